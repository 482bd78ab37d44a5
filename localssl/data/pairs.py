"""SCFF's positive and negative inputs, as the encoder takes them (METHODS 5.3; Chen et al., Nat. Commun. 2025).

SCFF feeds its first layer the channel concatenation of two images: a
positive (x_i, x_i') is two copies (or two views) of one image, a negative
(x_i, x_j) two different images. The layer applies the same weights W to both
halves and sums them (reference code, neurophysics-cnrsthales/
contrastive-forward-forward, ``ContrastFF_CIFAR.py``, ``Conv2d.forward``:
``conv_layer(x[:, :C]) + conv_layer(x[:, C:])``, the conv with its bias, so
the bias is counted twice). A convolution is linear, so

    W * x1 + b + W * x2 + b = (2W) * ((x1 + x2) / 2) + 2b,

one ordinary C-channel convolution (weights 2W, bias 2b) of the *mean* of the
two halves. So the view maker hands the encoder that mean, and every encoder
(VGG-6 as well as SCFF's own) stays a plain C-channel encoder. The mean, not
the sum, because of what one image is: the reference encodes a single image
for its linear probe as the image concatenated with itself (``train_readout``
/ ``test_readout``: ``torch.cat((x, x), dim=1)``), whose mean is the image
itself. So the probes, which feed one normalised image, give an encoder
with first-layer weights W', b' what SCFF's probe gives a network with shared
weights W = W'/2, b = b'/2 (`localssl.models.scff` starts W' at twice the
reference's draw), with no SCFF-specific code in the probes.

The batch (layout ``ViewLayout(2, "pairs")``) is (2B, C, H, W): rows 0..B-1
the positive pairs (image i's two halves), rows B..2B-1 the negative pairs.
Negative i pairs image i's first half with image (i + s) mod B's second
half, for one shift s drawn uniformly from 1..B-1 per batch (reference,
``get_pos_neg_batch_imgcats`` with p = 1: ``(randperm(B - 1) + 1)[:1]``), so a
negative never holds one image twice. The shift comes from torch's global
generator, as kornia's augmentation parameters do: a seeded run repeats it.
"""
from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from localssl.data.augment import VIEW_MAKERS, Preprocess, ViewBatch, ViewLayout, to_float_nchw

#: The layout of an SCFF batch: [positive pairs; negative pairs] along the rows, each pair as its mean.
PAIRS_LAYOUT = ViewLayout(2, "pairs")


def negative_partners(batch: int, shift: int) -> torch.Tensor:
    """Index of the image whose second half negative ``i`` takes: ``(i + shift) mod batch``."""
    if batch < 2:
        raise ValueError(f"SCFF's negatives pair two different images: a batch needs >= 2 images, got {batch}")
    if not 1 <= shift < batch:
        raise ValueError(f"the negative shift must be in 1..{batch - 1} (0 would pair an image with itself), "
                         f"got {shift}")
    return (torch.arange(batch) + shift) % batch


def pair_rows(first: torch.Tensor, second: torch.Tensor, shift: int) -> torch.Tensor:
    """(2B, C, H, W): the mean of ``first[i]`` and ``second[i]`` (positives), then of ``first[i]`` and
    ``second[(i + shift) mod B]`` (negatives). ``first``/``second``: each image's two halves, (B, C, H, W)."""
    if first.shape != second.shape:
        raise ValueError(f"the two halves must have one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    partner = negative_partners(first.shape[0], shift).to(first.device)
    return torch.cat([(first + second) / 2, (first + second[partner]) / 2])


def draw_shift(batch: int) -> int:
    """One negative shift, uniform in 1..batch-1, from torch's global generator."""
    negative_partners(batch, 1)  # the batch-size check
    return int(torch.randint(1, batch, (1,)).item())


class _SCFFPairs(nn.Module):
    """Base of the two SCFF view makers: ``batch(x_uint8)`` -> a `ViewBatch` in `PAIRS_LAYOUT`."""

    layout = PAIRS_LAYOUT

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Preprocess(mean, std)

    def normalized(self, xf: torch.Tensor) -> torch.Tensor:
        """A float (N, C, H, W) batch in 0..1, normalised with the run's mean and std."""
        return (xf - self.normalize.mean) / self.normalize.std

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves of every image's positive pair, normalised, (B, C, H, W) each."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float (2B, C, H, W): [positive pairs; negative pairs], each its halves' mean."""
        first, second = self.halves(x)
        return pair_rows(first, second, draw_shift(first.shape[0]))

    def batch(self, x: torch.Tensor) -> ViewBatch:
        return ViewBatch(self(x), self.layout)


@VIEW_MAKERS.register("pairs-same")
class SCFFSamePairs(_SCFFPairs):
    """SCFF's CIFAR-10 recipe: a positive is one image concatenated with itself.

    The reference's CIFAR run (``ContrastFF_CIFAR.py``, ``get_train(...,
    augment="no")``) takes ``img_original`` for both halves, whose only
    augmentation is a random horizontal flip (``transform_train``); the flip
    is drawn once per image, so both halves are the same tensor and a
    positive row is the image itself.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 crop_scale: tuple[float, float] = (0.08, 1.0)) -> None:
        super().__init__(image_size, mean, std)
        self.flip = K.RandomHorizontalFlip(p=0.5)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.normalized(self.flip(to_float_nchw(x)))
        return v, v


@VIEW_MAKERS.register("pairs-views")
class SCFFViewPairs(_SCFFPairs):
    """A positive is two augmented views of one image (METHODS 5.3; the reference's ``augment="dual"``).

    The reference's two transforms (``transform1``/``transform2``): random
    resized crop (ratio 0.75-1.33; its scale 0.8-1, here the run's
    ``crop_scale``), horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
    p = 0.8, then the normalisation; each view draws its own parameters.
    On one channel the jitter keeps brightness and contrast only.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 crop_scale: tuple[float, float] = (0.8, 1.0)) -> None:
        super().__init__(image_size, mean, std)
        augs: list[nn.Module] = [K.RandomResizedCrop((image_size, image_size), scale=tuple(crop_scale),
                                                     ratio=(0.75, 1.33)),
                                 K.RandomHorizontalFlip(p=0.5)]
        if len(mean) == 3:
            augs.append(K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8))
        elif len(mean) == 1:
            augs.append(K.ColorJitter(0.4, 0.4, 0.0, 0.0, p=0.8))
        self.augment = nn.Sequential(*augs)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = to_float_nchw(x)
        b = xf.shape[0]
        views = self.normalized(self.augment(torch.cat([xf, xf])))  # one call: every row its own parameters
        return views[:b], views[b:]


__all__ = ["PAIRS_LAYOUT", "negative_partners", "pair_rows", "draw_shift", "SCFFSamePairs", "SCFFViewPairs"]
