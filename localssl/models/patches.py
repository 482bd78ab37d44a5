"""Encoders that see an image as a grid of overlapping patches (Greedy InfoMax, CLAPP 2021; METHODS 5.3).

GIM and CLAPP cut every image into patches (STL-10: 16x16 at stride 8 of a
64x64 crop, a 7x7 grid; Löwe et al. 2019, sec. 4.2; loeweX/Greedy_InfoMax
``vision/models/Resnet_Encoder.py``, ``x.unfold(2, 16, 16 // 2)``) and encode
each patch on its own: no layer sees two patches. Here a patched encoder is
still a `BlockEncoder` whose blocks map a batch of images to image-like maps,
so that the trainer, the step and every probe work on it unchanged:

- the first block cuts the images into patches, runs its layers on every
  patch as a batch of small images, and *tiles* the per-patch outputs back
  into a mosaic ``(B, C, gy * h, gx * w)``: patch (i, j)'s ``h x w`` output
  sits at tile (i, j);
- every later block un-tiles its input into patches, runs its layers per
  patch, and tiles again.

Average-pooling the mosaic with a kernel of one tile gives exactly each
patch's pooled code, GIM's ``adaptive_avg_pool2d(z, 1)`` per patch (same
file), laid out as the patch grid; pooling it globally gives the mean of the
patch codes, which is what GIM's linear probe reads (its
``ClassificationModel`` averages the 7x7 grid of codes). The default pooling
grid of a patched encoder is therefore its patch grid (`PatchedEncoder.grids_at`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from localssl.config import ConfigError
from localssl.models.blocks import BlockEncoder
from localssl.models.registry import EncoderOptions

#: ITU-R 601 luma weights, PIL's "L" conversion, which torchvision's ``Grayscale`` (GIM's ``--grayscale``) uses.
LUMA = (0.299, 0.587, 0.114)


@dataclass
class PatchEncoderOptions(EncoderOptions):
    """Options of an encoder run per patch (``--encoder-opt KEY=VALUE``).

    patch: patch side in px (0: no patches, the plain encoder); patch_stride:
    the step between patches (GIM and CLAPP: half the patch, 50% overlap);
    grayscale: luma of RGB input first, inside the first block (GIM's
    ``--grayscale``; CLAPP trains on colour), so that the probes' images get
    it too. The reference converts before normalising, we after: a fixed
    linear map of the normalised channels, a slightly different gray weighting.
    """

    patch: int = 16
    patch_stride: int = 8
    grayscale: bool = False

    def __post_init__(self) -> None:
        if self.patch < 0 or (self.patch > 0 and self.patch_stride < 1):
            raise ConfigError(f"a patched encoder needs patch >= 0 and patch_stride >= 1, got patch={self.patch}, "
                              f"patch_stride={self.patch_stride}")


class Luma(nn.Module):
    """RGB -> one gray channel with the fixed `LUMA` weights (no parameter); other channel counts pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight.to(x.dtype)).sum(1, keepdim=True) if x.shape[1] == 3 else x


def patch_grid(size: int, patch: int, stride: int) -> int:
    """How many patches of side ``patch`` at ``stride`` fit along a side of ``size`` px (torch's ``unfold``)."""
    if size < patch:
        raise ValueError(f"a {size}px input is smaller than one {patch}px patch: lower the encoder's patch option")
    return (size - patch) // stride + 1


def to_patches(x: torch.Tensor, patch: int, stride: int) -> tuple[torch.Tensor, int, int]:
    """Images (B, C, H, W) -> patches (B * gy * gx, C, patch, patch), row-major per image, and (gy, gx)."""
    b, c, h, w = x.shape
    if h < patch or w < patch:  # a RuntimeError, as torch's own shape errors (the builder names the input size)
        raise RuntimeError(f"a {h}x{w} input is smaller than one {patch}px patch (encoder option patch)")
    p = x.unfold(2, patch, stride).unfold(3, patch, stride)  # (B, C, gy, gx, patch, patch)
    gy, gx = p.shape[2], p.shape[3]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(b * gy * gx, c, patch, patch), gy, gx


def tile(y: torch.Tensor, gy: int, gx: int) -> torch.Tensor:
    """Per-patch maps (B * gy * gx, C, h, w) -> the mosaic (B, C, gy * h, gx * w), patch (i, j) at tile (i, j)."""
    n, c, h, w = y.shape
    if n % (gy * gx):
        raise ValueError(f"{n} patch maps do not make whole {gy}x{gx} grids")
    b = n // (gy * gx)
    return y.reshape(b, gy, gx, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gy * h, gx * w)


def untile(m: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
    """The mosaic (B, C, gy * h, gx * w) of ``h x w`` tiles -> per-patch maps (B * gy * gx, C, h, w), and (gy, gx)."""
    b, c, H, W = m.shape
    if H % h or W % w:
        raise ValueError(f"a {H}x{W} mosaic is not made of {h}x{w} tiles")
    gy, gx = H // h, W // w
    return m.reshape(b, c, gy, h, gx, w).permute(0, 2, 4, 1, 3, 5).reshape(b * gy * gx, c, h, w), gy, gx


class PatchedBlock(nn.Module):
    """One block run patch by patch: cut (first block) or un-tile its input, run ``inner``, tile the outputs."""

    def __init__(self, inner: nn.Module, patch: int, stride: int, in_tile: tuple[int, int] | None) -> None:
        """``in_tile``: the tile side (h, w) of the mosaic this block reads; None for the first block (images)."""
        super().__init__()
        self.inner = inner
        self.patch, self.stride, self.in_tile = patch, stride, in_tile
        if hasattr(inner, "out_channels"):
            self.out_channels = inner.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_tile is None:
            p, gy, gx = to_patches(x, self.patch, self.stride)
        else:
            p, gy, gx = untile(x, *self.in_tile)
        return tile(self.inner(p.contiguous()), gy, gx)

    def extra_repr(self) -> str:
        return f"patch={self.patch}, stride={self.stride}" if self.in_tile is None else f"tile={self.in_tile}"


class PatchedEncoder(BlockEncoder):
    """A `BlockEncoder` whose blocks run on every patch alone and output mosaics of per-patch maps.

    ``tiles[k]``: block k's per-patch output side (h, w), fixed by the patch
    size whatever the image size (only the number of patches changes).
    """

    def __init__(self, blocks: list[PatchedBlock], patch: int, stride: int, tiles: list[tuple[int, int]],
                 name: str = "patched") -> None:
        super().__init__(blocks, name=name)
        self.patch, self.stride, self.tiles = patch, stride, list(tiles)

    def grids_at(self, image_size: int) -> list[int]:
        """The default pooling grid of every block: the patch grid, so each patch pools to one code."""
        return [patch_grid(image_size, self.patch, self.stride)] * len(self)


@torch.no_grad()
def patchify(encoder: BlockEncoder, patch: int, stride: int, in_channels: int) -> PatchedEncoder:
    """``encoder``'s blocks run on ``patch`` x ``patch`` patches at ``stride`` (same parameters, now per patch).

    ``in_channels``: the images' channels (to find every block's per-patch output side).
    """
    if patch < 1 or not 1 <= stride:
        raise ValueError(f"patches need patch >= 1 and patch_stride >= 1, got patch={patch}, patch_stride={stride}")
    was_training = encoder.training
    encoder.eval()
    p = next(encoder.parameters(), None)
    x = torch.zeros(1, in_channels, patch, patch, device=p.device if p is not None else None)
    tiles = []
    try:
        for block in encoder.blocks:
            try:
                x = block(x)
            except RuntimeError as e:  # e.g. more max-pools than a small patch has pixels
                raise ValueError(f"{encoder.name} cannot encode a {patch}px patch (block {len(tiles) + 1}: "
                                 f"{str(e).splitlines()[0]}): choose a larger patch") from None
            if x.dim() != 4:
                raise ValueError(f"a patched encoder's blocks must output maps, block {len(tiles) + 1} gives "
                                 f"{tuple(x.shape[1:])}")
            tiles.append((int(x.shape[2]), int(x.shape[3])))
    finally:
        encoder.train(was_training)
    blocks = [PatchedBlock(b, patch, stride, None if k == 0 else tiles[k - 1]) for k, b in enumerate(encoder.blocks)]
    out = PatchedEncoder(blocks, patch, stride, tiles, name=encoder.name)
    out.train(was_training)
    return out
