"""Folders of image files (``<class>/<image>``, optionally under ``<split>/``), plain or archived.

Layouts understood, in a folder or in a ``.tar``/``.tar.gz``/``.tgz``/``.zip``::

    root/<class>/<image>              split "all"
    root/<split>/<class>/<image>      splits = the top folder names
    root/<wrapper>/...                one top-level folder wrapping either of the above
                                      (e.g. ``cifar10/{train,test}/<class>/NNNN.jpg``)

Class indices come from the sorted union of class folders over *all* splits,
so ``train`` and ``test`` agree on label numbering even if a split lacks a
class. Archives are read member by member (tar in one streaming pass per
decode, zip by random access): nothing is extracted.

Hostile files: an image (file or member) is refused from its header when it
declares more than `localssl.data.images.MAX_IMAGE_PIXELS` pixels or more
bytes than `image_file_limit`; in a plain folder, entries that are not
regular files (FIFOs, devices, sockets, dangling links, links to folders)
are skipped with a warning naming them (`DirTree`); an archive that holds
one member twice is refused (`localssl.data.archive`).

Every image of a split must have the same size (training stacks them into one
array); the first odd file is named in the error. Pass ``resize=S`` (or
``(H, W)``; ``--resize S`` on the command line) to resize everything with
bicubic filtering instead; that choice is part of the cache key.

Channels: ``imagefolder`` keeps a split whose files are all grayscale (PIL
modes L, 1, I, ...: `GRAY_MODES`) single-channel, ``(N, H, W, 1)``; one
file in any other mode makes the whole split RGB (grayscale files tripled).
Finding out reads every file's header once before decoding (stopping at the
first colour file). The named data sets read through this module (CIFAR-10
JPEGs, Tiny ImageNet) are always RGB. ``imagefolder`` has no published statistics:
it is normalised with its own per-channel mean/std, computed once when the
cache entry is written (`ImageArray.channel_stats`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from localssl.data.archive import ZipReader, is_tar_name, is_zip_name, iter_tar, iter_tar_files, read_exact
from localssl.data.base import (
    DATASETS,
    Allocator,
    DatasetError,
    DatasetLoader,
    DatasetNotFoundError,
    DatasetSpec,
    Plan,
    Source,
    parse_size,
    require_root,
)
from localssl.data.files import SizeLimit, list_regular_files, read_regular
from localssl.data.images import GRAY_MODES, decode_image, image_file_limit, image_mode

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# ImageNet statistics: what imagefolder runs were normalised with before it
# computed its own (kept for reference; no loader uses them now).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def is_image_name(name: str) -> bool:
    parts = name.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False  # editor/OS droppings such as ._foo.jpg from macOS archives
    return name.lower().endswith(IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------- trees


class FileTree:
    """Relative file names plus a way to read a set of them; one per folder or archive."""

    path: Path
    #: every regular file, as normalised ``a/b/c`` names
    names: list[str]

    def where(self, name: str) -> str:
        """How to point a human at one file in error messages."""
        raise NotImplementedError

    def read_many(self, wanted: Iterable[str], limit: SizeLimit) -> Iterator[tuple[str, bytes]]:
        """Yield ``(name, bytes)`` for every wanted name, in whatever order is cheapest.

        A file over ``limit`` is an error naming it, raised before it is read.
        """
        raise NotImplementedError


class DirTree(FileTree):
    """A plain folder. Only regular files are listed (symlinks to regular files count, wherever they point).

    Anything else (FIFOs, sockets, devices, dangling links, links to
    folders) is skipped, with one warning that names the entries: a FIFO
    would block the read forever and a link to ``/dev/zero`` never ends, but
    neither should make a folder of good images unusable. Files are read
    with `read_regular`, which checks again on the open file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.names, skipped = list_regular_files(path)
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            log.warning("%s: skipping %d entries that are not regular files: %s", path, len(skipped), shown)

    def where(self, name: str) -> str:
        return str(self.path / name)

    def read_many(self, wanted: Iterable[str], limit: SizeLimit) -> Iterator[tuple[str, bytes]]:
        for name in wanted:
            yield name, read_regular(self.path / name, limit)


class ZipTree(FileTree):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip = ZipReader(path)
        self.names = sorted(self._zip.names)

    def where(self, name: str) -> str:
        return f"{self.path} (member {name!r})"

    def read_many(self, wanted: Iterable[str], limit: SizeLimit) -> Iterator[tuple[str, bytes]]:
        for name in wanted:
            yield name, self._zip.read(name, limit)


class TarTree(FileTree):
    """A tar read in streaming passes; small archives are kept in memory after the listing pass.

    Listing a ``.tar.gz`` means decompressing all of it, so the listing pass
    also keeps the images' bytes while they fit in ``keep_bytes``: a
    ``max_items`` subset (or a whole CIFAR-sized archive) is then decoded
    without a second pass. Bigger archives fall back to one more pass. An
    image member over `image_file_limit` is refused from its header.
    """

    def __init__(self, path: Path, keep_bytes: int = 512 << 20) -> None:
        self.path = path
        names: list[str] = []
        kept: dict[str, bytes] | None = {}
        total = 0
        limit = image_file_limit()
        for name, size, f in iter_tar_files(path):
            names.append(name)
            if is_image_name(name):
                limit.check(self.where(name), size)
                total += size
                if kept is not None and total > keep_bytes:
                    kept = None  # too big: read again in read_many
                elif kept is not None:
                    kept[name] = read_exact(f, size, path, name, limit)
        self.names = sorted(names)
        self._kept = kept

    def where(self, name: str) -> str:
        return f"{self.path} (member {name!r})"

    def read_many(self, wanted: Iterable[str], limit: SizeLimit) -> Iterator[tuple[str, bytes]]:
        wanted = set(wanted)
        if self._kept is not None and wanted <= self._kept.keys():
            for name in sorted(wanted):
                limit.check(self.where(name), len(self._kept[name]))
                yield name, self._kept[name]
            return
        seen = 0
        for name, data in iter_tar(self.path, wanted.__contains__, limit):
            seen += 1
            yield name, data
        if seen != len(wanted):
            raise DatasetError(f"{self.path}: {len(wanted) - seen} listed members vanished on the second pass")


def open_tree(path: Path) -> FileTree:
    """A folder, or a tar/zip archive by its file name."""
    if path.is_dir():
        return DirTree(path)
    if path.is_file() and is_zip_name(path):
        return ZipTree(path)
    if path.is_file() and is_tar_name(path):
        return TarTree(path)
    if path.exists():
        raise DatasetError(f"{path}: not a folder, .zip, .tar, .tar.gz or .tgz")
    raise DatasetNotFoundError(f"{path}: no such folder or archive")


# ----------------------------------------------------------------------------- layout


def resolve_layout(names: Sequence[str], split: str, where: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Pick the images of ``split``: returns ``[(name, class_name)]`` and the sorted class list."""
    names = [n for n in names if is_image_name(n)]
    if not names:
        raise DatasetNotFoundError(f"{where}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    parts = [n.split("/") for n in names]
    # Strip wrapper folders: one shared top folder above <split>/<class>/<image>,
    # or above <class>/<image> unless that folder is the split asked for.
    while len({p[0] for p in parts}) == 1:
        depths = {len(p) for p in parts}
        if min(depths) > 3 or (depths == {3} and parts[0][0] != split):
            parts = [p[1:] for p in parts]
        else:
            break
    depths = sorted({len(p) for p in parts})
    if len(depths) > 1:
        a = next(n for n, p in zip(names, parts) if len(p) == depths[0])
        b = next(n for n, p in zip(names, parts) if len(p) == depths[-1])
        raise DatasetError(
            f"{where}: images at different folder depths, e.g. {a!r} and {b!r}; "
            "expected <class>/<image> or <split>/<class>/<image>"
        )
    depth = depths[0]
    if depth == 3:
        splits = sorted({p[0] for p in parts})
        if split not in splits:
            raise DatasetError(f"{where}: unknown split {split!r}; splits found: {', '.join(splits)}")
        classes = sorted({p[1] for p in parts})
        items = [(n, p[1]) for n, p in zip(names, parts) if p[0] == split]
    elif depth == 2:
        if split != "all":
            raise DatasetError(
                f"{where}: images are in <class>/<image> folders without split folders; "
                f"the only split is 'all', not {split!r}"
            )
        classes = sorted({p[0] for p in parts})
        items = [(n, p[0]) for n, p in zip(names, parts)]
    else:
        raise DatasetError(
            f"{where}: images must sit in <class>/ folders (optionally under <split>/), found {names[0]!r}"
        )
    return sorted(items), classes


class TreeSource(Source):
    """The images of one split of a `FileTree`, decoded on demand."""

    def __init__(
        self,
        tree: FileTree,
        names: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        *,
        resize: tuple[int, int] | None = None,
        expect_size: tuple[int, int] | None = None,
        channels: int | None = 3,
    ) -> None:
        self.tree = tree
        self.names = list(names)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.resize = resize
        self.expect_size = expect_size
        self.channels = channels  # 3: always RGB; None: 1 if every file is grayscale (see the module doc)

    def _channels(self, wanted: Iterable[str]) -> int:
        if self.channels is not None:
            return self.channels
        for name, data in self.tree.read_many(wanted, image_file_limit()):  # stops at the first colour file
            if image_mode(data, self.tree.where(name)) not in GRAY_MODES:
                return 3
        return 1

    def decode(self, indices: np.ndarray, alloc: Allocator) -> np.ndarray:
        position = {self.names[i]: k for k, i in enumerate(indices)}
        out: np.ndarray | None = None
        first = ""
        filled = 0
        channels = self._channels(position)
        for name, data in self.tree.read_many(position, image_file_limit()):
            img = decode_image(data, self.tree.where(name), self.resize, channels)
            if out is None:
                first = name
                h, w = img.shape[:2]
                if self.expect_size is not None and (h, w) != self.expect_size:
                    eh, ew = self.expect_size
                    raise DatasetError(f"{self.tree.where(name)}: image is {h}x{w}, expected {eh}x{ew}")
                out = alloc((len(position), h, w, channels))
            elif img.shape != out.shape[1:]:
                raise DatasetError(
                    f"{self.tree.where(name)}: image is {img.shape[0]}x{img.shape[1]}, but "
                    f"{first} is {out.shape[1]}x{out.shape[2]}; all images must have one size "
                    "(pass --resize S, or resize=S to load_dataset, to resize them all)"
                )
            out[position[name]] = img
            filled += 1
        if out is None or filled != len(position):
            raise DatasetError(f"{self.tree.path}: expected {len(position)} images, read {filled}")
        return out


def tree_plan(
    tree_path: Path,
    split: str,
    *,
    resize: tuple[int, int] | None = None,
    expect_classes: Sequence[str] | None = None,
    expect_size: tuple[int, int] | None = None,
    dataset: str = "imagefolder",
    channels: int | None = 3,
) -> Plan:
    """A `Plan` for one split of an image-folder tree in a folder or archive.

    A folder is listed now (its files key the cache); an archive is keyed by
    its own stat and listed only if the cache misses. ``channels`` as in
    `TreeSource` (3: always RGB; None: grayscale data stay single-channel).
    """
    is_dir = tree_path.is_dir()
    dir_tree = DirTree(tree_path) if is_dir else None

    def build() -> Source:
        tree = dir_tree if dir_tree is not None else open_tree(tree_path)
        items, classes = resolve_layout(tree.names, split, str(tree_path))
        if expect_classes is not None and classes != list(expect_classes):
            raise DatasetError(
                f"{tree_path}: class folders {classes} are not the {dataset} classes {list(expect_classes)}"
            )
        index = {c: i for i, c in enumerate(classes)}
        return TreeSource(
            tree,
            [n for n, _ in items],
            [index[c] for _, c in items],
            classes,
            resize=resize,
            expect_size=expect_size,
            channels=channels,
        )

    if dir_tree is not None:
        files = [tree_path / n for n in dir_tree.names if is_image_name(n)]
        if not files:
            raise DatasetNotFoundError(f"{tree_path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    else:
        files = [tree_path]
    return Plan(files=files, where=str(tree_path), build=build)


class ImageFolderLoader(DatasetLoader):
    """``imagefolder``: your own images; the split names come from the folders (or ``all``).

    Size, channels, classes and the normalisation (mean/std) come from the
    data: `DatasetSpec.resolved` on a loaded split.
    """

    spec = DatasetSpec(
        name="imagefolder",
        image_size=None,
        channels=3,  # until resolved: grayscale data resolve to 1
        mean=None,  # the data's own, computed once into the cache
        std=None,
        num_classes=None,
        pretrain_split="train",
        probe_train_split="train",
        test_split="test",
        crop_scale=(0.08, 1.0),
        splits=(),  # from the data
    )
    options = ("resize",)
    # 1: grayscale folders decode to one channel (they were tripled to RGB before).
    decoder_version = 1

    def plan(self, root: Path | None, split: str, *, download: bool, resize: Any = None) -> Plan:
        if download:
            raise DatasetError("imagefolder: there is nothing to download; point root at your images")
        root = require_root(root, "imagefolder")
        if not root.exists():
            raise DatasetNotFoundError(
                f"imagefolder: {root} does not exist; expected a folder or .tar/.tar.gz/.tgz/.zip archive "
                "with <class>/<image> or <split>/<class>/<image> inside"
            )
        if root.is_file() and not (is_tar_name(root) or is_zip_name(root)):
            raise DatasetError(f"{root}: not a folder, .zip, .tar, .tar.gz or .tgz")
        return tree_plan(root, split, resize=parse_size(resize), channels=None)


DATASETS.register("imagefolder")(ImageFolderLoader())
