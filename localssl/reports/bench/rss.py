"""Whole-process peak RSS of one rule's training steps, each rule in a fresh interpreter (``bench --rss``)."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from localssl.engine.runtime import retain_freed_memory
from localssl.reports.bench.common import build_state, random_views


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: ``5`` into /proc/self/clear_refs); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int | None:
    """Peak RSS since the last reset, from /proc/self/status (Linux), in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_child() -> None:
    """Entry point of the per-rule subprocess: build, train a few steps, print peak RSS as JSON.

    The peak mark is reset after the imports and the build, so the figure is
    the peak *during training* (the imports alone peak near 400 MiB, which
    would otherwise hide every difference between rules).
    """
    cfg = json.loads(sys.argv[1])
    import psutil

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg.get("retain_memory"):
        retain_freed_memory()
    device = torch.device(cfg["device"])
    amp_dtype = getattr(torch, cfg["amp"]) if cfg["amp"] else None
    st = build_state(cfg["rule"], cfg["encoder"], cfg["width"], cfg["image_size"], device, amp_dtype,
                     cfg["channels_last"], cfg["seed"], cfg.get("micro_batch"), cfg.get("encoder_options"),
                     cfg.get("rule_options"))
    views = random_views(cfg["batch_size"], cfg["image_size"], device, cfg["channels_last"], cfg["seed"])
    gc.collect()
    before = psutil.Process().memory_info().rss
    reset = _reset_peak_rss()
    for _ in range(cfg["steps"]):
        st.step(views)
    peak = _vm_hwm() if reset else None
    if peak is None:  # no reset possible: the whole-process peak, imports included
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"rss_before_first_step": before, "peak_rss": peak, "peak_since_build": reset}))


def peak_rss(rule: str, encoder: str, width: float, image_size: int, batch_size: int, steps: int,
             device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, threads: int | None,
             seed: int, micro_batch: int | None = None, retain_memory: bool = True,
             encoder_options: dict | None = None, rule_options: dict | None = None) -> dict[str, int]:
    """Whole-process peak RSS of ``steps`` training steps of one rule, in a fresh interpreter."""
    cfg = {"rule": rule, "encoder": encoder, "width": width, "image_size": image_size,
           "batch_size": batch_size, "steps": steps, "device": str(device),
           "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
           "channels_last": channels_last, "threads": threads, "seed": seed, "micro_batch": micro_batch,
           "retain_memory": retain_memory, "encoder_options": encoder_options, "rule_options": rule_options}
    root = str(Path(__file__).resolve().parents[3])  # the folder that holds localssl/
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = "from localssl.reports.bench.rss import rss_child; rss_child()"
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                         env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"peak-RSS subprocess for {rule} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])

