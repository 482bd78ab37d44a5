"""The input views of the linear-network experiments: synthetic Gaussian or MNIST patches (METHODS 3).

A batch stacks view 1 of its samples on view 2 of the same samples
(:func:`.loss.other_view` pairs them). Synthetic views share a Gaussian
signal; the MNIST views are 14x14 patches of one image, either one pair
per image (:func:`mnist_patch_views`, the ``one-pair`` layout) or both
columns of every image as the authors batch them
(:func:`mnist_quadrant_batches`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import DTYPE

__all__ = ["MNIST_PREPROCESS", "make_views", "mnist_patch_views", "mnist_quadrant_batches",
           "synthetic_views"]


def synthetic_views(n: int, dim: int, *, seed: int = 0, noise: float = 0.5) -> tuple[Tensor, Tensor]:
    """Two Gaussian views ``s + noise * e1``, ``s + noise * e2`` of ``n`` shared signals s ~ N(0, I)."""
    g = torch.Generator().manual_seed(int(seed))
    s = torch.randn(n, dim, generator=g, dtype=DTYPE)
    return (s + noise * torch.randn(n, dim, generator=g, dtype=DTYPE),
            s + noise * torch.randn(n, dim, generator=g, dtype=DTYPE))


#: Standard torchvision MNIST normalisation (mean, std of the training pixels / 255).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_PREPROCESS = ("normalize", "scale", "center")


def _preprocess(parts: list[Tensor], preprocess: str) -> list[Tensor]:
    """Pixel preprocessing of patches already divided by 255 (see :func:`mnist_patch_views`)."""
    if preprocess == "normalize":
        return [(v - MNIST_MEAN) / MNIST_STD for v in parts]
    if preprocess == "center":
        mean = torch.cat(parts).mean(0)
        return [v - mean for v in parts]
    if preprocess != "scale":
        raise ValueError(f"unknown preprocess {preprocess!r}; valid: {', '.join(MNIST_PREPROCESS)}")
    return list(parts)


def _mnist_images(mnist_dir: str | Path, n: int, split: str) -> Tensor:
    from ..data.mnist import load_mnist

    images, _ = load_mnist(mnist_dir, split)
    if n > len(images):
        raise ValueError(f"asked for {n} MNIST images, split {split!r} of {mnist_dir} has {len(images)}")
    return torch.from_numpy(images[:n].astype(np.float64))


def mnist_patch_views(mnist_dir: str | Path, n_samples: int = 1024, *, columns: str = "alternate",
                      preprocess: str = "normalize", split: str = "train") -> tuple[Tensor, Tensor]:
    """One positive pair of 14x14 patches (196-d) per MNIST image: the ``one-pair`` layout.

    Each 28x28 image is cut into four 14x14 patches; the top and bottom patch
    of one column form a positive pair (view 1 = top, view 2 = bottom).
    ``columns``: ``"alternate"`` (image i of the first ``n_samples`` gives its
    left-column pair if i is even, its right-column pair if odd, so both
    pair kinds are used, every sample is a different image and so is every
    negative), ``"left"`` or ``"right"``. (The authors use both columns of
    every image: :func:`mnist_quadrant_batches`.)
    ``preprocess``: ``"normalize"`` (default: ``(x/255 - 0.1307) / 0.3081``,
    the usual torchvision MNIST normalisation, as the authors), ``"scale"``
    (x/255) or ``"center"`` (x/255 minus the per-pixel mean over all patches
    used).
    """
    x = _mnist_images(mnist_dir, n_samples, split)
    left = (x[:, :14, :14], x[:, 14:, :14])
    right = (x[:, :14, 14:], x[:, 14:, 14:])
    if columns == "left":
        top, bottom = left
    elif columns == "right":
        top, bottom = right
    elif columns == "alternate":
        even = (torch.arange(n_samples) % 2 == 0)[:, None, None]
        top, bottom = torch.where(even, left[0], right[0]), torch.where(even, left[1], right[1])
    else:
        raise ValueError(f"unknown columns {columns!r}; valid: alternate, left, right")
    v1, v2 = _preprocess([top.reshape(n_samples, 196) / 255.0, bottom.reshape(n_samples, 196) / 255.0],
                         preprocess)
    return v1.contiguous(), v2.contiguous()


def mnist_quadrant_batches(mnist_dir: str | Path, n_batches: int = 32, batch_size: int = 32, *,
                           preprocess: str = "normalize", split: str = "train") -> list[Tensor]:
    """The authors' batches (METHODS 3): both columns of every image, 2 x ``batch_size`` pairs.

    Batch b holds images ``b*batch_size ... (b+1)*batch_size - 1`` of the
    split (no shuffling) as rows ``[TL x bs, TR x bs | BL x bs, BR x bs]``
    (top-left, top-right, bottom-left, bottom-right 14x14 patches, 196-d):
    view 1 = the top patches, view 2 = the bottom ones, so row i's positive
    is row ``i + 2 bs`` (:func:`other_view`), the patch below it. This is
    the row order of their patch unfolding of a (bs, 1, 28, 28) batch.
    ``preprocess`` as in :func:`mnist_patch_views` (``"center"``: mean over
    all quadrants used).
    """
    n = n_batches * batch_size
    x = _mnist_images(mnist_dir, n, split) / 255.0
    quads = [x[:, :14, :14], x[:, :14, 14:], x[:, 14:, :14], x[:, 14:, 14:]]  # TL, TR, BL, BR
    quads = _preprocess([q.reshape(n, 196) for q in quads], preprocess)
    out = []
    for b in range(n_batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        out.append(torch.cat([q[sl] for q in quads]).contiguous())
    return out


def make_views(*, mnist_dir: str | Path | None, n_samples: int, dim: int, data_seed: int = 0,
               preprocess: str = "normalize", columns: str = "alternate") -> tuple[Tensor, Tensor, str]:
    """MNIST patches if ``mnist_dir`` is given, synthetic Gaussian views otherwise; also a description."""
    if mnist_dir is not None:
        v1, v2 = mnist_patch_views(mnist_dir, n_samples, columns=columns, preprocess=preprocess)
        return v1, v2, f"MNIST patches ({n_samples} train samples, columns={columns}, preprocess={preprocess})"
    v1, v2 = synthetic_views(n_samples, dim, seed=data_seed)
    return v1, v2, f"synthetic Gaussian views (n={n_samples}, dim={dim}, noise 0.5, data seed {data_seed})"


def _batches(v1: Tensor, v2: Tensor, batch_size: int):
    for i in range(0, len(v1) - batch_size + 1, batch_size):
        yield torch.cat([v1[i:i + batch_size], v2[i:i + batch_size]])
