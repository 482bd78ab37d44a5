"""The command line of ``localssl bench``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from localssl.config import parse_key_values
from localssl.reports.bench.common import DEFAULT_RULES
from localssl.reports.bench.format import format_report, twin_table
from localssl.reports.bench.run import DEFAULT_WIDTHS, WIDE_WIDTH, run_bench

DESCRIPTION = ("``localssl bench``: speed, activation memory, parameter memory and FLOPs of the rules, side by side; "
               "speed at every width and precision asked.")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``localssl bench``."""
    p = subparsers.add_parser(
        "bench", help="speed, activation/parameter memory and FLOPs of the rules, side by side",
        description=DESCRIPTION)
    p.add_argument("--encoder", default="vgg6", help="encoder name: vgg6, vgg8, resnet18, resnet50 (default: vgg6)")
    p.add_argument("--encoder-opt", dest="encoder_options", nargs="+", action="extend", metavar="KEY=VALUE",
                   default=None, help="the encoder's own options, repeatable (resnet*: stem=auto|cifar|imagenet, "
                                      "cut=stages|units, zero_init=true|false)")
    p.add_argument("--rule-opt", dest="rule_options", nargs="+", action="extend", metavar="KEY=VALUE",
                   default=None, help="rule options, repeatable, given to every benched rule that takes the key "
                                      "(e.g. expansion=64 for the blockwise rules and their BP twins); default: "
                                      "each rule's defaults (`localssl rules`)")
    p.add_argument("--widths", "--width", dest="widths", type=float, nargs="+", default=list(DEFAULT_WIDTHS),
                   help="channel width multipliers timed for speed; the other tables use the first "
                        f"(default: {' '.join(map(str, DEFAULT_WIDTHS))})")
    p.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                   help="precisions timed for speed, in order; the other tables use the first. auto: bf16 (what "
                        "`--amp auto` picks) and fp32 where the device runs bf16 natively (CPU flags avx512_bf16 / "
                        "amx_bf16, or CUDA bf16), fp32 alone elsewhere (default: auto)")
    p.add_argument("--image-size", dest="image_sizes", type=int, nargs="+", default=[32, 96],
                   help="image sizes for the memory tables (default: 32 96)")
    p.add_argument("--speed-size", type=int, default=None,
                   help="image size for speed, FLOPs and augmentation (default: the first --image-size)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step, two views each (default: 32)")
    p.add_argument("--steps", type=int, default=5,
                   help=f"timed steps per rule per round, widths below {WIDE_WIDTH} (default: 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help=f"untimed steps per rule first, widths below {WIDE_WIDTH} (default: 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help=f"rounds over the interleaved rules, widths below {WIDE_WIDTH}; median (default: 3)")
    p.add_argument("--wide-steps", type=int, default=1,
                   help=f"--steps for widths from {WIDE_WIDTH} (~16x the FLOPs of width 0.25) (default: 1)")
    p.add_argument("--wide-warmup", type=int, default=1,
                   help=f"--warmup for widths from {WIDE_WIDTH} (default: 1)")
    p.add_argument("--wide-rounds", type=int, default=5,
                   help=f"--rounds for widths from {WIDE_WIDTH} (default: 5)")
    p.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES),
                   help=f"rules to compare (default: {' '.join(DEFAULT_RULES)}); a variant of a rule with options of "
                        "its own is RULE@KEY=VALUE[,KEY=VALUE], its own row (e.g. clapp++ clapp++@b_rank=64 "
                        "clapp++@b_rank=64,b_optimizer=sgd clapp++@b_dtype=bf16 bp-infonce)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="contiguous (NCHW) encoder and inputs instead of channels_last")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the training-speed rounds")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory tables")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP table")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the per-op time breakdown (op families, a few steps per rule)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="skip the augmentation timing")
    p.add_argument("--no-precision-compare", dest="compare_precision", action="store_false",
                   help="skip timing the local rule with the fewest parameters of its own in the other memory layout "
                        "(and at the other precision where that is not timed anyway), and the rule with the most "
                        "with the unfused AdamW")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="also run every rule micro-batched at the first width, this many views per chunk; 0 to skip "
                        "(default: an eighth of the step's views, 8 at batch 32)")
    p.add_argument("--rss", action="store_true", help="also whole-process peak RSS per rule (one subprocess each)")
    p.add_argument("--no-retain-memory", dest="retain_memory", action="store_false",
                   help="leave glibc's allocator at its defaults (`train` keeps freed memory for reuse: "
                        "--retain-freed-memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and random inputs (default: 0)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--table", nargs="+", metavar="FILE.json", default=None,
                   help="measure nothing: print the Markdown table of saved results (each rule against its BP "
                        "twin and the per-stage floor), as the README shows it")
    p.set_defaults(func=bench_main)
    return p


def bench_main(args: argparse.Namespace) -> int:
    """Run ``localssl bench`` from parsed arguments; progress goes to stderr."""
    if args.table:
        print(twin_table([_read_result(f) for f in args.table]))
        return 0
    opts = {k: parse_key_values("bench", k, v) if v else None for k, v in
            (("encoder_options", args.encoder_options), ("rule_options", args.rule_options))}
    precisions = "auto" if args.precisions == ["auto"] else args.precisions
    res = run_bench(
        encoder=args.encoder, widths=args.widths, image_sizes=args.image_sizes, batch_size=args.batch_size,
        steps=args.steps, warmup=args.warmup, rounds=args.rounds, wide_steps=args.wide_steps,
        wide_warmup=args.wide_warmup, wide_rounds=args.wide_rounds, precisions=precisions, rules=args.rules,
        speed_size=args.speed_size, device=args.device, threads=args.threads, channels_last=args.channels_last,
        speed=args.speed, memory=args.memory, flops=args.flops, augment=args.augment,
        compare_precision=args.compare_precision, rss=args.rss, retain_memory=args.retain_memory,
        breakdown=args.breakdown and args.speed,
        micro_batch=max(1, args.batch_size // 4) if args.micro_batch is None else (args.micro_batch or None),
        seed=args.seed, **opts,
        log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True),
    )
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text if args.json else format_report(res))
    return 0


def _read_result(path: str) -> dict:
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--table {path}: not a readable JSON file ({e})") from None
    if not isinstance(res, dict) or "config" not in res or "memory" not in res:
        raise ValueError(f"--table {path}: not the JSON of a `localssl bench` run with memory tables "
                         "(written by --out)")
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localssl.reports.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    return bench_main(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))
