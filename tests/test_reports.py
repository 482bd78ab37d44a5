"""The demo end to end (tiny), and README tables generated from result files."""
from __future__ import annotations

import json

import yaml

from localssl.config import TrainConfig, to_dict
from localssl.reports.demo import run_demo
from localssl.reports.tables import collect, markdown_table


def test_demo_runs_end_to_end_and_writes_table_and_plot(tmp_path, capsys):
    out = run_demo(tmp_path / "demo", epochs=1, width=1 / 16, subset=64, progress=False)
    printed = capsys.readouterr().out
    assert {"clapp++", "bp-infonce", "random-init"} == set(out["accuracy"])
    for name in out["accuracy"]:
        assert name in printed
        assert all(0 <= v <= 100 for v in out["accuracy"][name].values())
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 1000
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["accuracy_percent"] == out["accuracy"]


def test_report_table_comes_from_the_result_files(tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(TrainConfig(rule="clapp++", subset=1000))))
    (run / "summary.json").write_text(json.dumps({"steps": 31, "images_per_s": 12.0}))
    probe = {"fast_all": {"test_acc": 0.5123}, "fast_last": {"test_acc": 0.25}, "knn_last": {"test_acc": 0.2}}
    (run / "probe.json").write_text(json.dumps(probe))
    (run / "probe-paper.json").write_text(json.dumps({"paper": {"test_acc": 0.6}, "num_train": 100}))
    (run / "probe-random-init.json").write_text(json.dumps(probe | {"fast_all": {"test_acc": 0.4}}))
    rows = collect(tmp_path / "runs")
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[2].startswith("| clapp++ | 60.00 | 51.23 | 25.00 | 20.00 | 31 steps x 32 images (of 1000)")
    assert lines[3].startswith("| random-init | - | 40.00 |")
