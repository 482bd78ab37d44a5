"""The files of ``localssl compare``: ``compare.csv``, the Markdown table made from it, and the plot.

``compare.csv`` is the result (STYLE principle 10: tables are generated from
a results file): one row per rule and one for the random-init encoder, every
probe accuracy in % (read from the probe files), the measured training
images/s and peak activation memory with their ratios to the end-to-end
baseline, and the environment they were measured in. ``compare.md`` is
rendered from the CSV alone plus the comparison's config; ``compare.png``
(matplotlib, the ``plots`` extra) shows the same numbers.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localssl.config import CompareConfig
from localssl.reports.tables import BLOCK_PREFIX, COLUMNS, PAPER_BN_COLUMN, probe_columns

RANDOM_INIT = "random-init"
CSV_NAME, MD_NAME, PNG_NAME = "compare.csv", "compare.md", "compare.png"
HEAD = ["rule", "local", "steps"]
MEASURED = ["images_per_s", "images_per_s_vs_bp", "peak_activation_mib", "peak_activation_vs_bp"]
ENV = ["probe_train_images", "probe_test_images", "device", "hardware", "torch", "threads"]
LABELS = {"rule": "rule", "local": "local", "steps": "steps", "images_per_s": "train img/s (vs BP)",
          "peak_activation_mib": "activations per step, MiB (vs BP)"}


def column_name(key: str, field: str) -> str:
    """The CSV column of a probe: its result key, with the paper probe's final/best apart."""
    return key if field == "test_acc" else f"{key}_{field.removeprefix('test_acc_')}"


def probe_label(name: str) -> str:
    """The Markdown header of a probe column of the CSV (the headers of `localssl report`)."""
    for key, field, header in [*COLUMNS, PAPER_BN_COLUMN]:
        if column_name(key, field) == name:
            return header
    if name.startswith(BLOCK_PREFIX):
        return f"linear, block {name[len(BLOCK_PREFIX):]} (fast)"
    return name


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def table_rows(rules: Sequence[str], probes: dict[str, dict[str, Any]], local: dict[str, bool],
               steps: dict[str, int], measured: dict[str, Any], env: dict[str, Any],
               random_inits: Sequence[str] = (RANDOM_INIT,)) -> tuple[list[str], list[dict]]:
    """(columns, rows) of ``compare.csv``: ``probes`` maps every rule and random-init label to its probe result
    (one random-init row per recipe, `run.recipe_groups`)."""
    labels = [*rules, *random_inits]
    cols = [(k, f) for k, f, _ in probe_columns([probes[x] for x in labels])
            if any(isinstance(probes[x].get(k), dict) and f in probes[x][k] for x in labels)]
    per_rule = measured.get("rules", {})
    main_base = per_rule.get(measured.get("baseline") or "", {})
    p0 = probes[labels[0]]
    rows = []
    for x in labels:
        p = probes[x]
        m = per_rule.get(x, {})
        ips, mem = m.get("images_per_s"), m.get("peak_activation_bytes")
        # Each rule is read against the end-to-end rule measured on its recipe (`measure_rules`; none: no ratio).
        base = per_rule.get(m["baseline"] or "", {}) if "baseline" in m else main_base
        row = {"rule": x, "local": "" if x in random_inits else str(local[x]).lower(), "steps": steps.get(x, 0)}
        for k, f in cols:
            v = p.get(k)
            row[column_name(k, f)] = f"{100 * v[f]:.2f}" if isinstance(v, dict) and f in v else ""
        row.update({
            "images_per_s": _num(ips, ".1f"),
            "images_per_s_vs_bp": _num(ips / base["images_per_s"] if ips and "images_per_s" in base else None, ".3f"),
            "peak_activation_mib": _num(mem / 2**20 if mem is not None else None, ".3f"),
            "peak_activation_vs_bp": _num(mem / base["peak_activation_bytes"]
                                          if mem is not None and base.get("peak_activation_bytes") else None, ".3f"),
            "probe_train_images": p0.get("num_train", ""), "probe_test_images": p0.get("num_test", ""),
            "device": env.get("device", ""), "hardware": env.get("gpu") or env.get("cpu", ""),
            "torch": env.get("torch", ""), "threads": env.get("torch_threads", ""),
        })
        rows.append(row)
    return [*HEAD, *(column_name(k, f) for k, f in cols), *MEASURED, *ENV], rows


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    from localssl.atomic import atomic_file

    with atomic_file(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def probe_names(columns: list[str]) -> list[str]:
    """The probe columns of the CSV, in order."""
    return [c for c in columns if c not in HEAD + MEASURED + ENV]


def _with_ratio(value: str, ratio: str) -> str:
    if not value:
        return "-"
    return f"{value} ({float(ratio):.2f}x)" if ratio else value


def markdown(csv_path: Path, cfg: CompareConfig, baseline: str | None,
             baseline_measured: dict[str, Any] | None = None, own_baselines: dict[str, str | None] | None = None
             ) -> str:
    """``compare.md``: the CSV as a Markdown table, under a line saying what was compared, how and where.

    ``baseline_measured``: the baseline's speed and memory where it was
    measured but not compared (it has no row then).
    """
    columns, rows = read_csv(csv_path)
    probes = probe_names(columns)
    head = ["rule", "local", "steps", *(probe_label(c) for c in probes), LABELS["images_per_s"],
            LABELS["peak_activation_mib"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["rule"], {"true": "yes", "false": "no"}.get(r["local"], "-"), r["steps"] or "-",
                 *(r[c] or "-" for c in probes),
                 _with_ratio(r["images_per_s"], r["images_per_s_vs_bp"]),
                 _with_ratio(r["peak_activation_mib"], r["peak_activation_vs_bp"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    r0 = rows[0] if rows else {}
    enc_opts = ", ".join(f"{k}={v}" for k, v in (cfg.encoder_options or {}).items())
    rule_opts = "; ".join(f"{r}: " + ", ".join(f"{k}={v}" for k, v in o.items())
                          for r, o in (cfg.rule_options or {}).items())
    recipes = "; ".join(f"{r}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for r, o in (cfg.recipes or {}).items())
    against = ", ".join(f"{r} vs {b or 'none'}" for r, b in (own_baselines or {}).items())
    own = (f"; own recipes (encoder and input) {recipes}, each with its own random-init row, its speed and memory "
           f"read against the end-to-end rule of its recipe{f' ({against})' if against else ''}" if recipes else "")
    protocols = ", ".join(cfg.probes)
    epochs = f"fast and blocks: {cfg.probe_epochs} epochs on frozen features"
    if any(p in cfg.probes for p in ("paper", "paper-bn")):
        epochs += f"; paper: {cfg.paper_epochs} epochs (the paper: 300)"
    speed = (f"train img/s and activation memory measured in one process on the same random views "
             f"({cfg.batch_size} images, in each rule's view layout; speed: median of "
             f"{_count(cfg.measure_rounds, 'round')} of {_count(cfg.measure_steps, 'step')} per rule, the rules "
             f"interleaved), vs {baseline}" if baseline else
             "train img/s and activation memory: " + ("not measured" if not cfg.measure else "no BP baseline"))
    if baseline and baseline_measured and "images_per_s" in baseline_measured:
        speed += (f" (measured with the same head, not trained here: {baseline_measured['images_per_s']:.1f} img/s, "
                  f"{baseline_measured['peak_activation_bytes'] / 2**20:.3f} MiB)")
    lines += ["", (
        f"{cfg.dataset}{f' (subset {cfg.subset})' if cfg.subset else ''}, {cfg.encoder} width {cfg.width:g}"
        f"{f' ({enc_opts})' if enc_opts else ''}; budget {cfg.budget} steps x {cfg.batch_size} images, AdamW lr "
        f"{cfg.lr:g}, seed {cfg.seed}, amp {cfg.amp}{f'; rule options {rule_opts}' if rule_opts else ''}"
        f"{own}. "
        f"Probes ({protocols}; test accuracy %, {r0.get('probe_train_images', '?')} train / "
        f"{r0.get('probe_test_images', '?')} test images; {epochs}); random-init: the same probes on an untrained "
        f"encoder of the same shape (seed {cfg.seed}: the weights training started from). {speed}. "
        f"Hardware: {r0.get('hardware', '?')} ({r0.get('device', '?')}, {r0.get('threads', '?')} threads), "
        f"torch {r0.get('torch', '?')}."
    )]
    return "\n".join(lines) + "\n"


def plot(csv_path: Path, path: Path) -> Path:
    """``compare.png`` from the CSV (`localssl.reports.plots.compare_bars`); RuntimeError without matplotlib."""
    from localssl.reports.plots import compare_bars

    columns, rows = read_csv(csv_path)
    probes = probe_names(columns)

    def val(r: dict[str, str], c: str) -> float | None:
        return float(r[c]) if r.get(c) else None

    return compare_bars(
        [r["rule"] for r in rows], {probe_label(c): [val(r, c) for r in rows] for c in probes},
        [val(r, "images_per_s") for r in rows], [val(r, "peak_activation_mib") for r in rows], path,
    )


__all__ = ["CSV_NAME", "MD_NAME", "PNG_NAME", "RANDOM_INIT", "column_name", "markdown", "plot", "probe_label",
           "read_csv", "table_rows", "write_csv"]
