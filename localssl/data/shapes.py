"""``shapes10``: a small data set the package draws itself, for the demo and for fast tests.

Ten shape classes on 32x32 RGB images. Position, size and (where it does not
change the class) rotation are random; foreground and background colours are
drawn independently of the class, the background carries a random linear
gradient and every pixel some Gaussian noise. Colour and mean brightness
therefore say nothing about the class: a representation has to pick up
*shape* (edges, corners, stripes, holes) to separate them, which is what the
local rules are supposed to learn, and a linear probe on raw pixels stays
well below a trained encoder.

Rotations are limited where a large one would turn one class into another:
a square and a diamond are the same shape 45 degrees apart, as are plus and
x, and horizontal and vertical bars 90 degrees apart; these get +-15 degrees
of jitter around their canonical angle, so classes stay 15 degrees apart.

Everything is vectorised numpy; 6,000 images take well under a second, so
nothing is cached or downloaded. The same seed always gives the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from localssl.data.base import DATASETS, DatasetLoader, DatasetSpec, ImageArray, PathLike, Plan

SHAPES10_CLASSES = [
    "disk", "ring", "square", "diamond", "triangle", "plus", "x", "hbars", "vbars", "checker",
]  # fmt: skip
DEFAULT_SIZES = {"train": 5000, "test": 1000}
_SPLIT_STREAM = {"train": 0, "test": 1}  # independent random streams per split


def _box(u: np.ndarray, v: np.ndarray, half: float) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= half


def _bars(t: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # 5 bands across [-0.9, 0.9], bands 0, 2, 4 on: three bars.
    return _box(u, v, 0.9) & (np.floor((t + 0.9) / 0.36).astype(np.int32) % 2 == 0)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral: inside the three half-planes with outward normals 120 degrees apart.
    inside = np.ones(u.shape, dtype=bool)
    for a in np.deg2rad([90.0, 210.0, 330.0]):
        inside &= u * np.cos(a) + v * np.sin(a) <= 0.5
    return inside


def _plus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return ((np.abs(u) <= 0.28) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 1.0))


def _checker(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cells = np.floor((u + 0.9) / 0.45).astype(np.int32) + np.floor((v + 0.9) / 0.45).astype(np.int32)
    return _box(u, v, 0.9) & (cells % 2 == 0)


def _rho(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v)


# class -> (mask in the shape's own unit frame, canonical angle in degrees or None for free rotation)
_SHAPES = {
    "disk": (lambda u, v: _rho(u, v) <= 1.0, 0.0),
    "ring": (lambda u, v: (_rho(u, v) <= 1.0) & (_rho(u, v) >= 0.55), 0.0),
    "square": (lambda u, v: _box(u, v, 0.8), 0.0),
    "diamond": (lambda u, v: _box(u, v, 0.8), 45.0),
    "triangle": (_triangle, None),
    "plus": (_plus, 0.0),
    "x": (_plus, 45.0),
    "hbars": (lambda u, v: _bars(v, u, v), 0.0),
    "vbars": (lambda u, v: _bars(u, u, v), 0.0),
    "checker": (_checker, 0.0),
}


def make_shapes10(n: int, seed: int = 0, image_size: int = 32, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uint8 ``(n, S, S, 3)`` and int64 labels, exactly balanced when 10 divides ``n``.

    ``seed`` and ``stream`` seed the generator together (splits use different
    streams of the same seed).
    """
    rng = np.random.default_rng([stream, seed])
    s = image_size
    labels = rng.permutation(np.arange(n) % len(SHAPES10_CLASSES)).astype(np.int64)

    # Geometry: half-size r, centre kept so the shape is (almost) fully inside.
    r = rng.uniform(0.22, 0.40, n) * s
    cx = rng.uniform(0.9 * r, s - 0.9 * r)
    cy = rng.uniform(0.9 * r, s - 0.9 * r)
    jitter = rng.uniform(-15.0, 15.0, n)
    free = rng.uniform(0.0, 360.0, n)
    canonical = np.array([a if a is not None else 0.0 for _, a in _SHAPES.values()])
    is_free = np.array([a is None for _, a in _SHAPES.values()])
    angle = np.where(is_free[labels], free, canonical[labels] + jitter)
    theta = np.deg2rad(angle).astype(np.float32)

    # Pixel centres in each shape's own frame: rotate by -theta, scale by 1/r.
    grid = np.arange(s, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - cx.astype(np.float32)[:, None, None]
    dy = grid[None, :, None] - cy.astype(np.float32)[:, None, None]
    c = np.cos(theta)[:, None, None]
    sn = np.sin(theta)[:, None, None]
    inv_r = (1.0 / r).astype(np.float32)[:, None, None]
    u = (c * dx + sn * dy) * inv_r
    v = (-sn * dx + c * dy) * inv_r
    mask = np.zeros((n, s, s), dtype=bool)
    for k, (fn, _) in enumerate(_SHAPES.values()):
        sel = labels == k
        mask[sel] = fn(u[sel], v[sel])

    # Colours independent of the class, but never too close to each other.
    fg = rng.integers(0, 256, (n, 3)).astype(np.int16)
    bg = rng.integers(0, 256, (n, 3)).astype(np.int16)
    close = np.linalg.norm((fg - bg).astype(np.float32), axis=1) < 120.0
    fg[close] = (bg[close] + 128) % 256
    # Integer arithmetic on int16 images: 2-3x faster than float32 for the same result.
    slope = rng.uniform(-30.0, 30.0, (n, 2)).astype(np.float32)
    ramp = grid / s - 0.5
    gradient = slope[:, 0, None, None] * ramp[None, None, :] + slope[:, 1, None, None] * ramp[None, :, None]
    img = bg[:, None, None, :] + np.rint(gradient).astype(np.int16)[..., None]
    img[mask] = np.repeat(fg, mask.sum(axis=(1, 2)), axis=0)
    img += rng.integers(-8, 9, img.shape, dtype=np.int8)  # uniform pixel noise, std about 5
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8), labels


class Shapes10Loader(DatasetLoader):
    """Generated in memory (no root, no cache): seconds would be lost on disk I/O, not saved."""

    spec = DatasetSpec(
        name="shapes10",
        image_size=32,
        channels=3,
        # Measured on the default train split (seed 0); colours are uniform, so about 0.5.
        mean=(0.4989, 0.5053, 0.5028),
        std=(0.2932, 0.2922, 0.2931),
        num_classes=10,
        pretrain_split="train",
        probe_train_split="train",
        test_split="test",
        # 32 px like CIFAR-10: an 8% crop (9x9 px) would often cut the shape out.
        crop_scale=(0.25, 1.0),
        splits=("train", "test"),
    )
    options = ("seed", "size")

    def plan(self, root: Path | None, split: str, *, download: bool) -> Plan:  # pragma: no cover
        raise NotImplementedError("shapes10 is generated, not read; use load()")

    def load(
        self,
        root: PathLike | None,
        split: str,
        *,
        download: bool = False,
        cache_dir: PathLike | None = None,
        max_items: int | None = None,
        seed: int = 0,
        size: int | None = None,
    ) -> ImageArray:
        self.check_split(split)
        n = DEFAULT_SIZES[split] if size is None else int(size)
        images, labels = make_shapes10(n, seed=seed, stream=_SPLIT_STREAM[split])
        images.flags.writeable = False  # behave like the read-only memmaps of the other data sets
        data = ImageArray(images, labels, list(SHAPES10_CLASSES), name="shapes10", split=split, source="generated")
        return data if max_items is None else data.subset(max_items)


DATASETS.register("shapes10")(Shapes10Loader())
