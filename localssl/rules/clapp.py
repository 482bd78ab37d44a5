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

from localssl.rules.base import FEEDBACK_KINDS, OptimizerHint, Rule, RuleOptions
from localssl.rules.feedback import B_DTYPES, B_STRUCTURES, Feedback
from localssl.rules.losses import CONTRASTIVE_F, contrastive_loss, spatial_pool, swap_views
from localssl.rules.registry import register_rule

#: b_optimizer: "same" (the run's optimizer) or an optimizer without second-moment state.
B_OPTIMIZERS = ("same", "sgd")


@dataclass
class ContrastiveOptions(RuleOptions):
    """Options of the CLAPP++ family (METHODS 2).

    f: the decreasing loss function (hinge, softplus/logistic, linear, type1).
    feedback: B^l trainable, identity (Forward-Forward-like) or fixed random
       (DFA-like).
    b_l2: L2 penalty on B, b_l2 |B|_F^2 (needed by the linear f, which is unbounded below).

    Cheaper B (issue 14; METHODS 2.2b: the dense spatial B costs more than
    the input-gradient pass local training saves). Each is off by default,
    and the defaults are the dense fp32 B in the run's optimizer, bit for bit:
    b_rank: r > 0: B = U V^T of rank r (`localssl.rules.feedback.Feedback`),
       r (d_z + d_c) parameters instead of d_z d_c; a layer whose smaller dim
       is <= r keeps its dense B (a rank that high constrains nothing).
       0: dense.
    b_structure: "dense" (B any d_z x d_c matrix; U V^T with b_rank) or
       "shared": one C_z x C_c channel map applied at every pooled cell
       (B = B_ch (x) M, M the fixed map from the context's grid to the
       layer's), plus a rank-b_rank coupling U V^T across positions when
       b_rank > 0. C_z C_c parameters (+ r (d_z + d_c))
       instead of d_z d_c: at full width 128^2 instead of 8192^2 on layer 1.
       Spatial dependence stays (each cell's gradient is B_ch c at that
       cell); what goes is B coupling different cells (the rank-r term gives
       some back). Grids of one cell (global pooling) keep the dense B.
    b_dtype: fp32, or bf16: the B matmul in bfloat16 from fp32 master weights
       (gradients and optimizer state fp32; slow on CPUs without native bf16).
       Under ``--amp bf16`` autocast already runs this matmul in bf16 from the
       fp32 weights; b_dtype=bf16 gives that to B alone in an fp32 run.
    b_optimizer: "same" (B in the run's optimizer, AdamW by default) or "sgd":
       momentum SGD for B alone (one buffer per B, b_momentum 0: none),
       without AdamW's second moment; the encoder keeps the run's optimizer.
    b_momentum: the momentum of b_optimizer=sgd.
    b_lr_scale: B's lr = the run's lr (at every step of its schedule) x this,
       with b_optimizer=sgd (SGD's steps scale with the gradient, AdamW's do
       not, so the run's lr is rarely the right one for both).
    """

    f: str = "hinge"
    feedback: str = "trainable"
    b_l2: float = 0.0
    b_rank: int = 0
    b_structure: str = "dense"
    b_dtype: str = "fp32"
    b_optimizer: str = "same"
    b_momentum: float = 0.9
    b_lr_scale: float = 1.0

    def check(self) -> None:
        if self.f not in CONTRASTIVE_F:
            raise ValueError(f"unknown f {self.f!r}; valid: {', '.join(CONTRASTIVE_F.names())}")
        if self.feedback not in FEEDBACK_KINDS:
            raise ValueError(f"unknown feedback {self.feedback!r}; valid: {', '.join(FEEDBACK_KINDS)}")
        if not self.b_l2 >= 0:
            raise ValueError(f"b_l2 must be >= 0, got {self.b_l2}")
        if self.b_rank < 0:
            raise ValueError(f"b_rank must be >= 0 (0: dense B), got {self.b_rank}")
        if self.b_rank and self.feedback == "identity":
            raise ValueError(f"b_rank={self.b_rank} needs a B matrix; feedback=identity has none")
        if self.b_structure not in B_STRUCTURES:
            raise ValueError(f"unknown b_structure {self.b_structure!r}; valid: {', '.join(B_STRUCTURES)}")
        if self.b_structure != "dense" and self.feedback == "identity":
            raise ValueError(f"b_structure={self.b_structure} needs a B matrix; feedback=identity has none")
        if self.b_dtype not in B_DTYPES:
            raise ValueError(f"unknown b_dtype {self.b_dtype!r}; valid: {', '.join(B_DTYPES)}")
        if self.b_optimizer not in B_OPTIMIZERS:
            raise ValueError(f"unknown b_optimizer {self.b_optimizer!r}; valid: {', '.join(B_OPTIMIZERS)}")
        if self.b_optimizer != "same" and self.feedback != "trainable":
            raise ValueError(f"b_optimizer={self.b_optimizer} needs a trainable B; feedback={self.feedback} has none")
        if not 0 <= self.b_momentum < 1:
            raise ValueError(f"b_momentum must be in [0, 1), got {self.b_momentum}")
        if not self.b_lr_scale > 0:
            raise ValueError(f"b_lr_scale must be > 0, got {self.b_lr_scale}")

    def make_feedback(self, c_layout: tuple[int, int], z_layout: tuple[int, int]) -> Feedback:
        """A B from the context to the layer as these options ask (kind, rank, structure, dtype).

        Each layout is (channels, grid) of a pooled vector of channels x grid^2 numbers (grid 1: a vector).
        """
        (cc, gc), (cz, gz) = c_layout, z_layout
        return Feedback(cc * gc * gc, cz * gz * gz, self.feedback, rank=self.b_rank, dtype=self.b_dtype,
                        structure=self.b_structure, c_layout=c_layout, z_layout=z_layout)

    def b_hint(self) -> OptimizerHint | None:
        """How the builder optimises B: None (the run's optimizer) or `OptimizerHint` (b_optimizer=sgd)."""
        if self.b_optimizer == "same":
            return None
        return OptimizerHint(self.b_optimizer, momentum=self.b_momentum, lr_scale=self.b_lr_scale)

    def check_training(self) -> None:
        # One loss evaluation is fine (the exactness tests take one), but training drives B to infinity.
        if self.f == "linear" and self.b_l2 == 0 and self.feedback == "trainable":
            raise ValueError("f=linear is unbounded below with a trainable B: set b_l2 > 0 (e.g. 1e-3)")


def _pooled_layout(shape: Sequence[int], grid: int) -> tuple[int, int]:
    """(channels, grid) of a block output of ``shape`` pooled to ``grid`` x ``grid`` (a vector: (D, 1))."""
    if len(shape) == 1:
        return int(shape[0]), 1
    c, h, w = shape
    if h % grid or w % grid:
        raise ValueError(
            f"pooling grid {grid} does not fit a {h}x{w} feature map: choose a grid that divides {h} "
            f"(e.g. {', '.join(str(d) for d in range(1, h + 1) if h % d == 0)})"
        )
    return int(c), int(grid)



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
        layouts = [_pooled_layout(s, g) for s, g in zip(self.feature_shapes, grids)]
        self.dims = [c * g * g for c, g in layouts]
        self.same = nn.ModuleList(
            [options.make_feedback(lay, lay) for lay in layouts] if context in ("same", "both") else []
        )
        self.top = nn.ModuleList(
            [options.make_feedback(layouts[-1], lay) for lay in layouts] if self.needs_top_context else []
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

    def optimizer_hint(self, p: nn.Parameter) -> OptimizerHint | None:
        hint = self.options.b_hint()
        if hint is None or not any(p is q for m in (*self.same, *self.top) for q in m.parameters()):
            return None
        return hint


class BPCLAPPPlusPlus(Rule):
    """BP-CLAPP++ ("CPC-like"): the hinge loss at the top only, end-to-end (METHODS 2.3)."""

    local = False
    options: ContrastiveOptions

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: ContrastiveOptions | None = None,
                 grids: Sequence[int] | None = None) -> None:
        super().__init__(feature_shapes, options or ContrastiveOptions(), grids)
        self.options.check()
        layout = _pooled_layout(self.feature_shapes[-1], 1)
        self.head = self.options.make_feedback(layout, layout)

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        return spatial_pool(h, 1)

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        loss = contrastive_loss(z, self.head(swap_views(z).detach()), self.options.f)
        if self.options.b_l2 > 0:
            loss = loss + self.options.b_l2 * self.head.l2().to(loss.device)
        return loss

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad]

    def optimizer_hint(self, p: nn.Parameter) -> OptimizerHint | None:
        hint = self.options.b_hint()
        return hint if hint is not None and any(p is q for q in self.head.parameters()) else None


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
