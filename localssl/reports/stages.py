"""``localssl stages``: each block's measured cost, the pipeline split for N ranks and what it predicts.

    localssl stages --encoder vgg6 --width 0.25 --dataset shapes10 --batch-size 32 --ranks 2 4 8

Takes the flags of ``localssl train`` (the same run, measured instead of trained): the time of each block's
step (forward, loss, backward of its group) on the run's first batch, its output's bytes (what a stage
boundary after it sends per step), and for every N the split that ``--pipeline`` would choose (or
``--stages``) with its predicted throughput, 1 / slowest stage, against one process's 1 / sum of blocks.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

import torch

from localssl.config import ConfigError, TrainConfig, validate_train


def measure_run(cfg: TrainConfig, ranks: list[int], repeats: int = 3) -> dict[str, Any]:
    """The measurements and predictions of ``cfg``'s encoder and rule (a dict, for --json)."""
    from localssl.builder import build_model, build_views, resolve
    from localssl.data.draws import ImageDraws
    from localssl.engine.runtime import resolve_device, seed_everything
    from localssl.engine.stages import balance, check_stages, measure_blocks, predict
    from localssl.engine.trainer import _Batches, _load_images

    validate_train(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    spec, data = _load_images(cfg)
    cfg = resolve(cfg, spec.channels, spec.image_size, spec.mean, spec.std)
    model = build_model(cfg, spec.channels, spec.image_size)
    encoder, rule = model.encoder.to(device), model.rule.to(device)
    encoder.train()
    augment = build_views(cfg, spec.image_size, spec.mean, spec.std, spec.crop_scale, device, rule)
    batches = _Batches(data.images, cfg.batch_size, cfg.seed, device)
    if batches.steps_per_epoch == 0:
        raise ConfigError(f"{len(data)} images make no batch of {cfg.batch_size}")
    idx = batches.indices(0, 0)
    x = batches.gather(idx)
    views = augment.batch(x, ImageDraws(cfg.seed, 0, 0, idx)) if getattr(augment, "per_image_draws", False) \
        else augment.batch(x)
    costs = measure_blocks(encoder, rule, views, repeats)
    splits = []
    for n in ranks:
        if n > len(costs):  # a stage needs a block: say so in the table rather than fail the others
            splits.append({"ranks": n, "stages": None, "note": f"only {len(costs)} blocks: at most "
                           f"{len(costs)} stages"})
            continue
        try:
            sizes = check_stages(cfg.stages, len(costs), n) if cfg.stages else balance([c.seconds for c in costs], n)
        except ValueError as e:
            raise ConfigError(f"stages: {e}") from None
        splits.append({"ranks": n, **asdict(predict(costs, sizes)), "speedup": predict(costs, sizes).speedup})
    return {"encoder": cfg.encoder, "width": cfg.width, "rule": cfg.rule, "batch_size": cfg.batch_size,
            "device": str(device), "threads": torch.get_num_threads(),
            "blocks": [asdict(c) for c in costs], "splits": splits}


def format_stages(res: dict[str, Any]) -> str:
    """A plain-text table of `measure_run`'s result."""
    lines = [f"{res['rule']} on {res['encoder']} x{res['width']}, batch {res['batch_size']}, {res['device']}, "
             f"{res['threads']} thread(s); time per step of each block's group (forward, loss, backward)",
             f"{'block':>5} {'ms':>9} {'output MiB':>11}"]
    for b, c in enumerate(res["blocks"]):
        lines.append(f"{b + 1:>5} {1e3 * c['seconds']:>9.2f} {c['out_bytes'] / 2**20:>11.2f}")
    lines.append("")
    lines.append(f"{'ranks':>5}  {'blocks per stage':<20} {'slowest ms':>10} {'steps/s seq':>11} "
                 f"{'steps/s pipe':>12} {'speedup':>7}  sent per step (MiB)")
    for s in res["splits"]:
        if s["stages"] is None:
            lines.append(f"{s['ranks']:>5}  {s['note']}")
            continue
        lines.append(f"{s['ranks']:>5}  {' '.join(map(str, s['stages'])):<20} {1e3 * max(s['stage_seconds']):>10.2f} "
                     f"{s['sequential_per_s']:>11.2f} {s['pipeline_per_s']:>12.2f} {s['speedup']:>7.2f}  "
                     + " ".join(f"{b / 2**20:.2f}" for b in s["boundary_bytes"]))
    lines.append("predicted: one step per slowest stage in the steady state; messages, the fill and the log steps' "
                 "flush not counted")
    return "\n".join(lines)


def add_stages_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``localssl stages``."""
    from localssl.cli import add_dataclass_flags

    p = subparsers.add_parser("stages", help="per-block cost, the pipeline split for N ranks and its predicted "
                                             "throughput", description=__doc__.split("\n\n")[-1])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="pipeline sizes to split for "
                                                                           "(default: 2 4 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per block, median taken (default: 3)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.add_argument("--config", help="YAML file with TrainConfig keys (flags override it)")
    add_dataclass_flags(p, TrainConfig, skip=set())
    p.set_defaults(func=cmd_stages)
    return p


def cmd_stages(args: argparse.Namespace) -> int:
    from localssl.cli import resolve_args

    if min(args.ranks) < 1 or args.repeats < 1:
        raise ConfigError(f"--ranks and --repeats must be >= 1, got {args.ranks} and {args.repeats}")
    res = measure_run(resolve_args(TrainConfig, args), args.ranks, args.repeats)
    print(json.dumps(res, indent=2) if args.json else format_stages(res))
    return 0


__all__ = ["measure_run", "format_stages", "add_stages_parser"]
