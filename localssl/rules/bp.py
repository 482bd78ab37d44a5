"""End-to-end baselines: one group holding every block, nothing detached."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from localssl.rules.base import Rule, RuleOptions
from localssl.rules.losses import INFONCE_LOSSES, spatial_pool
from localssl.rules.registry import register_rule


@dataclass
class InfoNCEOptions(RuleOptions):
    """temperature: of the cosine logits (0.1, METHODS 2.3); proj_dim: width of the linear projection (1024)."""

    temperature: float = 0.1
    proj_dim: int = 1024

    def check(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {self.proj_dim}")


class BPInfoNCE(Rule):
    """BP-InfoNCE, SimCLR-like (METHODS 2.3).

    Top block, global average pooling, a shared bias-free linear projection to
    ``proj_dim`` (1024) dims, cosine similarity / temperature (0.1), and
    ``loss`` from ``INFONCE_LOSSES``: by default the reference's one-direction
    cross-entropy over the B x B view-1-vs-view-2 matrix (``bp-infonce``);
    the symmetric average (``bp-infonce-sym``) and SimCLR's NT-Xent with
    2N-2 negatives (``bp-ntxent``) are other rules with the same head.
    """

    local = False
    options: InfoNCEOptions

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: InfoNCEOptions | None = None,
                 grids: Sequence[int] | None = None, loss: str = "infonce") -> None:
        super().__init__(feature_shapes, options or InfoNCEOptions(), grids)
        options = self.options
        options.check()
        self.loss_fn = INFONCE_LOSSES.get(loss)
        self.loss_name = loss
        c = int(self.feature_shapes[-1][0])
        self.projection = nn.Linear(c, options.proj_dim, bias=False)

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        return spatial_pool(h, 1)

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        p = self.projection(z)
        n = p.shape[0] // 2
        return self.loss_fn(p[:n], p[n:], self.options.temperature)

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return list(self.projection.parameters())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss={self.loss_name}"


# METHODS 2.3: the reference's one-direction InfoNCE is *the* BP baseline;
# the other two are different losses and keep their own names.
register_rule("bp-infonce", InfoNCEOptions)(lambda shapes, opt, grids: BPInfoNCE(shapes, opt, grids, loss="infonce"))
register_rule("bp-infonce-sym", InfoNCEOptions)(
    lambda shapes, opt, grids: BPInfoNCE(shapes, opt, grids, loss="infonce-symmetric"))
register_rule("bp-ntxent", InfoNCEOptions)(lambda shapes, opt, grids: BPInfoNCE(shapes, opt, grids, loss="nt-xent"))
