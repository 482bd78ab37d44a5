"""The ``localssl`` command.

    localssl train --rule clapp++ --dataset cifar10 --data-dir DIR --epochs 20 --out runs/c10-clapp
    localssl probe runs/c10-clapp [--random-init] [--grids 8 4 4 4 2 2] [--resize 32]
    localssl demo
    localssl bench [--json]
    localssl theory [EXPERIMENT]
    localssl align RUN_DIR
    localssl compare --rules RULE RULE ... --encoder resnet18 --dataset cifar10 --budget 2000
    localssl export RUN_DIR [--format safetensors|pt] [--out DIR]
    localssl energy RUN_DIR

Every ``train``/``probe``/``compare`` flag is generated from the fields of the config
dataclasses, so the command line and the YAML files can never drift apart.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from localssl.config import ConfigError, ProbeConfig, TrainConfig, from_dict, load_yaml, parse_key_values, to_dict

_HELP = {
    "rule": "learning rule (see `localssl rules`)",
    "encoder": "encoder name (vgg6, vgg8, resnet18, resnet50, scff-cifar; run per patch: gim-resnet, vgg6-patches)",
    "width": "channel width multiplier (1.0 = the paper's VGG-6; 0.25 for CPU runs)",
    "encoder_options": "the encoder's own options as KEY=VALUE, repeatable, over the config file's (resnet*: "
    "stem=auto|cifar|imagenet, cut=stages|units, zero_init=true|false; scff-cifar: first_norm=true|false; "
    "gim-resnet, vgg6-patches: patch=16, patch_stride=8, grayscale=true|false)",
    "rule_options": "the rule's own options as KEY=VALUE, repeatable, over the config file's (each rule's "
    "options and defaults: `localssl rules`)",
    "dataset": "data set name (shapes10 is embedded and needs no download)",
    "data_dir": "folder (or archive) holding the data set in its official format",
    "subset": "pre-train on only this many images (deterministic per seed)",
    "grids": "pooled grid side per block, for the spatial rules' losses and the probe's features (train default: "
    "the paper's grids where they divide the feature maps, else the largest divisor below them; a patched "
    "encoder's: its patch grid; probe default: the run's)",
    "resize": "resize every image to S x S pixels (bicubic) when the data set is first decoded into the cache "
    "(train default: keep the images' size; probe default: the run's)",
    "mean": "per-channel normalisation mean, 0..1 scale (default: the data set's published values; imagefolder: "
    "its own, computed once from its images)",
    "std": "per-channel normalisation std, 0..1 scale (default: as for --mean)",
    "max_steps": "train for exactly this many optimisation steps (overrides epochs; on --resume, --epochs alone "
    "drops the run's max_steps)",
    "batch_size": "images per batch (two views each)",
    "micro_batch": "views per chunk inside a step: the same gradient with one chunk's activations held, "
    "for one more forward pass",
    "optimizer": "adamw (METHODS 2.4) or lars (momentum SGD, each weight's step scaled to its norm; biases and "
    "norms without weight decay or scaling: as blockwise SSL trains, METHODS 5.1)",
    "momentum": "momentum of lars (adamw ignores it)",
    "lr_schedule": "constant, or cosine: from lr after the warmup down to --min-lr at the run's end",
    "warmup_steps": "raise the lr linearly from 0 to --lr over the first N steps",
    "min_lr": "the cosine schedule's final lr (absolute)",
    "amp": "auto (bf16 where the hardware has native bf16), bf16, or off",
    "checkpoint_every": "write the checkpoint every N steps (atomically)",
    "retain_freed_memory": "keep freed memory for the next block instead of returning it to the OS "
    "(glibc; saves page faults, changes no result)",
    "pipeline": "under torchrun: one contiguous stage of blocks per rank, activations sent forward, every stage "
    "updating from its own loss (local rules); without it, torchrun trains data-parallel",
    "stages": "blocks per pipeline stage, e.g. 2 2 2 (default: balanced by each block's measured time; see "
    "`localssl stages`)",
    "dist_timeout": "seconds a collective or message may wait before the run stops, naming the lost rank",
    "random_init": "probe an untrained encoder of the same shape instead",
    "protocols": "fast (features once, linear on all layers and on the last), blocks (the same, one linear probe "
                 "per block on its globally pooled output: fast_block_1..L), paper (METHODS 2.5: raw features, "
                 "RandomResizedCrop 0.08-1 + flip, final and best), paper-bn (ours: BatchNorm + pad-4 crop), knn",
    "epochs_paper": "epochs of the paper and paper-bn probes (the paper uses 300)",
}


# Short spellings of generated flags.
_ALIASES = {"encoder_options": ("--encoder-opt",), "rule_options": ("--rule-opt",), "recipes": ("--recipe",)}


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset(),
                        helps: dict[str, str] | None = None) -> None:
    """One flag per field of the config dataclass ``cls`` (but ``skip``), typed from its annotation.

    ``helps``: help texts of this command's fields, over the shared ones.
    """
    hints = typing.get_type_hints(cls)
    texts = {**_HELP, **(helps or {})}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{texts.get(f.name, f.name.replace('_', ' '))} (default: {default})"
        base = tp
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None -> X
            base = next(a for a in typing.get_args(tp) if a is not type(None))
        if base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(base) is dict:
            p.add_argument(flag, *_ALIASES.get(f.name, ()), dest=f.name, nargs="+", action="extend",
                           metavar="KEY=VALUE", default=None, help=help_)
        elif typing.get_origin(base) is list:
            p.add_argument(flag, dest=f.name, nargs="+", default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, default=None, help=help_)


def resolve_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """Config = dataclass defaults <- YAML file <- command-line flags."""
    data = to_dict(base) if base is not None else {}
    if getattr(args, "config", None):
        data.update(to_dict(load_yaml(cls, args.config)))
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if _is_mapping(hints[f.name]):  # KEY=VALUE flags add to (or override keys of) the file's mapping
            v = {**(data.get(f.name) or {}), **parse_key_values(cls.__name__, f.name, v)}
        data[f.name] = v
    return from_dict(cls, data)


def _is_mapping(tp: Any) -> bool:
    return any(typing.get_origin(t) is dict for t in (tp, *typing.get_args(tp)))


def cmd_train(args: argparse.Namespace) -> int:
    from localssl.engine.trainer import train

    base = None
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = Path(args.out) / "config.yaml"
        if not saved.exists():
            raise ConfigError(f"cannot resume: {saved} does not exist")
        base = load_yaml(TrainConfig, saved)
        if args.epochs is not None and args.max_steps is None:
            # --max-steps overrides --epochs, so a run's saved max_steps would ignore the --epochs asked for:
            # on resume, --epochs alone sets the run's length in epochs.
            base.max_steps = None
    cfg = resolve_args(TrainConfig, args, base)
    out = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once, by the rank that wrote it
        print(f"run written to {out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from localssl.evaluation.run import probe_run

    cfg = resolve_args(ProbeConfig, args)
    result, path = probe_run(cfg)
    print(f"probe results written to {path}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    """Every registered rule with its options (``--rule-opt KEY=VALUE``) and their defaults."""
    from dataclasses import asdict

    from localssl.rules import RULES

    for name in RULES:
        defaults = asdict(RULES.get(name).options())
        opts = " ".join(f"{k}={v}" for k, v in defaults.items()) or "(no options)"
        print(f"{name:16s} {opts}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The run's backbone weights (no rule heads, no optimizer) and a JSON of its architecture."""
    from localssl.export import export_run

    out = export_run(args.run, out=args.out, checkpoint=args.checkpoint, fmt=args.format)
    print(f"encoder exported to {out} (load it with localssl.load_exported({str(out)!r}))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localssl", description="Local self-supervised learning rules next to end-to-end BP-SSL."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pre-train an encoder with a rule")
    p.add_argument("--config", help="YAML file with TrainConfig keys (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    add_dataclass_flags(p, TrainConfig, skip=set())
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("probe", help="linear probes and kNN on a frozen encoder")
    p.add_argument("run", help="run folder written by `localssl train`")
    p.add_argument("--config", help="YAML file with ProbeConfig keys (flags override it)")
    add_dataclass_flags(p, ProbeConfig, skip={"run"})
    p.set_defaults(func=cmd_probe)

    from localssl.export import WEIGHTS

    p = sub.add_parser("export", help="write a run's backbone weights and a JSON of its architecture",
                       description="Write the encoder of a run (no rule heads, no optimizer) as encoder.safetensors "
                                   "(or encoder.pt) and encoder.json (architecture, preprocessing, block shapes, "
                                   "provenance), atomically.")
    p.add_argument("run", help="run folder written by `localssl train`")
    p.add_argument("--checkpoint", default=None, help="checkpoint to export (default: RUN/checkpoint.pt)")
    p.add_argument("--format", default="safetensors", choices=list(WEIGHTS),
                   help="weights file format (default: safetensors, which loads without pickle)")
    p.add_argument("--out", default=None, help="folder to write (default: RUN/export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("rules", help="list the registered rules")
    p.set_defaults(func=cmd_rules)

    from localssl.reports.demo import add_demo_parser

    add_demo_parser(sub)
    from localssl.reports.bench import add_bench_parser

    add_bench_parser(sub)
    from localssl.theory.linear import add_theory_parser

    add_theory_parser(sub)
    from localssl.theory.align import add_align_parser

    add_align_parser(sub)
    from localssl.reports.tables import add_report_parser

    add_report_parser(sub)
    from localssl.reports.compare import add_compare_parser

    add_compare_parser(sub)
    from localssl.reports.energy import add_energy_parser

    add_energy_parser(sub)

    from localssl.reports.stages import add_stages_parser

    add_stages_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from localssl.engine.distributed import RankLost
    from localssl.engine.trainer import CheckpointWriteError, NonFiniteLossError, TrainingInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ConfigError, KeyError, ValueError, FileNotFoundError) as e:
        # Bad input: one clear line, no traceback (the message names the key/file/value).
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"localssl {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointWriteError, RankLost) as e:
        print(f"localssl {args.command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # The machine, not the input (a full disk while writing metrics, a file gone): still one line with the
        # path. The last checkpoint is untouched: checkpoints are only ever replaced by an atomic rename.
        where = f": {e.filename}" if e.filename else ""
        print(f"localssl {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"localssl {args.command}: {e}", file=sys.stderr)
        return e.returncode
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
