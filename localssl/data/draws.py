"""Random augmentation parameters drawn per image from (seed, epoch, image index).

kornia draws an augmentation's parameters for a whole batch from the global
RNG, so an image's views depend on the batch it sits in and on what was
drawn before it. Data-parallel training must give every image the views one
process would give it, whichever rank holds it and however many ranks there
are; so each row's random numbers come from its own generator, seeded from
(seed, epoch, image index, view), and only then are they turned into kornia's
parameter dicts, which kornia applies to the whole batch at once. A resumed
run draws the same views too (no RNG state to restore for them).

Drawing a row's numbers costs one small generator (a few microseconds);
kornia's own per-row parameter generators cost ~0.6 ms a row, more than
augmenting the batch, so they are not called row by row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MASK = (1 << 64) - 1


def mix(*keys: int) -> int:
    """A 63-bit seed from integer keys (splitmix64's finaliser over each key in turn; Steele et al. 2014)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h >> 1


@dataclass(frozen=True)
class ImageDraws:
    """Where a batch's randomness comes from: the run's seed, the epoch, the batch's place in the epoch
    and each image's index in the data set (rows of the uint8 batch, in order)."""

    seed: int
    epoch: int
    batch: int
    index: torch.Tensor  # (B,) int64, data set indices of the batch's images

    def uniforms(self, view: int, n: int) -> torch.Tensor:
        """(B, n) float32 uniforms in [0, 1): row i from (seed, epoch, index[i], view) alone."""
        rows = [torch.rand(n, generator=torch.Generator().manual_seed(mix(self.seed, self.epoch, int(i), view)))
                for i in self.index.tolist()]
        return torch.stack(rows) if rows else torch.zeros(0, n)

    def batch_generator(self) -> torch.Generator:
        """A generator for what kornia draws once per call (colour jitter's order): one per global batch,
        so every rank that holds part of the batch draws the same."""
        return torch.Generator().manual_seed(mix(self.seed, self.epoch, self.batch, -1))


#: Uniforms each row of `simclr_params` reads: 10 crop tries (area, ratio), 2 offsets, flip, jitter
#: (apply + 4 factors), grayscale, blur (apply + sigma).
SIMCLR_UNIFORMS = 32


def resized_crop(u: torch.Tensor, size: tuple[int, int], out: int, scale: tuple[float, float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> dict[str, torch.Tensor]:
    """kornia ``RandomResizedCrop`` parameters from (B, 22) uniforms: torchvision's sampler (an area
    fraction uniform in ``scale``, a log-uniform aspect ratio, first of 10 tries that fits, else the
    whole image clamped to ``ratio``), then a uniform offset; kornia's corner format (x, y)."""
    H, W = size
    b = u.shape[0]
    area = (scale[0] + (scale[1] - scale[0]) * u[:, :10].double()) * H * W
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 10:20].double())
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = (fits.cumsum(1) == 1) & fits
    found, at = first.int().max(1)
    rows = torch.arange(b)
    in_ratio = W / H
    if in_ratio < ratio[0]:
        w_ct, h_ct = float(W), float(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        w_ct, h_ct = float(round(H * ratio[1])), float(H)
    else:
        w_ct, h_ct = float(W), float(H)
    w = torch.where(found.bool(), w[rows, at], torch.full((b,), w_ct, dtype=w.dtype)).clamp(1, W)
    h = torch.where(found.bool(), h[rows, at], torch.full((b,), h_ct, dtype=h.dtype)).clamp(1, H)
    x0 = (u[:, 20].double() * (W - w + 1)).floor()
    y0 = (u[:, 21].double() * (H - h + 1)).floor()
    src = torch.stack([torch.stack([x0, y0], 1), torch.stack([x0 + w - 1, y0], 1),
                       torch.stack([x0 + w - 1, y0 + h - 1], 1), torch.stack([x0, y0 + h - 1], 1)], 1).float()
    dst = torch.tensor([[0, 0], [out - 1, 0], [out - 1, out - 1], [0, out - 1]], dtype=torch.float32)
    return {"src": src, "dst": dst.expand(b, 4, 2).clone(),
            "input_size": torch.tensor([H, W]).expand(b, 2).clone(),
            "output_size": torch.tensor([out, out]).expand(b, 2).clone(),
            "batch_prob": torch.ones(b, dtype=torch.bool)}


def factor(u: torch.Tensor, strength: float) -> torch.Tensor:
    """torchvision's jitter factor: uniform in [max(0, 1 - s), 1 + s]."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


__all__ = ["ImageDraws", "mix", "resized_crop", "factor", "SIMCLR_UNIFORMS"]
