"""Plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - plots are an extra
        raise RuntimeError("plots need matplotlib: pip install 'localssl[plots]'") from e
    return plt


def learning_curves(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    accuracies: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Loss per block against step for every run, and probe accuracies as bars.

    ``curves`` maps a run label to its metric rows (``metrics.jsonl``);
    ``accuracies`` maps a label to {probe name: accuracy in %}.
    """
    plt = _plt()
    n = len(curves) + (1 if accuracies else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (label, rows) in zip(axes[0], curves.items()):
        steps = [r["step"] for r in rows]
        keys = sorted((k for k in rows[0] if k.startswith("loss_")), key=lambda k: int(k.split("_")[1])) if rows else []
        if len(keys) > 1:
            for k in keys:
                ax.plot(steps, [r[k] for r in rows], label=f"block {k.split('_')[1]}", lw=1.2)
            ax.legend(fontsize=7, ncol=2)
        elif rows:
            ax.plot(steps, [r["loss"] for r in rows], lw=1.2)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if len(keys) <= 1 else "local loss per block")
        ax.grid(alpha=0.3)
    if accuracies:
        ax = axes[0][-1]
        labels = list(accuracies)
        probes = list(next(iter(accuracies.values())))
        width = 0.8 / max(1, len(probes))
        for j, p in enumerate(probes):
            xs = [i + j * width for i in range(len(labels))]
            ax.bar(xs, [accuracies[lab].get(p, 0.0) for lab in labels], width=width, label=p)
        ax.set_xticks([i + width * (len(probes) - 1) / 2 for i in range(len(labels))], labels, fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("probes", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
