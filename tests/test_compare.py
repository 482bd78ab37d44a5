"""``localssl compare``: every rule on equal terms, probed and measured alike, resumable (issue 11).

One comparison of two rules (blockwise Barlow Twins and its end-to-end
counterpart) on a ResNet-18 at width 1/16 with tiny heads, 3 steps on the
embedded shapes10, is run once through the command line; every test works
on a copy of its folder. The per-block probe itself is tested in
tests/test_evaluation.py and its report columns in tests/test_reports.py.
"""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml

from localssl.cli import build_parser, main, resolve_args
from localssl.config import CompareConfig, ConfigError, load_yaml, replace
from localssl.reports.compare import run_compare
from localssl.reports.compare.measure import baseline
from localssl.reports.compare.runs import train_config
from localssl.reports.tables import collect, markdown_table

RULES = ["blockwise-barlow", "bp-barlow"]
HEAD = ["expansion=16", "projector=32,32"]
ARGS = ["--rules", *RULES, "--encoder", "resnet18", "--width", "0.0625",
        "--rule-opt", *(f"{r}:{o}" for r in RULES for o in HEAD),
        "--dataset", "shapes10", "--subset", "64", "--budget", "3", "--batch-size", "16", "--amp", "off",
        "--probe-epochs", "5", "--probe-train-subset", "100", "--probe-test-subset", "100",
        "--measure-steps", "1", "--measure-warmup", "0", "--measure-rounds", "1"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "out"
    assert main(["compare", *ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture
def folder(compared, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(compared, dst)
    return dst


def _cfg(out, **kw) -> CompareConfig:
    """The comparison saved in ``out`` (as the command line resolved it), with ``kw`` changed."""
    return replace(load_yaml(CompareConfig, out / "compare.yaml"), out=str(out), **kw)


def _csv(out) -> list[dict[str, str]]:
    with open(out / "compare.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _forbid(monkeypatch, *names):
    def fail(*a, **k):
        raise AssertionError("nothing should be recomputed")

    for name in names:
        monkeypatch.setattr(name, fail)


TRAIN, PROBE = "localssl.engine.trainer.train", "localssl.evaluation.run.probe_run"
MEASURE = ("localssl.reports.bench.speed.measure_speed", "localssl.reports.bench.memory.measure_memory")


def test_compare_writes_one_row_per_rule_and_random_init_with_the_probe_files_numbers(compared):
    rows = _csv(compared)
    assert [r["rule"] for r in rows] == [*RULES, "random-init"]
    files = {r: compared / r / "probe.json" for r in RULES} | {
        "random-init": compared / RULES[0] / "probe-random-init.json"}
    keys = ["fast_all", "fast_last", *(f"fast_block_{k}" for k in (1, 2, 3, 4)), "knn_last"]
    for row in rows:
        probe = json.loads(files[row["rule"]].read_text())
        assert probe["probe_config"]["protocols"] == ["blocks", "fast", "knn"]
        for k in keys:
            assert row[k] == f"{100 * probe[k]['test_acc']:.2f}", (row["rule"], k)
    a, b, r = rows
    assert (a["local"], b["local"], r["local"]) == ("true", "false", "")
    assert (a["steps"], b["steps"], r["steps"]) == ("3", "3", "0")
    # Speed and memory: measured for both rules, against the end-to-end one; random-init does not train.
    assert float(a["images_per_s"]) > 0 and float(a["peak_activation_mib"]) > 0
    assert b["images_per_s_vs_bp"] == b["peak_activation_vs_bp"] == "1.000"
    assert r["images_per_s"] == r["peak_activation_mib"] == ""
    assert a["torch"] and a["hardware"] and a["device"] == "cpu"
    md = (compared / "compare.md").read_text()
    assert md.startswith("| rule | local | steps | linear, all layers (fast) | linear, last layer (fast) | "
                         "linear, block 1 (fast) |")
    assert f"| blockwise-barlow | yes | 3 | {a['fast_all']} |" in md
    assert "shapes10 (subset 64), resnet18 width 0.0625" in md and "budget 3 steps x 16 images" in md
    assert "vs bp-barlow" in md and f"torch {a['torch']}" in md and "5 epochs" in md
    assert (compared / "compare.png").stat().st_size > 0
    # The folder is ordinary runs: `localssl report` reads it, per-block columns included.
    table = markdown_table(collect(compared))
    assert "linear, block 4 (fast)" in table and "| random-init |" in table


def test_a_second_compare_recomputes_nothing_and_a_missing_matplotlib_only_skips_the_plot(folder, monkeypatch):
    before = _csv(folder)
    _forbid(monkeypatch, TRAIN, PROBE, *MEASURE)
    monkeypatch.setattr("localssl.reports.plots._plt", lambda: (_ for _ in ()).throw(
        RuntimeError("plots need matplotlib: pip install 'localssl[plots]'")))
    (folder / "compare.png").unlink()
    lines: list[str] = []
    result = run_compare(_cfg(folder), log=lines.append)
    assert _csv(folder) == before
    assert lines[:3] == [f"[1/3] {RULES[0]}: training skipped: finished (3 steps); probe skipped: up to date",
                         f"[2/3] {RULES[1]}: training skipped: finished (3 steps); probe skipped: up to date",
                         "[3/3] random-init: probe skipped: up to date"]
    assert result["png"] is None and not (folder / "compare.png").exists()
    assert any(line.startswith("compare.png skipped: plots need matplotlib") for line in lines)


def test_without_measurements_the_speed_and_memory_cells_are_empty(folder, monkeypatch):
    _forbid(monkeypatch, TRAIN, PROBE, *MEASURE)
    run_compare(_cfg(folder, measure=False), log=lambda msg: None)
    rows = _csv(folder)
    assert all(r["images_per_s"] == r["peak_activation_mib"] == "" for r in rows) and rows[0]["torch"]
    assert "train img/s and activation memory: not measured" in (folder / "compare.md").read_text()


def test_deleting_one_probe_result_reprobes_only_that_run(folder, monkeypatch):
    before = _csv(folder)
    (folder / RULES[1] / "probe.json").unlink()
    _forbid(monkeypatch, TRAIN, *MEASURE)
    import localssl.evaluation.run as run_mod

    probed = []
    real = run_mod.probe_run
    monkeypatch.setattr(run_mod, "probe_run", lambda cfg: probed.append(cfg.run) or real(cfg))
    run_compare(_cfg(folder), log=lambda msg: None)
    assert probed == [str(folder / RULES[1])]
    assert _csv(folder) == before  # the probe is deterministic: the same numbers again


def test_a_longer_budget_resumes_every_run_and_reprobes_it(folder, monkeypatch):
    import localssl.engine.trainer as trainer_mod

    calls = []
    real = trainer_mod.train
    monkeypatch.setattr(trainer_mod, "train", lambda cfg, resume=False: calls.append((cfg.rule, resume))
                        or real(cfg, resume))
    _forbid(monkeypatch, *MEASURE)  # a step's speed and memory do not depend on how long it trained
    lines: list[str] = []
    run_compare(_cfg(folder, budget=5), log=lines.append)
    assert calls == [(r, True) for r in RULES]
    assert f"[1/3] {RULES[0]}: resuming at step 3, training to 5 ..." in lines
    assert "[3/3] random-init: probe skipped: up to date" in lines
    rows = _csv(folder)
    assert [r["steps"] for r in rows] == ["5", "5", "0"]
    for rule in RULES:
        assert json.loads((folder / rule / "probe.json").read_text())["checkpoint"]["step"] == 5


def test_a_folder_holding_a_run_with_other_settings_is_refused_naming_them(folder, monkeypatch):
    _forbid(monkeypatch, TRAIN, PROBE, *MEASURE)
    with pytest.raises(ConfigError, match=r"blockwise-barlow holds a run with other settings .*lr: run has 0.0002, "
                                          r"asked 0.001.*another --out"):
        run_compare(_cfg(folder, lr=1e-3), log=lambda msg: None)


def test_compare_config_from_yaml_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rules": RULES, "budget": 10, "rule_options": {
        "bp-barlow": {"expansion": 32, "lambd": 0.01}}}))
    args = build_parser().parse_args(["compare", "--config", str(path), "--rule-opt", "bp-barlow:expansion=8",
                                      "blockwise-barlow:noise=0.25"])
    cfg = resolve_args(CompareConfig, args)
    assert cfg.rules == RULES and cfg.budget == 10
    assert cfg.rule_options == {"bp-barlow": {"expansion": "8", "lambd": 0.01}, "blockwise-barlow": {"noise": "0.25"}}
    assert train_config(cfg, "bp-barlow").rule_options["expansion"] == 8  # typed by the rule's options
    path.write_text(yaml.safe_dump({"rules": RULES, "budgett": 10}))
    with pytest.raises(ConfigError, match="unknown CompareConfig key.*budgett.*valid keys: .*budget"):
        load_yaml(CompareConfig, path)
    for bad, match in (({"rules": []}, "needs --rules"), ({"budget": None}, "needs --budget"),
                       ({"rules": ["loco", "loco"]}, "listed twice"),
                       ({"rule_options": {"loco": {"overlap": 2}}}, "rule_options for loco, which is not compared"),
                       ({"rule_options": {"bp-barlow:expansion": -1}}, "expansion")):
        with pytest.raises(ConfigError, match=match):
            run_compare(replace(cfg, out=str(tmp_path / "never"), **bad))
    assert not (tmp_path / "never").exists()  # checked before anything is written


def test_the_baseline_of_local_rules_alone_is_their_bp_counterpart_with_their_head():
    cfg = CompareConfig(rules=["blockwise-barlow"], encoder="resnet18", width=1 / 16, budget=1,
                        rule_options={"blockwise-barlow": {"expansion": 16, "noise": 0.25}})
    rule, options = baseline({"blockwise-barlow": train_config(cfg, "blockwise-barlow")})
    assert rule == "bp-barlow" and options["expansion"] == 16 and "noise" not in options


def test_every_rule_trains_with_the_comparisons_optimizer_and_schedule():
    from localssl.reports.compare.runs import train_config

    cfg = CompareConfig(rules=["blockwise-barlow", "bp-barlow"], encoder="resnet18", width=1 / 16, budget=4,
                        optimizer="lars", momentum=0.8, lr=0.2, weight_decay=1e-6, lr_schedule="cosine",
                        warmup_steps=1, min_lr=0.01)
    for rule in cfg.rules:
        t = train_config(cfg, rule)
        assert (t.optimizer, t.momentum, t.lr, t.weight_decay, t.lr_schedule, t.warmup_steps, t.min_lr) == (
            "lars", 0.8, 0.2, 1e-6, "cosine", 1, 0.01)
    assert train_config(CompareConfig(rules=["loco"], budget=1), "loco").optimizer == "adamw"


def test_a_recipe_gives_one_rule_its_own_encoder_and_input(tmp_path):
    # The patch rules run on a patched encoder: a recipe says so for them alone, and nothing else of theirs differs.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rules": ["clapp++global", "gim"], "budget": 2, "encoder_options": {"pool": "max"},
                                    "recipes": {"gim": {"encoder": "vgg6-patches", "resize": 48}}}))
    args = build_parser().parse_args(["compare", "--config", str(path), "--recipe", "gim:encoder_options.patch=16",
                                      "--rule-opt", "gim:crop=32"])
    with pytest.raises(ConfigError):  # vgg6 takes no option "pool": the shared encoder's options are checked
        train_config(resolve_args(CompareConfig, args), "clapp++global")
    path.write_text(yaml.safe_dump({"rules": ["clapp++global", "gim"], "budget": 2, "encoder_options": {},
                                    "recipes": {"gim": {"encoder": "vgg6-patches", "resize": 48}}}))
    cfg = resolve_args(CompareConfig, args)
    assert cfg.recipes == {"gim": {"encoder": "vgg6-patches", "resize": 48, "encoder_options": {"patch": "16"}}}
    own, shared = train_config(cfg, "gim"), train_config(cfg, "clapp++global")
    assert (own.encoder, own.resize, own.encoder_options["patch"]) == ("vgg6-patches", 48, 16)
    assert own.grids == [5] * 6 and shared.grids == [8, 4, 4, 4, 2, 2]  # each encoder's own grids, at its size
    assert (shared.encoder, shared.resize) == ("vgg6", None)
    assert (own.lr, own.max_steps, own.batch_size, own.seed) == (shared.lr, shared.max_steps, shared.batch_size,
                                                                 shared.seed)
    for bad, match in (({"recipes": {"gim": {"lr": 1.0}}}, r"recipes of gim: unknown key 'lr'; valid: encoder"),
                       ({"recipes": {"gim": {"rule_options.crop": 1}}}, "unknown key"),
                       ({"recipes": {"loco": {"width": 0.5}}}, "recipes for loco, which is not compared")):
        with pytest.raises(ConfigError, match=match):
            run_compare(replace(cfg, out=str(tmp_path / "never"), **bad))


def test_rules_of_another_recipe_get_their_own_random_init_row_and_baseline(tmp_path):
    out = tmp_path / "out"
    assert main(["compare", "--rules", "clapp++global", "gim", "--width", "0.0625",
                 "--recipe", "gim:encoder=vgg6-patches", "--rule-opt", "gim:crop=32", "--dataset", "shapes10",
                 "--subset", "64", "--budget", "1", "--batch-size", "16", "--amp", "off", "--probes", "fast",
                 "--probe-epochs", "2", "--probe-train-subset", "50", "--probe-test-subset", "50",
                 "--measure-steps", "1", "--measure-warmup", "0", "--measure-rounds", "1", "--out", str(out)]) == 0
    rows = {r["rule"]: r for r in _csv(out)}
    assert list(rows) == ["clapp++global", "gim", "random-init", "random-init (gim)"]
    own = json.loads((out / "gim" / "probe-random-init.json").read_text())
    assert own["random_init"] and own["encoder"] == "vgg6-patches"
    measured = json.loads((out / "measurements.json").read_text())
    # Each rule against the end-to-end rule of its own recipe: never a ratio across two encoders.
    assert measured["rules"]["clapp++global"]["baseline"] == "bp-clapp++"
    assert measured["rules"]["gim"]["baseline"] == "bp-cpc"
    gim = measured["rules"]["gim"]
    assert float(rows["gim"]["images_per_s_vs_bp"]) == pytest.approx(
        gim["images_per_s"] / measured["rules"]["bp-cpc"]["images_per_s"], abs=1e-3)
    md = (out / "compare.md").read_text()
    assert "own recipes (encoder and input) gim: encoder=vgg6-patches" in md and "(gim vs bp-cpc)" in md
