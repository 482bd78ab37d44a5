"""``localssl demo``: the whole pipeline in a few minutes, offline, on 2 CPU cores.

Trains CLAPP++ (local) and BP-InfoNCE (end-to-end) on the embedded
``shapes10`` data set with the same encoder and budget, probes both and a
random-init encoder of the same shape, prints a table and writes a plot of
the learning curves.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from localssl.config import ProbeConfig, TrainConfig
from localssl.engine.metrics import read_metrics

PROBES = {"fast_all": "linear, all layers", "fast_last": "linear, last layer", "knn_last": "kNN, last layer"}


def run_demo(
    out: str | Path = "runs/demo",
    rules: tuple[str, ...] = ("clapp++", "bp-infonce"),
    epochs: int = 6,
    width: float = 0.125,
    subset: int | None = None,
    lr: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    from localssl.engine.trainer import train
    from localssl.evaluation.run import probe_run
    from localssl.reports.plots import learning_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    curves = {}
    first_run = None
    for rule in rules:
        run_dir = out / rule
        if (run_dir / "config.yaml").exists():
            shutil.rmtree(run_dir)  # the demo owns its run folders
        cfg = TrainConfig(rule=rule, dataset="shapes10", width=width, epochs=epochs, subset=subset, lr=lr,
                          seed=seed, out=str(run_dir), progress=progress, log_every=10, checkpoint_every=10_000)
        t = time.perf_counter()
        train(cfg)
        train_s = time.perf_counter() - t
        summary = json.loads((run_dir / "summary.json").read_text())
        probe, _ = probe_run(ProbeConfig(run=str(run_dir), protocols=["fast", "knn"], epochs_fast=60, seed=seed))
        results[rule] = {"probe": probe, "train_seconds": train_s, "images_per_s": summary["images_per_s"]}
        curves[rule] = read_metrics(run_dir / "metrics.jsonl")
        first_run = first_run or run_dir
    probe, _ = probe_run(ProbeConfig(run=str(first_run), random_init=True, protocols=["fast", "knn"],
                                     epochs_fast=60, seed=seed, out=str(out / "probe-random-init.json")))
    results["random-init"] = {"probe": probe}

    accs = {name: {PROBES[k]: 100 * r["probe"][k]["test_acc"] for k in PROBES} for name, r in results.items()}
    plot = learning_curves({f"{r} (shapes10)": curves[r] for r in rules}, out / "demo.png", accs)
    (out / "results.json").write_text(json.dumps({"accuracy_percent": accs, "runs": {
        k: {kk: vv for kk, vv in v.items() if kk != "probe"} for k, v in results.items()}}, indent=2))
    print(format_table(accs, results, epochs))
    print(f"\nplot: {plot}\nresults: {out / 'results.json'}")
    return {"accuracy": accs, "plot": str(plot)}


def format_table(accs: dict[str, dict[str, float]], results: dict[str, Any], epochs: int) -> str:
    cols = list(PROBES.values())
    head = f"{'encoder':<14}" + "".join(f"{c:>22}" for c in cols) + f"{'train img/s':>14}"
    lines = [f"shapes10 test accuracy (%), {epochs} epochs of pre-training, same encoder and budget", head,
             "-" * len(head)]
    for name, a in accs.items():
        ips = results[name].get("images_per_s")
        lines.append(f"{name:<14}" + "".join(f"{a[c]:>22.1f}" for c in cols) + (f"{ips:>14.0f}" if ips else
                                                                               f"{'-':>14}"))
    return "\n".join(lines)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train CLAPP++ and BP-InfoNCE briefly on embedded data, probe, plot")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW lr (the paper's 2e-4 is for 300 epochs)")
    p.add_argument("--subset", type=int, default=None, help="pre-train on this many images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=lambda a: run_demo(a.out, epochs=a.epochs, width=a.width, subset=a.subset, lr=a.lr,
                                           seed=a.seed, progress=a.progress) and 0)
