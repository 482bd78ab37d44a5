"""Where a step's time goes: every op of a few steps per rule timed on its own, summed by family (table 6).

It shows what the FLOP table cannot: how much of the step is not
convolution at all.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from localssl.reports.bench.common import (
    BUILD_ERRORS,
    BenchState,
    Log,
    build_state,
    dtype_name,
    error_text,
    hook_optimizer_step,
    median,
    random_views,
    sync,
)
from localssl.reports.bench.flops import conv_backward_mask

# Op families of the time breakdown, in table order. A convolution's backward
# is one op; whether it also computes the input gradient is its output_mask[0].
# The encoders' max-pool (models/layers.py) runs its backward as a zero fill
# (fill/copy) and a scatter (pool).
TIME_PARTS = ("conv_fwd", "conv_dw", "conv_dw_dx", "matmul", "pool", "relu", "fill_copy", "optimizer", "other_ops",
              "outside_ops")
_OP_FAMILIES = {
    "convolution": "conv_fwd", "mm": "matmul", "addmm": "matmul", "bmm": "matmul", "linear": "matmul",
    "max_pool2d_with_indices": "pool", "max_pool2d_with_indices_backward": "pool", "avg_pool2d": "pool",
    "avg_pool2d_backward": "pool", "scatter_": "pool", "relu": "relu", "relu_": "relu", "threshold_backward": "relu",
    "clamp_min": "relu", "fill_": "fill_copy", "zero_": "fill_copy", "zeros_like": "fill_copy",
    "new_zeros": "fill_copy", "copy_": "fill_copy", "clone": "fill_copy", "_to_copy": "fill_copy",
}


def time_breakdown(state: BenchState, views: torch.Tensor, steps: int, dev: torch.device) -> dict[str, float]:
    """Seconds per step by op family: every aten op of ``steps`` steps timed on its own.

    A `TorchDispatchMode` sees each op below autograd (forward and backward
    alike) and times it, with a device sync after it on CUDA; ops inside an
    optimizer's ``step`` count as ``optimizer``. ``outside_ops`` is the
    step's wall time minus its ops: Python, autograd bookkeeping and this
    timing's own overhead, so the breakdown's total exceeds table 1's step.
    """
    acc = dict.fromkeys(TIME_PARTS, 0.0)
    in_opt = [False]

    def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        in_opt[0] = True

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        in_opt[0] = False

    handles = hook_optimizer_step(state, pre, post)

    class _Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            sync(dev)
            name = func.overloadpacket.__name__
            if in_opt[0]:
                part = "optimizer"
            elif name == "convolution_backward":
                part = "conv_dw_dx" if conv_backward_mask(args)[0] else "conv_dw"
            else:
                part = _OP_FAMILIES.get(name, "other_ops")
            acc[part] += time.perf_counter() - t0
            return out

    try:
        sync(dev)
        t0 = time.perf_counter()
        with _Timer():
            for _ in range(steps):
                state.step(views)
        sync(dev)
        wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    acc["outside_ops"] = max(0.0, wall - sum(acc.values()))
    return {k: v / steps for k, v in acc.items()}


def measure_breakdown(rules: Sequence[str], encoder: str, width: float, size: int, batch_size: int, steps: int,
                      warmup: int, rounds: int, dev: torch.device, amp_dtype: torch.dtype | None,
                      channels_last: bool, seed: int, log: Log, encoder_options: Mapping[str, Any] | None = None,
                      rule_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per rule, the median over interleaved rounds of each op family's time per step."""
    views = random_views(batch_size, size, dev, channels_last, seed)
    per_rule: dict[str, Any] = {}
    states: dict[str, BenchState] = {}
    for r in rules:
        try:
            st = build_state(r, encoder, width, size, dev, amp_dtype, channels_last, seed, None, encoder_options,
                             rule_options)
            for _ in range(max(1, warmup)):
                st.step(views)
            states[r] = st
        except BUILD_ERRORS as e:
            per_rule[r] = {"error": error_text(e)}
        st = None
        gc.collect()
    samples: dict[str, list[dict[str, float]]] = {r: [] for r in states}
    for i in range(rounds):
        log(f"time breakdown: round {i + 1}/{rounds}")
        for r, st in states.items():
            samples[r].append(time_breakdown(st, views, steps, dev))
    for r, runs in samples.items():
        d = {p: median([x[p] for x in runs]) for p in TIME_PARTS}
        d["total"] = sum(d.values())
        d["conv"] = d["conv_fwd"] + d["conv_dw"] + d["conv_dw_dx"]
        per_rule[r] = d
    return {"image_size": size, "width": width, "amp_dtype": dtype_name(amp_dtype),
            "unit": "seconds per step (median over rounds)", "rules": {r: per_rule[r] for r in rules}}
