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

import math
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
    stats:   per-channel ``(mean, std)`` of the images in the 0..1 scale, as
             computed once when the cache entry was written; None until
             `channel_stats` computes it (in-memory arrays, subsets).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    split: str = ""
    source: str = field(default="", repr=False)
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, repr=False)

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

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(mean, std)`` of these images (0..1 scale): the cached ones, else computed now.

        The normalisation of a data set without published statistics
        (``imagefolder``). A function of the images alone (`channel_stats`,
        seed 0), so a subset decoded on its own and the same subset taken
        from a full cache entry get the same numbers.
        """
        if self.stats is None:
            self.stats = channel_stats(self.images)
        return self.stats

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
        return replace(self, images=images, labels=np.array(self.labels[idx]), stats=None)

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
    with): the published constants of a named data set, or None where they
    are the data's own (``imagefolder``: computed once over the decoded
    images and kept in the cache). ``image_size``/``num_classes`` are None
    where they depend on the data, and ``channels`` is then only the usual
    case (``imagefolder``: 3, grayscale folders resolve to 1); `resolved`
    fills all of them from a loaded `ImageArray`.
    crop_scale is the SimCLR random-resized-crop scale range (METHODS 2.4:
    0.08-1, but 0.25-1 on 32 px images where an 8% crop is only 9x9 pixels).
    """

    name: str
    image_size: int | None
    channels: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    num_classes: int | None
    pretrain_split: str
    probe_train_split: str
    test_split: str
    crop_scale: tuple[float, float] = (0.08, 1.0)
    splits: tuple[str, ...] = ()

    def resolved(self, data: ImageArray) -> DatasetSpec:
        """This spec with image size, channels and class count taken from loaded data.

        mean/std stay the published constants where the spec has them, else
        they are the data's own (`ImageArray.channel_stats`).
        """
        h, w, c = data.image_shape
        if h != w:
            raise DatasetError(
                f"{data.name}: non-square images ({h}x{w}) are not supported; pass resize=S (--resize S)"
            )
        mean, std = (self.mean, self.std) if self.mean is not None and self.std is not None else data.channel_stats()
        if len(mean) != c or len(std) != c:
            raise DatasetError(f"{data.name}: images have {c} channel(s) but the normalisation has {len(mean)}")
        return replace(self, image_size=h, channels=c, num_classes=len(data.classes), mean=mean, std=std)


def channel_stats(images: np.ndarray, max_items: int = 10_000, seed: int = 0) -> tuple[tuple, tuple]:
    """Per-channel mean and std (0..1 scale, population std) over up to ``max_items`` random images.

    For a data set without published statistics (``imagefolder``). The sums
    of pixel values and of their squares are exact integers (read in chunks
    of at most 8 MiB, whatever the image size), so the only roundings are the
    final divisions and square root: the result does not depend on chunking
    or on the order of the images.
    """
    n = int(images.shape[0])
    if n == 0 or images.ndim != 4:
        raise DatasetError(f"channel statistics need a non-empty (N, H, W, C) array, got shape {images.shape}")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_items), replace=False))
    c = int(images.shape[3])
    chunk = max(1, (8 << 20) // int(np.prod(images.shape[1:])))
    s = np.zeros(c, np.int64)
    q = np.zeros(c, np.int64)
    for a in range(0, len(idx), chunk):
        x = np.asarray(images[idx[a : a + chunk]]).reshape(-1, c).astype(np.int64)
        s += x.sum(axis=0)
        q += (x * x).sum(axis=0)
    m = len(idx) * int(images.shape[1]) * int(images.shape[2])  # values per channel
    # Python ints: exact; int / int is correctly rounded.
    mean = tuple(int(si) / (255 * m) for si in s)
    std = tuple(math.sqrt((int(qi) * m - int(si) ** 2) / (255 * 255 * m * m)) for si, qi in zip(s, q))
    return mean, std


def parse_size(resize: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``64`` or ``(64, 64)`` -> ``(H, W)``; None stays None."""
    if resize is None:
        return None
    if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
        size: tuple[int, ...] = (int(resize), int(resize))
    elif isinstance(resize, (list, tuple)):
        size = tuple(int(s) for s in resize)
    else:
        raise ValueError(f"resize must be a positive int or (H, W), got {resize!r}")
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"resize must be a positive int or (H, W), got {resize!r}")
    return size  # type: ignore[return-value]


def resize_images(images: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` -> ``(N, size[0], size[1], C)``, bicubic (PIL), one image at a time.

    The same filter as the image-file loaders' ``resize``; images already at
    ``size`` are copied unchanged.
    """
    from PIL import Image

    n, h, w, c = images.shape
    if out is None:
        out = np.empty((n, *size, c), np.uint8)
    for i in range(n):
        img = np.asarray(images[i])
        if (h, w) == tuple(size):
            out[i] = img
            continue
        im = Image.fromarray(img[..., 0] if c == 1 else img)
        r = np.asarray(im.resize((size[1], size[0]), Image.Resampling.BICUBIC), dtype=np.uint8)
        out[i] = r.reshape(size[0], size[1], c)
    return out


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
    this data set; anything else is an error. ``resize=S`` (or ``(H, W)``) is
    accepted by every loader: one that lists it resizes while decoding
    (``imagefolder``), any other gets its decoded images resized (bicubic)
    before they enter the cache, so a resized split is decoded once too.
    """

    spec: DatasetSpec
    options: tuple[str, ...] = ()
    #: Bump when this loader's decoded pixels for the same files change; it
    #: joins the cache key (0 leaves the key of earlier versions unchanged).
    decoder_version: int = 0

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
        size = None
        if "resize" not in self.options and options.get("resize") is not None:
            size = parse_size(options["resize"])
        # resize=None means "as stored" for every loader; a resize this loader does not do itself is ours.
        own = {k: v for k, v in options.items() if k != "resize" or (v is not None and k in self.options)}
        self._check_options(own)
        plan = self.plan(_as_path(root), split, download=download, **own)
        if size is not None:
            inner = plan.build
            plan = replace(plan, build=lambda: ResizedSource(inner(), size))
            own["resize"] = list(size)  # part of the cache key
        return cache.load_or_build(
            self.spec.name, split, plan, cache_dir=cache_dir, max_items=max_items, options=own,
            version=self.decoder_version,
        )

    def _check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(sorted({*self.options, "resize"}))  # every loader takes resize
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
    options:   ``resize=S`` (any data set: images resized to S x S, bicubic,
               before they are cached) and data-set specific ones.

    Raises KeyError for an unknown name, `DatasetError` for an unknown split or
    a broken file, `DatasetNotFoundError` when the data is not there.
    """
    if max_items is not None and max_items <= 0:
        raise ValueError(f"max_items must be positive, got {max_items}")
    loader = DATASETS.get(name)
    resize = options.get("resize")
    if "resize" in options and "resize" not in loader.options and type(loader).load is not DatasetLoader.load:
        # A loader with its own load (generated data, no cache): resize what it returns.
        rest = {k: v for k, v in options.items() if k != "resize"}
        data = loader.load(root, split, download=download, cache_dir=cache_dir, max_items=max_items, **rest)
        size = parse_size(resize)
        if size is None or size == data.image_shape[:2]:
            return data
        images = resize_images(data.images, size)
        images.flags.writeable = False
        return replace(data, images=images, stats=None)
    return loader.load(root, split, download=download, cache_dir=cache_dir, max_items=max_items, **options)


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


class ResizedSource(Source):
    """Another `Source` whose images are resized (bicubic) on their way into the cache.

    An in-memory source is resized in chunks; any other is decoded once (one
    pass over its files) into memory at its own size, then resized.
    """

    def __init__(self, inner: Source, size: tuple[int, int]) -> None:
        self.inner = inner
        self.size = size
        self.labels = inner.labels
        self.classes = inner.classes

    def decode(self, indices: np.ndarray, alloc: Allocator) -> np.ndarray:
        indices = np.asarray(indices)
        if isinstance(self.inner, ArraySource):
            x = self.inner.images
            out = alloc((len(indices), *self.size, x.shape[3]))
            step = 1024
            for a in range(0, len(indices), step):
                resize_images(x[indices[a : a + step]], self.size, out=out[a : a + step])
            return out
        full = self.inner.decode(indices, lambda shape: np.empty(shape, np.uint8))
        out = alloc((len(indices), *self.size, full.shape[3]))
        return resize_images(full, self.size, out=out)
