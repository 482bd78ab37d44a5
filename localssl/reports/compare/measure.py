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
    other = bp_counterpart(first)
    return (other, options_for(other, tcfgs[first].rule_options)) if other else (None, None)


def measure_rules(cfg: CompareConfig, tcfgs: dict[str, TrainConfig], out: Path,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Images/s and peak activation bytes per step of every rule of ``tcfgs`` (and the baseline).

    Returns ``{"key", "baseline", "rules": {rule: {"local", "images_per_s",
    "peak_activation_bytes"} or {"error"}}, "env", ...}``, or ``{"skipped":
    why}`` where the bench cannot measure this data set's images.
    """
    import torch

    from localssl.data import dataset_spec
    from localssl.engine.runtime import environment_info, resolve_amp, resolve_device
    from localssl.reports.bench.common import dtype_name
    from localssl.reports.bench.memory import measure_memory
    from localssl.reports.bench.speed import Schedule, measure_speed

    spec = dataset_spec(cfg.dataset)
    size = cfg.resize or spec.image_size
    if size is None or spec.channels != 3:
        # The bench's random views are 3-channel squares of a known side.
        return {"skipped": f"the bench measures 3-channel images of a known size; {cfg.dataset} has "
                           f"{spec.channels} channel(s) at {size or 'a size known once read'} px"}
    dev = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, dev)
    base, base_options = baseline(tcfgs)
    options = {r: c.rule_options for r, c in tcfgs.items()}
    if base is not None and base not in options:
        options[base] = base_options
    names = list(options)
    encoder_options = next(iter(tcfgs.values())).encoder_options
    key = {"rules": names, "rule_options": options, "encoder": cfg.encoder, "width": cfg.width,
           "encoder_options": encoder_options, "image_size": size, "batch_size": cfg.batch_size,
           "precision": dtype_name(amp_dtype), "device": str(dev), "seed": cfg.seed, "channels_last": True,
           "schedule": [cfg.measure_steps, cfg.measure_warmup, cfg.measure_rounds]}
    path = out / MEASUREMENTS
    cached = read_json(path)
    if cached is not None and cached.get("key") == json.loads(json.dumps(key)):
        log(f"speed and memory: skipped: measured before ({path})")
        return cached
    log(f"speed and memory: measuring {', '.join(names)} (interleaved rounds of {cfg.measure_steps} step(s) each) "
        "...")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quiet: Callable[[str], None] = lambda msg: None  # noqa: E731 - the bench's per-round lines
    speed = measure_speed(names, cfg.encoder, [cfg.width], [dtype_name(amp_dtype)],
                          [Schedule(cfg.measure_steps, cfg.measure_warmup, cfg.measure_rounds)], size, cfg.batch_size,
                          dev, True, True, False, False, None, cfg.seed, quiet, encoder_options=encoder_options,
                          rule_options=options)
    memory = measure_memory(names, cfg.encoder, cfg.width, size, cfg.batch_size, dev, amp_dtype, True, None,
                            cfg.seed, quiet, encoder_options=encoder_options, rule_options=options)
    rules = _per_rule(names, speed["entries"][0]["rules"], memory["rules"])
    result = {"key": key, "baseline": base, "rules": rules, "env": environment_info(dev),
              "speed_unit": speed["unit"], "memory": "peak bytes autograd holds for backward in one step "
              f"of {2 * cfg.batch_size} views (parameters apart)"}
    with atomic_file(path, "w") as fh:
        fh.write(json.dumps(result, indent=2))
    return result


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
