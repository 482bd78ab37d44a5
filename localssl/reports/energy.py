"""``localssl energy RUN``: the energy curve of a run whose rule learns through inference (predictive coding).

The inference step (`localssl.engine.inference.InferenceStep`) records the
energy E after each of its T iterations, and the trainer logs it with every
row of ``metrics.jsonl`` as ``energy_0 .. energy_T`` (t = 0: the feedforward
latents, where E is the top loss alone) and ``inference_step_size`` (the step
size inference ended with: below the one asked for where backtracking halved
it). This prints those curves for a few of the logged steps.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from localssl.engine.metrics import read_metrics


def energy_curves(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every logged step's ``{"step", "step_size", "energies": [E_0 .. E_T]}`` of the run in ``run_dir``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a run folder written by `localssl train`")
    out = []
    for row in read_metrics(path):
        ts = sorted(int(k.removeprefix("energy_")) for k in row if k.startswith("energy_"))
        if ts:
            out.append({"step": row["step"], "step_size": row.get("inference_step_size"),
                        "energies": [row[f"energy_{t}"] for t in ts]})
    if not out:
        raise ValueError(f"{path} logs no energy curve: the run's rule has no inference step (e.g. --rule pc)")
    return out


def _spread(n: int, k: int) -> list[int]:
    """Up to ``k`` indices of ``range(n)``, evenly spread, first and last included."""
    k = min(k, n)
    return [0] if k == 1 else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def format_curves(curves: list[dict[str, Any]], rows: int = 8, columns: int = 11) -> str:
    """A table of ``rows`` logged steps (first and last included), E at up to ``columns`` iterations each."""
    if rows < 1 or columns < 2:
        raise ValueError(f"rows must be >= 1 and columns >= 2, got {rows} and {columns}")
    picked = _spread(len(curves), rows)
    ts = _spread(len(curves[0]["energies"]), columns)
    head = f"{'step':>7} {'eta':>9} " + " ".join(f"{'E_' + str(t):>10}" for t in ts)
    lines = [head]
    for i in picked:
        c = curves[i]
        eta = "" if c["step_size"] is None else f"{c['step_size']:.3g}"
        lines.append(f"{c['step']:>7} {eta:>9} " + " ".join(f"{c['energies'][t]:>10.4g}" for t in ts))
    return "\n".join(lines)


def cmd_energy(args: argparse.Namespace) -> int:
    print(format_curves(energy_curves(args.run), rows=args.rows, columns=args.columns))
    return 0


def add_energy_parser(sub: Any) -> None:
    p = sub.add_parser("energy", help="the energy per inference iteration of a predictive-coding run",
                       description=__doc__.split("\n\n", 1)[1].strip())
    p.add_argument("run", help="run folder written by `localssl train` (with a rule that has an inference step)")
    p.add_argument("--rows", type=int, default=8, help="logged steps to show, first and last included (default 8)")
    p.add_argument("--columns", type=int, default=11, help="iterations to show per step (default 11)")
    p.set_defaults(func=cmd_energy)


__all__ = ["energy_curves", "format_curves", "add_energy_parser"]
