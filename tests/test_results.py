"""Probe results say what they measured; `localssl report` shows a result only while it still describes its run."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import yaml

from localssl.cli import main
from localssl.config import ConfigError, ProbeConfig, TrainConfig, load_yaml, replace
from localssl.engine.checkpoint import CHECKPOINT, load_checkpoint
from localssl.engine.trainer import train
from localssl.evaluation import run as run_mod
from localssl.reports.tables import collect, markdown_table, report_main

PROBE = ["--protocols", "knn", "--batch-size", "16"]


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(rule="clapp++global", dataset="shapes10", width=1 / 16, subset=64, batch_size=16, epochs=1,
                amp="off", progress=False, checkpoint_every=100, log_every=1, out=str(out), seed=1, max_steps=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A 2-step run, probed (kNN) and probed at random init: the state every test starts from (copied)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(tiny_cfg(run))
    assert main(["probe", str(run), *PROBE]) == 0
    assert main(["probe", str(run), "--random-init", *PROBE]) == 0
    return run


@pytest.fixture
def run(probed, tmp_path):
    dst = tmp_path / "runs" / "run"
    shutil.copytree(probed, dst)
    return dst


def _report(runs_dir):
    notes: list[str] = []
    rows = collect(runs_dir, notes)
    return rows, notes


def test_a_probe_records_the_step_and_hash_of_the_checkpoint_it_measured(run):
    result = json.loads((run / "probe.json").read_text())
    digest = hashlib.sha256((run / CHECKPOINT).read_bytes()).hexdigest()
    assert result["checkpoint"] == {"file": CHECKPOINT, "step": 2, "sha256": digest}
    random = json.loads((run / "probe-random-init.json").read_text())
    assert random["checkpoint"] is None and random["encoder"] == "vgg6" and random["width"] == 1 / 16
    rows, notes = _report(run.parent)
    assert notes == [] and [r["label"] for r in rows] == ["clapp++global", "random-init"]


def test_a_resumed_run_drops_the_results_of_its_earlier_checkpoint(run, capsys):
    cfg = replace(load_yaml(TrainConfig, run / "config.yaml"), max_steps=4, out=str(run))  # it was copied
    train(cfg, resume=True)
    assert load_checkpoint(run / CHECKPOINT)["step"] == 4
    rows, notes = _report(run.parent)
    # The trained result measured step 2; the random-init one still holds (same encoder shape).
    assert [r["label"] for r in rows] == ["random-init"]
    assert len(notes) == 1 and notes[0].startswith(f"dropped {run / 'probe.json'}: measured the checkpoint of step 2")
    assert "resumed or retrained since" in notes[0] and f"rerun `localssl probe {run}`" in notes[0]
    assert report_main(type("A", (), {"runs_dir": str(run.parent)})()) == 0
    assert "report: dropped" in capsys.readouterr().err
    assert main(["probe", str(run), *PROBE]) == 0  # probing again brings it back
    rows, notes = _report(run.parent)
    assert notes == [] and [r["label"] for r in rows] == ["clapp++global", "random-init"]


def test_another_rule_or_encoder_in_the_folder_drops_the_old_results(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(cfg | {"rule": "clapp++", "width": 0.125}))
    rows, notes = _report(run.parent)
    assert rows == []
    assert any("measured rule 'clapp++global', the run now holds 'clapp++'" in n for n in notes)
    assert any("measured a random-init width 0.0625, the run's is now 0.125" in n for n in notes)
    (run / CHECKPOINT).unlink()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    _, notes = _report(run.parent)
    assert any("and the run has no checkpoint.pt now" in n for n in notes)


def test_results_of_older_versions_are_shown_marked_unverified(run):
    for name in ("probe.json", "probe-random-init.json"):
        result = json.loads((run / name).read_text())
        for key in ("checkpoint", "encoder", "width"):
            result.pop(key)
        (run / name).write_text(json.dumps(result))
    rows, notes = _report(run.parent)
    assert notes == [] and [r["label"] for r in rows] == ["clapp++global †", "random-init †"]
    assert "| clapp++global † |" in markdown_table(rows)


@pytest.mark.parametrize("name, content, expected", [
    ("probe.json", "{not json", "skipped {run}/probe.json: cannot be read (JSONDecodeError"),
    ("probe.json", "[1, 2]", "skipped {run}/probe.json: expected a mapping, found list"),
    ("config.yaml", "rule: [unclosed", "skipped {run}/config.yaml: cannot be read (ParserError"),
    ("config.yaml", "rule: clapp++\n", "skipped {run}/config.yaml: no 'dataset', 'encoder', 'width', 'batch_size'"),
    ("summary.json", "\x00\x01", "skipped {run}/summary.json: cannot be read"),
])
def test_report_skips_unreadable_files_with_a_note_naming_them(run, name, content, expected):
    other = run.parent / "other"
    shutil.copytree(run, other)
    (run / name).write_text(content)
    rows, notes = _report(run.parent)
    assert any(n.startswith(expected.format(run=run)) for n in notes), notes
    assert any(r["run"] == other for r in rows)  # the other run is still in the table


def test_probe_into_a_folder_it_cannot_write_fails_before_computing(run, monkeypatch, capsys):
    def must_not_run(*a, **k):
        raise AssertionError("probed although the result could not be written")

    monkeypatch.setattr(run_mod, "run_probe", must_not_run)
    out = run / "summary.json" / "probe.json"  # a folder that is a file: no user can write there
    with pytest.raises(ConfigError, match=r"cannot write the probe result .*nothing was computed"):
        run_mod.probe_run(ProbeConfig(run=str(run), protocols=["knn"], out=str(out)))
    assert main(["probe", str(run), *PROBE, "--out", str(out)]) == 2
    assert "nothing was computed" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is not a folder"):
        run_mod.probe_run(ProbeConfig(run=str(run / "missing")))
    assert sorted(p.name for p in run.iterdir() if ".tmp" in p.name) == []
