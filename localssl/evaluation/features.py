"""Frozen-encoder features for the probes (METHODS 2.2 and 2.5).

The paper's linear probe (METHODS 2.5) reads *every* layer: each block's output
is average-pooled to that block's grid (8, 4, 4, 4, 2, 2 for VGG-6, METHODS
2.2), flattened (channels x cells) and concatenated, which gives 32,768 dims at
full width. The CLAPP-2021-style probe reads only the last block, pooled
globally. The per-block probe of blockwise SSL (METHODS 5.1: a linear head
on every stage's output) reads every block, each pooled globally. All three
come out of one pass here, as feature keys ``"all"``, ``"last"`` and
``"blocks"`` (every block's globally pooled output, concatenated block by
block: the probe slices it, so the encoder runs once per image for all of
them).

Memory: the encoder is run block by block and each block's output is pooled
as soon as it exists, so at most one block's activation map (plus the pooled
vectors, which are small) is alive at a time; the outputs of the whole
network are never held together, unlike ``BlockEncoder.forward``. The result
tensor is allocated once and filled batch by batch (no list + ``cat``, which
would double the peak).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURE_KEYS = ("all", "last", "blocks")
#: What is computed when the caller does not say (the fast and kNN probes' features).
DEFAULT_KEYS = ("all", "last")


def as_grids(grids: int | Sequence[int], num_blocks: int) -> list[int]:
    """One positive grid side per block (an int means the same for every block)."""
    if isinstance(grids, int):
        grids = [grids] * num_blocks
    grids = [int(g) for g in grids]
    if len(grids) != num_blocks:
        raise ValueError(f"got {len(grids)} pooling grids {grids} for an encoder with {num_blocks} blocks")
    bad = [g for g in grids if g < 1]
    if bad:
        raise ValueError(f"pooling grids must be >= 1, got {grids}")
    return grids


def _check_grid(k: int, h: int, w: int, grid: int, channels: int | None = None) -> None:
    if h % grid or w % grid:
        c = f"{channels}x" if channels is not None else ""
        raise ValueError(
            f"block {k + 1 if k >= 0 else '?'}: pooling grid {grid} does not divide its output of size {c}{h}x{w}; "
            f"the kernel H/grid must be an integer (METHODS 2.2), so pick grids that divide every "
            f"block's output or change the input size"
        )


def pool_to_grid(h: torch.Tensor, grid: int, block: int = -1) -> torch.Tensor:
    """Average-pool ``h`` (N, C, H, W) to (N, C*grid*grid), channel-major.

    The kernel and stride are H/grid (METHODS 2.2: kernels 4-4-4-2-2-1 at 32 px
    give grids 8-4-4-4-2-2), identical to adaptive pooling when grid divides H;
    a grid that does not divide is an error rather than a silent uneven
    adaptive pooling. Pooling runs in float32 whatever the activation dtype.
    """
    n, c, hh, ww = h.shape
    _check_grid(block, hh, ww, grid, c)
    h = h.float()
    if grid == 1:
        return h.mean(dim=(2, 3))
    if hh != grid or ww != grid:
        h = F.avg_pool2d(h, kernel_size=(hh // grid, ww // grid))
    return h.reshape(n, c * grid * grid)


def feature_dims(encoder: nn.Module, input_shape: Sequence[int], grids: int | Sequence[int]) -> dict:
    """Dimensions of the probe features for inputs of shape (C, H, W).

    Returns ``{"all": sum_k C_k * g_k**2, "last": C_L, "per_block": [...],
    "blocks": sum_k C_k, "block_dims": [C_1, ..., C_L], "shapes": [(C, H, W), ...]}``
    (``per_block``: each block at its grid; ``block_dims``: each block
    globally pooled, the columns of ``"blocks"`` in order) and raises ``ValueError`` (naming the block,
    grid and size) if a grid does not divide its block's output. Runs one
    sample through the encoder, so call it before any heavy work.
    """
    shapes = encoder.feature_shapes(tuple(input_shape))
    grids = as_grids(grids, len(shapes))
    per_block = []
    for k, ((c, h, w), g) in enumerate(zip(shapes, grids)):
        _check_grid(k, h, w, g, c)
        per_block.append(c * g * g)
    block_dims = [s[0] for s in shapes]
    return {"all": sum(per_block), "last": shapes[-1][0], "per_block": per_block, "blocks": sum(block_dims),
            "block_dims": block_dims, "shapes": [list(s) for s in shapes]}


@contextlib.contextmanager
def frozen(encoder: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Eval mode (and optionally ``device``) for the duration; restores both after.

    METHODS 2.5 evaluates a frozen encoder in eval mode. The caller's encoder
    is handed back as it came (training flag and device), so a probe in the
    middle of training does not flip the model into eval mode behind the
    trainer's back. Gradients are never computed (callers use ``no_grad``).
    """
    was_training = encoder.training
    p = next(encoder.parameters(), None)
    old_device = p.device if p is not None else None
    if device is not None:
        encoder.to(device)
    encoder.eval()
    try:
        yield encoder
    finally:
        encoder.train(was_training)
        if device is not None and old_device is not None:
            encoder.to(old_device)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on any device type (CPU included) when ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def encode(
    encoder: nn.Module,
    x: torch.Tensor,
    grids: Sequence[int],
    keys: Sequence[str] = DEFAULT_KEYS,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """Probe features of one preprocessed float batch (N, C, H, W), on x's device.

    The encoder must already be in eval mode on ``x``'s device (see
    :func:`frozen`). Blocks run one at a time and each output is pooled at
    once, so only one activation map is alive. Features are float32.
    """
    blocks = encoder.blocks if hasattr(encoder, "blocks") else None
    if blocks is None:
        raise TypeError(f"expected a BlockEncoder (with .blocks), got {type(encoder).__name__}")
    grids = as_grids(grids, len(blocks))
    unknown = set(keys) - set(FEATURE_KEYS)
    if unknown:
        raise ValueError(f"unknown feature keys {sorted(unknown)}; valid: {list(FEATURE_KEYS)}")
    pooled: list[torch.Tensor] = []
    global_pooled: list[torch.Tensor] = []
    with autocast(x.device, amp):
        h = x
        for k, (block, g) in enumerate(zip(blocks, grids)):
            h = block(h)
            if "all" in keys:
                pooled.append(pool_to_grid(h, g, block=k))
            if "blocks" in keys:
                global_pooled.append(pool_to_grid(h, 1, block=k))
    out: dict[str, torch.Tensor] = {}
    if "all" in keys:
        out["all"] = torch.cat(pooled, dim=1)
    if "blocks" in keys:
        out["blocks"] = torch.cat(global_pooled, dim=1)
    if "last" in keys:
        out["last"] = h.float().mean(dim=(2, 3))
    return out


def _as_uint8_tensor(images) -> torch.Tensor:
    """A uint8 (N, H, W, C) batch as a CPU tensor (copies only what it must)."""
    if isinstance(images, torch.Tensor):
        t = images
    else:
        # A read-only memmap slice: torch.from_numpy needs a writable, contiguous array.
        arr = np.asarray(images)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, copy=True, order="C")
        t = torch.from_numpy(arr)
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {t.dtype} {tuple(t.shape)}")
    return t


def iter_features(
    encoder: nn.Module,
    images,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    *,
    grids: Sequence[int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: bool = False,
    keys: Sequence[str] = DEFAULT_KEYS,
) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Yield ``(rows, features)`` batch by batch, features on ``device``.

    ``preprocess`` maps a uint8 NHWC batch on ``device`` to the encoder's input
    (e.g. ``Preprocess(mean, std)`` or a centre crop + normalisation). The
    encoder must be frozen on ``device`` (see :func:`frozen`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    n = len(images)
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        x = _as_uint8_tensor(images[rows]).to(device, non_blocking=True)
        with torch.no_grad():
            feats = encode(encoder, preprocess(x), grids, keys=keys, amp=amp)
        yield rows, feats


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    *,
    grids: int | Sequence[int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: bool = False,
    keys: Sequence[str] = DEFAULT_KEYS,
    out_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Frozen-encoder probe features of a whole image array, on the CPU.

    Args:
        encoder: a ``BlockEncoder``; run in eval mode under ``no_grad`` and
            handed back in its original mode and device.
        images: uint8 (N, H, W, C), numpy (a memmap is fine: it is read one
            batch at a time) or a torch tensor.
        preprocess: uint8 NHWC batch -> normalised float NCHW (``Preprocess``).
        grids: pooling grid per block (METHODS 2.2), e.g. ``default_grids("vgg6")``.
        batch_size: images per forward pass.
        device: where the encoder runs.
        amp: bf16 autocast (on CPU too); features are pooled in float32.
        keys: which features to compute, among ``"all"``, ``"last"`` and
            ``"blocks"`` (default: the first two).
        out_dtype: storage dtype of the result (float32; bf16 halves the
            memory of 32,768-dim features on large sets).
        progress: show a tqdm bar.

    Returns:
        ``{"all": (N, sum_k C_k*g_k^2), "last": (N, C_L)}`` CPU tensors (and
        ``"blocks": (N, sum_k C_k)`` when asked).

    Raises:
        ValueError: if a grid does not divide its block's output (the message
            names the block, the grid and the size), or the images are not uint8 NHWC.
    """
    device = torch.device(device)
    n = len(images)
    if n == 0:
        raise ValueError("no images to extract features from")
    first = _as_uint8_tensor(images[0:1])
    if isinstance(preprocess, nn.Module):
        preprocess.to(device)  # its mean/std buffers must sit beside the batch
    with frozen(encoder, device):
        # Input shape after preprocessing (a centre crop may change it); checks
        # every grid before the first real batch.
        in_shape = preprocess(first.to(device)).shape[1:]
        dims = feature_dims(encoder, in_shape, grids)
        grids = as_grids(grids, len(dims["per_block"]))
        out = {k: torch.empty(n, dims[k], dtype=out_dtype) for k in keys}
        it = iter_features(encoder, images, preprocess, grids=grids, batch_size=batch_size,
                           device=device, amp=amp, keys=keys)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=(n + batch_size - 1) // batch_size, desc="features", leave=False)
        for rows, feats in it:
            for k in keys:
                out[k][rows] = feats[k].to("cpu", out_dtype)
    return out
