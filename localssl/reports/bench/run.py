"""The orchestrator of ``localssl bench``: which widths and precisions, then every measuring tool in turn."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from localssl.engine import runtime
from localssl.engine.runtime import environment_info, resolve_amp, resolve_device, retain_freed_memory
from localssl.models import build_encoder, resolve_encoder_options
from localssl.reports.bench.breakdown import measure_breakdown
from localssl.reports.bench.common import (
    AUGMENT_TARGET,
    DEFAULT_RULES,
    MEMORY_TARGET,
    PRECISIONS,
    REFERENCE_FLOOR,
    REFERENCE_GFLOP,
    Log,
    bench_config,
    bp_twins,
    check_rule_options,
    dtype_name,
    rule_facts,
    rule_variants,
    variant_label,
)
from localssl.reports.bench.flops import measure_flops
from localssl.reports.bench.memory import measure_memory
from localssl.reports.bench.rss import peak_rss
from localssl.reports.bench.speed import Schedule, loadavg, measure_speed
from localssl.rules import resolve_rule_options, speed_targets, split_variant

#: Widths timed by default: the README's 0.25 and the paper's full width.
DEFAULT_WIDTHS = (0.25, 1.0)
#: From this width on, the speed rounds use the ``wide_*`` step counts: at 1.0 a step costs ~16x the
#: FLOPs of one at 0.25, and CLAPP++'s dense B holds ~201M parameters.
WIDE_WIDTH = 1.0
#: The CPU flags the header shows: the two that decide native bf16 (`runtime.CPU_BF16_FLAGS`) and
#: the ones they come with (AVX-512 foundation, AMX tiles). oneDNN emulates bf16 on plain avx512f.
SHOWN_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def precision_support(dev: torch.device) -> dict[str, Any]:
    """What decides the precision on ``dev``: the CPU's flags, native bf16 or not, and `--amp auto`'s pick."""
    flags = runtime.cpu_flags()
    shown = dict.fromkeys([*SHOWN_CPU_FLAGS, *sorted(runtime.CPU_BF16_FLAGS - set(SHOWN_CPU_FLAGS))])
    out: dict[str, Any] = {"device": dev.type, "cpu_flags": {f: f in flags for f in shown}}
    if dev.type == "cuda":
        out["native_bf16"] = bool(torch.cuda.is_bf16_supported())
        out["decided_by"] = f"torch.cuda.is_bf16_supported() on {torch.cuda.get_device_name(dev)}: {out['native_bf16']}"
    else:
        out["native_bf16"] = runtime.cpu_supports_bf16()
        have = sorted(runtime.CPU_BF16_FLAGS & flags)
        out["decided_by"] = (f"CPU flag {' and '.join(have)} present" if have else
                             f"neither {' nor '.join(sorted(runtime.CPU_BF16_FLAGS))} in the CPU flags")
    out["amp_auto"] = dtype_name(resolve_amp("auto", dev))
    return out


def resolve_precisions(precisions: str | Sequence[str], support: dict[str, Any]) -> tuple[list[str], str | None]:
    """The precisions to time, in order, and a line saying why bf16 is skipped or emulated (None if neither).

    ``auto``: `--amp auto`'s pick first (the precision `localssl train` uses
    here, which the memory, FLOP and breakdown tables then use too), and
    fp32 next to it where that pick is bf16. Otherwise the names asked for
    (fp32, bf16), in their order.
    """
    asked = [precisions] if isinstance(precisions, str) else list(precisions)
    if asked == ["auto"]:
        if support["native_bf16"]:
            return ["bf16", "fp32"], None
        return ["fp32"], (f"bf16 skipped: no native bf16 here ({support['decided_by']}); on a CPU oneDNN would "
                          "emulate it, several times slower than fp32. --precisions fp32 bf16 times it anyway.")
    bad = [p for p in asked if p not in PRECISIONS]
    if not asked or bad:
        raise ValueError(f"precisions {asked}: give 'auto' alone, or any of {', '.join(PRECISIONS)}"
                         + (f" (unknown: {', '.join(map(str, bad))})" if bad else ""))
    out = list(dict.fromkeys(asked))
    note = None
    if "bf16" in out and not support["native_bf16"]:
        note = (f"bf16 timed as asked, without native bf16 here ({support['decided_by']}): emulated, so its "
                "figures say nothing about a device that has it.")
    return out, note


def run_bench(
    encoder: str = "vgg6",
    widths: Sequence[float] = DEFAULT_WIDTHS,
    image_sizes: Sequence[int] = (32, 96),
    batch_size: int = 32,
    steps: int = 5,
    warmup: int = 2,
    rounds: int = 3,
    wide_steps: int = 1,
    wide_warmup: int = 1,
    wide_rounds: int = 5,
    precisions: str | Sequence[str] = "auto",
    rules: Sequence[str] = DEFAULT_RULES,
    speed_size: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    channels_last: bool = True,
    speed: bool = True,
    memory: bool = True,
    flops: bool = True,
    augment: bool = True,
    compare_precision: bool = True,
    rss: bool = False,
    breakdown: bool = True,
    micro_batch: int | None = None,
    retain_memory: bool = True,
    seed: int = 0,
    log: Log | None = None,
    encoder_options: Mapping[str, Any] | None = None,
    rule_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return every figure as a JSON-serialisable dict.

    Speed is timed at every (width, precision): ``widths`` below
    ``WIDE_WIDTH`` for ``rounds`` rounds of ``steps`` steps after ``warmup``,
    wider ones with the ``wide_*`` counts; ``precisions`` is ``auto`` (fp32,
    and bf16 where the device runs it natively: `resolve_precisions`) or a
    list of names. The other tables (memory, FLOPs, breakdown, RSS) describe
    the first width at the first precision. Speed, FLOPs and augmentation
    are measured at ``speed_size`` (default: the first of ``image_sizes``);
    activation and parameter memory at every size. ``compare_precision``
    adds to the first width's speed rounds one rule in the other memory
    layout (and at the other precision if that one is not timed anyway) and
    the rule with the most parameters of its own with the unfused (for-each)
    AdamW (`speed.extra_rules`). ``micro_batch`` (views per
    chunk; None to skip) adds every rule once more with the micro-batched
    step (`train_step(micro_batch=...)`) to the first width's speed, memory
    and RSS figures. ``breakdown`` times every op of a few steps per rule,
    by family. ``retain_memory`` sets the allocator as `localssl train` does
    (`retain_freed_memory`, in this process and in the RSS subprocesses).
    ``encoder_options`` are the encoder's own (ResNet's stem, cut);
    ``rule_options`` go to every rule that takes them (head sizes of the
    blockwise rules and their BP twins alike). Every rule is compared with its
    BP twin (`common.bp_twins`: its registered counterpart where benched, else
    the first end-to-end rule benched).
    """
    log = log or (lambda msg: None)
    rules = list(rules)
    widths = [float(w) for w in widths]
    if not rules:
        raise ValueError("no rules to benchmark")
    if not widths or min(widths) <= 0:
        raise ValueError(f"widths {widths}: give one or more positive width multipliers")
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size}: the negative of an image is another image of the batch")
    if min(steps, rounds, wide_steps, wide_rounds) < 1 or min(warmup, wide_warmup) < 0:
        raise ValueError("steps and rounds (and wide_steps, wide_rounds) must be >= 1, warmup (wide_warmup) >= 0")
    if micro_batch is not None and not 0 < micro_batch < 2 * batch_size:
        raise ValueError(f"micro_batch={micro_batch} views: choose 1 .. {2 * batch_size - 1} (a step has "
                         f"{2 * batch_size} views), or None")
    image_sizes = [int(s) for s in image_sizes]
    speed_size = int(speed_size if speed_size is not None else image_sizes[0])
    if threads:
        torch.set_num_threads(threads)
    if retain_memory:
        retain_freed_memory()
    dev = resolve_device(device)
    support = precision_support(dev)
    precisions, precision_note = resolve_precisions(precisions, support)
    amp_dtype = PRECISIONS[precisions[0]]  # of every table but the speed rounds
    width = widths[0]
    for w in dict.fromkeys(widths):  # unknown encoder names or options fail here, before any work
        build_encoder(encoder, w, options=encoder_options, image_size=speed_size)
    check_rule_options(rules, rule_options)
    # What each rule trains with, every default written out: a figure says which head it measured.
    resolved_rules = {r: resolve_rule_options(split_variant(r)[0],
                                              bench_config(r, encoder, width, None, rule_options).rule_options)
                      for r in rules}
    # The shared --rule-opt mapping, as each rule's own options (what the measuring tools take).
    per_rule = {r: bench_config(r, encoder, width, None, rule_options).rule_options for r in rules}
    facts = rule_facts(rules, encoder, width, speed_size, encoder_options, per_rule)
    twins = bp_twins(rules, encoder, width, speed_size, encoder_options, facts)
    schedules = [Schedule(wide_steps, wide_warmup, wide_rounds) if w >= WIDE_WIDTH else Schedule(steps, warmup, rounds)
                 for w in widths]

    result: dict[str, Any] = {
        "config": {
            "encoder": encoder, "widths": widths, "width": width, "precisions": precisions,
            "precision": precisions[0], "image_sizes": image_sizes, "speed_size": speed_size,
            "batch_size": batch_size, "views_per_step": 2 * batch_size,
            "steps": steps, "warmup": warmup, "rounds": rounds, "wide_from": WIDE_WIDTH,
            "wide_steps": wide_steps, "wide_warmup": wide_warmup, "wide_rounds": wide_rounds,
            "schedules": [{"width": w, "steps": s.steps, "warmup": s.warmup, "rounds": s.rounds}
                          for w, s in zip(widths, schedules)],
            "rules": rules, "device": str(dev), "threads": torch.get_num_threads(), "channels_last": channels_last,
            "cpu_native_bf16": runtime.cpu_supports_bf16() if dev.type == "cpu" else None, "seed": seed,
            "micro_batch": micro_batch,
            "encoder_options": resolve_encoder_options(encoder, encoder_options, speed_size),
            "rule_options": resolved_rules, "bp_twins": twins,
        },
        "env": environment_info(dev),
        "precision_support": support,
        "precision_note": precision_note,
        "targets": {"speed_vs_bp": speed_targets(rules, widths), "memory_local_vs_bp": MEMORY_TARGET,
                    "augment_vs_train": AUGMENT_TARGET},
        "reference": {"gflop_per_view_full_width_32px": REFERENCE_GFLOP, "floor_vgg6_32px": REFERENCE_FLOOR},
    }
    if precision_note:
        log(precision_note)

    result["load_average_before"] = loadavg()
    if speed or augment:
        result["speed"] = measure_speed(rules, encoder, widths, precisions, schedules, speed_size, batch_size, dev,
                                        channels_last, speed, augment, compare_precision, micro_batch, seed, log,
                                        twins, encoder_options=encoder_options, rule_options=per_rule,
                                        facts=facts)
    if breakdown:
        s0 = schedules[0]
        result["time_breakdown"] = measure_breakdown(rules, encoder, width, speed_size, batch_size, s0.steps,
                                                     s0.warmup, s0.rounds, dev, amp_dtype, channels_last, seed, log,
                                                     encoder_options, rule_options)
    if flops:
        result["flops"] = measure_flops(rules, encoder, width, speed_size, batch_size, dev, amp_dtype, channels_last,
                                        seed, log, encoder_options, rule_options)
    if memory:
        result["memory"] = [
            measure_memory(rules, encoder, width, s, batch_size, dev, amp_dtype, channels_last, micro_batch, seed, log,
                           twins, encoder_options=encoder_options, rule_options=per_rule)
            for s in image_sizes
        ]
    if rss:
        result["rss"] = []
        for s in image_sizes:
            for r, mb in rule_variants(rules, micro_batch):
                label = variant_label(r, mb)
                log(f"peak RSS: {label} at {s}px (subprocess)")
                try:
                    d = peak_rss(r, encoder, width, s, batch_size, max(1, warmup + 1), dev, amp_dtype,
                                 channels_last, threads, seed, mb, retain_memory, encoder_options, rule_options)
                except RuntimeError as e:
                    d = {"error": str(e)}
                result["rss"].append({"rule": r, "label": label, "micro_batch": mb, "image_size": s, **d})
    result["load_average_after"] = loadavg()
    return result
