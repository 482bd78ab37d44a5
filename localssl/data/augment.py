"""Batched SimCLR augmentations on uint8 tensors (METHODS 2.4).

The data set lives in memory as uint8 (N, H, W, C); a batch is moved to the
device as uint8 and augmented there as a whole, with independent random
parameters per sample (airbench-style: data loading never limits training).
kornia does the per-sample random crops, flips, colour jitter, grayscale and
blur on tensors, so no PIL or worker processes are involved.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import nn

from localssl.data.draws import SIMCLR_UNIFORMS, ImageDraws, factor, resized_crop
from localssl.registry import Registry

STACKINGS = ("rows", "channels", "pairs")


@dataclass(frozen=True)
class ViewLayout:
    """How a batch holds its views: ``n`` views of each of B images, stacked along the rows
    (``[view 1; view 2]``, (nB, C, H, W): SimCLR and every rule here) or the channels
    ((B, nC, H, W): concatenated views), or as ``pairs`` ((2B, C, H, W): rows [positive pairs; negative
    pairs], each row the mean of its pair's two halves: SCFF's shared first layer on the concatenation,
    `localssl.data.pairs`, METHODS 5.3)."""

    n: int = 2
    stacking: str = "rows"

    def __post_init__(self) -> None:
        if self.n < 1 or self.stacking not in STACKINGS:
            raise ValueError(f"a view layout needs n >= 1 and stacking in {STACKINGS}, got {self.n}, {self.stacking!r}")


@dataclass
class ViewBatch:
    """A batch of views that says how they are laid out; the step checks it against the rule's."""

    x: torch.Tensor
    layout: ViewLayout

    @property
    def images(self) -> int:
        if self.layout.stacking == "channels":
            return self.x.shape[0]
        return self.x.shape[0] // self.layout.n


#: View makers by name: a rule names the one it needs (`Rule.view_maker`); `localssl.builder.build_views`
#: builds it as ``maker(image_size, mean, std, crop_scale=...)``; ``maker.batch(x_uint8) -> ViewBatch``.
VIEW_MAKERS: Registry[type[nn.Module]] = Registry("view maker")


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
        if x.dim() == 4 and x.shape[-1] != self.mean.shape[1]:
            raise ValueError(
                f"images have {x.shape[-1]} channel(s) but the normalisation has {self.mean.shape[1]} "
                "(mean/std are per channel)"
            )
        return (to_float_nchw(x) - self.mean) / self.std


@VIEW_MAKERS.register("simclr")
class SimCLRViews(nn.Module):
    """Two SimCLR views per image, stacked: rows 0..B-1 are view 1, B..2B-1 view 2.

    Recipe of METHODS 2.4: random resized crop (``crop_scale``), horizontal
    flip p=0.5, colour jitter (0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2,
    Gaussian blur p=0.5 with a kernel of about 10% of the image side, then
    normalisation. The channel count is ``len(mean)``. On one channel the
    jitter keeps its brightness and contrast (p=0.8) and drops saturation and
    hue, which have no meaning there (kornia 0.9 raises on hue for one
    channel, and its saturation and grayscale leave one channel unchanged),
    and there is no grayscale step. Other channel counts get no colour
    transforms.
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
        self.image_size, self.crop_scale = image_size, (float(crop_scale[0]), float(crop_scale[1]))
        self.jitter, self.jitter_p, self.grayscale_p, self.blur_p = tuple(jitter), jitter_p, grayscale_p, blur_p
        self.channels = channels
        augs: list[nn.Module] = [
            K.RandomResizedCrop((image_size, image_size), scale=crop_scale),
            K.RandomHorizontalFlip(p=0.5),
        ]
        if channels == 3:
            augs += [K.ColorJitter(*jitter, p=jitter_p), K.RandomGrayscale(p=grayscale_p)]
        elif channels == 1:
            augs.append(K.ColorJitter(jitter[0], jitter[1], 0.0, 0.0, p=jitter_p))
        if blur_p > 0:
            k = blur_kernel_size(image_size)
            augs.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=blur_p))
        self.augment = nn.Sequential(*augs)
        self.normalize = Preprocess(mean, std)

    def one_view(self, x_float: torch.Tensor) -> torch.Tensor:
        return self.augment(x_float)

    layout = ViewLayout(2, "rows")
    #: `batch` takes ``draws``: each image's views from (seed, epoch, image index) alone (`localssl.data.draws`).
    per_image_draws = True

    def batch(self, x: torch.Tensor, draws: ImageDraws | None = None) -> ViewBatch:
        """uint8 (B, H, W, C) -> a `ViewBatch` of the (2B, C, H, W) views, view 1 stacked on view 2.

        With ``draws`` every image's two views depend on (seed, epoch, its index) only, not on the
        batch it is in (data-parallel ranks, resumed runs); without, kornia draws from the global RNG.
        """
        return ViewBatch(self(x) if draws is None else self.drawn(x, draws), self.layout)

    def _params(self, u: torch.Tensor, order: torch.Tensor, size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Each augmentation's kornia parameters for rows of uniforms ``u`` (`SIMCLR_UNIFORMS` per row)."""
        n = u.shape[0]
        out: list[dict[str, torch.Tensor]] = [resized_crop(u[:, :22], size, self.image_size, self.crop_scale),
                                              {"batch_prob": u[:, 22] < 0.5}]
        if self.channels in (1, 3):
            b, c, s, h = self.jitter
            colour = self.channels == 3
            out.append({"brightness_factor": factor(u[:, 24], b), "contrast_factor": factor(u[:, 25], c),
                        "saturation_factor": factor(u[:, 26], s) if colour else torch.ones(n),
                        "hue_factor": (2 * u[:, 27] - 1) * h if colour else torch.zeros(n),
                        "order": order, "batch_prob": u[:, 23] < self.jitter_p})
            if colour:
                out.append({"batch_prob": u[:, 28] < self.grayscale_p})
        if self.blur_p > 0:
            out.append({"sigma": 0.1 + 1.9 * u[:, 30], "batch_prob": u[:, 29] < self.blur_p})
        return out

    @torch.no_grad()
    def drawn(self, x: torch.Tensor, draws: ImageDraws) -> torch.Tensor:
        """`forward` with every row's parameters drawn from ``draws`` (one generator per image and view)."""
        if draws.index.shape[0] != x.shape[0]:
            raise ValueError(f"draws for {draws.index.shape[0]} images, batch of {x.shape[0]}")
        xf = to_float_nchw(x)
        u = torch.cat([draws.uniforms(v, SIMCLR_UNIFORMS) for v in range(2)])  # rows: view 1, then view 2
        order = torch.randperm(4, generator=draws.batch_generator())
        views = torch.cat([xf, xf], dim=0)
        for aug, params in zip(self.augment, self._params(u, order, tuple(xf.shape[-2:]))):
            params = {k: v.to(views.device) for k, v in params.items()}
            params["forward_input_shape"] = torch.tensor(views.shape)
            views = aug(views, params=params)
        return ((views - self.normalize.mean) / self.normalize.std).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float (2B, C, H, W): view 1 stacked on view 2."""
        xf = to_float_nchw(x)
        # One call over the doubled batch: every row draws its own parameters.
        views = self.augment(torch.cat([xf, xf], dim=0))
        return ((views - self.normalize.mean) / self.normalize.std).contiguous(memory_format=torch.channels_last)


class ResizedCropFlip(nn.Module):
    """Augmentation of the paper's linear probe (METHODS 2.5): random resized crop + flip.

    uint8 NHWC -> normalised float NCHW of side ``image_size``. Each sample
    draws its own crop: an area fraction uniform in ``scale`` (0.08-1 in the
    reference probe, also on CIFAR-10, where pre-training uses 0.25-1) and an
    aspect ratio log-uniform in ``ratio`` (torchvision's default 3/4-4/3,
    which the reference keeps), resized bilinearly to ``image_size``; then a
    horizontal flip with p=0.5. ``align_corners=False`` puts the resize on the
    half-pixel grid that torchvision's resize uses (kornia defaults to
    corner alignment).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.augment = nn.Sequential(
            K.RandomResizedCrop((image_size, image_size), scale=self.scale, ratio=self.ratio, align_corners=False),
            K.RandomHorizontalFlip(p=0.5),
        )
        self.normalize = Preprocess(mean, std)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = self.augment(to_float_nchw(x))
        return (xf - self.normalize.mean) / self.normalize.std


class CropFlip(nn.Module):
    """Augmentation of the ``paper-bn`` probe (ours, not the paper's): pad-4 random crop + flip."""

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


@VIEW_MAKERS.register("patches")
class PatchViews(nn.Module):
    """One view per image for the patch rules (Greedy InfoMax, CLAPP 2021; METHODS 5.3): ``(B, C, crop, crop)``.

    GIM's and CLAPP's training transform (loeweX/Greedy_InfoMax
    ``vision/data/get_dataloader.py``): a random ``crop`` x ``crop`` window
    (64 of STL-10's 96 px; no resize), a horizontal flip with p = 0.5, and
    normalisation; their grayscale step is the encoder's (`models.gim_resnet`),
    so that the probes' images get it too. ``padding`` px of reflection
    first (ours, for 32 px CIFAR-10: pad 4, crop 32). ``crop_scale`` (the
    SimCLR crop's area range) does not apply here.
    """

    layout = ViewLayout(1, "rows")

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 crop_scale: tuple[float, float] | None = None, crop: int = 64, padding: int = 0) -> None:
        super().__init__()
        if not 1 <= crop <= image_size + 2 * padding:
            raise ValueError(f"crop={crop} px does not fit the {image_size} px images with crop_padding={padding}: "
                             f"choose crop <= {image_size + 2 * padding}")
        self.crop, self.padding = crop, padding
        self.augment = nn.Sequential(
            K.RandomCrop((crop, crop), padding=padding or None, padding_mode="reflect"),
            K.RandomHorizontalFlip(p=0.5),
        )
        self.normalize = Preprocess(mean, std)

    def batch(self, x: torch.Tensor) -> ViewBatch:
        """uint8 (B, H, W, C) -> a `ViewBatch` of one view per image."""
        return ViewBatch(self(x), self.layout)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = self.augment(to_float_nchw(x))
        return ((xf - self.normalize.mean) / self.normalize.std).contiguous(memory_format=torch.channels_last)
