"""Predictive coding (PC) for self-supervised learning: a baseline (METHODS 5.3).

The standard discriminative PC network (Whittington & Bogacz 2017; Millidge,
Tschantz & Buckley 2022, "Predictive coding approximates backprop along
arbitrary computation graphs"; Song et al. 2020, Z-IL), on the encoder's
blocks as they are:
- every block l has a latent activity x_l (one per view); x_0 is the views,
  clamped;
- block l predicts its own latent from the one below: mu_l = f_l(x_{l-1}),
  with its own weights; the prediction error is e_l = x_l - mu_l;
- energy, per view: E = sum_l ||e_l||^2 / 2 + w * L_top(x_L), where L_top is
  the SSL objective on the top latents of the two views (the views' top codes
  are each other's targets; ``top_loss`` below);
- inference: x starts at the feedforward pass (all e_l = 0) and takes T
  gradient steps of size eta on E, x_l <- x_l - eta dE/dx_l (per view), i.e.
  x_l <- x_l - eta (e_l - J_{l+1}^T e_{l+1}) below the top: the top-down part
  of PC is this error flow, one block further down per iteration;
- learning: each block's weights take -dE/dW_l at the settled latents, the
  gradient of ||e_l||^2 / 2 through f_l alone, which reads only x_{l-1} and
  e_l (local); the projection of the top loss takes -w dL_top/dtheta at the
  settled x_L.

The loop is `localssl.engine.inference.InferenceStep` (``schedule =
"inference"``); this module owns the energy terms and the options, and never
sees the engine.

What follows from the dynamics (tests/test_pc.py checks each): with T = 0 (or
eta = 0) every e_l is 0, so no block learns and only the top loss's
projection does (with BP-InfoNCE's projection gradient); after T < L
iterations the error has reached the top T blocks only, so only they learn;
with a small w and T long enough to settle, each block's update is w times
its BP gradient of L_top, to first order in w (Whittington & Bogacz 2017;
Millidge et al. 2022).

Top loss (``top_loss``):
- ``infonce`` (default): the reference's one-direction InfoNCE on a linear
  projection of the globally pooled top latent, BP-InfoNCE's own loss
  (METHODS 2.3), so that PC and its end-to-end counterpart optimise one
  objective and any gap between them is PC's, not the objective's;
- ``invariance``: supervised PC's clamped label, transposed to two views:
  each view's pooled top latent is pulled to the other view's feedforward top
  code, fixed (detached) for the step. No negatives: it can collapse, it is
  here to show that.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from localssl.rules.base import Inference, Rule, RuleOptions
from localssl.rules.losses import info_nce, spatial_pool, swap_views
from localssl.rules.registry import register_rule

PC_TOP_LOSSES = ("infonce", "invariance")


@dataclass
class PCOptions(RuleOptions):
    """Options of predictive coding.

    iterations: inference steps T on the latents per training step (PCX's
       standard PC uses 8 to 20; 0: only the top loss's projection learns).
    step_size: eta of every inference step, per view (0 <= eta < 2: above 2
       even a lone error term e_l diverges).
    backtrack: halve the step, for the rest of the training step, whenever it
       would raise the energy (so E never rises; off: the fixed-step dynamics
       of the papers, which diverge once eta exceeds 2 / the energy's
       curvature: on ResNet stages with BatchNorm and small batches, or a top
       code of small norm under the cosine InfoNCE, already at eta = 0.1).
    top_weight: w, the weight of the top SSL loss in the energy.
    top_loss: infonce (BP-InfoNCE's loss on a projection) or invariance (the
       other view's feedforward top code as the target).
    temperature, proj_dim: of the infonce top loss (BP-InfoNCE's: 0.1, 1024).
    """

    iterations: int = 20
    step_size: float = 0.1
    backtrack: bool = True
    top_weight: float = 1.0
    top_loss: str = "infonce"
    temperature: float = 0.1
    proj_dim: int = 1024

    def check(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not 0 <= self.step_size < 2:
            raise ValueError(f"step_size must be in [0, 2) (eta >= 2 diverges), got {self.step_size}")
        if not self.top_weight > 0:
            raise ValueError(f"top_weight must be > 0, got {self.top_weight}")
        if self.top_loss not in PC_TOP_LOSSES:
            raise ValueError(f"unknown top_loss {self.top_loss!r}; valid: {', '.join(PC_TOP_LOSSES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {self.proj_dim}")


class PredictiveCoding(Rule):
    """Predictive coding with an SSL loss on the top latents (see the module's docstring).

    Its groups are the blocks, one each; the top group's ``loss`` is the top
    energy term w * L_top, and the blocks below have no loss of their own:
    they learn from their prediction errors (``prediction_energy``), which the
    inference step settles. Hence ``group_losses = False``.
    """

    local = True
    schedule = "inference"
    group_losses = False
    options: PCOptions

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: PCOptions | None = None,
                 grids: Sequence[int] | None = None) -> None:
        super().__init__(feature_shapes, options or PCOptions(), grids)
        options = self.options
        options.check()
        # invariance: the step hands over the feedforward top output (the targets, fixed during inference).
        self.needs_top_context = options.top_loss == "invariance"
        c = int(self.feature_shapes[-1][0])
        self.projection = nn.Linear(c, options.proj_dim, bias=False) if options.top_loss == "infonce" else None

    @property  # type: ignore[override]
    def inference(self) -> Inference:
        o = self.options
        return Inference(o.iterations, o.step_size, o.backtrack)

    @property
    def top_group(self) -> int:
        return self.num_blocks - 1

    def prediction_energy(self, block: int, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """||x - mu||^2 / 2 summed over a view's units, averaged over the views: unit-variance Gaussian
        errors (Whittington & Bogacz 2017, with every variance 1), in float32 at least."""
        e = x - mu
        if e.dtype in (torch.float16, torch.bfloat16):
            e = e.float()
        return e.pow(2).flatten(1).sum(1).mean() / 2

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        return spatial_pool(h, 1)

    def context(self, top: torch.Tensor) -> torch.Tensor:
        return spatial_pool(top, 1)

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The top energy term w * L_top (group ``top_group`` only: the blocks below have no loss)."""
        if g != self.top_group:
            raise ValueError(f"predictive coding's block {g + 1} has no loss of its own: it learns from its "
                             "prediction error, settled by the inference step (schedule 'inference')")
        w = self.options.top_weight
        n = z.shape[0] // 2
        if self.projection is not None:
            p = self.projection(z)
            return w * info_nce(p[:n], p[n:], self.options.temperature)
        if context is None:
            raise ValueError("the invariance top loss needs the feedforward top output as its target")
        target = swap_views(context).detach()
        return w * (z - target).pow(2).sum(1).mean() / 2

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        if g != self.top_group or self.projection is None:
            return []
        return list(self.projection.parameters())

    def extra_repr(self) -> str:
        o = self.options
        return f"{super().extra_repr()}, T={o.iterations}, eta={o.step_size}, top={o.top_loss}"


# The counterpart: BP-InfoNCE optimises the default top loss end-to-end (same projection, same loss).
register_rule("pc", PCOptions, counterpart="bp-infonce")(
    lambda shapes, opt, grids: PredictiveCoding(shapes, opt, grids))
