"""VGG encoders of the CLAPP++ experiments (METHODS 2.1).

VGG-6: six 3x3 conv layers (padding 1, bias, ReLU, no normalisation) with
128, 256, 256, 512, 1024, 1024 channels and a 2x2 max-pool after layers 2, 4,
5 and 6. Every layer is its own block, and the max-pool belongs to the block
of the layer before it: that is what makes the reference pooling kernels
(4-4-4-2-2-1 at 32 px) land on the reference grids (8, 4, 4, 4, 2, 2).
The 8-layer ImageNet variant: 128, 256M, 512M, 512, 1024M, 1024M, 1024, 1024M.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from localssl.models.blocks import BlockEncoder, scale_channels
from localssl.models.layers import MaxPool2d
from localssl.models.patches import Luma, PatchEncoderOptions, patchify
from localssl.models.registry import register_encoder

# (channels, max-pool after the layer)
VGG_CONFIGS: dict[str, list[tuple[int, bool]]] = {
    "vgg6": [(128, False), (256, True), (256, False), (512, True), (1024, True), (1024, True)],
    "vgg8": [
        (128, False), (256, True), (512, True), (512, False),
        (1024, True), (1024, True), (1024, False), (1024, True),
    ],
}

# Pooled grid side per block for the spatially dependent CLAPP++ loss
# (METHODS 2.2) at 32/64/96 px. For VGG-8 the paper gives no grids; these keep
# the same ~4096-8192 dims per layer at 224 px *(inferred)*. At other input
# sizes `default_grids(name, shapes=...)` fits each to its block's map.
DEFAULT_GRIDS: dict[str, list[int]] = {
    "vgg6": [8, 4, 4, 4, 2, 2],
    "vgg8": [8, 4, 4, 4, 2, 2, 2, 2],
}


def _vgg(name: str, width: float, in_channels: int) -> BlockEncoder:
    # round(c * width) keeps a channel only above c * width = 0.5: the narrowest layer sets the smallest width.
    c_min = min(c for c, _ in VGG_CONFIGS[name])
    if not math.isfinite(width) or round(c_min * width) < 1:
        raise ValueError(
            f"width must be a finite number > {0.5 / c_min:g} (1/{2 * c_min}: at or below it {name}'s {c_min}-channel "
            f"layer rounds to 0 channels), got {width}"
        )
    blocks = []
    c_in = in_channels
    for c, pool in VGG_CONFIGS[name]:
        c_out = scale_channels(c, width)
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)]
        # relu(maxpool(x)) == maxpool(relu(x)) exactly (max commutes with a
        # non-decreasing map), so the max-pool goes first: the ReLU and its
        # backward then touch a 4x smaller map, which matters most to the
        # local step (README, benchmark); the gradients differ only where a
        # 2x2 window has positive ties.
        if pool:
            layers.append(MaxPool2d(2))  # nn.MaxPool2d(2) that saves only its indices (models/layers.py)
        layers.append(nn.ReLU(inplace=False))
        blocks.append(nn.Sequential(*layers))
        c_in = c_out
    return BlockEncoder(blocks, name=name)


@register_encoder("vgg6")
def vgg6(width: float = 1.0, in_channels: int = 3) -> BlockEncoder:
    """VGG-6 of METHODS 2.1, channel counts scaled by ``width``."""
    return _vgg("vgg6", width, in_channels)


@register_encoder("vgg6-patches", options=PatchEncoderOptions)
def vgg6_patches(width: float = 1.0, in_channels: int = 3, options: PatchEncoderOptions | None = None) -> BlockEncoder:
    """VGG-6 run per patch (`localssl.models.patches`): CLAPP 2021's encoder (Illing et al. 2021; its
    ``VGG_like_Encoder`` stacks 128, 256, M, 256, 512, M, 1024, M, 1024, M, VGG-6's layers, one module
    each, on 16 px patches at stride 8 of colour 64 px crops: per-patch maps 16, 8, 8, 4, 2, 1)."""
    options = options or PatchEncoderOptions()
    gray = options.grayscale and in_channels == 3
    encoder = _vgg("vgg6", width, 1 if gray else in_channels)
    if gray:
        encoder.blocks[0] = nn.Sequential(Luma(), *encoder.blocks[0])
    if options.patch == 0:
        return encoder
    return patchify(encoder, options.patch, options.patch_stride, in_channels)


@register_encoder("vgg8")
def vgg8(width: float = 1.0, in_channels: int = 3) -> BlockEncoder:
    """The 8-layer ImageNet variant of METHODS 2.1, scaled by ``width``."""
    return _vgg("vgg8", width, in_channels)


def fit_grid(reference: int, height: int, width: int | None = None) -> int:
    """The pooled grid side for one ``height`` x ``width`` block output, given the paper's grid.

    The rule (METHODS 2.2 keeps the kernel H/grid an integer): the reference
    grid where it divides the map; otherwise the largest divisor of the map
    side that is below it, so the pooled dimension stays at or below the
    paper's (a 7x7 map with reference 4 gets 1, a 28x28 map with reference 8
    gets 7). At 32, 64 and 96 px this is exactly the paper's grids.
    """
    width = height if width is None else width
    if reference < 1 or height < 1 or width < 1:
        raise ValueError(f"grid and map sides must be >= 1, got grid {reference} for a {height}x{width} map")
    side = math.gcd(height, width)
    return max(d for d in range(1, min(reference, side) + 1) if side % d == 0)


def grid_choices(height: int, width: int | None = None) -> list[int]:
    """Every grid side that divides a ``height`` x ``width`` map (what `fit_grid` picks from)."""
    side = math.gcd(height, height if width is None else width)
    return [d for d in range(1, side + 1) if side % d == 0]


def default_grids(
    name: str, num_blocks: int | None = None, *, shapes: Sequence[Sequence[int]] | None = None
) -> list[int]:
    """Pooling grids of encoder ``name``: the reference ones, or fitted to its block outputs.

    Without ``shapes``: the paper's grids (METHODS 2.2), 1 (global pooling)
    per block for an encoder without reference grids (``num_blocks`` needed).
    With ``shapes`` (the ``(C, H, W)`` output of every block at the actual
    input size, `BlockEncoder.feature_shapes`): each reference grid fitted to
    its map by `fit_grid`, so any input size gets grids that work. Train,
    probe, align and bench all take their default grids from here.
    """
    if shapes is not None:
        shapes = [tuple(int(d) for d in s) for s in shapes]
        if num_blocks is not None and num_blocks != len(shapes):
            raise ValueError(f"num_blocks={num_blocks} but {len(shapes)} block shapes given")
        num_blocks = len(shapes)
    if name in DEFAULT_GRIDS:
        reference = list(DEFAULT_GRIDS[name])
        if shapes is not None and num_blocks != len(reference):
            raise ValueError(f"encoder {name!r} has {len(reference)} reference grids but {num_blocks} block shapes")
    elif num_blocks is None:
        raise KeyError(f"no default pooling grids for encoder {name!r}; give grids explicitly")
    else:
        reference = [1] * num_blocks
    if shapes is None:
        return reference
    return [fit_grid(g, s[-2], s[-1]) for g, s in zip(reference, shapes)]
