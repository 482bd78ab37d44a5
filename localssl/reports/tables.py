"""README tables generated from result files (STYLE principle 10).

``localssl report RUNS_DIR`` reads every run folder below RUNS_DIR (its
``config.yaml``, ``summary.json``, ``probe.json`` and
``probe-random-init.json``) and prints one Markdown table, so the numbers in
the README are never typed by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

COLUMNS = [
    ("paper", "linear, paper protocol"),
    ("fast_all", "linear, all layers (fast)"),
    ("fast_last", "linear, last layer (fast)"),
    ("knn_last", "kNN, last layer"),
]


def _acc(probe: dict[str, Any], key: str) -> str:
    v = probe.get(key)
    return f"{100 * v['test_acc']:.2f}" if isinstance(v, dict) and "test_acc" in v else "-"


def collect(runs_dir: str | Path) -> list[dict[str, Any]]:
    rows = []
    for cfg_path in sorted(Path(runs_dir).glob("*/config.yaml")):
        run = cfg_path.parent
        cfg = yaml.safe_load(cfg_path.read_text())
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        for stem, label in (("probe", cfg["rule"]), ("probe-random-init", "random-init")):
            if (run / f"{stem}.json").exists():
                probe = json.loads((run / f"{stem}.json").read_text())
                # A paper-protocol probe run separately (e.g. on a train subset,
                # `--protocols paper --out .../probe-paper.json`) joins the row.
                paper = run / f"{stem}-paper.json"
                if paper.exists():
                    extra = json.loads(paper.read_text())
                    probe["paper"] = extra["paper"]
                    probe["paper_num_train"] = extra.get("num_train")
                rows.append({"label": label, "run": run, "cfg": cfg, "summary": summary if stem == "probe"
                             else {}, "probe": probe})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    # Speed is left to `localssl bench`, measured side by side on a quiet machine.
    head = ["encoder / rule", *[c for _, c in COLUMNS], "pre-training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cfg, s, p = r["cfg"], r["summary"], r["probe"]
        if r["label"] == "random-init":
            budget = "none"
        else:
            n = cfg.get("subset") or "all"
            budget = f"{s.get('steps', '?')} steps x {cfg['batch_size']} images (of {n})"
        lines.append("| " + " | ".join([r["label"], *[_acc(p, k) for k, _ in COLUMNS], budget]) + " |")
    return "\n".join(lines)


def describe(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    cfg, p = r0["cfg"], r0["probe"]
    pc = p.get("probe_config", {})
    env = p.get("env", {})
    return (
        f"{cfg['dataset']}, {cfg['encoder']} width {cfg['width']}, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"seed {cfg['seed']}; probes on {p.get('num_train')} train / {p.get('num_test')} test images "
        f"(fast: {pc.get('epochs_fast')} epochs on frozen features; paper protocol: "
        f"{p.get('paper', {}).get('epochs', '-')} epochs with crop+flip on "
        f"{p.get('paper_num_train') or p.get('num_train')} train images; kNN k={pc.get('knn_k')}, "
        f"T={pc.get('knn_t')}). Hardware: {env.get('cpu')}, "
        f"{env.get('torch_threads')} threads, torch {env.get('torch')}."
    )


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown table of every run (and its probes) under a folder")
    p.add_argument("runs_dir")
    p.set_defaults(func=report_main)


def report_main(args: argparse.Namespace) -> int:
    rows = collect(args.runs_dir)
    if not rows:
        raise FileNotFoundError(f"no probed runs under {args.runs_dir} (run `localssl probe` first)")
    print(markdown_table(rows))
    print()
    print(describe(rows))
    return 0
