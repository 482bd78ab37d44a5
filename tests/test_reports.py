"""README tables generated from result files (the demo: tests/test_demo.py)."""
from __future__ import annotations

import hashlib
import json

import yaml

from localssl.config import TrainConfig, to_dict
from localssl.reports.tables import collect, describe, markdown_table


def _run(root, name: str, probe: dict, extra: dict | None = None, extra_random: dict | None = None):
    """A run folder with probe results that match its checkpoint (tests/test_results.py: when they do not)."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    cfg = TrainConfig(rule="clapp++", subset=1000)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (run / "summary.json").write_text(json.dumps({"steps": 31, "images_per_s": 12.0}))
    (run / "checkpoint.pt").write_bytes(b"weights")
    measured = {"checkpoint": {"file": "checkpoint.pt", "step": 31, "sha256": hashlib.sha256(b"weights").hexdigest()},
                "rule": "clapp++", "random_init": False}
    random = {"checkpoint": None, "random_init": True, "encoder": cfg.encoder, "width": cfg.width}
    (run / "probe.json").write_text(json.dumps(probe | measured))
    if extra is not None:
        (run / "probe-paper.json").write_text(json.dumps(extra | measured))
    (run / "probe-random-init.json").write_text(json.dumps(probe | {"fast_all": {"test_acc": 0.4}} | random))
    if extra_random is not None:
        (run / "probe-random-init-paper.json").write_text(json.dumps(extra_random | random))
    return run


FAST = {"fast_all": {"test_acc": 0.5123}, "fast_last": {"test_acc": 0.25}, "knn_last": {"test_acc": 0.2}}


def test_report_table_comes_from_the_result_files(tmp_path):
    paper = {"test_acc": 0.6, "test_acc_final": 0.6, "test_acc_best": 0.625, "best_epoch": 2, "epochs": 3,
             "reference_epochs": 300, "normalization": "none"}
    _run(tmp_path, "a", FAST, extra={"paper": paper, "num_train": 100})
    rows = collect(tmp_path / "runs")
    lines = markdown_table(rows).splitlines()
    assert lines[0].startswith("| encoder / rule | linear, paper protocol, final | linear, paper protocol, best "
                               "(epoch) | linear, all layers (fast) |")
    assert "paper-bn" not in lines[0]  # no such probe, no column
    assert lines[2].startswith("| clapp++ | 60.00 | 62.50 (2 of 3) | 51.23 | 25.00 | 20.00 | 31 steps x 32 images "
                               "(of 1000)")
    assert lines[3].startswith("| random-init | - | - | 40.00 |")
    text = describe(rows)
    assert "3 epochs (the paper: 300) on 100 train images" in text
    assert "final = after the last epoch" in text and "paper-bn" not in text


def test_report_reads_an_older_paper_probe_as_paper_bn(tmp_path):
    # Before the paper's own probe existed, "paper" held the BatchNorm + pad-4 probe.
    old = {"test_acc": 0.58, "epochs": 3, "padding": 4, "normalization": "batchnorm1d_no_affine"}
    new = {"test_acc": 0.5, "test_acc_final": 0.5, "test_acc_best": 0.55, "best_epoch": 1, "epochs": 2,
           "reference_epochs": 300, "normalization": "none"}
    _run(tmp_path, "a", FAST, extra={"paper": old, "num_train": 100},
         extra_random={"paper": new, "paper-bn": old | {"test_acc": 0.4}, "num_train": 50})
    rows = collect(tmp_path / "runs")
    lines = markdown_table(rows).splitlines()
    assert lines[0].split(" | ")[-2] == "linear, paper-bn (ours)"
    assert lines[2].startswith("| clapp++ | - | - | 51.23 | 25.00 | 20.00 | 58.00 |")
    assert lines[3].startswith("| random-init | 50.00 | 55.00 (1 of 2) | 40.00 | 25.00 | 20.00 | 40.00 |")
    text = describe(rows)
    assert "2 epochs (the paper: 300) on 50 train images" in text
    assert "paper-bn (ours, not the paper's" in text and "3 epochs on 100 train images / 3 epochs on 50" in text


def test_report_shows_the_per_block_probes_where_a_run_has_them(tmp_path):
    blocks = {f"fast_block_{k}": {"test_acc": 0.1 * k} for k in (1, 2, 3)}
    _run(tmp_path, "a", FAST | blocks)
    _run(tmp_path, "b", FAST)  # probed without the blocks protocol: its cells are "-"
    rows = collect(tmp_path / "runs")
    lines = markdown_table(rows).splitlines()
    head = lines[0].split(" | ")
    last = head.index("linear, last layer (fast)")
    assert head[last + 1:last + 4] == [f"linear, block {k} (fast)" for k in (1, 2, 3)]
    assert head[last + 4] == "kNN, last layer"
    assert lines[2].startswith("| clapp++ | - | - | 51.23 | 25.00 | 10.00 | 20.00 | 30.00 | 20.00 |")
    assert lines[4].startswith("| clapp++ | - | - | 51.23 | 25.00 | - | - | - | 20.00 |")
    assert "Block k (fast): the same linear probe on block k's output alone" in describe(rows)
    rows = collect(tmp_path / "runs")[2:]  # run b alone: no block columns
    assert "block 1" not in markdown_table(rows) and "Block k" not in describe(rows)
