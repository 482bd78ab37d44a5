"""FLOP tools of ``localssl bench``: FLOPs per view of each part of a training step (METHODS 2.2b).

Counted with the formulas of `torch.utils.flop_counter` (2 FLOPs per
multiply-add; conv and matmul only: ReLU, pooling, the hinge and AdamW are
elementwise and not counted).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from localssl.reports.bench.common import BUILD_ERRORS, BenchState, Log, build_state, error_text, random_views

FLOP_PARTS = (
    "encoder_fwd",
    "encoder_bwd_weight",
    "encoder_bwd_input",
    "rule_params_fwd",
    "rule_params_bwd",
    "loss",
    "context_fwd",
)


def conv_backward_mask(args: Sequence[Any]) -> list[bool]:
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
            mask = conv_backward_mask(args)
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


def step_flops(state: BenchState, views: torch.Tensor) -> dict[str, float]:
    """FLOPs per view of each part of one training step (no optimizer step)."""
    counter = PartFlopCounter(state.rule)
    with counter:
        state.step(views, with_optimizer=False)
    n = views.shape[0]
    d = {p: counter.counts.get(p, 0) / n for p in FLOP_PARTS}
    d["total"] = sum(d[p] for p in FLOP_PARTS)
    return d



def measure_flops(rules: Sequence[str], encoder: str, width: float, size: int, batch_size: int,
                  dev: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, seed: int,
                  log: Log, encoder_options: Mapping[str, Any] | None = None,
                  rule_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Table 5: FLOPs per view of each part of one step, per rule (with ``local``: whether it trains locally)."""
    views = random_views(batch_size, size, dev, channels_last, seed)
    per_rule: dict[str, Any] = {}
    for r in rules:
        log(f"flops: {r} at {size}px")
        try:
            st = build_state(r, encoder, width, size, dev, amp_dtype, channels_last, seed, None, encoder_options,
                             rule_options)
            per_rule[r] = {**step_flops(st, views), "local": st.rule.local}
        except BUILD_ERRORS as e:
            per_rule[r] = {"error": error_text(e)}
        st = None  # free this rule's parameters before the next is built
    return {"image_size": size, "width": width, "unit": "FLOP per view (2 per multiply-add)", "rules": per_rule}
