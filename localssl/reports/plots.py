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
        labels = list(accuracies)
        probes = list(next(iter(accuracies.values())))
        _accuracy_bars(axes[0][-1], labels, {p: [accuracies[lab].get(p) for lab in labels] for p in probes})
        axes[0][-1].legend(fontsize=7)
    return _save(plt, fig, path)


def _accuracy_bars(ax, labels: Sequence[str], accuracies: Mapping[str, Sequence[float | None]],
                   rotation: float = 0) -> None:
    """One group of bars per label, one bar per probe (None: no bar)."""
    width = 0.8 / max(1, len(accuracies))
    for j, (p, values) in enumerate(accuracies.items()):
        xs = [i + j * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width=width, label=p)
    ax.set_xticks([i + width * (len(accuracies) - 1) / 2 for i in range(len(labels))], labels, fontsize=8,
                  rotation=rotation)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("probes", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_bars(
    labels: Sequence[str],
    accuracies: Mapping[str, Sequence[float | None]],
    images_per_s: Sequence[float | None],
    activation_mib: Sequence[float | None],
    path: str | Path,
) -> Path:
    """``localssl compare``'s figure: accuracy per probe per rule, beside training images/s and memory.

    ``labels``: one per row (rules, then random-init); ``accuracies`` maps a
    probe's name to one test accuracy in % per row (None: not measured);
    ``images_per_s`` and ``activation_mib``: one per row (None for
    random-init, which does not train).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [3, 1, 1]})
    ax = axes[0]
    _accuracy_bars(ax, labels, accuracies, rotation=20)
    top = max((v for vs in accuracies.values() for v in vs if v is not None), default=100.0)
    ax.set_ylim(0, 1.35 * top)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    for ax, values, title in ((axes[1], images_per_s, "training images/s"),
                              (axes[2], activation_mib, "activations per step (MiB)")):
        shown = [(lab, v) for lab, v in zip(labels, values) if v is not None]
        ax.bar(range(len(shown)), [v for _, v in shown], color="tab:gray")
        ax.set_xticks(range(len(shown)), [lab for lab, _ in shown], fontsize=8, rotation=20)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)
