"""End-to-end baselines: one group holding every block, nothing detached."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from localssl.rules.base import Rule, RuleOptions
from localssl.rules.losses import INFONCE_LOSSES, spatial_pool


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

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: RuleOptions,
                 loss: str = "infonce") -> None:
        super().__init__(feature_shapes, options)
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
