"""CLAPP++ and its variants (METHODS 2, 2.2; Wu et al. 2026).

At layer l with pooled representation z^l (gradient flows) and detached
context c^l, the score is u = z^l . (B^l c^l) and the loss f(u_pos, u_neg).
- CLAPP++: same-layer context (the other view at layer l), pooled to the
  per-layer grids so that B^l couples positions (spatial dependence).
- CLAPP++ without spatial dependence: grids of 1 (global mean pooling).
- CLAPP++DFB: context = the other view's top-layer representation.
- CLAPP++both: the sum of the same-layer and DFB losses.
- BP-CLAPP++: the same hinge loss at the top layer only, global pooling,
  back-propagated through the whole encoder.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from localssl.rules.base import FEEDBACK_KINDS, Rule, RuleOptions
from localssl.rules.losses import CONTRASTIVE_F, contrastive_loss, spatial_pool, swap_views
from localssl.rules.registry import register_rule


@dataclass
class ContrastiveOptions(RuleOptions):
    """Options of the CLAPP++ family (METHODS 2).

    f: the decreasing loss function (hinge, softplus/logistic, linear, type1).
    feedback: B^l trainable, identity (Forward-Forward-like) or fixed random
       (DFA-like).
    b_l2: L2 penalty on B (needed by the linear f, which is unbounded below).
    """

    f: str = "hinge"
    feedback: str = "trainable"
    b_l2: float = 0.0

    def check(self) -> None:
        if self.f not in CONTRASTIVE_F:
            raise ValueError(f"unknown f {self.f!r}; valid: {', '.join(CONTRASTIVE_F.names())}")
        if self.feedback not in FEEDBACK_KINDS:
            raise ValueError(f"unknown feedback {self.feedback!r}; valid: {', '.join(FEEDBACK_KINDS)}")
        if not self.b_l2 >= 0:
            raise ValueError(f"b_l2 must be >= 0, got {self.b_l2}")

    def check_training(self) -> None:
        # One loss evaluation is fine (the exactness tests take one), but training drives B to infinity.
        if self.f == "linear" and self.b_l2 == 0 and self.feedback == "trainable":
            raise ValueError("f=linear is unbounded below with a trainable B: set b_l2 > 0 (e.g. 1e-3)")


class Feedback(nn.Module):
    """The bias-free map B from context space (d_c) to layer space (d_z)."""

    def __init__(self, d_c: int, d_z: int, kind: str = "trainable") -> None:
        super().__init__()
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"unknown feedback {kind!r}; valid: {', '.join(FEEDBACK_KINDS)}")
        self.kind = kind
        self.d_c, self.d_z = d_c, d_z
        if kind == "identity":
            if d_c != d_z:
                raise ValueError(f"identity feedback needs equal dims, got context {d_c} and layer {d_z}")
            self.weight = None
        else:
            lin = nn.Linear(d_c, d_z, bias=False)  # default (Kaiming-uniform) init, as the reference
            self.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=(kind == "trainable"))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return c
        return nn.functional.linear(c, self.weight)

    def l2(self) -> torch.Tensor:
        if self.weight is None or not self.weight.requires_grad:
            return torch.zeros(())
        return self.weight.pow(2).sum()

    def extra_repr(self) -> str:
        return f"{self.d_c} -> {self.d_z}, kind={self.kind}"


def _pooled_dim(shape: Sequence[int], grid: int) -> int:
    if len(shape) == 1:
        return int(shape[0])
    c, h, w = shape
    if h % grid or w % grid:
        raise ValueError(
            f"pooling grid {grid} does not fit a {h}x{w} feature map: choose a grid that divides {h} "
            f"(e.g. {', '.join(str(d) for d in range(1, h + 1) if h % d == 0)})"
        )
    return c * grid * grid


class CLAPPPlusPlus(Rule):
    """Local CLAPP++ with same-layer and/or top-layer (DFB) context."""

    local = True

    options: ContrastiveOptions

    def __init__(
        self,
        feature_shapes: Sequence[tuple[int, ...]],
        options: ContrastiveOptions | None = None,
        grids: Sequence[int] | None = None,
        context: str = "same",
        spatial: bool = True,
    ) -> None:
        super().__init__(feature_shapes, options or ContrastiveOptions(), grids)
        options = self.options
        options.check()
        if context not in ("same", "top", "both"):
            raise ValueError(f"unknown context {context!r}; valid: same, top, both")
        self.context_source = context  # same, top or both
        self.needs_top_context = context in ("top", "both")
        n = self.num_blocks
        if spatial:
            if self.run_grids is None:
                raise ValueError("spatial CLAPP++ needs pooling grids (one per block)")
            grids = list(self.run_grids)
            if len(grids) != n:
                raise ValueError(f"{len(grids)} pooling grids given for an encoder of {n} blocks")
        else:
            grids = [1] * n
        self.grids = grids
        dims = [_pooled_dim(s, g) for s, g in zip(self.feature_shapes, grids)]
        self.dims = dims
        self.same = nn.ModuleList(
            [Feedback(d, d, options.feedback) for d in dims] if context in ("same", "both") else []
        )
        self.top = nn.ModuleList(
            [Feedback(dims[-1], d, options.feedback) for d in dims] if self.needs_top_context else []
        )

    def _penalty(self, g: int) -> torch.Tensor:
        pen = sum((m[g].l2() for m in (self.same, self.top) if len(m)), torch.zeros(()))
        return self.options.b_l2 * pen

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        return spatial_pool(h, self.grids[g])

    def context(self, top: torch.Tensor) -> torch.Tensor:
        return spatial_pool(top, self.grids[-1])

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        loss = z.new_zeros((), dtype=torch.float32)
        if len(self.same):
            c = swap_views(z).detach()
            loss = loss + contrastive_loss(z, self.same[g](c), self.options.f)
        if len(self.top):
            if context is None:
                raise ValueError("this rule needs the top block's output as context")
            c_top = swap_views(context).detach()
            loss = loss + contrastive_loss(z, self.top[g](c_top), self.options.f)
        if self.options.b_l2 > 0:
            loss = loss + self._penalty(g).to(loss.device)
        return loss

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        mods = [m[g] for m in (self.same, self.top) if len(m)]
        return [p for m in mods for p in m.parameters() if p.requires_grad]


class BPCLAPPPlusPlus(Rule):
    """BP-CLAPP++ ("CPC-like"): the hinge loss at the top only, end-to-end (METHODS 2.3)."""

    local = False
    options: ContrastiveOptions

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: ContrastiveOptions | None = None,
                 grids: Sequence[int] | None = None) -> None:
        super().__init__(feature_shapes, options or ContrastiveOptions(), grids)
        self.options.check()
        d = _pooled_dim(self.feature_shapes[-1], 1)
        self.head = Feedback(d, d, self.options.feedback)

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        return spatial_pool(h, 1)

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        loss = contrastive_loss(z, self.head(swap_views(z).detach()), self.options.f)
        if self.options.b_l2 > 0:
            loss = loss + self.options.b_l2 * self.head.l2().to(loss.device)
        return loss

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad]


# The family (METHODS 2, 2.3). Each local variant's gradient is compared with BP-CLAPP++'s.
register_rule("clapp++", ContrastiveOptions, counterpart="bp-clapp++")(
    lambda shapes, opt, grids: CLAPPPlusPlus(shapes, opt, grids, context="same", spatial=True))
register_rule("clapp++global", ContrastiveOptions, counterpart="bp-clapp++")(
    lambda shapes, opt, grids: CLAPPPlusPlus(shapes, opt, grids, context="same", spatial=False))
register_rule("clapp++dfb", ContrastiveOptions, counterpart="bp-clapp++")(
    lambda shapes, opt, grids: CLAPPPlusPlus(shapes, opt, grids, context="top", spatial=True))
register_rule("clapp++both", ContrastiveOptions, counterpart="bp-clapp++")(
    lambda shapes, opt, grids: CLAPPPlusPlus(shapes, opt, grids, context="both", spatial=True))
register_rule("bp-clapp++", ContrastiveOptions)(BPCLAPPPlusPlus)
