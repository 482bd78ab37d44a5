"""Encoders cut into blocks.

A local rule trains every block from its own loss, so the encoder is not one
``nn.Sequential`` but an ordered list of blocks: block k maps block k-1's output
to its own. Every rule sees the encoder cut the same way (STYLE principle 3);
end-to-end BP simply trains all blocks as one group.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from localssl.models.preprocessing import Preprocessing


class BlockEncoder(nn.Module):
    """An encoder made of consecutive blocks.

    ``forward`` returns the output of *every* block, because local rules put a
    loss on each of them and the probes read all of them; `pooled` gives the
    last block's output averaged over positions, the usual backbone features.
    An encoder loaded from a run (``localssl.load_encoder``) states the input
    it expects in ``preprocessing`` (a `Preprocessing`; None on one built fresh).
    """

    preprocessing: Preprocessing | None = None

    def __init__(self, blocks: Sequence[nn.Module], name: str = "custom") -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("a BlockEncoder needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.name = name

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) features: the last block's output, globally average-pooled (what the probes call "last layer")."""
        h = self.forward(x)[-1]
        return h.flatten(2).mean(-1) if h.dim() > 2 else h

    def grids_at(self, image_size: int) -> list[int] | None:
        """Pooling grids this encoder's own layout calls for at ``image_size`` px (a patched encoder: its
        patch grid, `localssl.models.patches`); None: the name's defaults (`default_grids`)."""
        return None

    def run_blocks(self, x: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """Apply the consecutive blocks ``indices`` to ``x`` (a group's forward)."""
        for k in indices:
            x = self.blocks[k](x)
        return x

    @torch.no_grad()
    def feature_shapes(self, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Per-block output shape (C, H, W) for one input of shape (C, H, W)."""
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters(), None)
            dev = p.device if p is not None else torch.device("cpu")
            outs = self.forward(torch.zeros(1, *input_shape, device=dev))
        finally:
            self.train(was_training)
        return [tuple(o.shape[1:]) for o in outs]


def scale_channels(channels: int, width: float) -> int:
    """A layer's channel count under the width multiplier ``width``: rounded, and at least 1."""
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    return max(1, int(round(channels * width)))


def split_into_blocks(model: nn.Sequential, boundaries: Sequence[int], name: str = "custom") -> BlockEncoder:
    """Cut any ``nn.Sequential`` into blocks.

    ``boundaries`` are the indices (into ``model``) where a new block starts,
    excluding 0; e.g. ``[3, 6]`` cuts a 9-layer Sequential into
    ``model[0:3], model[3:6], model[6:9]``.
    """
    layers = list(model.children())
    cuts = [0, *boundaries, len(layers)]
    if sorted(set(cuts)) != cuts or cuts[0] != 0 or cuts[-1] != len(layers):
        raise ValueError(f"block boundaries {list(boundaries)} must be increasing and inside 1..{len(layers) - 1}")
    blocks = [nn.Sequential(*layers[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return BlockEncoder(blocks, name=name)
