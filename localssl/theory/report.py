"""Result container of the theory experiments: per-layer figures, a text table, JSON, a PNG plot."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TheoryResult"]


def _num(v: Any) -> float:
    return float(v)


@dataclass
class TheoryResult:
    """Figures of one experiment.

    ``metrics[setting][metric]`` is a list with one value per layer (layer 1
    first); ``reference[setting]`` holds published per-layer figures to show
    next to ours (the authors' cosines); ``per_seed[setting]`` optionally the
    per-seed rows of the primary metric; ``primary`` is the metric that
    :meth:`plot` draws, with the metrics named in ``secondary`` (e.g. the
    authors' seed alone) as dotted lines.
    """

    name: str
    primary: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    reference: dict[str, list[float]] = field(default_factory=dict)
    per_seed: dict[str, list[list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    secondary: list[str] = field(default_factory=list)
    runtime_s: float = 0.0

    def add(self, setting: str, metric: str, values) -> None:
        self.metrics.setdefault(setting, {})[metric] = [_num(v) for v in np.asarray(values).reshape(-1)]

    def get(self, setting: str, metric: str) -> list[float]:
        return self.metrics[setting][metric]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (inf/nan become strings, as JSON has no such numbers)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, (np.floating, np.integer)):
                return clean(v.item())
            return v

        return clean({
            "experiment": self.name, "config": self.config, "metrics": self.metrics,
            "reference": self.reference, "per_seed": self.per_seed, "secondary": self.secondary,
            "notes": self.notes,
            "runtime_s": round(self.runtime_s, 3),
        })

    def table(self) -> str:
        """Plain-text table: one row per (setting, metric), one column per layer."""
        n_layers = max((len(v) for m in self.metrics.values() for v in m.values()), default=0)
        head = ["setting", "metric"] + [f"L{i + 1}" for i in range(n_layers)]
        rows = []
        for setting, ms in self.metrics.items():
            for metric, vals in ms.items():
                rows.append([setting, metric] + [_fmt(v) for v in vals])
            if setting in self.reference:
                rows.append([setting, "authors"] + [f"{v:.3f}" for v in self.reference[setting]])
        widths = [max(len(r[i]) if i < len(r) else 0 for r in rows + [head]) for i in range(len(head))]
        lines = [f"== {self.name} ({self.runtime_s:.1f} s) =="]
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        lines.append(cfg)
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path | None:
        """Write a PNG of the primary metric per layer (and the reference); None if matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n_lines = sum((self.primary in ms) + sum(k in ms for k in self.secondary) for ms in self.metrics.values())
        many = n_lines + len(self.reference) > 8  # legend beside the axes, not over the curves
        fig, ax = plt.subplots(figsize=(9.0, 4.2) if many else (5.5, 3.8))
        for setting, ms in self.metrics.items():
            color = None
            if self.primary in ms:
                y = np.asarray(ms[self.primary])
                x = np.arange(1, len(y) + 1)
                std_key = next((k for k in ms if k.startswith(self.primary.replace("_mean", ""))
                                and "std_seeds" in k), None)
                line = ax.plot(x, y, marker="o", label=setting)[0]
                color = line.get_color()
                if std_key:
                    s = np.asarray(ms[std_key])
                    ax.fill_between(x, y - s, y + s, color=color, alpha=0.2)
            for key in self.secondary:
                if key in ms:
                    y2 = np.asarray(ms[key])
                    line2 = ax.plot(np.arange(1, len(y2) + 1), y2, ls=":", marker=".", color=color,
                                    label=f"{setting} ({key.replace('cosine_', '')})")[0]
                    color = line2.get_color()
            if color is None:
                continue
            if setting in self.reference:
                ref = self.reference[setting]
                ax.plot(np.arange(1, len(ref) + 1), ref, ls="--", marker="x", color=color,
                        label=f"{setting} (authors)")
        ax.set_xlabel("layer")
        ax.set_ylabel(self.primary)
        ax.set_title(self.name)
        ax.grid(alpha=0.3)
        if many:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    return f"{v:.4f}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"
