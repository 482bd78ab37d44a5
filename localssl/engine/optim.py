"""The optimizers and learning-rate schedules of a run besides plain AdamW.

- `LARS`: SGD with momentum whose step of every weight tensor is scaled to
  its norm (You, Gitman & Ginsburg 2017, "Large batch training of
  convolutional networks"), as Barlow Twins trains and blockwise SSL after it
  (METHODS 5.1: LARS, lr 0.2 x batch / 256, warmup then cosine).
- `OptimizerSet`: several optimizers stepped, saved and loaded as one
  (a rule's parameters with an `OptimizerHint` train with their own).
- `lr_at`: the learning rate of a step, a pure function of the step.

Why the schedule is a function and not a ``torch.optim.lr_scheduler``: the
trainer sets every parameter group's lr to ``lr_at(step, ...)`` before each
step, so the lr depends on nothing but the step number and the config, both
in the checkpoint. A resumed run therefore takes the same lr at every step as
an uninterrupted one by construction; there is no scheduler state to save,
restore, or get out of step with the optimizer's.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from localssl.config import LR_SCHEDULES


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling: momentum SGD with a trust ratio per tensor.

    For each parameter ``w`` with gradient ``g`` (the formula of
    facebookresearch/barlowtwins, main.py, class ``LARS``, which
    shoaibahmed/blockwise_ssl uses unchanged):

        d  = g + weight_decay * w
        d *= eta * ||w|| / ||d||        (1 where ||w|| or ||d|| is 0)
        mu = momentum * mu + d
        w -= lr * mu

    With ``exclude_bias_and_norm`` (the default, as both references train),
    parameters with one dimension (biases, BatchNorm's scale and shift) take
    neither the weight decay nor the trust ratio: ``d = g``. The momentum
    buffer ``mu`` is the optimizer's state (``state_dict``), so a checkpoint
    holds everything a resumed run needs. The trust ratio uses the weight's
    norm, so a tensor of zeros (or one without gradient) moves by its raw
    gradient.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], lr: float,
                 momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 exclude_bias_and_norm: bool = True) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        # A bool, not the references' filter function: a function in the param groups would make the
        # optimizer's state_dict unloadable with torch.load(weights_only=True).
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        exclude_bias_and_norm=exclude_bias_and_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient (frozen blocks' have none and stay put)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not (group["exclude_bias_and_norm"] and p.ndim == 1):
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    # torch.where, not `if`: no device sync per tensor; 1 where either norm is 0.
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                mu = state["momentum_buffer"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


class OptimizerSet:
    """Several optimizers over disjoint parameters, used as one (what a step and a checkpoint see).

    ``param_groups`` are the members' groups in order (the same dicts, so
    `set_lr` reaches them all; the first member's first group is the run's
    lr). ``state_dict`` is in torch's own format, indices numbered across
    the members in that order, so a checkpoint reads like a single
    optimizer's (a pipeline's stages gather it by parameter index), and
    ``load_state_dict`` splits it back. Each member steps on its own
    parameters: one ``step`` after every group's backward, as with one
    optimizer (the members are element-wise or per-tensor, so the order does
    not matter).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("an OptimizerSet needs at least one optimizer")
        self.optimizers = list(optimizers)
        self._pre: OrderedDict[int, Callable] = OrderedDict()
        self._post: OrderedDict[int, Callable] = OrderedDict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def defaults(self) -> dict[str, Any]:
        """The first member's (the encoder's optimizer)."""
        return self.optimizers[0].defaults

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Every member's per-parameter state, merged (read-only view)."""
        return {p: st for o in self.optimizers for p, st in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        if closure is not None:
            raise ValueError("OptimizerSet.step takes no closure (each member would re-evaluate the loss)")
        for hook in list(self._pre.values()):
            hook(self, (), {})
        for o in self.optimizers:
            o.step()
        for hook in list(self._post.values()):
            hook(self, (), {})
        return None

    def register_step_pre_hook(self, hook: Callable) -> RemovableHandle:
        """``hook(optimizer_set, args, kwargs)`` before every step (as torch's optimizers' hooks)."""
        handle = RemovableHandle(self._pre)
        self._pre[handle.id] = hook
        return handle

    def register_step_post_hook(self, hook: Callable) -> RemovableHandle:
        """``hook(optimizer_set, args, kwargs)`` after every step."""
        handle = RemovableHandle(self._post)
        self._post[handle.id] = hook
        return handle

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        sizes = [len(o.param_groups) for o in self.optimizers]
        if len(groups) != sum(sizes):
            raise ValueError(f"the saved optimizer has {len(groups)} parameter groups, this run's "
                             f"{sum(sizes)} ({len(self.optimizers)} optimizers)")
        offset, first = 0, 0
        for o, n in zip(self.optimizers, sizes):
            mine = groups[first:first + n]
            count = sum(len(g["params"]) for g in o.param_groups)
            o.load_state_dict({
                "state": {i - offset: s for i, s in state_dict["state"].items() if offset <= i < offset + count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine],
            })
            offset, first = offset + count, first + n


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0,
          min_lr: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based: the step about to run) of a ``total_steps``-step run.

    Linear warmup from 0 over the first ``warmup_steps`` steps (``base_lr *
    step / warmup_steps``, so step 0 has lr 0, as in barlowtwins'
    ``adjust_learning_rate``), then ``base_lr`` (``"constant"``) or a half
    cosine from ``base_lr`` at the end of warmup to ``min_lr`` at
    ``total_steps`` (``"cosine"``; SGDR, Loshchilov & Hutter 2017, without
    restarts). Steps past ``total_steps`` stay at ``min_lr``. With the
    defaults it returns ``base_lr`` itself, so a run without a schedule
    steps exactly as before schedules existed.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    span = total_steps - warmup_steps
    t = min(1.0, (step - warmup_steps) / span) if span > 0 else 1.0
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer | OptimizerSet, lr: float) -> None:
    """Every parameter group's lr to ``lr`` (the run's one lr: `lr_at` of the step), times the group's
    ``lr_scale`` where it has one (a rule's hinted parameters, `localssl.rules.OptimizerHint`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


__all__ = ["LARS", "OptimizerSet", "lr_at", "set_lr"]
