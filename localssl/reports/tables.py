"""README tables generated from result files (STYLE principle 10).

``localssl report RUNS_DIR`` reads every run folder below RUNS_DIR (its
``config.yaml``, ``summary.json``, ``probe.json`` and
``probe-random-init.json``) and prints one Markdown table, so the numbers in
the README are never typed by hand.

A probe result is shown only while it still describes its run: it records
the checkpoint it measured (step and SHA-256), and a run resumed or retrained
since has another checkpoint, so the result is dropped with a note saying
why (rerun `localssl probe`). A result written before probes recorded their
checkpoint is shown, marked as unverified. Unreadable files are skipped with
a note naming them; they never stop the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from localssl.engine.checkpoint import CHECKPOINT, checkpoint_sha256

# (result key, accuracy field, header). The paper probe records the test
# accuracy after its last epoch and the best over its epochs (METHODS 2.5:
# which one the paper's table quotes is not known), so both are shown.
COLUMNS = [
    ("paper", "test_acc_final", "linear, paper protocol, final"),
    ("paper", "test_acc_best", "linear, paper protocol, best (epoch)"),
    ("fast_all", "test_acc", "linear, all layers (fast)"),
    ("fast_last", "test_acc", "linear, last layer (fast)"),
    ("knn_last", "test_acc", "kNN, last layer"),
]
# Shown only when some row has it: BatchNorm + pad-4 crop, ours, not the paper's.
PAPER_BN_COLUMN = ("paper-bn", "test_acc", "linear, paper-bn (ours)")
# The ``blocks`` protocol's keys, fast_block_1 .. fast_block_L (`localssl.evaluation.probe.block_key`).
BLOCK_PREFIX = "fast_block_"
AUGMENTED = ("paper", "paper-bn")
# What the table reads from a run's config.yaml.
CONFIG_KEYS = ("rule", "dataset", "encoder", "width", "batch_size", "lr", "seed")
UNVERIFIED = " †"


def _acc(probe: dict[str, Any], key: str, field: str = "test_acc") -> str:
    v = probe.get(key)
    if not isinstance(v, dict) or field not in v:
        return "-"
    cell = f"{100 * v[field]:.2f}"
    if field == "test_acc_best":
        cell += f" ({v.get('best_epoch', '?')} of {v.get('epochs', '?')})"
    return cell


def _upgrade(probe: dict[str, Any]) -> dict[str, Any]:
    """Read older probe files: their ``paper`` entry was the BatchNorm + pad-4 probe, now ``paper-bn``.

    The paper's own probe writes ``"normalization": "none"``; any other
    ``paper`` entry predates it.
    """
    paper = probe.get("paper")
    if isinstance(paper, dict) and paper.get("normalization") != "none":
        probe = dict(probe)
        probe.setdefault("paper-bn", probe.pop("paper"))
    return probe


def _read(path: Path, notes: list[str], kind: str = "json") -> Any:
    """The parsed file, or None with a note naming it and what is wrong."""
    try:
        text = path.read_text()
        data = json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        notes.append(f"skipped {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})")
        return None
    if not isinstance(data, dict):
        notes.append(f"skipped {path}: expected a mapping, found {type(data).__name__}")
        return None
    return data


def stale_reason(probe: dict[str, Any], cfg: dict[str, Any], current: str | None) -> str | None:
    """Why ``probe`` no longer describes the run whose config is ``cfg`` and whose checkpoint's
    SHA-256 is ``current`` (None: it does, or it cannot tell)."""
    if probe.get("random_init"):
        for key in ("encoder", "width", "encoder_options"):  # a key older results lack is not checked
            if key in probe and probe[key] != cfg.get(key):
                return f"measured a random-init {key} {probe[key]!r}, the run's is now {cfg.get(key)!r}"
        return None
    if "rule" in probe and probe["rule"] != cfg["rule"]:
        return f"measured rule {probe['rule']!r}, the run now holds {cfg['rule']!r}"
    record = probe.get("checkpoint")
    if not isinstance(record, dict):
        return None
    if current is None:
        return f"measured the checkpoint of step {record.get('step')}, and the run has no {CHECKPOINT} now"
    if record.get("sha256") != current:
        return (f"measured the checkpoint of step {record.get('step')} ({str(record.get('sha256'))[:12]}), the "
                f"run's {CHECKPOINT} is now another one ({current[:12]}): resumed or retrained since")
    return None


def _read_probe(path: Path, run: Path, cfg: dict[str, Any], current: str | None,
                notes: list[str]) -> dict[str, Any] | None:
    """A probe result of ``run`` that still describes it, or None (with a note unless the file is absent)."""
    if not path.exists():
        return None
    probe = _read(path, notes)
    if probe is None:
        return None
    why = stale_reason(probe, cfg, current)
    if why:
        notes.append(f"dropped {path}: {why}; rerun `localssl probe {run}`")
        return None
    return _upgrade(probe)


def _verified(probe: dict[str, Any]) -> bool:
    """Whether the result records what it measured (results of older versions do not)."""
    return ("encoder" in probe) if probe.get("random_init") else isinstance(probe.get("checkpoint"), dict)


def collect(runs_dir: str | Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of the table, one per probed run (and its random-init); ``notes`` gets what was left out and why."""
    notes = [] if notes is None else notes
    rows = []
    for cfg_path in sorted(Path(runs_dir).glob("*/config.yaml")):
        run = cfg_path.parent
        cfg = _read(cfg_path, notes, kind="yaml")
        if cfg is None:
            continue
        missing = [k for k in CONFIG_KEYS if k not in cfg]
        if missing:
            notes.append(f"skipped {cfg_path}: no {', '.join(repr(k) for k in missing)} entry")
            continue
        summary = (_read(run / "summary.json", notes) or {}) if (run / "summary.json").exists() else {}
        current = checkpoint_sha256(run / CHECKPOINT) if (run / CHECKPOINT).is_file() else None

        for stem, label in (("probe", cfg["rule"]), ("probe-random-init", "random-init")):
            probe = _read_probe(run / f"{stem}.json", run, cfg, current, notes)
            if probe is None:
                continue
            verified = _verified(probe)
            # The augmented probes run separately (e.g. on a train subset,
            # `--protocols paper paper-bn --out .../probe-paper.json`) join the row.
            for extra_path in (run / f"{stem}-paper.json", run / f"{stem}-paper-bn.json"):
                extra = _read_probe(extra_path, run, cfg, current, notes)
                if extra is None:
                    continue
                verified = verified and _verified(extra)
                for key in AUGMENTED:
                    if key in extra:
                        probe[key] = extra[key]
                        probe[f"{key}_num_train"] = extra.get("num_train")
            rows.append({"label": label + ("" if verified else UNVERIFIED), "run": run, "cfg": cfg,
                         "summary": summary if stem == "probe" else {}, "probe": probe, "verified": verified})
    return rows


def block_count(probe: dict[str, Any]) -> int:
    """How many ``fast_block_k`` results ``probe`` holds (0 without the ``blocks`` protocol)."""
    return sum(1 for k in probe if k.startswith(BLOCK_PREFIX) and k[len(BLOCK_PREFIX):].isdigit())


def probe_columns(probes: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(result key, accuracy field, header) of every probe column: the fixed ones, one per block after
    the last-layer probe where some result has the ``blocks`` protocol, and paper-bn where some has it."""
    blocks = max((block_count(p) for p in probes), default=0)
    block_cols = [(f"{BLOCK_PREFIX}{k}", "test_acc", f"linear, block {k} (fast)") for k in range(1, blocks + 1)]
    last = next(i for i, c in enumerate(COLUMNS) if c[0] == "fast_last") + 1
    return (COLUMNS[:last] + block_cols + COLUMNS[last:]
            + ([PAPER_BN_COLUMN] if any("paper-bn" in p for p in probes) else []))


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return probe_columns([r["probe"] for r in rows])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    # Speed is left to `localssl bench`, measured side by side on a quiet machine.
    cols = columns(rows)
    head = ["encoder / rule", *[c for _, _, c in cols], "pre-training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cfg, s, p = r["cfg"], r["summary"], r["probe"]
        if r["probe"].get("random_init") or r["label"].startswith("random-init"):
            budget = "none"
        else:
            n = cfg.get("subset") or "all"
            budget = f"{s.get('steps', '?')} steps x {cfg['batch_size']} images (of {n})"
        lines.append("| " + " | ".join([r["label"], *[_acc(p, k, f) for k, f, _ in cols], budget]) + " |")
    return "\n".join(lines)


def _epochs(rows: list[dict[str, Any]], key: str) -> str:
    """Epochs and train images of an augmented probe over all rows: one value, or each distinct one."""
    probes = [r["probe"] for r in rows if isinstance(r["probe"].get(key), dict)]
    used = sorted({(q[key].get("epochs"), q.get(f"{key}_num_train") or q.get("num_train")) for q in probes}, key=str)
    ref = next((q[key]["reference_epochs"] for q in probes if "reference_epochs" in q[key]), None)
    ref_text = f" (the paper: {ref})" if ref else ""
    return " / ".join(f"{e} epochs{ref_text} on {n} train images" for e, n in used)


def describe(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    cfg, p = r0["cfg"], r0["probe"]
    pc = p.get("probe_config", {})
    env = p.get("env", {})
    text = (
        f"{cfg['dataset']}, {cfg['encoder']} width {cfg['width']}, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"seed {cfg['seed']}; probes on {p.get('num_train')} train / {p.get('num_test')} test images "
        f"(fast: {pc.get('epochs_fast')} epochs on frozen features; kNN k={pc.get('knn_k')}, T={pc.get('knn_t')})."
    )
    if any(block_count(r["probe"]) for r in rows):
        text += (" Block k (fast): the same linear probe on block k's output alone, globally pooled (the "
                 "per-stage probe of blockwise SSL, METHODS 5.1); the last block's is the last-layer probe.")
    if any("paper" in r["probe"] for r in rows):
        text += (
            f" Paper protocol (METHODS 2.5): {_epochs(rows, 'paper')}; raw features, one linear layer, "
            "RandomResizedCrop 0.08-1 + flip, test after every epoch: final = after the last epoch, "
            "best = the highest of the per-epoch test accuracies (epoch of the best, of the epochs run)."
        )
    if any("paper-bn" in r["probe"] for r in rows):
        text += (
            f" paper-bn (ours, not the paper's: BatchNorm1d in front of the linear layer, pad-4 crop + flip): "
            f"{_epochs(rows, 'paper-bn')}."
        )
    text += f" Hardware: {env.get('cpu')}, {env.get('torch_threads')} threads, torch {env.get('torch')}."
    if not all(r["verified"] for r in rows):
        text += (f"{UNVERIFIED.strip()} A result written before probes recorded their checkpoint: it cannot be "
                 "checked against the run's current one.")
    return text


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown table of every run (and its probes) under a folder")
    p.add_argument("runs_dir")
    p.set_defaults(func=report_main)


def report_main(args: argparse.Namespace) -> int:
    notes: list[str] = []
    rows = collect(args.runs_dir, notes)
    for note in notes:
        print(f"report: {note}", file=sys.stderr)
    if not rows:
        raise FileNotFoundError(f"no probed runs under {args.runs_dir} (run `localssl probe` first)")
    print(markdown_table(rows))
    print()
    print(describe(rows))
    return 0
