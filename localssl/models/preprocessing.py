"""What a trained encoder expects of its input, stated next to its weights.

A backbone taken elsewhere (``localssl.load_encoder``, ``localssl export``)
is only usable with the normalisation it was trained with; SSL libraries
that ship weights without it leave users to guess the mean and std. So the
encoder a run hands out carries a `Preprocessing`, and the export's JSON
holds the same fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: The steps from stored images to what block 1 takes (`localssl.data.augment.Preprocess`).
STEPS = "uint8 (N, H, W, C) -> float (N, C, H, W) / 255 -> (x - mean) / std, per channel"


@dataclass(frozen=True)
class Preprocessing:
    """The input an encoder was trained on.

    image_size: side in px of the training images (None where the run did not
        record it); the encoder takes other sizes too, but its features were
        learnt at this one.
    channels: input channels (3, or 1 for grayscale data).
    mean, std: per-channel normalisation in the 0..1 scale, as `STEPS` applies them.
    """

    image_size: int | None
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    steps: str = STEPS

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean {list(self.mean)} and std {list(self.std)} need one value per channel "
                             f"({self.channels})")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0 per channel, got {list(self.std)}")

    def module(self) -> nn.Module:
        """An ``nn.Module`` doing `STEPS` (`localssl.data.augment.Preprocess`): uint8 NHWC in, normalised NCHW out."""
        from localssl.data.augment import Preprocess  # imports kornia: only when asked for

        return Preprocess(self.mean, self.std)

    def __call__(self, images: Any) -> torch.Tensor:
        """`STEPS` applied to a uint8 (N, H, W, C) tensor or numpy array."""
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
        return self.module().to(x.device)(x)

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std), "steps": self.steps}
