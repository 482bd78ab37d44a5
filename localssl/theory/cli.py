"""``localssl theory``: run the deep-linear-network experiments of METHODS 3.

    localssl theory [EXPERIMENT|all] [--f logistic|hinge|linear|type1] [--seeds N]
                    [--mnist-dir DIR] [--out DIR] [--json] [--layout authors|one-pair]

Prints one table per experiment (or, with ``--json``, the same figures as
JSON), and writes ``<experiment>.png`` and ``<experiment>.json`` into
``--out`` (default ``runs/theory``).

``broken`` defaults to the authors' layout (METHODS 3): a batch of 32 images
stacks [TL x 32, TR x 32 | BL x 32, BR x 32] (64 positive pairs, both
columns of every image), L2 0.005 per B, negative = the next row of the
projected batch, W = the authors' BP model's (untrained) weights replayed
in their draw order; it reports the mean +- std over --seeds init seeds and
the authors' seed 42 alone. ``--layout one-pair`` is the earlier setting (one
pair per image, columns alternating, L2 0.01 per B, negative scored with the
context's B, plain float64 init). ``ablation`` changes one of these choices
at a time (and fits B as the authors run it, float32 L-BFGS, for seed 42);
it is not part of ``all``. ``rank`` (not in ``all`` either) limits every B to
rank r (CLAPP++'s ``b_rank``): the local-vs-BP cosine per layer for each
``--ranks``, against a closed form with ``--f linear``.
"""
from __future__ import annotations

import argparse
import inspect
import json as _json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..registry import Registry
from . import linear as _linear
from .conv import conv as _conv_experiment
from .rank import rank as _rank_experiment
from .report import TheoryResult

__all__ = ["EXPERIMENTS", "add_theory_parser", "run_theory", "theory_main"]

EXPERIMENTS: Registry[Callable[..., TheoryResult]] = Registry("theory experiment")
EXPERIMENTS.register("theorem31")(_linear.theorem31)
EXPERIMENTS.register("broken")(_linear.broken)
EXPERIMENTS.register("dfb")(_linear.dfb)
EXPERIMENTS.register("conv")(_conv_experiment)
EXPERIMENTS.register("projection")(_linear.projection)
EXPERIMENTS.register("ablation")(_linear.broken_ablation)
EXPERIMENTS.register("rank")(_rank_experiment)

#: the order of ``all``
ORDER = ("theorem31", "broken", "dfb", "conv", "projection")
#: experiments run only when named (slow, or about one experiment's choices)
EXTRA = ("ablation", "rank")


def run_theory(experiment: str = "all", *, f: str = "logistic", seeds: int | None = None,
               mnist_dir: str | Path | None = None, out_dir: str | Path | None = None, json: bool = False,
               plot: bool = True, verbose: bool = True, **kwargs: Any) -> dict[str, TheoryResult]:
    """Run one experiment (or ``"all"``) and return ``{name: TheoryResult}``.

    ``seeds``: number of init seeds (``None``: each experiment's default);
    ``mnist_dir``: use the authors' MNIST patch setting where it applies
    (theorem31, broken, dfb, projection; conv is always synthetic);
    ``out_dir``: write ``<name>.png`` (if ``plot`` and matplotlib is there) and
    ``<name>.json``; ``json``: print JSON instead of tables (if ``verbose``).
    Extra keyword arguments (``n_batches``, ``fit``, ``preprocess``, ``lam``,
    ``shared_b`` ...) go to the experiment functions.
    """
    if f not in _linear.LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss function f={f!r}; valid: {', '.join(_linear.LOSS_FUNCTIONS)}")
    names = list(ORDER) if experiment == "all" else [experiment]
    fns = {name: EXPERIMENTS.get(name) for name in names}
    params = {name: set(inspect.signature(fn).parameters) for name, fn in fns.items()}
    unknown = [k for k in kwargs if not any(k in p for p in params.values())]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for theory experiment(s) {names}")
    results: dict[str, TheoryResult] = {}
    for name, fn in fns.items():
        # Common options go to the experiments that take them (conv takes no MNIST options).
        kw: dict[str, Any] = dict(kwargs, f=f, seeds=seeds, mnist_dir=mnist_dir)
        kw = {k: v for k, v in kw.items() if k in params[name] and v is not None}
        if mnist_dir is not None and "mnist_dir" not in params[name] and verbose:
            print(f"note: {name} always uses synthetic data (--mnist-dir ignored)", file=sys.stderr)
        res = fn(**kw)
        results[name] = res
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.json").write_text(_json.dumps(res.to_dict(), indent=1))
            if plot:
                res.plot(out / f"{name}.png")
        if verbose and not json:
            print(res.table(), flush=True)
            print(flush=True)
    if verbose and json:
        print(_json.dumps({k: r.to_dict() for k, r in results.items()}, indent=1))
    return results


def add_theory_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``theory`` subcommand to an argparse ``subparsers``; sets ``func=theory_main``."""
    p = subparsers.add_parser("theory", help="deep linear network theory experiments (METHODS 3)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?", default="all", choices=list(ORDER) + list(EXTRA) + ["all"],
                   help=f"which experiment (default: all = {', '.join(ORDER)})")
    p.add_argument("--f", default="logistic", choices=list(_linear.LOSS_FUNCTIONS),
                   help="loss function f of the unified loss (default: logistic)")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of init seeds 0..N-1 (default: per experiment; broken and ablation also "
                        "report the authors' seed 42 alone)")
    p.add_argument("--mnist-dir", default=None,
                   help="folder with the MNIST IDX files: use the authors' MNIST patch setting")
    p.add_argument("--out", default="runs/theory", help="folder for PNG plots and JSON (default: runs/theory)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    p.add_argument("--fit", default=None, choices=list(_linear.BROKEN_FITS),
                   help="how B is fitted: exact Newton (default), L-BFGS in float64 (slow), or, for broken "
                        "only, lbfgs32: the authors' float32 L-BFGS, warm-started, 3 refits per batch (slower)")
    p.add_argument("--layout", default=None, choices=list(_linear.BROKEN_LAYOUTS),
                   help="broken only: 'authors' (default: 64 pairs per 32 images, L2 0.005 per B, negative = "
                        "next row of the projected batch, the authors' BP-model weights) or 'one-pair' (one "
                        "pair per image, L2 0.01 per B, negative scored with the context's B)")
    p.add_argument("--lam", type=float, default=None,
                   help="L2 penalty per B matrix (default: 0.005 for broken's authors layout, else 0.01)")
    p.add_argument("--batches", type=int, default=None, help="number of batches (default: per experiment)")
    p.add_argument("--preprocess", default=None, choices=list(_linear.MNIST_PREPROCESS),
                   help="MNIST pixel preprocessing (default: normalize)")
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="rank only: the ranks r of B to compare (default: 1 2 4 8 width/2 width)")
    p.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    p.set_defaults(func=theory_main)
    return p


def theory_main(args: argparse.Namespace) -> int:
    """Run ``localssl theory`` from parsed arguments; returns the exit code."""
    extra: dict[str, Any] = {}
    if getattr(args, "fit", None):
        extra["fit"] = args.fit
    if getattr(args, "batches", None):
        extra["n_batches"] = args.batches
    if getattr(args, "preprocess", None):
        extra["preprocess"] = args.preprocess
    if getattr(args, "layout", None):
        extra["layout"] = args.layout
    if getattr(args, "lam", None) is not None:
        extra["lam"] = args.lam
    if getattr(args, "ranks", None):
        extra["ranks"] = args.ranks
    try:
        run_theory(args.experiment, f=args.f, seeds=args.seeds, mnist_dir=args.mnist_dir,
                   out_dir=args.out, json=args.json, plot=not getattr(args, "no_plot", False), **extra)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"localssl theory: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m localssl.theory ...`` (same arguments as ``localssl theory``)."""
    parser = argparse.ArgumentParser(prog="localssl")
    sub = parser.add_subparsers(dest="command", required=True)
    add_theory_parser(sub)
    args = parser.parse_args(["theory", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
