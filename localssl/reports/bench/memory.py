"""Memory tools of ``localssl bench``: saved activations for backward, parameter memory, the memory guard.

Peak activation memory held for backward: every tensor autograd saves is
counted through `torch.autograd.graph.saved_tensors_hooks`, deduplicated by
storage, and released when autograd frees it, so the figure is the peak of
the *live* saved bytes. Parameters + gradients + optimizer state are read
from the real tensors after a step.
"""
from __future__ import annotations

import gc
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from localssl.engine.runtime import autocast
from localssl.models import BlockEncoder, build_encoder
from localssl.reports.bench.common import (
    BUILD_ERRORS,
    MEMORY_TARGET,
    BenchState,
    Log,
    build_state,
    error_text,
    random_views,
    rule_variants,
    variant_label,
)

#: Share of the memory available before a width's builds that the speed rounds may plan to fill with
#: parameters, gradients and AdamW state; the rest is left for activations and the allocator.
MEMORY_GUARD = 0.8


# --------------------------------------------------------------------------- saved activations


class _Saved:
    """What the pack hook hands to autograd: the (detached) saved tensor.

    It must hold a *detached* alias: holding the output tensor itself (with
    its grad_fn) would make a reference cycle through the graph that is
    never freed.
    """

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedBytesTracker:
    """Live and peak bytes of the tensors autograd holds for backward.

    Every saved tensor is keyed by its storage, so a storage saved by several
    ops (a block's ReLU output, which the next conv saves too under BP)
    counts once; when autograd frees the last reference to it (after the
    group's backward), its bytes leave the live total. Storages of ``params`` are tracked apart
    (``peak_param_bytes``) and not counted as activations.

    ``group_peaks`` splits the step into segments that start whenever the live
    total rises from zero: with the trainer's per-group backward, that is one
    segment per group.
    """

    def __init__(self, params: Sequence[torch.Tensor] = ()) -> None:
        self._param_keys = {self._key(p) for p in params}
        self._refs: dict[tuple[int, str], list[int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.live_param_bytes = 0
        self.peak_param_bytes = 0
        self.group_peaks: list[int] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[int, str]:
        st = t.untyped_storage()
        return st.data_ptr(), str(t.device)

    def _pack(self, t: torch.Tensor) -> _Saved:
        key = self._key(t)
        nbytes = t.untyped_storage().nbytes()
        is_param = key in self._param_keys
        entry = self._refs.get(key)
        if entry is None:
            self._refs[key] = [1, nbytes]
            if is_param:
                self.live_param_bytes += nbytes
                self.peak_param_bytes = max(self.peak_param_bytes, self.live_param_bytes)
            else:
                if self.live_bytes == 0:
                    self.group_peaks.append(0)
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                if self.group_peaks:
                    self.group_peaks[-1] = max(self.group_peaks[-1], self.live_bytes)
        else:
            entry[0] += 1
        holder = _Saved(t.detach())
        weakref.finalize(holder, self._release, key, is_param)
        return holder

    @staticmethod
    def _unpack(holder: _Saved) -> torch.Tensor:
        return holder.tensor

    def _release(self, key: tuple[int, str], is_param: bool) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._refs[key]
            if is_param:
                self.live_param_bytes -= entry[1]
            else:
                self.live_bytes -= entry[1]

    def __enter__(self) -> SavedBytesTracker:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def encoder_block_bytes(encoder: BlockEncoder, views: torch.Tensor,
                        amp_dtype: torch.dtype | None = None) -> tuple[list[int], int]:
    """Saved activation bytes of each block trained alone, and of the whole encoder under BP.

    Block k runs on the detached output of block k-1 with no loss head (what
    per-block training must hold at least); the BP figure is one graph over
    all blocks, where a tensor saved by two blocks counts once.
    """
    params = list(encoder.parameters())
    per_block = []
    h = views
    for k in range(len(encoder)):
        tr = SavedBytesTracker(params)
        with tr, autocast(views.device, amp_dtype):
            out = encoder.blocks[k](h.detach())
        per_block.append(tr.peak_bytes)
        h = out.detach()
        del out
    tr = SavedBytesTracker(params)
    with tr, autocast(views.device, amp_dtype):
        outs = encoder(views)
    total = tr.peak_bytes
    del outs
    return per_block, total


# --------------------------------------------------------------------------- parameter memory


def parameter_memory(state: BenchState) -> dict[str, Any]:
    """Bytes of parameters, gradients and optimizer state, encoder and rule apart.

    Read from the real tensors after a step, so a parameter missing from an
    optimizer, or a gradient that was never made, shows up.
    """
    enc_ids = {id(p) for p in state.encoder.parameters()}
    out: dict[str, Any] = {}
    for part, params in (("encoder", list(state.encoder.parameters())), ("rule", list(state.rule.parameters()))):
        out[part] = {
            "numel": sum(p.numel() for p in params),
            "trainable_numel": sum(p.numel() for p in params if p.requires_grad),
            "params_bytes": sum(p.nbytes for p in params),
            "grads_bytes": sum(p.grad.nbytes for p in params if p.grad is not None),
            "optimizer_bytes": 0,
        }
    step_bytes = 0
    for p, st in state.optimizer.state.items():
        part = "encoder" if id(p) in enc_ids else "rule"
        for k, v in st.items():
            if not torch.is_tensor(v):
                continue
            if k == "step":
                step_bytes += v.nbytes
            else:
                out[part]["optimizer_bytes"] += v.nbytes
    for part in ("encoder", "rule"):
        d = out[part]
        d["total_bytes"] = d["params_bytes"] + d["grads_bytes"] + d["optimizer_bytes"]
    out["optimizer_step_counters_bytes"] = step_bytes
    out["total_bytes"] = out["encoder"]["total_bytes"] + out["rule"]["total_bytes"] + step_bytes
    return out


def state_tensors_per_parameter(optimizer: Any, group: dict[str, Any]) -> int:
    """Tensors the size of a parameter that the optimizer holding ``group`` keeps for it after a step.

    AdamW: exp_avg and exp_avg_sq (and max_exp_avg_sq with amsgrad); SGD: a
    momentum buffer if momentum > 0, else nothing; LARS: its momentum buffer.
    (Scalar step counters are not counted here: `parameter_memory` lists them apart.)
    """
    from localssl.engine.optim import LARS, OptimizerSet

    if isinstance(optimizer, OptimizerSet):
        owner = next(o for o in optimizer.optimizers if any(g is group for g in o.param_groups))
        return state_tensors_per_parameter(owner, group)
    if isinstance(optimizer, torch.optim.AdamW):
        return 3 if group.get("amsgrad") else 2
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if group["momentum"] else 0
    if isinstance(optimizer, LARS):
        return 1
    raise TypeError(f"no state count known for {type(optimizer).__name__}")


def training_state_bytes(state: BenchState) -> int:
    """Bytes that parameters, gradients and optimizer state of ``state`` take once a step has run.

    Per trainable parameter: itself, its gradient and its optimizer's state
    tensors (`state_tensors_per_parameter`): 16 bytes per fp32 parameter in
    AdamW, 12 in momentum SGD, 8 in plain SGD. Known before the first step,
    which is when gradients and optimizer state are allocated.
    """
    opt = state.optimizer
    return sum((2 + state_tensors_per_parameter(opt, g)) * p.nbytes for g in opt.param_groups for p in g["params"])


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CUDA: free device memory; CPU: the OS's available memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    return int(psutil.virtual_memory().available)


def check_fits(planned_bytes: int, available: int | None, what: str) -> None:
    """Raise MemoryError, naming ``what`` and both sizes, where ``planned_bytes`` exceeds the guard.

    A CPU allocation beyond the machine's memory rarely fails cleanly: the
    kernel's OOM killer ends the process, and with it every table. So a rule
    that would not fit says so before its first step instead.
    """
    if available is not None and planned_bytes > MEMORY_GUARD * available:
        raise MemoryError(f"{what}: parameters + gradients + AdamW state would bring this run's total to "
                          f"{planned_bytes / 2**30:.1f} GiB, over {MEMORY_GUARD:.0%} of the "
                          f"{available / 2**30:.1f} GiB available")


# --------------------------------------------------------------------------- the memory tables


def measure_memory(rules: Sequence[str], encoder: str, width: float, size: int, batch_size: int,
                   dev: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
                   micro_batch: int | None, seed: int, log: Log, twins: Mapping[str, str | None] | None = None, *,
                   encoder_options: Mapping[str, Any] | None = None,
                   rule_options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Tables 2/3 at one image size: the per-block floor, then every rule's saved activations and parameters.

    Every row is compared with its BP twin's plain step (``twins``: rule ->
    end-to-end rule, `common.bp_twins`; ``vs_bp``) and with the floor
    (``vs_floor``: its peak over the largest block's own saved activations).
    A micro-batched row is compared with its twin's *plain* step, as before.
    ``encoder_options``: the encoder's own options; ``rule_options``: rule
    name -> that rule's options (a rule not in it: its defaults).
    """
    rule_options = rule_options or {}
    views = random_views(batch_size, size, dev, channels_last, seed)
    torch.manual_seed(seed)
    enc = build_encoder(encoder, width, 3, options=encoder_options, image_size=size).to(
        dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    log(f"memory: per-block floor at {size}px")
    per_block, bp_total = encoder_block_bytes(enc, views, amp_dtype)
    del enc
    out: dict[str, Any] = {
        "image_size": size,
        "width": width,
        "unit": "bytes",
        "floor": {
            "block_bytes": per_block,
            "largest_block": int(max(range(len(per_block)), key=per_block.__getitem__)),
            "floor_bytes": max(per_block),
            "sum_of_blocks_bytes": sum(per_block),
            "bp_encoder_bytes": bp_total,
            "floor_ratio": max(per_block) / bp_total,
            "floor_ratio_vs_sum_of_blocks": max(per_block) / sum(per_block),
        },
        "rules": {},
    }
    for r, mb in rule_variants(rules, micro_batch):
        label = variant_label(r, mb)
        log(f"memory: {label} at {size}px")
        gc.collect()
        available = available_memory(dev)
        try:
            st = build_state(r, encoder, width, size, dev, amp_dtype, channels_last, seed, mb,
                             encoder_options=encoder_options, rule_options=rule_options.get(r))
            check_fits(training_state_bytes(st), available, label)
        except BUILD_ERRORS as e:
            out["rules"][label] = {"error": error_text(e)}
            st = None  # drop the rule that did not fit before the next is built
            gc.collect()
            continue
        params = list(st.encoder.parameters()) + list(st.rule.parameters())
        gc.collect()
        cuda_before = None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            cuda_before = torch.cuda.memory_allocated(dev)
        tracker = SavedBytesTracker(params)
        try:
            with tracker:
                st.step(views)
        except BUILD_ERRORS as e:
            out["rules"][label] = {"error": error_text(e)}
            del st, tracker
            gc.collect()
            continue
        d: dict[str, Any] = {
            "rule": r,
            "micro_batch": mb,
            "local": bool(st.rule.local),
            "groups": len(st.rule.groups()),
            "peak_saved_activation_bytes": tracker.peak_bytes,
            "group_peaks": tracker.group_peaks,
            "peak_saved_param_bytes": tracker.peak_param_bytes,
            "live_after_step_bytes": tracker.live_bytes,
            "vs_floor": tracker.peak_bytes / max(per_block),
            "parameters": parameter_memory(st),
        }
        # The whole training state: parameters + gradients + optimizer state + peak saved activations.
        d["whole_process_bytes"] = d["parameters"]["total_bytes"] + tracker.peak_bytes
        if cuda_before is not None:
            d["cuda_step_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - cuda_before
        out["rules"][label] = d
        del st, tracker
    for d in out["rules"].values():
        if "error" in d:
            continue
        twin = (twins or {}).get(d["rule"])
        base = out["rules"].get(twin) if twin else None
        if base is None or "error" in base:
            continue
        d["bp_twin"] = twin
        d["vs_bp"] = d["peak_saved_activation_bytes"] / base["peak_saved_activation_bytes"]
        d["whole_vs_bp"] = d["whole_process_bytes"] / base["whole_process_bytes"]
        if d["local"]:
            d["meets_target"] = d["vs_bp"] <= MEMORY_TARGET
    return out
