"""Speed and activation memory of every compared rule, measured the same way, with ``localssl bench``'s tools.

The numbers of a comparison come from one process, one encoder shape, one
batch of random views (`bench.common.random_views`: the same inputs for
every rule) and the real training step, not from the training runs (which
ran one after the other, perhaps on a loaded machine, perhaps across
sessions):

- training images/s: `bench.speed.measure_speed`, the rules interleaved
  round by round, the median over rounds;
- peak activation memory per step: `bench.memory.measure_memory`, the peak
  of the bytes autograd holds for backward (parameters apart).

Each is reported next to an end-to-end baseline: the first end-to-end rule
compared, else the registered BP counterpart of the first local rule
(measured here with that rule's head options, not trained). The result is
kept in ``OUT/measurements.json`` with what it was measured for, so a
comparison run again with the same rules and settings reuses it.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localssl.atomic import atomic_file
from localssl.config import CompareConfig, TrainConfig
from localssl.reports.compare.runs import is_local, read_json

MEASUREMENTS = "measurements.json"


def baseline(tcfgs: dict[str, TrainConfig]) -> tuple[str | None, dict[str, Any] | None]:
    """The end-to-end rule that speed and memory are read against, and its options where it is not compared."""
    from localssl.builder import options_for
    from localssl.rules import bp_counterpart

    bp = next((r for r, c in tcfgs.items() if not is_local(c)), None)
    if bp is not None:
        return bp, None
    first = next(iter(tcfgs))
    other = bp_counterpart(tcfgs[first].rule)  # the rule's name, whatever its label (a variant's)
    return (other, options_for(other, tcfgs[first].rule_options)) if other else (None, None)


def measure_rules(cfg: CompareConfig, tcfgs: dict[str, TrainConfig], out: Path, log: Callable[[str], None],
                  groups: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Images/s and peak activation bytes per step of every rule of ``tcfgs`` (and the baselines).

    ``groups``: the rules by recipe (`run.recipe_groups`; default: one). The
    rules of one recipe are measured together on its encoder and input, the
    rules interleaved, against the recipe's end-to-end rule (`baseline`);
    rules of different recipes are never put in one ratio. Returns ``{"key",
    "baseline" (the first recipe's), "rules": {rule: {"local", "images_per_s",
    "peak_activation_bytes", "baseline"} or {"error"}}, "env", ...}``, or
    ``{"skipped": why}`` where the bench cannot measure this data set's images.
    """
    import torch

    from localssl.data import dataset_spec
    from localssl.engine.runtime import environment_info, resolve_amp, resolve_device
    from localssl.reports.bench.common import dtype_name

    spec = dataset_spec(cfg.dataset)
    groups = groups or {"": list(tcfgs)}
    if spec.channels != 3 or any((tcfgs[m[0]].resize or spec.image_size) is None for m in groups.values()):
        # The bench's random views are 3-channel squares of a known side.
        return {"skipped": f"the bench measures 3-channel images of a known size; {cfg.dataset} has "
                           f"{spec.channels} channel(s) at {cfg.resize or spec.image_size or 'a size known once read'}"
                           " px"}
    dev = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, dev)
    plans = []
    for members in groups.values():
        group = {r: tcfgs[r] for r in members}
        base, base_options = baseline(group)
        options = {r: c.rule_options for r, c in group.items()}
        if base is not None and base not in options:
            options[base] = base_options
        t0 = group[members[0]]
        plans.append({"rules": list(options), "rule_options": options, "baseline": base, "encoder": t0.encoder,
                      "width": t0.width, "encoder_options": t0.encoder_options,
                      "image_size": t0.resize or spec.image_size})
    key = {"groups": plans, "batch_size": cfg.batch_size, "precision": dtype_name(amp_dtype), "device": str(dev),
           "seed": cfg.seed, "channels_last": True,
           "schedule": [cfg.measure_steps, cfg.measure_warmup, cfg.measure_rounds]}
    path = out / MEASUREMENTS
    cached = read_json(path)
    if cached is not None and cached.get("key") == json.loads(json.dumps(key)):
        log(f"speed and memory: skipped: measured before ({path})")
        return cached
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rules: dict[str, dict[str, Any]] = {}
    speed_unit = None
    for plan in plans:
        log(f"speed and memory: measuring {', '.join(plan['rules'])} on {plan['encoder']} at {plan['image_size']} px "
            f"(interleaved rounds of {cfg.measure_steps} step(s) each) ...")
        measured, speed_unit = _measure(cfg, plan, dev, amp_dtype)
        rules.update({r: {**m, "baseline": plan["baseline"]} if "error" not in m else m for r, m in measured.items()})
    result = {"key": key, "baseline": plans[0]["baseline"], "rules": rules, "env": environment_info(dev),
              "speed_unit": speed_unit, "memory": "peak bytes autograd holds for backward in one step "
              f"of {cfg.batch_size} images (parameters apart)"}
    with atomic_file(path, "w") as fh:
        fh.write(json.dumps(result, indent=2))
    return result


def _measure(cfg: CompareConfig, plan: dict[str, Any], dev, amp_dtype) -> tuple[dict[str, dict[str, Any]], Any]:
    """One recipe's rules, interleaved (speed), then one by one (memory)."""
    from localssl.reports.bench.common import dtype_name
    from localssl.reports.bench.memory import measure_memory
    from localssl.reports.bench.speed import Schedule, measure_speed

    quiet: Callable[[str], None] = lambda msg: None  # noqa: E731 - the bench's per-round lines
    names, size = plan["rules"], plan["image_size"]
    speed = measure_speed(names, plan["encoder"], [plan["width"]], [dtype_name(amp_dtype)],
                          [Schedule(cfg.measure_steps, cfg.measure_warmup, cfg.measure_rounds)], size, cfg.batch_size,
                          dev, True, True, False, False, None, cfg.seed, quiet,
                          encoder_options=plan["encoder_options"], rule_options=plan["rule_options"])
    memory = measure_memory(names, plan["encoder"], plan["width"], size, cfg.batch_size, dev, amp_dtype, True, None,
                            cfg.seed, quiet, encoder_options=plan["encoder_options"],
                            rule_options=plan["rule_options"])
    return _per_rule(names, speed["entries"][0]["rules"], memory["rules"]), speed["unit"]


def _per_rule(names: Sequence[str], speed_rows: Sequence[dict[str, Any]],
              memory_rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per rule from the bench's speed rows and memory table (an error where either failed)."""
    speed = {r["rule"]: r for r in speed_rows if r["main"]}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        s, m = speed.get(name, {}), memory_rows.get(name, {})
        error = s.get("error") or m.get("error")
        if error or "images_per_s" not in s:
            out[name] = {"error": error or "not measured"}
            continue
        out[name] = {"local": m["local"], "images_per_s": s["images_per_s"],
                     "peak_activation_bytes": m["peak_saved_activation_bytes"], "speed_spread": s.get("spread")}
    return out


__all__ = ["MEASUREMENTS", "baseline", "measure_rules"]
