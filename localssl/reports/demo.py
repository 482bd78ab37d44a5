"""``localssl demo``: the whole pipeline in a few minutes, offline, on 2 CPU cores.

Trains CLAPP++ (local: every block learns from its own loss) and BP-InfoNCE
(end-to-end) on the embedded ``shapes10`` data set with the same encoder,
data, augmentations, optimizer and budget; probes both, and a random-init
encoder of the same shape (the very weights CLAPP++ started from), with the
same probes; measures, in the same process, each rule's peak activation
memory per training step; prints one table and writes a plot of the learning
curves and ``results.json``.

The budget (README, "The demo"): width 0.125, 12 epochs of 156 steps of 32
images, AdamW lr 1e-3, fp32, for both rules. It was chosen by measuring, not
by tuning the probes (the probes are the fixed ``fast`` and ``knn``
protocols of `localssl.evaluation`, the same for every encoder):

- *Steps limit a short local run, not the data or the width.* At 6 epochs
  (936 steps, lr 5e-4) the local losses had barely left their starting
  value and up to 40% of the top block's units never fired: CLAPP++'s
  last-layer probes were below the random encoder's. A local block learns
  on the output of the block below, which keeps changing, so the top of the
  network starts to learn late; more steps and lr 1e-3 lift every probe
  well above random-init. A wider encoder in the same time did not
  (fewer steps, and wide random features are strong: METHODS 2.5).
- *fp32 by default.* ``--amp auto`` takes bf16 on CPUs with native bf16,
  which would make the printed numbers depend on the CPU. The accuracies
  come out alike in both precisions, but bf16 speeds up the end-to-end step
  more than the local one on a CPU, so the speed ratio would change too.
  ``--amp auto`` is there for speed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localssl.config import AMP_MODES, ProbeConfig, TrainConfig
from localssl.engine.metrics import read_metrics
from localssl.rules import DEMO_RULES  # what the demo trains: a local rule, then its end-to-end counterpart

DEMO_DATASET = "shapes10"
DEMO_EPOCHS = 12
DEMO_WIDTH = 0.125
DEMO_LR = 1e-3
DEMO_AMP = "off"
#: Epochs of the fast linear protocol; the same for every encoder.
PROBE_EPOCHS = 60
RANDOM_INIT = "random-init"

PROBES = {"fast_all": "linear, all layers", "fast_last": "linear, last layer", "knn_last": "kNN, last layer"}
#: Short column heads for the printed table, in the order of PROBES.
_PROBE_HEADS = ("lin. all", "lin. last", "kNN last")


def measure_step_memory(cfg: TrainConfig, batch: Any) -> dict[str, Any]:
    """Peak bytes that autograd holds for backward in one training step of ``cfg.rule``.

    The step is the trainer's (`localssl.engine.trainer.train_step`, built as
    ``localssl bench`` builds it) on SimCLR views of ``batch`` (uint8 images
    of the data set), counted with ``bench``'s `SavedBytesTracker`:
    activations only, parameters (conv weights, B) apart. The figure depends
    on shapes, not on weight values, so an untrained copy gives the same
    number as the trained encoder. Also returns the floor of per-block
    training (the largest block trained alone, `encoder_block_bytes`).
    """
    import numpy as np
    import torch

    from localssl.data import dataset_spec
    from localssl.data.augment import SimCLRViews
    from localssl.engine.runtime import resolve_amp, resolve_device
    from localssl.evaluation.linear import seeded
    from localssl.reports.bench import SavedBytesTracker, build_state, encoder_block_bytes

    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    spec = dataset_spec(cfg.dataset)
    crop = tuple(cfg.crop_scale) if cfg.crop_scale else spec.crop_scale
    images = torch.from_numpy(np.array(batch, copy=True)).to(device)  # a writable copy of a read-only slice
    with seeded(cfg.seed, device):  # the same views for every rule, the caller's RNG untouched
        views = SimCLRViews(images.shape[1], spec.mean, spec.std, crop_scale=crop).to(device)(images)
        state = build_state(cfg.rule, cfg.encoder, cfg.width, images.shape[1], device, amp_dtype,
                            cfg.channels_last, cfg.seed, cfg.micro_batch, encoder_options=cfg.encoder_options,
                            rule_options=cfg.rule_options)
    views = views.contiguous(memory_format=state.memory_format)
    params = list(state.encoder.parameters()) + list(state.rule.parameters())
    tracker = SavedBytesTracker(params)
    with tracker:
        state.step(views, with_optimizer=False)
    per_block, bp_total = encoder_block_bytes(state.encoder, views, amp_dtype)
    return {
        "peak_saved_activation_bytes": tracker.peak_bytes,
        "group_peaks": tracker.group_peaks,
        "local": bool(state.rule.local),
        "groups": len(state.rule.groups()),
        "floor_bytes": max(per_block),
        "bp_encoder_bytes": bp_total,
        "views": int(views.shape[0]),
    }


def training_speed(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> float:
    """Training images/s of a run: the median over its logging windows (``metrics.jsonl``).

    The median leaves out the first window (one-off kernel set-up) and bursts
    of load from other processes, which the whole-run mean
    (``summary.json``) keeps; with a single window it is the mean.
    """
    speeds = sorted(r["images_per_s"] for r in rows if "images_per_s" in r)
    if len(speeds) < 2:
        return float(summary["images_per_s"])
    mid = len(speeds) // 2
    return float(speeds[mid] if len(speeds) % 2 else 0.5 * (speeds[mid - 1] + speeds[mid]))


def run_demo(
    out: str | Path = "runs/demo",
    rules: Sequence[str] = DEMO_RULES,
    epochs: int = DEMO_EPOCHS,
    width: float = DEMO_WIDTH,
    subset: int | None = None,
    lr: float = DEMO_LR,
    seed: int = 0,
    amp: str = DEMO_AMP,
    threads: int | None = None,
    progress: bool = True,
    probe_epochs: int = PROBE_EPOCHS,
    probe_subset: int | None = None,
) -> dict[str, Any]:
    """Train ``rules`` on ``shapes10`` with one budget, probe them and a random-init encoder, print the table.

    Every rule gets the same encoder (VGG-6 at ``width``), seed, data,
    augmentations, AdamW and number of steps. ``probe_epochs`` and
    ``probe_subset`` (class-balanced train and test subsets) exist for fast
    tests; the demo itself probes the full splits with `PROBE_EPOCHS`.

    Returns ``{"accuracy": {encoder: {probe: %}}, "table": str, "plot": str,
    "results": str}``.
    """
    from localssl.data import dataset_spec, load_dataset
    from localssl.engine.runtime import environment_info, resolve_device
    from localssl.engine.trainer import train
    from localssl.evaluation.run import probe_run
    from localssl.reports.plots import learning_curves

    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {amp!r}; valid: {', '.join(AMP_MODES)}")
    if not rules:
        raise ValueError("the demo needs at least one rule to train")
    t_demo = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def probe(run_dir: Path, **kw: Any) -> dict[str, Any]:
        cfg = ProbeConfig(run=str(run_dir), protocols=["fast", "knn"], epochs_fast=probe_epochs, seed=seed, amp=amp,
                          train_subset=probe_subset, test_subset=probe_subset, **kw)
        t = time.perf_counter()
        result, _ = probe_run(cfg)
        seconds["probes"] += time.perf_counter() - t
        return result

    seconds = {"training": 0.0, "probes": 0.0, "memory": 0.0}
    results: dict[str, dict[str, Any]] = {}
    curves = {}
    configs: dict[str, TrainConfig] = {}
    for rule in rules:
        run_dir = out / rule
        if (run_dir / "config.yaml").exists():
            shutil.rmtree(run_dir)  # the demo owns its run folders
        cfg = TrainConfig(rule=rule, dataset=DEMO_DATASET, width=width, epochs=epochs, subset=subset, lr=lr,
                          seed=seed, amp=amp, threads=threads, out=str(run_dir), progress=progress, log_every=10,
                          checkpoint_every=10_000)
        t = time.perf_counter()
        train(cfg)
        seconds["training"] += time.perf_counter() - t
        summary = json.loads((run_dir / "summary.json").read_text())
        curves[rule] = read_metrics(run_dir / "metrics.jsonl")
        results[rule] = {"probe": probe(run_dir), "train_seconds": summary["seconds_this_session"],
                         "images_per_s": training_speed(curves[rule], summary),
                         "images_per_s_whole_run": summary["images_per_s"], "steps": summary["steps"],
                         "images_seen": summary["images_seen_this_session"], "precision": summary["amp"]}
        configs[rule] = cfg
    first = configs[rules[0]]
    # The same weights the first rule started from: train() seeds torch and builds the encoder first.
    results[RANDOM_INIT] = {"probe": probe(Path(first.out), random_init=True,
                                           out=str(out / "probe-random-init.json"))}

    t = time.perf_counter()
    spec = dataset_spec(DEMO_DATASET)
    pretrain = load_dataset(DEMO_DATASET, None, spec.pretrain_split, max_items=subset)
    batch = pretrain.images[: first.batch_size]
    for rule in rules:
        results[rule]["memory"] = measure_step_memory(configs[rule], batch)
    seconds["memory"] = time.perf_counter() - t

    accs = {name: {PROBES[k]: 100 * r["probe"][k]["test_acc"] for k in PROBES} for name, r in results.items()}
    ref = next((r for r in rules if not results[r]["memory"]["local"]), None)
    env = environment_info(resolve_device(first.device))
    p0 = results[RANDOM_INIT]["probe"]
    info = {
        "dataset": DEMO_DATASET,
        "pretrain_images": len(pretrain),
        "steps_per_epoch": len(pretrain) // first.batch_size,
        "epochs": epochs,
        "steps": results[rules[0]]["steps"],
        "batch_size": first.batch_size,
        "images_seen": results[rules[0]]["images_seen"],
        "lr": lr,
        "width": width,
        "encoder": first.encoder,
        "amp": amp,
        "precision": results[rules[0]]["precision"],
        "seed": seed,
        "probe_epochs": probe_epochs,
        "probe_train": p0["num_train"],
        "probe_test": p0["num_test"],
        "feature_dims": {"all": p0["feature_dims"]["all"], "last": p0["feature_dims"]["last"]},
        "knn_k": p0["knn_last"]["k"],
        "reference": ref,
        "env": env,
    }
    seconds["total"] = time.perf_counter() - t_demo
    table = format_table(accs, results, info, seconds)
    plot = learning_curves({f"{r} ({DEMO_DATASET})": curves[r] for r in rules}, out / "demo.png", accs)
    runs = {k: {kk: vv for kk, vv in v.items() if kk != "probe"} for k, v in results.items()}
    (out / "results.json").write_text(json.dumps({"accuracy_percent": accs, "runs": runs, "budget": info,
                                                  "seconds": seconds}, indent=2))
    print(table)
    print(f"\nplot: {plot}\nresults: {out / 'results.json'}")
    return {"accuracy": accs, "table": table, "plot": str(plot), "results": str(out / "results.json")}


def _precision_text(info: dict[str, Any]) -> str:
    if info["amp"] == "off":
        return "fp32 (--amp off: the same precision on every CPU)"
    if info["precision"] == "None":
        return f"fp32 (--amp {info['amp']}: no native bf16 here)"
    return f"bf16 autocast (--amp {info['amp']})"


def _minutes(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s"


def format_table(accs: dict[str, dict[str, float]], results: dict[str, dict[str, Any]], info: dict[str, Any],
                 seconds: dict[str, float] | None = None) -> str:
    """The demo's printed report: budget, hardware, one row per encoder, gains over random-init.

    ``accs``: encoder -> {probe name of `PROBES`: test accuracy in %};
    ``results``: encoder -> its ``images_per_s`` and ``memory`` (trained
    rules; random-init has neither); ``info``: the budget and environment
    (`run_demo` fills it).
    """
    probes = list(PROBES.values())
    ref = info.get("reference")
    ref_ips = results[ref]["images_per_s"] if ref else None
    ref_mem = results[ref]["memory"]["peak_saved_activation_bytes"] if ref else None
    head = (f"{'encoder':<12} {'kind':<16}" + "".join(f"{h:>10}" for h in _PROBE_HEADS)
            + f"{'train img/s':>13}{'vs BP':>7}{'act. MiB/step':>15}{'vs BP':>7}")
    env = info["env"]
    dims = info["feature_dims"]
    lines = [
        f"localssl demo: {info['dataset']} ({info['pretrain_images']:,} train images, 10 shape classes in random "
        "colours, positions and sizes)",
        f"budget: {info['epochs']} epochs x {info['steps_per_epoch']} steps x {info['batch_size']} images = "
        f"{info['steps']:,} steps, {info['images_seen']:,} images seen, the same for every rule; "
        f"AdamW lr {info['lr']:g}, seed {info['seed']}",
        f"encoder: {info['encoder']} width {info['width']:g}; precision: {_precision_text(info)}",
        f"hardware: {env.get('cpu', '?')}, {env.get('cpu_count', '?')} CPUs, torch threads "
        f"{env.get('torch_threads', '?')}{', ' + str(env['gpu']) if env.get('gpu') else ''}; torch "
        f"{env.get('torch', '?')}",
        f"probes (the same for every encoder, test accuracy %, {info['probe_train']:,} train / "
        f"{info['probe_test']:,} test images): linear on all layers ({dims['all']:,} dims) and "
        f"on the last layer ({dims['last']} dims, global pool), {info['probe_epochs']} epochs of Adam on frozen "
        f"features; kNN (k={info['knn_k']}) on the last layer",
        "",
        head,
        "-" * len(head),
    ]
    for name, a in accs.items():
        r = results.get(name, {})
        mem = r.get("memory")
        ips = r.get("images_per_s")
        if mem is None:
            kind = "untrained"
        elif mem["local"]:
            kind = f"local, {mem['groups']} blocks"
        else:
            kind = "end-to-end"
        row = f"{name:<12} {kind:<16}" + "".join(f"{a[p]:>10.1f}" for p in probes)
        row += f"{ips:>13.0f}" if ips else f"{'-':>13}"
        row += f"{ips / ref_ips:>6.2f}x" if ips and ref_ips else f"{'-':>7}"
        if mem is not None:
            b = mem["peak_saved_activation_bytes"]
            row += f"{b / 2**20:>15.2f}" + (f"{b / ref_mem:>6.2f}x" if ref_mem else f"{'-':>7}")
        else:
            row += f"{'-':>15}{'-':>7}"
        lines.append(row)
    base = accs.get(RANDOM_INIT)
    if base is not None:
        lines.append("")
        for name, a in accs.items():
            if name != RANDOM_INIT:
                gains = ", ".join(f"{a[p] - base[p]:+.1f}" for p in probes)
                lines.append(f"{name} vs random-init (points, {' / '.join(_PROBE_HEADS)}): {gains}")
    lines.append("")
    lines.append("train img/s: median over the run's logging windows of 10 steps (augmentation included); the "
                 "rules ran one after the other, `localssl bench` interleaves them for steadier ratios.")
    mems = [r["memory"] for r in results.values() if r.get("memory")]
    if mems:
        m = mems[0]
        lines.append(f"act. MiB/step: peak bytes autograd holds for backward in one step of {m['views']} views "
                     f"(parameters apart); per-block floor (largest block alone) {m['floor_bytes'] / 2**20:.2f} MiB"
                     + (f" = {m['floor_bytes'] / ref_mem:.2f}x BP." if ref_mem else "."))
    if seconds:
        lines.append(f"wall time: {_minutes(seconds['total'])} (training {_minutes(seconds['training'])}, "
                     f"probes {_minutes(seconds['probes'])}, memory {seconds['memory']:.1f}s)")
    return "\n".join(lines)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train CLAPP++ and BP-InfoNCE briefly on embedded data, probe, plot")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                   help=f"pre-training epochs of 5,000 images (default {DEMO_EPOCHS}; at 6 the local rule is "
                        "still below random-init on the last layer)")
    p.add_argument("--width", type=float, default=DEMO_WIDTH)
    p.add_argument("--lr", type=float, default=DEMO_LR, help="AdamW lr (the paper's 2e-4 is for 300 epochs)")
    p.add_argument("--amp", choices=AMP_MODES, default=DEMO_AMP,
                   help="off (default): fp32 on every CPU; auto: bf16 where the CPU has it natively (faster, "
                        "numbers then depend on the CPU)")
    p.add_argument("--subset", type=int, default=None, help="pre-train on this many images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=lambda a: run_demo(a.out, epochs=a.epochs, width=a.width, subset=a.subset, lr=a.lr,
                                           seed=a.seed, amp=a.amp, threads=a.threads, progress=a.progress) and 0)
