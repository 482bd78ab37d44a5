"""Local rules whose feedback B is not learnt: Forward-Forward and fixed random feedback (METHODS 2, 5.3).

Both are the unified loss of METHODS 2, u = z^l . (B^l c^l), f(u_pos, u_neg),
on two SimCLR views, with B^l given rather than trained:

- ``ff``: B = identity and same-layer context (Forward-Forward in the
  unified form, METHODS 5.3; Wu et al. 2026 place FF-type rules there).
- ``dfa``: B^l frozen at its random init and context = the other view's
  top-layer code (CLAPP++DFB with fixed B): the top layer's code reaches
  every layer through a fixed random matrix, the closest local analogue of
  direct feedback alignment (Nokland 2016; METHODS 5.3).

``clapp++ --rule-opt feedback=fixed`` (same-layer context, fixed B) stays as
it is; see `DirectFeedbackAlignment` for which of the two the paper's
"random fixed feedback" is.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from localssl.rules.base import Rule, RuleOptions
from localssl.rules.clapp import CLAPPPlusPlus, ContrastiveOptions
from localssl.rules.losses import CONTRASTIVE_F, contrastive_loss, spatial_pool, swap_views
from localssl.rules.registry import register_rule


@dataclass
class FFOptions(RuleOptions):
    """Options of ``ff``.

    f: the decreasing loss function of METHODS 2 (default hinge, as CLAPP++;
       softplus with a threshold is Hinton's logistic, see `ForwardForward`).
    threshold: shifts both scores before f, f(u_pos - theta, u_neg - theta)
       (Forward-Forward's goodness threshold theta); 0, the default, is the
       unified loss of the CLAPP++ paper.
    """

    f: str = "hinge"
    threshold: float = 0.0

    def check(self) -> None:
        if self.f not in CONTRASTIVE_F:
            raise ValueError(f"unknown f {self.f!r}; valid: {', '.join(CONTRASTIVE_F.names())}")

    def check_training(self) -> None:
        # With B = identity no L2 penalty can help: u = z . c grows with the encoder's own scale.
        if self.f == "linear":
            raise ValueError("f=linear is unbounded below with B = identity (u grows with the encoder's scale): "
                             "use softplus, hinge or type1")


class ForwardForward(Rule):
    """Forward-Forward in the unified form (METHODS 5.3): B = identity, same-layer context, global pooling.

    u_pos = z_i . c_i and u_neg = z_{i+1} . c_i, with z the globally pooled
    block output and c the other view's (detached). The rule has no
    parameters of its own.

    Pooling: global (mean over H, W), not CLAPP++'s grids. CLAPP++'s gain from
    spatial dependence comes from B^l coupling positions (METHODS 2.2); with
    B = identity a grid would only score cell k of one crop against cell k
    of the other, and the two random crops do not put the same content in
    the same cell. Globally pooled codes are what the crops share. (The
    spatial variant is ``clapp++ --rule-opt feedback=identity``.)

    f and the threshold: Hinton's FF (2022) trains a layer with the logistic
    -log sigmoid(G_pos - theta) - log sigmoid(theta - G_neg) on the goodness
    G = sum of squared activities. Here the score u = z . c plays G (2u is the
    cross term of |z + c|^2, the goodness of the two views' summed codes, much
    as SCFF sums two views in its first layer, METHODS 5.3), and the unified
    logistic f = softplus(1 - u_pos) + softplus(1 + u_neg) is that loss with
    the threshold split into +1 for positives and -1 for negatives: a margin
    of 1 around theta = 0. A ``threshold`` option is offered because a rule
    without B cannot move u otherwise: block outputs pass a ReLU, so z, c >= 0
    and u >= 0, and at theta = 0 the negative target u_neg <= -1 is out of
    reach (the negative term pushes every u_neg towards 0 for good).

    Default f: the hinge, the paper's f for CLAPP++, so that ``ff`` differs from
    ``clapp++global`` by B alone. Not the logistic, because at theta = 0 it
    weighs a negative more than a positive whenever u_pos = u_neg = u > 0
    (sigmoid(1 + u) > sigmoid(1 - u)), which is how non-negative codes of
    different images look at init, so it first shrinks every code; the hinge's
    weights are +-1. (Measured on the test suite's tiny VGG-6, 100 AdamW steps
    at lr 3e-3 on one batch: the hinge took layer losses 2.0 -> 1.95..1.0, the
    logistic 2.63 -> 2.62..1.33, the logistic with threshold 1 2.7 -> 2.6..0.69.)
    """

    local = True
    options: FFOptions

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: FFOptions | None = None,
                 grids: Sequence[int] | None = None) -> None:
        super().__init__(feature_shapes, options or FFOptions(), grids)
        self.options.check()
        self.grids = [1] * self.num_blocks  # global pooling (see the class docstring)

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        return spatial_pool(h, 1)

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # scores in float32 at least (a few hundred numbers per row: free)
        return contrastive_loss(z, swap_views(z).detach(), self.options.f, self.options.threshold)


@dataclass
class DFAOptions(ContrastiveOptions):
    """Options of ``dfa``: those of CLAPP++ (f, b_l2) with the feedback fixed.

    feedback: only "fixed" (the rule's definition); kept as an option so that
       the resolved config says so, and so that another value is refused by name.
    train_top: let the top layer's own B^L train (its context is itself): the
       setting of the reference code's MNIST "random fixed feedback" run
       (see `DirectFeedbackAlignment`). Default False: every B frozen.
    """

    feedback: str = "fixed"
    train_top: bool = False

    def check(self) -> None:
        if self.feedback != "fixed":
            raise ValueError(f"dfa's feedback is fixed random by definition (METHODS 5.3), got "
                             f"feedback={self.feedback!r} (a trainable B with top-layer context: clapp++dfb; "
                             "B = identity: ff)")
        super().check()

    def check_training(self) -> None:
        if self.f == "linear" and self.b_l2 == 0 and self.train_top:
            raise ValueError("f=linear is unbounded below with a trainable top B (train_top): set b_l2 > 0")


class DirectFeedbackAlignment(CLAPPPlusPlus):
    """Fixed random feedback (METHODS 5.3): CLAPP++DFB with every B^l frozen at its random init.

    Layer l scores its pooled code z^l against B^l c, c the other view's
    top-layer code (detached) and B^l a fixed random matrix (the Kaiming-
    uniform init of every B in this family): the top layer's code is sent down
    through a fixed random map, as DFA sends the output error (Nokland 2016).
    B^l is a parameter with ``requires_grad=False``: no group owns it, so the
    optimizer never holds it (no weight decay reaches it), and it is in the
    rule's ``state_dict``, so a checkpoint saves it and a resumed run loads it
    (it is not re-drawn: its init depends on the global RNG at build time).

    Which is the paper's "random fixed feedback": in the reference code
    (zihan-wu/local-SSL, theory/simulations.sh, Fig. 3b) it is the DFB
    configuration (fb_idx = top layer for every layer) with ``freeze_fb``,
    which freezes every B but the top layer's own (theory/models.py:
    ``Wproj[:-1]``): that is this rule with ``train_top=True``. The vision
    code's ``--freeze_W_pred`` alone freezes every B, our default
    (``--unfreeze_last_W_pred`` frees the top one); no released script uses
    either, and METHODS 4's table of published figures has no row for it.
    """

    options: DFAOptions

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: DFAOptions | None = None,
                 grids: Sequence[int] | None = None) -> None:
        super().__init__(feature_shapes, options or DFAOptions(), grids, context="top", spatial=True)
        if self.options.train_top:
            self.top[-1].set_trainable(True)


# Both compare with BP-CLAPP++, the family's end-to-end rule (METHODS 2.3).
register_rule("ff", FFOptions, counterpart="bp-clapp++")(ForwardForward)
register_rule("dfa", DFAOptions, counterpart="bp-clapp++")(DirectFeedbackAlignment)
