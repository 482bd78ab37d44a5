"""``localssl bench``: speed, activation memory, parameter memory and FLOPs of the rules, side by side.

Everything is measured in one process on the same encoder, batch and inputs
(random views, so no data set is needed), with the real training step
(`localssl.engine.trainer.train_step`, the AdamW of `build_optimizer`):

1. Training images/s per rule. The rules are interleaved inside every round
   and the median over rounds is reported, so that a burst of load from
   another process hits every rule alike; ``spread`` shows how noisy the
   machine was; ``in AdamW`` is the share of the step spent in the
   optimizer (timed with step hooks); ``faults/step`` the process's minor
   page faults per step (see `engine.runtime.retain_freed_memory`). Ratios
   are against BP-InfoNCE, next to the targets (clapp++global >= 1.3x,
   clapp++ >= 0.9x), with the quartiles of the same ratio taken round by
   round. Optionally one
   rule again at the other precision (fp32 / bf16 autocast) and the other
   memory layout (channels_last / contiguous).
2. Peak activation memory held for backward: every tensor autograd saves is
   counted through `torch.autograd.graph.saved_tensors_hooks`, deduplicated
   by storage, and released when autograd frees it, so the figure is the peak
   of the *live* saved bytes. The trainer frees each group's graph after its
   backward, so a local rule holds one block's tensors at a time. Tensors
   that share storage with a parameter (conv weights, B matrices) are
   excluded from the activation figure and reported on their own: they are
   the parameters, counted in (3). The floor of per-block training is the
   largest block's saved activations (block run alone on a detached input, no
   loss head) over the whole encoder's under BP (one graph; a tensor saved by
   two blocks counted once). METHODS 2.2b's "about 0.41 for VGG-6 at 32 px"
   is the largest block over the *sum* of the blocks, which counts the
   tensors shared at block boundaries twice; both are printed, and the one
   against BP (0.58 for VGG-6) is the floor a local/BP ratio can reach.
   Optionally (``--rss``) the whole-process peak RSS of each rule, each in a
   fresh subprocess, from the end of the build to the end of training.
3. Parameters + gradients + optimizer state of the encoder *and* of the
   rule's own parameters, read from the real tensors after a step (AdamW keeps
   two states per parameter; its scalar step counters are listed apart).
4. Augmentation images/s (`SimCLRViews`, uint8 in, two views out) against
   training images/s; target >= 5x.
5. FLOPs per view of each part of a step (encoder forward, encoder backward
   split into weight gradients and input gradients, the rule's own
   parameters forward/backward, the loss), counted with the formulas of
   `torch.utils.flop_counter` (2 FLOPs per multiply-add; conv and matmul only:
   ReLU, pooling, the hinge and AdamW are elementwise and not counted).
6. Where a step's time goes: every op of a few steps per rule timed on its
   own (a `TorchDispatchMode`) and summed by family: conv forward, conv
   backward with the weight gradient only or with the input gradient too,
   matmul, pooling, ReLU, fill/copy, AdamW, other ops, and the time outside
   ops. It shows what the FLOP table cannot: how much of the step is not
   convolution at all.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from localssl.engine.runtime import (
    autocast,
    cpu_supports_bf16,
    environment_info,
    resolve_amp,
    resolve_device,
    retain_freed_memory,
)
from localssl.models import BlockEncoder, build_encoder, default_grids
from localssl.rules import SPATIAL_RULES, Rule, RuleOptions, build_rule

DEFAULT_RULES = ("clapp++", "clapp++global", "bp-infonce")
#: The end-to-end rule that speed and memory are compared with.
BASELINE = "bp-infonce"
#: Speed targets, images/s relative to BP-InfoNCE.
SPEED_TARGETS = {"clapp++global": 1.3, "clapp++": 0.9}
#: Local peak saved activations relative to BP.
MEMORY_TARGET = 0.5
#: Augmentation images/s relative to training images/s.
AUGMENT_TARGET = 5.0
#: Above this spread between rounds, the report warns that the timings are noisy.
NOISY_SPREAD = 0.25
#: METHODS 2.2b, full-width VGG-6 at 32 px, GFLOP per view.
REFERENCE_GFLOP = {"local step": 2.1, "BP step": 3.2, "dense B (fwd + dB)": 0.8}
#: METHODS 2.2b: the largest block's share of the sum over blocks, VGG-6 at 32 px.
REFERENCE_FLOOR = 0.41

FLOP_PARTS = (
    "encoder_fwd",
    "encoder_bwd_weight",
    "encoder_bwd_input",
    "rule_params_fwd",
    "rule_params_bwd",
    "loss",
    "context_fwd",
)
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

Log = Callable[[str], None]


# --------------------------------------------------------------------------- setup


@dataclass
class _State:
    """One rule ready to train: its own copy of the encoder, the rule, its optimizer."""

    name: str
    encoder: BlockEncoder
    rule: Rule
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    micro_batch: int | None = None

    def step(self, views: torch.Tensor, with_optimizer: bool = True) -> list[torch.Tensor]:
        from localssl.engine.trainer import train_step

        return train_step(self.encoder, self.rule, self.optimizer if with_optimizer else None, views,
                          device=self.device, amp_dtype=self.amp_dtype, micro_batch=self.micro_batch)


def _build(
    rule_name: str,
    encoder_name: str,
    width: float,
    image_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    seed: int,
    micro_batch: int | None = None,
) -> _State:
    """Encoder + rule + AdamW (lr 2e-4, wd 0, METHODS 2.4), as `localssl train` builds them."""
    from localssl.engine.trainer import build_optimizer

    torch.manual_seed(seed)  # the same encoder init for every rule
    encoder = build_encoder(encoder_name, width, 3)
    shapes = encoder.feature_shapes((3, image_size, image_size))
    grids = default_grids(encoder_name, len(encoder)) if rule_name in SPATIAL_RULES else None
    rule = build_rule(rule_name, shapes, RuleOptions(grids=grids))
    mf = torch.channels_last if channels_last else torch.contiguous_format
    encoder.to(device, memory_format=mf)
    rule.to(device)
    encoder.train()
    opt = build_optimizer(encoder, rule, 2e-4, 0.0)
    return _State(rule_name, encoder, rule, opt, device, amp_dtype, mf, micro_batch)


def _random_views(batch_size: int, image_size: int, device: torch.device, channels_last: bool,
                  seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(2 * batch_size, 3, image_size, image_size, generator=g).to(device)
    return v.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (None where `resource` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def parameter_memory(state: _State) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- FLOPs


def _conv_backward_mask(args: Sequence[Any]) -> list[bool]:
    """(input, weight, bias) gradients that an ``aten.convolution_backward`` call computes.

    Autograd asks a conv for its input gradient only where that input needs
    one: never for a local block, whose input is detached.
    """
    return list(args[10])


class PartFlopCounter(TorchDispatchMode):
    """FLOPs of a training step, split into the parts of METHODS 2.2b.

    - conv forward with grad -> encoder_fwd; without grad -> context_fwd (DFB);
    - conv backward -> encoder_bwd_weight / encoder_bwd_input, from the
      output mask that autograd passes (BP computes input gradients, a local
      group whose input is detached does not);
    - matmuls inside the forward of a module of the rule that owns
      parameters (B, projection) -> rule_params_fwd, and inside the backward
      of the autograd nodes those forwards created -> rule_params_bwd;
    - any other counted op (InfoNCE's similarity matrix) -> loss.
    """

    def __init__(self, rule: nn.Module) -> None:
        super().__init__()
        self.counts: dict[str, int] = defaultdict(int)
        self._in_head = 0
        self._head_nodes: list[Any] = []  # strong refs: keep ids unique while counting
        self._head_ids: set[int] = set()
        self._handles: list[Any] = []
        self._head_modules = [m for m in rule.modules() if any(True for _ in m.parameters(recurse=False))]

    def _pre(self, mod: nn.Module, args: Any) -> None:
        self._in_head += 1

    def _post(self, mod: nn.Module, args: Any, output: Any) -> None:
        self._in_head -= 1
        if not (torch.is_tensor(output) and output.grad_fn is not None):
            return
        stop = {id(a.grad_fn) for a in args if torch.is_tensor(a) and a.grad_fn is not None}
        todo = [output.grad_fn]
        while todo:  # the nodes this module's forward created
            node = todo.pop()
            if node is None or id(node) in stop or id(node) in self._head_ids:
                continue
            if type(node).__name__ == "AccumulateGrad":
                continue
            self._head_nodes.append(node)
            self._head_ids.add(id(node))
            todo.extend(n for n, _ in node.next_functions)

    def __enter__(self) -> PartFlopCounter:
        for m in self._head_modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._head_nodes.clear()
        self._head_ids.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = flop_registry.get(packet)
        if formula is None:
            return out
        backward = torch._C._current_graph_task_id() != -1
        if packet is torch.ops.aten.convolution_backward:
            mask = _conv_backward_mask(args)
            for i, part in ((0, "encoder_bwd_input"), (1, "encoder_bwd_weight")):
                if mask[i]:
                    one = [j == i for j in range(3)]
                    self.counts[part] += formula(*args[:10], one, out_val=out)
        elif "conv" in packet.__name__:
            self.counts["encoder_fwd" if torch.is_grad_enabled() else "context_fwd"] += formula(
                *args, **kwargs, out_val=out)
        else:
            if backward:
                node = torch._C._current_autograd_node()
                part = "rule_params_bwd" if node is not None and id(node) in self._head_ids else "loss"
            else:
                part = "rule_params_fwd" if self._in_head else "loss"
            self.counts[part] += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(state: _State, views: torch.Tensor) -> dict[str, float]:
    """FLOPs per view of each part of one training step (no optimizer step)."""
    counter = PartFlopCounter(state.rule)
    with counter:
        state.step(views, with_optimizer=False)
    n = views.shape[0]
    d = {p: counter.counts.get(p, 0) / n for p in FLOP_PARTS}
    d["total"] = sum(d[p] for p in FLOP_PARTS)
    return d


# --------------------------------------------------------------------------- peak RSS (subprocess)


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


def _rss_child() -> None:
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
    st = _build(cfg["rule"], cfg["encoder"], cfg["width"], cfg["image_size"], device, amp_dtype,
                cfg["channels_last"], cfg["seed"], cfg.get("micro_batch"))
    views = _random_views(cfg["batch_size"], cfg["image_size"], device, cfg["channels_last"], cfg["seed"])
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
             seed: int, micro_batch: int | None = None, retain_memory: bool = True) -> dict[str, int]:
    """Whole-process peak RSS of ``steps`` training steps of one rule, in a fresh interpreter."""
    cfg = {"rule": rule, "encoder": encoder, "width": width, "image_size": image_size,
           "batch_size": batch_size, "steps": steps, "device": str(device),
           "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
           "channels_last": channels_last, "threads": threads, "seed": seed, "micro_batch": micro_batch,
           "retain_memory": retain_memory}
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = "from localssl.reports.bench import _rss_child; _rss_child()"
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                         env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"peak-RSS subprocess for {rule} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmark


def _quartiles(xs: Sequence[float]) -> list[float]:
    """First and third quartile (inclusive method); a single value is its own quartiles."""
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).replace("torch.", "").replace("bfloat16", "bf16")


def run_bench(
    encoder: str = "vgg6",
    width: float = 0.25,
    image_sizes: Sequence[int] = (32, 96),
    batch_size: int = 32,
    steps: int = 5,
    warmup: int = 2,
    rounds: int = 3,
    amp: str = "auto",
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
) -> dict[str, Any]:
    """Run the benchmark and return every figure as a JSON-serialisable dict.

    Speed, FLOPs and augmentation are measured at ``speed_size`` (default: the
    first of ``image_sizes``); activation and parameter memory at every size.
    ``compare_precision`` adds, for one rule, the other precision (fp32 vs
    bf16 autocast) and the other memory layout to the speed rounds, and
    clapp++ with the unfused (for-each) AdamW, to show what the trainer's fused
    kernel saves on its 12.6M B parameters. ``micro_batch`` (views per chunk;
    None to skip) adds every rule once more with the micro-batched step
    (`train_step(micro_batch=...)`) to the speed, memory and RSS figures.
    ``breakdown`` times every op of a few steps per rule, by family (conv
    forward, conv weight / weight+input gradient, pooling, ReLU, AdamW, ...).
    ``retain_memory`` sets the allocator as `localssl train` does
    (`retain_freed_memory`, in this process and in the RSS subprocesses).
    """
    log = log or (lambda msg: None)
    rules = list(rules)
    if not rules:
        raise ValueError("no rules to benchmark")
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size}: the negative of an image is another image of the batch")
    if min(steps, rounds) < 1 or warmup < 0:
        raise ValueError("steps and rounds must be >= 1, warmup >= 0")
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
    amp_dtype = resolve_amp(amp, dev)
    build_encoder(encoder, width)  # unknown encoder names fail here, before any work

    result: dict[str, Any] = {
        "config": {
            "encoder": encoder, "width": width, "image_sizes": image_sizes, "speed_size": speed_size,
            "batch_size": batch_size, "views_per_step": 2 * batch_size, "steps": steps, "warmup": warmup,
            "rounds": rounds, "amp": amp, "amp_dtype": _dtype_name(amp_dtype), "rules": rules,
            "device": str(dev), "threads": torch.get_num_threads(), "channels_last": channels_last,
            "cpu_native_bf16": cpu_supports_bf16() if dev.type == "cpu" else None, "seed": seed,
            "micro_batch": micro_batch,
        },
        "env": environment_info(dev),
        "targets": {"speed_vs_bp": SPEED_TARGETS, "memory_local_vs_bp": MEMORY_TARGET,
                    "augment_vs_train": AUGMENT_TARGET, "baseline": BASELINE},
        "reference": {"gflop_per_view_full_width_32px": REFERENCE_GFLOP, "floor_vgg6_32px": REFERENCE_FLOOR},
    }

    result["load_average_before"] = _loadavg()
    if speed or augment:
        result["speed"] = _speed(rules, encoder, width, speed_size, batch_size, steps, warmup, rounds, dev,
                                 amp_dtype, channels_last, speed, augment, compare_precision, micro_batch, seed,
                                 log)
    if breakdown:
        result["time_breakdown"] = _breakdown(rules, encoder, width, speed_size, batch_size, steps, warmup, rounds,
                                              dev, amp_dtype, channels_last, seed, log)
    if flops:
        result["flops"] = _flops(rules, encoder, width, speed_size, batch_size, dev, amp_dtype, channels_last,
                                 seed, log)
    if memory:
        result["memory"] = [
            _memory(rules, encoder, width, s, batch_size, dev, amp_dtype, channels_last, micro_batch, seed, log)
            for s in image_sizes
        ]
    if rss:
        result["rss"] = []
        for s in image_sizes:
            for r, mb in _rule_variants(rules, micro_batch):
                label = _variant_label(r, mb)
                log(f"peak RSS: {label} at {s}px (subprocess)")
                try:
                    d = peak_rss(r, encoder, width, s, batch_size, max(1, warmup + 1), dev, amp_dtype,
                                 channels_last, threads, seed, mb, retain_memory)
                except RuntimeError as e:
                    d = {"error": str(e)}
                result["rss"].append({"rule": r, "label": label, "micro_batch": mb, "image_size": s, **d})
    result["load_average_after"] = _loadavg()
    return result


def _rule_variants(rules: Sequence[str], micro_batch: int | None) -> list[tuple[str, int | None]]:
    """Every rule with the plain step, then (if asked) every rule micro-batched: the rows of every table."""
    return [(r, None) for r in rules] + ([(r, micro_batch) for r in rules] if micro_batch else [])


def _variant_label(rule: str, micro_batch: int | None) -> str:
    return rule if micro_batch is None else f"{rule} [micro-batch {micro_batch}]"


def _loadavg() -> list[float] | None:
    """1-, 5- and 15-minute load averages (Unix): other processes' load makes timings noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _time_optimizer(state: _State, dev: torch.device) -> list[float]:
    """Add the seconds spent in the optimizer's ``step`` to the returned one-element list."""
    acc = [0.0]
    t0 = [0.0]

    def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        _sync(dev)
        t0[0] = time.perf_counter()

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        _sync(dev)
        acc[0] += time.perf_counter() - t0[0]

    _hook_optimizer_step(state, pre, post)
    return acc


def _hook_optimizer_step(state: _State, pre: Callable[..., None], post: Callable[..., None]) -> list[Any]:
    """Call ``pre``/``post`` around the optimizer's ``step`` of ``state``; returns the removable handles."""
    return [state.optimizer.register_step_pre_hook(pre), state.optimizer.register_step_post_hook(post)]


# Op families of the time breakdown, in table order. A convolution's backward
# is one op; whether it also computes the input gradient is its output_mask[0].
# The encoders' max-pool (models/layers.py) runs its backward as a zero fill
# (fill/copy) and a scatter (pool).
TIME_PARTS = ("conv_fwd", "conv_dw", "conv_dw_dx", "matmul", "pool", "relu", "fill_copy", "optimizer", "other_ops",
              "outside_ops")
_TIME_LABELS = {"conv_fwd": "conv fwd", "conv_dw": "conv dW", "conv_dw_dx": "conv dW+dX", "matmul": "matmul",
                "pool": "pool", "relu": "ReLU", "fill_copy": "fill/copy", "optimizer": "AdamW",
                "other_ops": "other ops", "outside_ops": "outside ops"}
_OP_FAMILIES = {
    "convolution": "conv_fwd", "mm": "matmul", "addmm": "matmul", "bmm": "matmul", "linear": "matmul",
    "max_pool2d_with_indices": "pool", "max_pool2d_with_indices_backward": "pool", "avg_pool2d": "pool",
    "avg_pool2d_backward": "pool", "scatter_": "pool", "relu": "relu", "relu_": "relu", "threshold_backward": "relu",
    "clamp_min": "relu", "fill_": "fill_copy", "zero_": "fill_copy", "zeros_like": "fill_copy",
    "new_zeros": "fill_copy", "copy_": "fill_copy", "clone": "fill_copy", "_to_copy": "fill_copy",
}


def _time_breakdown(state: _State, views: torch.Tensor, steps: int, dev: torch.device) -> dict[str, float]:
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

    handles = _hook_optimizer_step(state, pre, post)

    class _Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            _sync(dev)
            name = func.overloadpacket.__name__
            if in_opt[0]:
                part = "optimizer"
            elif name == "convolution_backward":
                part = "conv_dw_dx" if _conv_backward_mask(args)[0] else "conv_dw"
            else:
                part = _OP_FAMILIES.get(name, "other_ops")
            acc[part] += time.perf_counter() - t0
            return out

    try:
        _sync(dev)
        t0 = time.perf_counter()
        with _Timer():
            for _ in range(steps):
                state.step(views)
        _sync(dev)
        wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    acc["outside_ops"] = max(0.0, wall - sum(acc.values()))
    return {k: v / steps for k, v in acc.items()}


def _breakdown(rules, encoder, width, size, batch_size, steps, warmup, rounds, dev, amp_dtype, channels_last, seed,
               log) -> dict[str, Any]:
    """Per rule, the median over interleaved rounds of each op family's time per step."""
    views = _random_views(batch_size, size, dev, channels_last, seed)
    per_rule: dict[str, Any] = {}
    states = {}
    for r in rules:
        try:
            states[r] = _build(r, encoder, width, size, dev, amp_dtype, channels_last, seed)
        except (ValueError, RuntimeError) as e:
            per_rule[r] = {"error": str(e)}
            continue
        for _ in range(max(1, warmup)):
            states[r].step(views)
    samples: dict[str, list[dict[str, float]]] = {r: [] for r in states}
    for i in range(rounds):
        log(f"time breakdown: round {i + 1}/{rounds}")
        for r, st in states.items():
            samples[r].append(_time_breakdown(st, views, steps, dev))
    for r, runs in samples.items():
        d = {p: _median([x[p] for x in runs]) for p in TIME_PARTS}
        d["total"] = sum(d.values())
        d["conv"] = d["conv_fwd"] + d["conv_dw"] + d["conv_dw_dx"]
        per_rule[r] = d
    return {"image_size": size, "unit": "seconds per step (median over rounds)", "rules": per_rule}


def _speed(rules, encoder, width, size, batch_size, steps, warmup, rounds, dev, amp_dtype, channels_last,
           do_train, do_augment, compare_precision, micro_batch, seed, log) -> dict[str, Any]:
    variants: list[dict[str, Any]] = []
    if do_train:
        for r, mb in _rule_variants(rules, micro_batch):
            variants.append({"rule": r, "amp": amp_dtype, "channels_last": channels_last, "main": mb is None,
                             "micro_batch": mb})
        if compare_precision:
            ref = "clapp++global" if "clapp++global" in rules else rules[0]
            other = None if amp_dtype is not None else torch.bfloat16
            variants.append({"rule": ref, "amp": other, "channels_last": channels_last, "main": False})
            variants.append({"rule": ref, "amp": amp_dtype, "channels_last": not channels_last, "main": False})
            # The trainer uses fused AdamW; the unfused one shows what that saves,
            # for the rule with the most parameters of its own.
            big = "clapp++" if "clapp++" in rules else ref
            variants.append({"rule": big, "amp": amp_dtype, "channels_last": channels_last, "main": False,
                             "unfused": True})
    states, views = [], {}
    for v in variants:
        layout = "channels_last" if v["channels_last"] else "contiguous"
        if v["main"]:
            v["label"] = v["rule"]
        elif v.get("micro_batch"):
            v["label"] = _variant_label(v["rule"], v["micro_batch"])
        elif v.get("unfused"):
            v["label"] = f"{v['rule']} [unfused AdamW]"
        else:
            v["label"] = f"{v['rule']} [{_dtype_name(v['amp'])}, {layout}]"
        try:
            st = _build(v["rule"], encoder, width, size, dev, v["amp"], v["channels_last"], seed,
                        v.get("micro_batch"))
            if v.get("unfused"):
                st.optimizer = torch.optim.AdamW(st.optimizer.param_groups[0]["params"], lr=2e-4, weight_decay=0.0,
                                                 fused=False)
            states.append(st)
        except (ValueError, RuntimeError) as e:  # e.g. pooling grids that do not fit this image size
            v["error"] = str(e)
            states.append(None)
        if v["channels_last"] not in views:
            views[v["channels_last"]] = _random_views(batch_size, size, dev, v["channels_last"], seed)
    aug = x_uint8 = None
    if do_augment:
        from localssl.data.augment import SimCLRViews

        aug = SimCLRViews(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_scale=(0.08, 1.0)).to(dev)
        g = torch.Generator().manual_seed(seed)
        x_uint8 = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=g).to(dev)

    def time_it(fn: Callable[[], Any], n: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(dev)
        return time.perf_counter() - t0

    live = [(v, st) for v, st in zip(variants, states) if st is not None]
    opt_time = {v["label"]: _time_optimizer(st, dev) for v, st in live}
    for v, st in live:
        log(f"speed: warm-up {v['label']}")
        time_it(lambda st=st, v=v: st.step(views[v["channels_last"]]), warmup)
    if aug is not None:
        time_it(lambda: aug(x_uint8), max(1, warmup))
    samples: dict[str, list[float]] = {v["label"]: [] for v, _ in live}
    opt_share: dict[str, list[float]] = {v["label"]: [] for v, _ in live}
    faults: dict[str, int | None] = {v["label"]: 0 for v, _ in live}
    aug_samples: list[float] = []
    for r in range(rounds):
        log(f"speed: round {r + 1}/{rounds}")
        for v, st in live:
            opt_time[v["label"]][0] = 0.0
            f0 = _minor_faults()
            t = time_it(lambda st=st, v=v: st.step(views[v["channels_last"]]), steps)
            f1 = _minor_faults()
            faults[v["label"]] = None if f0 is None or f1 is None else faults[v["label"]] + f1 - f0
            samples[v["label"]].append(batch_size * steps / t)
            opt_share[v["label"]].append(opt_time[v["label"]][0] / t)
        if aug is not None:
            t = time_it(lambda: aug(x_uint8), steps)
            aug_samples.append(batch_size * steps / t)

    rows = []
    for v in variants:
        row: dict[str, Any] = {"label": v["label"], "rule": v["rule"], "amp_dtype": _dtype_name(v["amp"]),
                               "channels_last": v["channels_last"], "main": v["main"],
                               "micro_batch": v.get("micro_batch")}
        if "error" in v:
            row["error"] = v["error"]
        else:
            s = samples[v["label"]]
            med = _median(s)
            row.update({"images_per_s": med, "rounds": s, "spread": (max(s) - min(s)) / med if med else None,
                        "step_ms": 1000 * batch_size / med, "optimizer_share": _median(opt_share[v["label"]])})
            f = faults[v["label"]]
            row["page_faults_per_step"] = None if f is None else f / (rounds * steps)
        rows.append(row)
    base = next((r for r in rows if r["main"] and r["rule"] == BASELINE and "images_per_s" in r), None)
    for row in rows:
        if base is not None and "images_per_s" in row:
            row["vs_bp"] = row["images_per_s"] / base["images_per_s"]
            # The same ratio round by round (rules run back to back inside a
            # round, so a burst of load hits both): its quartiles say how far
            # the one figure above can be trusted on this machine.
            row["vs_bp_rounds_quartiles"] = _quartiles([a / b for a, b in zip(row["rounds"], base["rounds"])])
            if row["main"] and row["rule"] in SPEED_TARGETS:
                row["target_vs_bp"] = SPEED_TARGETS[row["rule"]]
                row["meets_target"] = row["vs_bp"] >= SPEED_TARGETS[row["rule"]]
    out: dict[str, Any] = {"image_size": size, "unit": "images/s (one image = two views)", "rules": rows}
    if aug is not None:
        a = _median(aug_samples)
        out["augment"] = {"images_per_s": a, "rounds": aug_samples}
        out["augment"]["vs_train"] = {
            row["label"]: a / row["images_per_s"] for row in rows if row["main"] and "images_per_s" in row}
        if out["augment"]["vs_train"]:
            worst = min(out["augment"]["vs_train"].values())
            out["augment"]["min_vs_train"] = worst
            out["augment"]["meets_target"] = worst >= AUGMENT_TARGET
    return out


def _flops(rules, encoder, width, size, batch_size, dev, amp_dtype, channels_last, seed, log) -> dict[str, Any]:
    views = _random_views(batch_size, size, dev, channels_last, seed)
    per_rule: dict[str, Any] = {}
    for r in rules:
        log(f"flops: {r} at {size}px")
        try:
            st = _build(r, encoder, width, size, dev, amp_dtype, channels_last, seed)
        except ValueError as e:
            per_rule[r] = {"error": str(e)}
            continue
        per_rule[r] = step_flops(st, views)
    return {"image_size": size, "unit": "FLOP per view (2 per multiply-add)", "rules": per_rule}


def _memory(rules, encoder, width, size, batch_size, dev, amp_dtype, channels_last, micro_batch, seed,
            log) -> dict[str, Any]:
    views = _random_views(batch_size, size, dev, channels_last, seed)
    torch.manual_seed(seed)
    enc = build_encoder(encoder, width, 3).to(dev, memory_format=torch.channels_last if channels_last
                                              else torch.contiguous_format)
    log(f"memory: per-block floor at {size}px")
    per_block, bp_total = encoder_block_bytes(enc, views, amp_dtype)
    del enc
    out: dict[str, Any] = {
        "image_size": size,
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
    for r, mb in _rule_variants(rules, micro_batch):
        label = _variant_label(r, mb)
        log(f"memory: {label} at {size}px")
        try:
            st = _build(r, encoder, width, size, dev, amp_dtype, channels_last, seed, mb)
        except ValueError as e:
            out["rules"][label] = {"error": str(e)}
            continue
        params = list(st.encoder.parameters()) + list(st.rule.parameters())
        gc.collect()
        cuda_before = None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            cuda_before = torch.cuda.memory_allocated(dev)
        tracker = SavedBytesTracker(params)
        with tracker:
            st.step(views)
        d: dict[str, Any] = {
            "rule": r,
            "micro_batch": mb,
            "local": bool(st.rule.local),
            "groups": len(st.rule.groups()),
            "peak_saved_activation_bytes": tracker.peak_bytes,
            "group_peaks": tracker.group_peaks,
            "peak_saved_param_bytes": tracker.peak_param_bytes,
            "live_after_step_bytes": tracker.live_bytes,
            "parameters": parameter_memory(st),
        }
        if cuda_before is not None:
            d["cuda_step_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - cuda_before
        out["rules"][label] = d
        del st, tracker
    base = out["rules"].get(BASELINE)
    if base is None or "error" in base:
        base = next((d for d in out["rules"].values() if "error" not in d and not d["local"]), None)
    if base is not None:
        for d in out["rules"].values():
            if "error" not in d:
                d["vs_bp"] = d["peak_saved_activation_bytes"] / base["peak_saved_activation_bytes"]
                if d["local"]:
                    d["meets_target"] = d["vs_bp"] <= MEMORY_TARGET
    return out


# --------------------------------------------------------------------------- printing


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


def format_report(res: dict[str, Any]) -> str:
    """The human-readable tables of a `run_bench` result."""
    c, env = res["config"], res["env"]
    out = [
        "localssl bench",
        f"  hardware: {env.get('cpu')}" + (f", GPU {env['gpu']}" if "gpu" in env else "")
        + f"; {env.get('cpu_count')} CPUs, torch threads {c['threads']}; native bf16 on CPU: {c['cpu_native_bf16']}",
        f"  versions: python {env.get('python')}, torch {env.get('torch')}, kornia {env.get('kornia', '-')}; "
        f"{env.get('platform')}",
        f"  encoder {c['encoder']} width {c['width']}, batch {c['batch_size']} images ({c['views_per_step']} views), "
        f"device {c['device']}, amp {c['amp']} -> {c['amp_dtype']}, "
        f"{'channels_last' if c['channels_last'] else 'contiguous'}",
        f"  image sizes: speed/FLOPs {c['speed_size']}px, memory {', '.join(f'{s}px' for s in c['image_sizes'])}; "
        f"{c['rounds']} rounds x {c['steps']} steps (+{c['warmup']} warm-up), rules interleaved, median",
        f"  allocator: {env.get('allocator', 'default')}",
        f"  load average (1, 5, 15 min) before / after: {res.get('load_average_before')} / "
        f"{res.get('load_average_after')}",
    ]
    sp = res.get("speed")
    if sp and sp["rules"]:
        out += ["", f"1. Training speed at {sp['image_size']}px (images/s, one image = two views; "
                    f"median of {c['rounds']} rounds; spread = (max - min) / median)"]
        rows, errors = [], []
        for r in sp["rules"]:
            if "error" in r:
                errors.append(f"   {r['label']}: not run: {r['error']}")
                continue
            tgt = r.get("target_vs_bp")
            pf = r.get("page_faults_per_step")
            qs = r.get("vs_bp_rounds_quartiles")
            rows.append([r["label"], f"{r['images_per_s']:.1f}", f"{r['spread']:.0%}", f"{r['step_ms']:.0f}",
                         f"{r['optimizer_share']:.0%}", "-" if pf is None else f"{pf:.0f}",
                         f"{r['vs_bp']:.2f}x" if "vs_bp" in r else "-",
                         f"{qs[0]:.2f}-{qs[1]:.2f}" if qs else "-", f">= {tgt}x" if tgt else "",
                         _mark(r.get("meets_target"))])
        out.append(_table(["rule", "img/s", "spread", "ms/step", "in AdamW", "faults/step", f"vs {BASELINE}",
                           "per-round IQR", "target", "met"], rows))
        out += errors
        out.append("   per-round IQR = quartiles of the same ratio taken round by round (its noise on this machine); "
                   "in AdamW = share of the step inside optimizer.step(); faults/step = minor page faults of the "
                   "process per timed step (memory the allocator handed back and touched again); [unfused AdamW] = "
                   "the same rule with torch's for-each AdamW instead of the fused kernel that `train` uses "
                   "(a what-if).")
        worst = max((r["spread"] for r in sp["rules"] if r.get("spread") is not None), default=0.0)
        if worst > NOISY_SPREAD:
            out.append(f"   WARNING: noisy timings (spread up to {worst:.0%}; load average "
                       f"{res.get('load_average_before')} -> {res.get('load_average_after')} on "
                       f"{env.get('cpu_count')} CPUs): rerun on a quiet machine, or with --threads 1 for steadier "
                       "ratios.")
    if sp and "augment" in sp:
        a = sp["augment"]
        out += ["", f"4. Augmentation (SimCLRViews, uint8 -> 2 views) at {sp['image_size']}px: "
                    f"{a['images_per_s']:.0f} images/s"]
        if a["vs_train"]:
            out.append("   vs training: " + ", ".join(f"{k} {v:.1f}x" for k, v in a["vs_train"].items())
                       + f"  (target >= {AUGMENT_TARGET:.0f}x: {_mark(a.get('meets_target'))})")
    for m in res.get("memory", []):
        f = m["floor"]
        out += ["", f"2./3. Memory at {m['image_size']}px, batch {c['batch_size']} (MiB). act = peak of the live "
                    "bytes autograd saves for backward (deduplicated by storage; parameters excluded),"]
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
                name, _mib(d["peak_saved_activation_bytes"]),
                f"{d['vs_bp']:.2f}x" if "vs_bp" in d else "-",
                _mark(d.get("meets_target")) if d["local"] else "",
                f"{enc['numel'] / 1e6:.2f}M", f"{rule['numel'] / 1e6:.2f}M",
                f"{rule['numel'] / enc['numel']:.1f}x",
                _mib(enc["total_bytes"]), _mib(rule["total_bytes"]),
                _mib(p["total_bytes"] + d["peak_saved_activation_bytes"]),
            ])
        out.append(_table(["rule", "act", f"vs {BASELINE}", f"<= {MEMORY_TARGET}x", "enc params", "rule params",
                           "rule/enc", "enc p+g+opt", "rule p+g+opt", "p+g+opt+act"], rows))
        out += errors
        out.append("   p+g+opt = parameters + gradients + AdamW state (2 per parameter), fp32: 16 bytes per "
                   "trainable parameter. rule params = B matrices / projection / head.")
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
        out += ["", f"5. FLOPs per step at {fl['image_size']}px, GFLOP per view (x2 per image); "
                    "conv/matmul only, 2 FLOPs per multiply-add"]
        parts = [*FLOP_PARTS, "total"]
        rows, errors = [], []
        for name, d in fl["rules"].items():
            if "error" in d:
                errors.append(f"   {name}: not run: {d['error']}")
                continue
            rows.append([name] + [f"{d[p] / 1e9:.4f}" for p in parts])
        out.append(_table(["rule"] + [_FLOP_LABELS[p] for p in parts], rows))
        out += errors
        out += _flop_notes(fl["rules"], c["width"])
    tb = res.get("time_breakdown")
    if tb:
        out += ["", f"6. Where a step's time goes at {tb['image_size']}px (ms per step, each op timed on its own; "
                    f"median per column over {c['rounds']} interleaved rounds of {c['steps']} steps; conv dW = weight "
                    "gradient only, dW+dX = also the input gradient)"]
        rows, errors = [], []
        for name, d in tb["rules"].items():
            if "error" in d:
                errors.append(f"   {name}: not run: {d['error']}")
                continue
            rows.append([name] + [f"{1000 * d[p]:.1f}" for p in (*TIME_PARTS, "total")])
        out.append(_table(["rule"] + [_TIME_LABELS[p] for p in TIME_PARTS] + ["total"], rows))
        out += errors
        out += _breakdown_notes(tb["rules"])
    return "\n".join(out)


def _breakdown_notes(per_rule: dict[str, Any]) -> list[str]:
    notes = ["   outside ops = wall time minus the timed ops (Python, autograd, and this timing's own overhead, "
             "so totals run above table 1's ms/step)."]
    bp = per_rule.get(BASELINE)
    if not bp or "error" in bp:
        return notes
    for name, d in per_rule.items():
        if name == BASELINE or "error" in d:
            continue
        rest, rest_bp = d["total"] - d["conv"], bp["total"] - bp["conv"]
        notes.append(f"   {name} vs {BASELINE}: convolutions {1000 * d['conv']:.1f} vs {1000 * bp['conv']:.1f} ms "
                     f"({bp['conv'] / d['conv']:.2f}x faster), everything else {1000 * rest:.1f} vs "
                     f"{1000 * rest_bp:.1f} ms; whole step {bp['total'] / d['total']:.2f}x.")
    return notes


def _flop_notes(per_rule: dict[str, Any], width: float) -> list[str]:
    ok = {k: v for k, v in per_rule.items() if "error" not in v}
    ref = REFERENCE_GFLOP
    ref_b, ref_saved = ref["dense B (fwd + dB)"], ref["BP step"] - ref["local step"]
    notes = [f"   METHODS 2.2b (full width, 32px): local step ~{ref['local step']}, BP ~{ref['BP step']}, dense B "
             f"~{ref_b} GFLOP/view: B ~{ref_b / ref_saved:.1f}x the input-gradient pass that local training skips, "
             "so CLAPP++ roughly even with BP."]
    bp, dense = ok.get(BASELINE), ok.get("clapp++")
    if not (bp and dense and bp["encoder_bwd_input"] > 0):
        return notes
    saved = bp["encoder_bwd_input"]
    b_cost = dense["rule_params_fwd"] + dense["rule_params_bwd"]
    scale = 1 / width**2  # every part grows with width^2 (B's side with width); the 3-channel input layer aside
    line = (f"   measured: CLAPP++'s dense spatial B (B c forward + dB backward) {b_cost / 1e9:.4f} GFLOP/view = "
            f"{b_cost / saved:.2f}x the skipped input-gradient pass ({saved / 1e9:.4f} in BP); step totals clapp++ "
            f"{dense['total'] / 1e9:.4f} ({dense['total'] / bp['total']:.2f}x BP)")
    if "clapp++global" in ok:
        g = ok["clapp++global"]["total"]
        line += f", clapp++global {g / 1e9:.4f} ({g / bp['total']:.2f}x)"
    notes.append(line + f", {BASELINE} {bp['total'] / 1e9:.4f}.")
    notes.append(f"   x{scale:.0f} (width {width} -> 1): local step ~{dense['total'] * scale / 1e9:.1f}, BP "
                 f"~{bp['total'] * scale / 1e9:.1f}, dense B ~{b_cost * scale / 1e9:.1f} GFLOP/view (counting 2 FLOPs "
                 "per multiply-add).")
    if b_cost >= 0.75 * saved:
        notes.append("   So the dense B costs about as much as the pass local training saves: CLAPP++ is roughly "
                     "even with BP in FLOPs; small-B rules (clapp++global) keep the saving.")
    else:
        notes.append(f"   So in FLOPs the dense B takes only {b_cost / saved:.0%} of what local training saves; in "
                     "time it costs more than its FLOPs, because AdamW then updates B's parameters every step "
                     "(see 'in AdamW' in table 1).")
    return notes


# --------------------------------------------------------------------------- command line


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``localssl bench``."""
    p = subparsers.add_parser(
        "bench", help="speed, activation/parameter memory and FLOPs of the rules, side by side",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--encoder", default="vgg6", help="encoder name (default: vgg6)")
    p.add_argument("--width", type=float, default=0.25, help="channel width multiplier (default: 0.25)")
    p.add_argument("--image-size", dest="image_sizes", type=int, nargs="+", default=[32, 96],
                   help="image sizes for the memory tables (default: 32 96)")
    p.add_argument("--speed-size", type=int, default=None,
                   help="image size for speed, FLOPs and augmentation (default: the first --image-size)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step, two views each (default: 32)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per rule per round (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per rule first (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the interleaved rules; median (default: 3)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="auto: bf16 only where the hardware runs it natively (default: auto)")
    p.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES),
                   help=f"rules to compare (default: {' '.join(DEFAULT_RULES)})")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="contiguous (NCHW) encoder and inputs instead of channels_last")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the training-speed rounds")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory tables")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP table")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the per-op time breakdown (op families, a few steps per rule)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="skip the augmentation timing")
    p.add_argument("--no-precision-compare", dest="compare_precision", action="store_false",
                   help="skip timing one rule at the other precision (fp32/bf16) and the other memory layout, "
                   "and clapp++ with the unfused AdamW")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="also run every rule micro-batched, this many views per chunk; 0 to skip (default: an "
                   "eighth of the step's views, 8 at batch 32)")
    p.add_argument("--rss", action="store_true", help="also whole-process peak RSS per rule (one subprocess each)")
    p.add_argument("--no-retain-memory", dest="retain_memory", action="store_false",
                   help="leave glibc's allocator at its defaults (`train` keeps freed memory for reuse: "
                        "--retain-freed-memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and random inputs (default: 0)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.set_defaults(func=bench_main)
    return p


def bench_main(args: argparse.Namespace) -> int:
    """Run ``localssl bench`` from parsed arguments; progress goes to stderr."""
    res = run_bench(
        encoder=args.encoder, width=args.width, image_sizes=args.image_sizes, batch_size=args.batch_size,
        steps=args.steps, warmup=args.warmup, rounds=args.rounds, amp=args.amp, rules=args.rules,
        speed_size=args.speed_size, device=args.device, threads=args.threads, channels_last=args.channels_last,
        speed=args.speed, memory=args.memory, flops=args.flops, augment=args.augment,
        compare_precision=args.compare_precision, rss=args.rss, retain_memory=args.retain_memory,
        breakdown=args.breakdown and args.speed,
        micro_batch=max(1, args.batch_size // 4) if args.micro_batch is None else (args.micro_batch or None),
        seed=args.seed,
        log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True),
    )
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text if args.json else format_report(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localssl.reports.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    return bench_main(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
