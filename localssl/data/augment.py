"""Batched SimCLR augmentations on uint8 tensors (METHODS 2.4).

The data set lives in memory as uint8 (N, H, W, C); a batch is moved to the
device as uint8 and augmented there as a whole, with independent random
parameters per sample (airbench-style: data loading never limits training).
kornia does the per-sample random crops, flips, colour jitter, grayscale and
blur on tensors, so no PIL or worker processes are involved.
"""
from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn


def to_float_nchw(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1], channels_last in memory."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected a uint8 batch of shape (N, H, W, C), got {x.dtype} {tuple(x.shape)}")
    # permute is free; the memory stays NHWC, which is channels_last for NCHW.
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel of about 10% of the image side (SimCLR), at least 3."""
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 == 1 else k + 1


class Preprocess(nn.Module):
    """No augmentation: uint8 NHWC -> normalised float NCHW (probe features)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (to_float_nchw(x) - self.mean) / self.std


class SimCLRViews(nn.Module):
    """Two SimCLR views per image, stacked: rows 0..B-1 are view 1, B..2B-1 view 2.

    Recipe of METHODS 2.4: random resized crop (``crop_scale``), horizontal
    flip p=0.5, colour jitter (0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2,
    Gaussian blur p=0.5 with a kernel of about 10% of the image side, then
    normalisation.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.08, 1.0),
        jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
    ) -> None:
        super().__init__()
        channels = len(mean)
        augs: list[nn.Module] = [
            K.RandomResizedCrop((image_size, image_size), scale=crop_scale),
            K.RandomHorizontalFlip(p=0.5),
        ]
        if channels == 3:
            # Colour transforms only make sense on RGB input.
            augs += [K.ColorJitter(*jitter, p=jitter_p), K.RandomGrayscale(p=grayscale_p)]
        if blur_p > 0:
            k = blur_kernel_size(image_size)
            augs.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=blur_p))
        self.augment = nn.Sequential(*augs)
        self.normalize = Preprocess(mean, std)

    def one_view(self, x_float: torch.Tensor) -> torch.Tensor:
        return self.augment(x_float)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float (2B, C, H, W): view 1 stacked on view 2."""
        xf = to_float_nchw(x)
        # One call over the doubled batch: every row draws its own parameters.
        views = self.augment(torch.cat([xf, xf], dim=0))
        return ((views - self.normalize.mean) / self.normalize.std).contiguous(memory_format=torch.channels_last)


class CropFlip(nn.Module):
    """Probe-time augmentation of METHODS 2.5: random (padded) crop + flip."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], padding: int = 4) -> None:
        super().__init__()
        self.augment = nn.Sequential(
            K.RandomCrop((image_size, image_size), padding=padding, padding_mode="reflect"),
            K.RandomHorizontalFlip(p=0.5),
        )
        self.normalize = Preprocess(mean, std)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = self.augment(to_float_nchw(x))
        return (xf - self.normalize.mean) / self.normalize.std
