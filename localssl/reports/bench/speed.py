"""Training images/s of the rules, side by side, at every (width, precision) asked (table 1).

Within one width, every rule at every precision is built once and the
variants are interleaved inside every round: a burst of load from another
process hits each of them alike, so the ratios (local / BP at one
precision, bf16 / fp32 for one rule) come from one run. Widths run one after
the other, each with its own step/round counts (a full-width step costs ~16x
one at width 0.25), and each width's models are freed before the next is
built (CLAPP++'s dense B alone holds ~201M parameters at width 1.0).
"""
from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from localssl.engine.optim import OptimizerSet
from localssl.reports.bench.common import (
    AUGMENT_TARGET,
    BUILD_ERRORS,
    PRECISIONS,
    BenchState,
    Log,
    RuleFacts,
    build_state,
    error_text,
    hook_optimizer_step,
    median,
    quartiles,
    random_views,
    rule_facts,
    sync,
    variant_label,
)
from localssl.reports.bench.memory import available_memory, check_fits, training_state_bytes
from localssl.rules import speed_target


@dataclass(frozen=True)
class Schedule:
    """How long one width is timed: untimed warm-up steps, then ``rounds`` rounds of ``steps`` steps per variant."""

    steps: int
    warmup: int
    rounds: int


def minor_faults() -> int | None:
    """Minor page faults of this process so far (None where `resource` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def loadavg() -> list[float] | None:
    """1-, 5- and 15-minute load averages (Unix): other processes' load makes timings noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def time_optimizer(state: BenchState, dev: torch.device) -> list[float]:
    """Add the seconds spent in the optimizer's ``step`` to the returned one-element list."""
    acc = [0.0]
    t0 = [0.0]

    def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        sync(dev)
        t0[0] = time.perf_counter()

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        sync(dev)
        acc[0] += time.perf_counter() - t0[0]

    hook_optimizer_step(state, pre, post)
    return acc


def extra_rules(rules: Sequence[str], facts: Mapping[str, RuleFacts | None]) -> tuple[str, str]:
    """The rules of the extra rows, chosen by what they hold (`RuleFacts`), never by name: ``ref``, the local rule
    with the fewest parameters of its own (the small-B rule, whose step is mostly the encoder's, so precision and
    memory layout show in it undiluted; ``rules[0]`` if no local rule could be built), and ``big``, the rule with
    the most (where the fused AdamW kernel saves the most; ``ref`` if none could be built)."""
    built = [r for r in rules if facts.get(r) is not None]
    local = [r for r in built if facts[r].local]
    ref = min(local, key=lambda r: facts[r].own_params) if local else rules[0]
    big = max(built, key=lambda r: facts[r].own_params) if built else ref
    return ref, big


def speed_variants(rules: Sequence[str], width: float, precisions: Sequence[str], with_extras: bool,
                   channels_last: bool, compare_precision: bool, micro_batch: int | None,
                   facts: Mapping[str, RuleFacts | None] | None = None) -> list[dict[str, Any]]:
    """The rows timed together at one width: every rule at every precision, then (``with_extras``) the extras.

    The extras run at the first precision only: every rule micro-batched;
    with ``compare_precision``, one rule (``ref`` of `extra_rules`, read
    from ``facts``) at the other precision where that precision is not
    measured anyway (so a CPU without native bf16 still shows what emulated
    bf16 costs) and in the other memory layout, and the rule with the most
    parameters of its own (``big``) with the unfused (for-each) AdamW, to
    show what the trainer's fused kernel saves on those parameters.
    """
    p0 = precisions[0]
    base = {"width": width, "channels_last": channels_last, "entry_precision": p0, "micro_batch": None}
    out = [{**base, "rule": r, "precision": p, "entry_precision": p, "main": True, "label": r}
           for p in precisions for r in rules]
    if not with_extras:
        return out
    out += [{**base, "rule": r, "precision": p0, "main": False, "micro_batch": mb, "label": variant_label(r, mb)}
            for r, mb in ((r, micro_batch) for r in rules) if mb]
    if compare_precision:
        ref, big = extra_rules(rules, facts or {})
        layout = "channels_last" if channels_last else "contiguous"
        other_layout = "contiguous" if channels_last else "channels_last"
        other = "bf16" if p0 == "fp32" else "fp32"
        if other not in precisions:
            out.append({**base, "rule": ref, "precision": other, "main": False, "label": f"{ref} [{other}, {layout}]"})
        out.append({**base, "rule": ref, "precision": p0, "main": False, "channels_last": not channels_last,
                    "label": f"{ref} [{p0}, {other_layout}]"})
        # The trainer uses fused AdamW; the unfused one shows what that saves.
        out.append({**base, "rule": big, "precision": p0, "main": False, "unfused": True,
                    "label": f"{big} [unfused AdamW]"})
    return out


def measure_speed(
    rules: Sequence[str],
    encoder: str,
    widths: Sequence[float],
    precisions: Sequence[str],
    schedules: Sequence[Schedule],
    size: int,
    batch_size: int,
    dev: torch.device,
    channels_last: bool,
    do_train: bool,
    do_augment: bool,
    compare_precision: bool,
    micro_batch: int | None,
    seed: int,
    log: Log,
    twins: Mapping[str, str | None] | None = None,
    *,
    encoder_options: Mapping[str, Any] | None = None,
    rule_options: Mapping[str, Mapping[str, Any]] | None = None,
    facts: Mapping[str, RuleFacts | None] | None = None,
) -> dict[str, Any]:
    """Table 1 (and 4, augmentation): one entry per (width, precision), augmentation timed at the first width.

    The first width's first precision also carries the extra rows of
    `speed_variants`. A rule that cannot be built or run at a width (pooling
    grids that do not fit, memory) becomes a row with its ``error``. Every
    row's ratio is against its BP twin (``twins``, `common.bp_twins`) at the
    same width and precision, next to its target (`localssl.rules.speed_target`
    at that width). ``encoder_options``: the encoder's own options;
    ``rule_options``: rule name -> that rule's options (a rule not in it: its
    defaults); ``facts``: `common.rule_facts` of the rules at the first width
    (built here if not given), which choose the rules of the extra rows.
    """
    options = {"encoder_options": encoder_options, "rule_options": rule_options or {}}
    if facts is None and do_train and compare_precision:
        facts = rule_facts(rules, encoder, widths[0], size, encoder_options, rule_options)
    entries: list[dict[str, Any]] = []
    augment: dict[str, Any] | None = None
    for i, (width, sched) in enumerate(zip(widths, schedules)):
        if i and not do_train:
            break
        variants = speed_variants(rules, width, precisions, i == 0, channels_last, compare_precision,
                                  micro_batch, facts) if do_train else []
        rows, aug = _time_width(variants, encoder, width, sched, size, batch_size, dev, do_augment and i == 0,
                                seed, log, options)
        augment = aug if i == 0 else augment
        by_entry: dict[str, list[dict[str, Any]]] = {p: [] for p in precisions}
        for r in rows:
            by_entry[r.pop("entry_precision")].append(r)
        for p in precisions if do_train else ():
            entries.append({"width": width, "precision": p, "steps": sched.steps, "warmup": sched.warmup,
                            "rounds": sched.rounds, "interleaved_with": [q for q in precisions if q != p],
                            "rules": by_entry[p]})
        _ratios(entries[-len(precisions):] if do_train else [], twins or {})
    out: dict[str, Any] = {"image_size": size, "unit": "images/s (one image = two views)",
                           "widths": list(widths), "precisions": list(precisions), "entries": entries}
    if augment is not None:
        first = entries[0]["rules"] if entries else []
        augment["vs_train"] = {r["label"]: augment["images_per_s"] / r["images_per_s"]
                               for r in first if r["main"] and "images_per_s" in r}
        if augment["vs_train"]:
            worst = min(augment["vs_train"].values())
            augment["min_vs_train"] = worst
            augment["meets_target"] = worst >= AUGMENT_TARGET
        out["augment"] = augment
    return out


def _time_width(variants: list[dict[str, Any]], encoder: str, width: float, sched: Schedule, size: int,
                batch_size: int, dev: torch.device, do_augment: bool, seed: int, log: Log,
                options: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Build every variant of one width, time them interleaved, free them; one row per variant.

    ``options``: ``{"encoder_options": ..., "rule_options": {rule: ...}}`` (`measure_speed`).
    """
    gc.collect()
    available = available_memory(dev)
    planned = 0
    states: dict[int, BenchState] = {}
    views: dict[bool, torch.Tensor] = {}
    for k, v in enumerate(variants):
        what = f"{v['label']} ({v['precision']}) at width {width}"
        try:
            st = build_state(v["rule"], encoder, width, size, dev, PRECISIONS[v["precision"]], v["channels_last"],
                             seed, v["micro_batch"], encoder_options=options["encoder_options"],
                             rule_options=options["rule_options"].get(v["rule"]))
            need = training_state_bytes(st)
            check_fits(planned + need, available, what)
            planned += need
            if v.get("unfused"):
                unfused = torch.optim.AdamW(st.optimizer.param_groups[0]["params"], lr=2e-4, weight_decay=0.0,
                                            fused=False)
                if isinstance(st.optimizer, OptimizerSet):  # a hinted B keeps its own optimizer (b_optimizer=sgd)
                    st.optimizer.optimizers[0] = unfused
                else:
                    st.optimizer = unfused
            states[k] = st
        except BUILD_ERRORS as e:
            v["error"] = error_text(e)
            log(f"speed: {what}: not run: {v['error']}")
        st = None  # a variant that did not fit is freed before the next is built
        if v["channels_last"] not in views:
            views[v["channels_last"]] = random_views(batch_size, size, dev, v["channels_last"], seed)
    aug = x_uint8 = None
    if do_augment:
        from localssl.data.augment import SimCLRViews

        aug = SimCLRViews(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_scale=(0.08, 1.0)).to(dev)
        g = torch.Generator().manual_seed(seed)
        x_uint8 = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=g).to(dev)

    def time_it(fn: Callable[[], Any], n: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(dev)
        return time.perf_counter() - t0

    def step_fn(k: int) -> Callable[[], Any]:
        return lambda: states[k].step(views[variants[k]["channels_last"]])

    def fail(k: int, e: BaseException) -> None:  # e.g. an allocation refused mid-run: drop that variant only
        variants[k]["error"] = error_text(e)
        log(f"speed: {variants[k]['label']} ({variants[k]['precision']}) at width {width}: stopped: "
            f"{variants[k]['error']}")
        del states[k]
        gc.collect()

    opt_time = {k: time_optimizer(st, dev) for k, st in states.items()}
    for k in list(states):
        log(f"speed: width {width}: warm-up {variants[k]['label']} ({variants[k]['precision']})")
        try:
            time_it(step_fn(k), sched.warmup)
        except BUILD_ERRORS as e:
            fail(k, e)
    if aug is not None:
        time_it(lambda: aug(x_uint8), max(1, sched.warmup))
    samples: dict[int, list[float]] = {k: [] for k in states}
    opt_share: dict[int, list[float]] = {k: [] for k in states}
    faults: dict[int, int | None] = dict.fromkeys(states, 0)
    aug_samples: list[float] = []
    for r in range(sched.rounds):
        log(f"speed: width {width}: round {r + 1}/{sched.rounds}")
        for k in list(states):
            opt_time[k][0] = 0.0
            f0 = minor_faults()
            try:
                t = time_it(step_fn(k), sched.steps)
            except BUILD_ERRORS as e:
                fail(k, e)
                continue
            f1 = minor_faults()
            faults[k] = None if f0 is None or f1 is None or faults[k] is None else faults[k] + f1 - f0
            samples[k].append(batch_size * sched.steps / t)
            opt_share[k].append(opt_time[k][0] / t)
        if aug is not None:
            t = time_it(lambda: aug(x_uint8), sched.steps)
            aug_samples.append(batch_size * sched.steps / t)
    states.clear()
    gc.collect()

    rows = []
    for k, v in enumerate(variants):
        row: dict[str, Any] = {"label": v["label"], "rule": v["rule"], "width": width, "precision": v["precision"],
                               "channels_last": v["channels_last"], "main": v["main"],
                               "micro_batch": v["micro_batch"], "entry_precision": v["entry_precision"]}
        if "error" in v:
            row["error"] = v["error"]
        else:
            s = samples[k]
            med = median(s)
            row.update({"images_per_s": med, "rounds": s, "spread": (max(s) - min(s)) / med if med else None,
                        "step_ms": 1000 * batch_size / med, "optimizer_share": median(opt_share[k])})
            f = faults[k]
            row["page_faults_per_step"] = None if f is None else f / (sched.rounds * sched.steps)
        rows.append(row)
    augment = {"images_per_s": median(aug_samples), "rounds": aug_samples} if aug is not None else None
    return rows, augment


def _ratios(entries: Sequence[dict[str, Any]], twins: Mapping[str, str | None]) -> None:
    """Add to every timed row its ratio to its BP twin (same width and precision) and bf16 rows their ratio to fp32.

    Each comes with the quartiles of the same ratio taken round by round (the
    two rows ran back to back inside every round, so a burst of load hits
    both): they say how far the one median ratio can be trusted on this
    machine.
    """
    def main_row(entry: dict[str, Any], rule: str | None) -> dict[str, Any] | None:
        return next((r for r in entry["rules"] if r["main"] and r["rule"] == rule and "images_per_s" in r), None)

    fp32 = next((e for e in entries if e["precision"] == "fp32"), None)
    for entry in entries:
        for row in entry["rules"]:
            if "images_per_s" not in row:
                continue
            base = main_row(entry, twins.get(row["rule"]))
            if base is not None:
                row["bp_twin"] = base["rule"]
                row["vs_bp"] = row["images_per_s"] / base["images_per_s"]
                row["vs_bp_rounds_quartiles"] = quartiles([a / b for a, b in zip(row["rounds"], base["rounds"])])
                target = speed_target(row["rule"], entry["width"]) if row["main"] else None
                if target is not None:
                    row["target_vs_bp"] = target
                    row["meets_target"] = row["vs_bp"] >= target
            ref = main_row(fp32, row["rule"]) if fp32 is not None and entry is not fp32 and row["main"] else None
            if ref is not None:
                row["vs_fp32"] = row["images_per_s"] / ref["images_per_s"]
                row["vs_fp32_rounds_quartiles"] = quartiles([a / b for a, b in zip(row["rounds"], ref["rounds"])])
