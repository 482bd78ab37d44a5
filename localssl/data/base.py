"""The data contracts: `ImageArray`, `DatasetSpec`, the `DATASETS` registry and `load_dataset`.

Every data set, whatever its on-disk format, ends up as one `ImageArray`: a uint8
``(N, H, W, C)`` array plus int64 labels. Training never decodes an image: the
first `load_dataset` call decodes the source once into the uint8 cache
(`localssl.data.cache`) and every later call memory-maps that cache, so
augmentation can run on whole batches on the device (airbench style).

A loader is a `DatasetLoader` registered in `DATASETS`. It does two things:

1. `plan(root, split, ...)` finds the files on disk *without decoding them*
   and returns a `Plan`: the files whose (path, size, mtime) key the cache,
   and a `build` callable;
2. `plan.build()` lists the items (labels are known before any pixel is
   decoded) and returns a `Source` that decodes any subset of them.

Knowing the labels before decoding is what lets ``max_items`` decode only a
class-balanced subset: the same `select_balanced` picks the same items whether
they come out of a fresh decode or out of an existing full cache.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from localssl.registry import Registry

PathLike = str | os.PathLike


class DatasetError(ValueError):
    """A data set is missing, malformed, truncated or unsafe; the message names the file."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """No data set in a known format was found where one was expected.

    Also a `FileNotFoundError`, so callers that only know the standard library
    can still catch it.
    """


# ----------------------------------------------------------------------------- ImageArray


@dataclass(eq=False)
class ImageArray:
    """A whole split in memory (or memory-mapped): the one data type training sees.

    images:  uint8 ``(N, H, W, C)``; usually a read-only `np.memmap` of the cache.
    labels:  int64 ``(N,)``; -1 marks an unlabelled image (STL-10 ``unlabeled``).
    classes: class names; ``labels`` index into this list.
    name:    the registry name of the data set (``"cifar10"``), so that
             ``dataset_spec(array.name)`` works.
    split:   the split it came from (informative only).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    split: str = ""
    source: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DatasetError(
                f"{self.name}: images must be a uint8 (N, H, W, C) array, got "
                f"{getattr(self.images, 'dtype', type(self.images))} {getattr(self.images, 'shape', '')}"
            )
        # asarray keeps a memmap a memmap when it is already int64.
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but labels of shape {self.labels.shape}")
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_labelled(self) -> int:
        return int((self.labels >= 0).sum())

    def subset(self, n: int, seed: int = 0) -> ImageArray:
        """A deterministic, class-balanced random subset of ``n`` images (original order kept).

        Every class (and the unlabelled group, if any) gets ``n // groups`` images
        where it has enough; the rest goes to the groups that still have images.
        The result is an in-memory copy (fancy indexing of a memmap copies).
        """
        if n >= len(self):
            return self
        idx = select_balanced(self.labels, n, seed)
        images = self.images[idx]
        images.flags.writeable = False
        return replace(self, images=images, labels=np.array(self.labels[idx]))

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        kind = "memmap" if isinstance(self.images, np.memmap) else "array"
        split = f", split={self.split!r}" if self.split else ""
        return (
            f"ImageArray(name={self.name!r}{split}, n={len(self)}, image={h}x{w}x{c}, "
            f"classes={len(self.classes)}, labelled={self.num_labelled}, {kind})"
        )


def select_balanced(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of a deterministic class-balanced random subset of size ``min(n, len)``.

    Items are shuffled within each label group and then dealt round-robin: first
    the first item of every group, then the second, ... The order of the groups
    in each round is itself random, so a remainder ``n % groups`` does not
    always favour class 0. Unlabelled items (-1) form one group of their own.
    Depends only on ``labels``, ``n`` and ``seed``: `max_items` relies on that to
    pick the same subset before decoding as after.
    """
    labels = np.asarray(labels)
    total = labels.shape[0]
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    groups, inverse = np.unique(labels, return_inverse=True)
    group_rank = rng.permutation(len(groups))  # the random order of groups inside a round
    order = rng.permutation(total)  # shuffle, then a stable sort by group keeps the shuffle
    order = order[np.argsort(inverse[order], kind="stable")]
    sorted_groups = inverse[order]
    starts = np.searchsorted(sorted_groups, np.arange(len(groups)))
    rank_in_group = np.arange(total) - starts[sorted_groups]
    key = rank_in_group.astype(np.int64) * len(groups) + group_rank[sorted_groups]
    chosen = order[np.argsort(key, kind="stable")[:n]]
    return np.sort(chosen)


# ----------------------------------------------------------------------------- DatasetSpec


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the library needs to know about a data set without loading it.

    mean/std are per channel in the 0..1 scale (what `Preprocess` normalises
    with). ``image_size``/``num_classes`` are None where they depend on the
    data (``imagefolder``); `resolved` fills them from a loaded `ImageArray`.
    crop_scale is the SimCLR random-resized-crop scale range (METHODS 2.4:
    0.08-1, but 0.25-1 on 32 px images where an 8% crop is only 9x9 pixels).
    """

    name: str
    image_size: int | None
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None
    pretrain_split: str
    probe_train_split: str
    test_split: str
    crop_scale: tuple[float, float] = (0.08, 1.0)
    splits: tuple[str, ...] = ()

    def resolved(self, data: ImageArray) -> DatasetSpec:
        """This spec with image size, channels and class count taken from loaded data."""
        h, w, c = data.image_shape
        if h != w:
            raise DatasetError(f"{data.name}: non-square images ({h}x{w}) are not supported")
        return replace(self, image_size=h, channels=c, num_classes=len(data.classes))


def channel_stats(images: np.ndarray, max_items: int = 10_000, seed: int = 0) -> tuple[tuple, tuple]:
    """Per-channel mean and std (0..1 scale) over up to ``max_items`` random images.

    For a data set without published statistics (``imagefolder``).
    """
    n = images.shape[0]
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_items), replace=False))
    x = np.asarray(images[idx], dtype=np.float64) / 255.0
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ----------------------------------------------------------------------------- loaders

Allocator = Callable[[tuple[int, ...]], np.ndarray]
"""Returns a writable uint8 array of the given shape: a memmap of the cache file being written."""


class Source(ABC):
    """Items of one split, listed but not decoded: labels and classes are known, pixels are not."""

    #: int64 (N,) labels of every item, -1 for unlabelled
    labels: np.ndarray
    classes: list[str]

    @abstractmethod
    def decode(self, indices: np.ndarray, alloc: Allocator) -> np.ndarray:
        """Decode items ``indices`` (sorted) into ``alloc((len(indices), H, W, C))`` and return it.

        ``alloc`` is called once, as soon as the image shape is known.
        """


@dataclass
class Plan:
    """What a loader found on disk, before it reads any data.

    files:  the files the split is made from; their absolute path, size and
            mtime key the cache, so a changed file means a new decode.
    where:  human-readable description of the source (error messages, cache meta).
    build:  lists the items and returns a `Source` (may read the whole archive).
    """

    files: list[Path]
    where: str
    build: Callable[[], Source]


class DatasetLoader(ABC):
    """A registered data set. Subclasses set `spec` and implement `plan`.

    ``options`` lists the extra keyword arguments `load_dataset` accepts for
    this data set (``resize`` for ``imagefolder``); anything else is an error.
    """

    spec: DatasetSpec
    options: tuple[str, ...] = ()

    @abstractmethod
    def plan(self, root: Path | None, split: str, *, download: bool, **options: Any) -> Plan:
        """Find the split on disk (downloading if asked) and say how to read it."""

    def check_split(self, split: str) -> None:
        if self.spec.splits and split not in self.spec.splits:
            raise DatasetError(
                f"unknown split {split!r} for {self.spec.name}; valid splits: {', '.join(self.spec.splits)}"
            )

    def load(
        self,
        root: PathLike | None,
        split: str,
        *,
        download: bool = False,
        cache_dir: PathLike | None = None,
        max_items: int | None = None,
        **options: Any,
    ) -> ImageArray:
        """Load through the decode-once cache (see `localssl.data.cache`)."""
        from localssl.data import cache  # local: cache is independent of this module

        self.check_split(split)
        self._check_options(options)
        plan = self.plan(_as_path(root), split, download=download, **options)
        return cache.load_or_build(
            self.spec.name, split, plan, cache_dir=cache_dir, max_items=max_items, options=options
        )

    def _check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise TypeError(
                f"{self.spec.name} does not take option(s) {', '.join(unknown)}; accepted options: {accepted}"
            )


DATASETS: Registry[DatasetLoader] = Registry("dataset")


def dataset_spec(name: str) -> DatasetSpec:
    """The `DatasetSpec` of a registered data set (KeyError listing the valid names)."""
    return DATASETS.get(name).spec


def load_dataset(
    name: str,
    root: PathLike | None,
    split: str,
    *,
    download: bool = False,
    cache_dir: PathLike | None = None,
    max_items: int | None = None,
    **options: Any,
) -> ImageArray:
    """Load split ``split`` of data set ``name`` as an `ImageArray`.

    root:      a folder holding the data set, or the archive/folder itself
               (e.g. ``.../cifar-10-python.tar.gz``); ignored by ``shapes10``.
    download:  fetch the official archive into ``root`` when nothing is found.
    cache_dir: where decoded arrays go (default ``$LOCALSSL_CACHE`` or
               ``~/.cache/localssl``).
    max_items: a deterministic class-balanced subset of this size (only those
               images are decoded; an existing full cache is subset instead).
    options:   data-set specific, e.g. ``resize=64`` for ``imagefolder``.

    Raises KeyError for an unknown name, `DatasetError` for an unknown split or
    a broken file, `DatasetNotFoundError` when the data is not there.
    """
    if max_items is not None and max_items <= 0:
        raise ValueError(f"max_items must be positive, got {max_items}")
    return DATASETS.get(name).load(root, split, download=download, cache_dir=cache_dir, max_items=max_items, **options)


def _as_path(root: PathLike | None) -> Path | None:
    if root is None:
        return None
    return Path(os.path.expanduser(os.fspath(root)))


def require_root(root: Path | None, name: str) -> Path:
    """Loaders that read files need a root; say so clearly instead of failing on ``None``."""
    if root is None:
        raise DatasetNotFoundError(f"{name}: no data root given; pass the folder or archive that holds it")
    return root


class ArraySource(Source):
    """Items already decoded into memory (binary formats such as CIFAR-10's pickles)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)

    def decode(self, indices: np.ndarray, alloc: Allocator) -> np.ndarray:
        out = alloc((len(indices), *self.images.shape[1:]))
        step = 4096  # bounded temporaries: fancy indexing copies
        for a in range(0, len(indices), step):
            out[a : a + step] = self.images[indices[a : a + step]]
        return out
