"""The formatter of ``localssl bench``: the human-readable tables of a `run_bench` result."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from localssl.reports.bench.breakdown import TIME_PARTS
from localssl.reports.bench.common import (
    AUGMENT_TARGET,
    MEMORY_TARGET,
    NOISY_SPREAD,
    REFERENCE_FLOOR,
)
from localssl.reports.bench.flop_notes import flop_notes
from localssl.reports.bench.flops import FLOP_PARTS

_FLOP_LABELS = {
    "encoder_fwd": "enc fwd",
    "encoder_bwd_weight": "enc dW",
    "encoder_bwd_input": "enc dX",
    "rule_params_fwd": "B/proj fwd",
    "rule_params_bwd": "B/proj bwd",
    "loss": "loss",
    "context_fwd": "DFB ctx",
    "total": "total",
}
_TIME_LABELS = {"conv_fwd": "conv fwd", "conv_dw": "conv dW", "conv_dw_dx": "conv dW+dX", "matmul": "matmul",
                "pool": "pool", "relu": "ReLU", "fill_copy": "fill/copy", "optimizer": "AdamW",
                "other_ops": "other ops", "outside_ops": "outside ops"}


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "NO")


def _ratio(x: float | None, qs: Sequence[float] | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" + (f" ({qs[0]:.2f}-{qs[1]:.2f})" if qs else "")


def _header(res: dict[str, Any]) -> list[str]:
    c, env = res["config"], res["env"]
    sup = res.get("precision_support") or {}
    flags = ", ".join(f"{f} {'present' if on else 'absent'}" for f, on in sup.get("cpu_flags", {}).items())
    scheds = "; ".join(f"width {s['width']}: {s['rounds']} rounds x {s['steps']} steps (+{s['warmup']} warm-up)"
                       for s in c["schedules"])
    out = [
        "localssl bench",
        f"  hardware: {env.get('cpu')}" + (f", GPU {env['gpu']}" if "gpu" in env else "")
        + f"; {env.get('cpu_count')} CPUs, torch threads {c['threads']}",
        f"  precision: CPU flags {flags or 'unreadable'}; native bf16 on {sup.get('device', c['device'])}: "
        f"{_yes(sup.get('native_bf16'))} ({sup.get('decided_by', '-')}); `--amp auto` picks "
        f"{sup.get('amp_auto', '-')} here",
    ]
    if res.get("precision_note"):
        out.append(f"  {res['precision_note']}")
    out += [
        f"  versions: python {env.get('python')}, torch {env.get('torch')}, kornia {env.get('kornia', '-')}; "
        f"{env.get('platform')}",
        f"  encoder {c['encoder']}, widths {', '.join(f'{w}' for w in c['widths'])}, precisions "
        f"{', '.join(c['precisions'])}, batch {c['batch_size']} images ({c['views_per_step']} views), "
        f"device {c['device']}, {'channels_last' if c['channels_last'] else 'contiguous'}",
        f"  image sizes: speed/FLOPs {c['speed_size']}px, memory {', '.join(f'{s}px' for s in c['image_sizes'])}; "
        f"speed: {scheds}; within a width every rule at every precision interleaved, median",
        f"  tables 2-6 at width {c['width']}, {c['precision']} (the first width and precision)",
        f"  allocator: {env.get('allocator', 'default')}",
        f"  load average (1, 5, 15 min) before / after: {res.get('load_average_before')} / "
        f"{res.get('load_average_after')}",
    ]
    return out


def _iqr(qs: Sequence[float] | None) -> str:
    return "-" if not qs else f"{qs[0]:.2f}-{qs[1]:.2f}"


def _yes(x: bool | None) -> str:
    return "-" if x is None else ("yes" if x else "no")


def _speed_table(res: dict[str, Any]) -> list[str]:
    sp, env = res["speed"], res["env"]
    out = ["", f"1. Training speed at {sp['image_size']}px (images/s, one image = two views; median over rounds; "
               "spread = (max - min) / median)"]
    rows, errors = [], []
    for e in sp["entries"]:
        for r in e["rules"]:
            where = f"width {e['width']}, {r['precision']}"
            if "error" in r:
                errors.append(f"   {r['label']} ({where}): not run: {r['error']}")
                continue
            tgt = r.get("target_vs_bp")
            pf = r.get("page_faults_per_step")
            rows.append([f"{e['width']}", r["precision"], r["label"], f"{r['images_per_s']:.1f}",
                         f"{r['spread']:.0%}", f"{r['step_ms']:.0f}", f"{r['optimizer_share']:.0%}",
                         "-" if pf is None else f"{pf:.0f}", r.get("bp_twin", "-"),
                         _ratio(r.get("vs_bp"), None), _iqr(r.get("vs_bp_rounds_quartiles")),
                         _ratio(r.get("vs_fp32"), r.get("vs_fp32_rounds_quartiles")),
                         f">= {tgt}x" if tgt else "", _mark(r.get("meets_target"))])
    out.append(_table(["width", "prec", "rule", "img/s", "spread", "ms/step", "in AdamW", "faults/step",
                       "BP twin", "vs twin", "per-round IQR", "vs fp32 (IQR)", "target", "met"], rows))
    out += errors
    out.append("   BP twin = the end-to-end rule a row is compared with (the rule's registered counterpart where it "
               "is benched, else the first end-to-end rule benched); vs twin = against it at the same width and "
               "precision; vs fp32 = the same rule at fp32, same "
               "width and rounds; per-round IQR = quartiles of the same ratio taken round by round (its noise on this "
               "machine); in AdamW = share of the step inside optimizer.step(); faults/step = minor page faults of "
               "the process per timed step (memory the allocator handed back and touched again); [unfused AdamW] = "
               "the same rule with torch's for-each AdamW instead of the fused kernel that `train` uses (a what-if).")
    worst = max((r["spread"] for e in sp["entries"] for r in e["rules"] if r.get("spread") is not None), default=0.0)
    if worst > NOISY_SPREAD:
        out.append(f"   WARNING: noisy timings (spread up to {worst:.0%}; load average "
                   f"{res.get('load_average_before')} -> {res.get('load_average_after')} on "
                   f"{env.get('cpu_count')} CPUs): rerun on a quiet machine, or with --threads 1 for steadier "
                   "ratios.")
    return out


def format_report(res: dict[str, Any]) -> str:
    """The human-readable tables of a `run_bench` result."""
    c = res["config"]
    out = _header(res)
    sp = res.get("speed")
    if sp and sp["entries"]:
        out += _speed_table(res)
    if sp and "augment" in sp:
        a = sp["augment"]
        out += ["", f"4. Augmentation (SimCLRViews, uint8 -> 2 views) at {sp['image_size']}px: "
                    f"{a['images_per_s']:.0f} images/s"]
        if a["vs_train"]:
            out.append(f"   vs training (width {c['width']}, {c['precision']}): "
                       + ", ".join(f"{k} {v:.1f}x" for k, v in a["vs_train"].items())
                       + f"  (target >= {AUGMENT_TARGET:.0f}x: {_mark(a.get('meets_target'))})")
    for m in res.get("memory", []):
        f = m["floor"]
        out += ["", f"2./3. Memory at {m['image_size']}px, width {m.get('width', c['width'])}, {c['precision']}, "
                    f"batch {c['batch_size']} (MiB). act = peak of the live bytes autograd saves for backward "
                    "(deduplicated by storage; parameters excluded),"]
        out.append(f"   floor of per-block training: largest block (block {f['largest_block'] + 1}) "
                   f"{_mib(f['floor_bytes'])} MiB / whole encoder under BP {_mib(f['bp_encoder_bytes'])} MiB = "
                   f"{f['floor_ratio']:.2f}; / sum over blocks {_mib(f['sum_of_blocks_bytes'])} MiB = "
                   f"{f['floor_ratio_vs_sum_of_blocks']:.2f} (METHODS 2.2b: ~{REFERENCE_FLOOR} for VGG-6 at 32px)")
        out.append(f"   per block alone: {', '.join(_mib(b) for b in f['block_bytes'])} MiB. BP saves a tensor "
                   "shared by two blocks once, so the floor against BP is the higher of the two ratios.")
        rows, errors = [], []
        for name, d in m["rules"].items():
            if "error" in d:
                errors.append(f"   {name}: not run: {d['error']}")
                continue
            p = d["parameters"]
            enc, rule = p["encoder"], p["rule"]
            rows.append([
                name, _mib(d["peak_saved_activation_bytes"]), d.get("bp_twin", "-"),
                f"{d['vs_bp']:.2f}x" if "vs_bp" in d else "-", f"{d['vs_floor']:.2f}x",
                _mark(d.get("meets_target")) if d["local"] else "",
                f"{enc['numel'] / 1e6:.2f}M", f"{rule['numel'] / 1e6:.2f}M",
                f"{rule['numel'] / enc['numel']:.1f}x",
                _mib(enc["total_bytes"]), _mib(rule["total_bytes"]),
                _mib(p["total_bytes"] + d["peak_saved_activation_bytes"]),
                f"{d['whole_vs_bp']:.2f}x" if "whole_vs_bp" in d else "-",
            ])
        out.append(_table(["rule", "act", "BP twin", "vs twin", "vs floor", f"<= {MEMORY_TARGET}x", "enc params",
                           "rule params", "rule/enc", "enc p+g+opt", "rule p+g+opt", "p+g+opt+act", "vs twin"],
                          rows))
        out += errors
        out += _group_lines(m)
        out.append("   p+g+opt = parameters + gradients + optimizer state as held after a step (AdamW: 2 tensors per "
                   "parameter, 16 bytes per fp32 parameter in all; a B in momentum SGD, b_optimizer=sgd: 1, 12 bytes; "
                   "plain SGD: none, 8 bytes). rule params = B matrices (U and V for a low-rank B) / projection / "
                   "head. p+g+opt+act = that plus the peak saved activations: the whole training state, vs twin = "
                   "against the BP twin's. A label NAME@KEY=VALUE is a variant of rule NAME with those options.")
        if f["floor_ratio"] > MEMORY_TARGET:
            out.append(f"   The {MEMORY_TARGET}x target lies below this encoder's floor against BP "
                       f"({f['floor_ratio']:.2f}): no block-by-block loop meets it without micro-batching inside "
                       "a block (METHODS 2.2b).")
        if c.get("micro_batch"):
            out.append(f"   [micro-batch {c['micro_batch']}] = the same gradient computed {c['micro_batch']} views at "
                       "a time (train --micro-batch): a no-graph pass keeps each block's pooled z, the losses give "
                       "dL/dz, then each chunk is recomputed with a graph. It costs one more forward (table 1). "
                       "End-to-end BP can be chunked the same way (GradCache), shown for comparison; its chunk "
                       "holds every block's activations, a local chunk one block's.")
        leaks = [n for n, d in m["rules"].items() if d.get("live_after_step_bytes")]
        if leaks:
            out.append(f"   WARNING: saved tensors still alive after the step for {', '.join(leaks)}.")
    for r in res.get("rss", []):
        if r is res["rss"][0]:
            out += ["", "   whole-process peak RSS, each rule in a fresh subprocess (MiB):"]
        if "error" in r:
            out.append(f"   {r.get('label', r['rule']):32s} {r['image_size']:4d}px: error: "
                       f"{r['error'].strip().splitlines()[-1]}")
        else:
            out.append(f"   {r.get('label', r['rule']):32s} {r['image_size']:4d}px: before the first step "
                       f"{_mib(r['rss_before_first_step'])}, peak {_mib(r['peak_rss'])} "
                       f"({'during training' if r['peak_since_build'] else 'whole process, imports included'}), "
                       f"growth {_mib(r['peak_rss'] - r['rss_before_first_step'])}")
    fl = res.get("flops")
    if fl:
        out += ["", f"5. FLOPs per step at {fl['image_size']}px, width {fl.get('width', c['width'])}, GFLOP per "
                    "view (x2 per image); conv/matmul only, 2 FLOPs per multiply-add"]
        parts = [*FLOP_PARTS, "total"]
        rows, errors = [], []
        for name, d in fl["rules"].items():
            if "error" in d:
                errors.append(f"   {name}: not run: {d['error']}")
                continue
            rows.append([name] + [f"{d[p] / 1e9:.4f}" for p in parts])
        out.append(_table(["rule"] + [_FLOP_LABELS[p] for p in parts], rows))
        out += errors
        out += flop_notes(fl["rules"], fl.get("width", c["width"]), c.get("bp_twins", {}), c["encoder"])
    tb = res.get("time_breakdown")
    if tb:
        s0 = c["schedules"][0]
        out += ["", f"6. Where a step's time goes at {tb['image_size']}px, width {tb.get('width', c['width'])}, "
                    f"{tb.get('amp_dtype', c['precision'])} (ms per step, each op timed on its own; median per column "
                    f"over {s0['rounds']} interleaved rounds of {s0['steps']} steps; conv dW = weight gradient only, "
                    "dW+dX = also the input gradient)"]
        rows, errors = [], []
        for name, d in tb["rules"].items():
            if "error" in d:
                errors.append(f"   {name}: not run: {d['error']}")
                continue
            rows.append([name] + [f"{1000 * d[p]:.1f}" for p in (*TIME_PARTS, "total")])
        out.append(_table(["rule"] + [_TIME_LABELS[p] for p in TIME_PARTS] + ["total"], rows))
        out += errors
        out += _breakdown_notes(tb["rules"], c.get("bp_twins", {}))
    return "\n".join(out)



def _group_lines(m: dict[str, Any]) -> list[str]:
    """Per local rule: its peak against its twin and the floor, and each group's peak next to its blocks alone
    (the difference is what the rule's own head and loss hold on top of the blocks)."""
    f = m["floor"]
    out = ["   vs floor = act over the floor (the largest block's own saved activations); per group: the peak of "
           "each group's step (blocks + the rule's head and loss), next to the block alone:"]
    for name, d in m["rules"].items():
        if "error" in d or not d["local"] or d.get("micro_batch"):
            continue
        twin = (f"{d['vs_bp']:.2f}x {d['bp_twin']} ({_mib(m['rules'][d['bp_twin']]['peak_saved_activation_bytes'])})"
                if "vs_bp" in d else "no BP twin benched")
        out.append(f"   {name}: {_mib(d['peak_saved_activation_bytes'])} MiB = {twin}, {d['vs_floor']:.2f}x the floor "
                   f"({_mib(f['floor_bytes'])}); per group {', '.join(_mib(b) for b in d['group_peaks'])} "
                   f"(blocks alone {', '.join(_mib(b) for b in f['block_bytes'])})")
    return out if len(out) > 1 else []


def _breakdown_notes(per_rule: dict[str, Any], twins: dict[str, str | None]) -> list[str]:
    notes = ["   outside ops = wall time minus the timed ops (Python, autograd, and this timing's own overhead, "
             "so totals run above table 1's ms/step)."]
    for name, d in per_rule.items():
        twin = twins.get(name)
        bp = per_rule.get(twin) if twin else None
        if name == twin or "error" in d or not bp or "error" in bp:
            continue
        rest, rest_bp = d["total"] - d["conv"], bp["total"] - bp["conv"]
        notes.append(f"   {name} vs {twin}: convolutions {1000 * d['conv']:.1f} vs {1000 * bp['conv']:.1f} ms "
                     f"({bp['conv'] / d['conv']:.2f}x faster), everything else {1000 * rest:.1f} vs "
                     f"{1000 * rest_bp:.1f} ms; whole step {bp['total'] / d['total']:.2f}x.")
    return notes


def _changed_rule_options(resolved: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The options a bench ran with that differ from their rule's defaults (``--rule-opt``), over all its rules."""
    from dataclasses import asdict

    from localssl.rules import RULES, split_variant

    out: dict[str, Any] = {}
    for label, opts in resolved.items():
        rule, own = split_variant(label)
        if rule not in RULES:  # a result of a version with other rules
            continue
        defaults = {k: v for k, v in asdict(RULES.get(rule).options()).items() if k not in own}  # the label says
        out.update({k: v for k, v in opts.items() if k in defaults and defaults[k] != v})
    return out


def twin_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of saved `run_bench` results (``localssl bench --table FILE.json ...``): per rule, its
    peak saved activations against its BP twin and against the per-stage floor, and its images/s against the
    twin's, one block of rows per result (its encoder, input size, batch, width and precision in the first column).

    The README's bench table for the ResNets is this output, so it cannot drift from the JSON it cites.
    """
    head = ["encoder, input", "rule", "BP twin", "saved activations, MiB", "vs twin", "vs floor", "images/s",
            "vs twin"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for res in results:
        c = res["config"]
        changed = _changed_rule_options(c.get("rule_options") or {})
        heads = ", ".join(f"{k}={v}" for k, v in changed.items()) if changed else "rule options at their defaults"
        where = f"{c['encoder']} width {c['width']}, {{size}} px, batch {c['batch_size']}, {c['precision']}; {heads}"
        speed = {}
        entries = (res.get("speed") or {}).get("entries") or []
        if entries:
            speed = {r["rule"]: r for r in entries[0]["rules"] if r["main"]}
        for m in res.get("memory", []):
            f = m["floor"]
            label = where.format(size=m["image_size"])
            rows = [d for d in m["rules"].values() if "error" not in d and not d.get("micro_batch")]
            for i, d in enumerate(rows):
                sp = speed.get(d["rule"], {})
                lines.append("| " + " | ".join([
                    label if i == 0 else "", d["rule"], d.get("bp_twin", "-"), _mib(d["peak_saved_activation_bytes"]),
                    f"{d['vs_bp']:.2f}x" if "vs_bp" in d else "-",
                    f"{d['peak_saved_activation_bytes'] / f['floor_bytes']:.2f}x",  # results of earlier versions too
                    f"{sp['images_per_s']:.1f}" if "images_per_s" in sp else "-",
                    f"{sp['vs_bp']:.2f}x" if "vs_bp" in sp else "-"]) + " |")
            # The floor against the BP twin of the first local rule: the lowest a local rule could get to.
            twin = next((d["bp_twin"] for d in rows if d["local"] and "bp_twin" in d), None)
            twin_bytes = m["rules"][twin]["peak_saved_activation_bytes"] if twin else None
            lines.append("| " + " | ".join([
                "", f"per-stage floor: block {f['largest_block'] + 1} alone, no head", twin or "",
                _mib(f["floor_bytes"]), f"{f['floor_bytes'] / twin_bytes:.2f}x" if twin_bytes else "", "1.00x",
                "", ""]) + " |")
            notes.append(f"{label}: floor {_mib(f['floor_bytes'])} MiB = {f['floor_ratio']:.2f} of the whole "
                         f"encoder's {_mib(f['bp_encoder_bytes'])} MiB under BP (no head)")
    return "\n".join(lines + [""] + [f"- {n}" for n in dict.fromkeys(notes)])
