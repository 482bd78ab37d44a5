"""STL-10: the official binary release (https://cs.stanford.edu/~acoates/stl10/).

``stl10_binary/`` holds ``{train,test}_X.bin``, ``{train,test}_y.bin``,
``unlabeled_X.bin`` and ``class_names.txt``. An ``*_X.bin`` is raw uint8, one
image after the other, each 3 x 96 x 96 *column-major*: for image n, byte
``c*9216 + w*96 + h`` is channel c at row h, column w (MATLAB heritage). So
``reshape(N, 3, 96, 96)`` gives ``(N, C, W, H)`` and ``transpose(0, 3, 2, 1)``
gives ``(N, H, W, C)``. ``*_y.bin`` holds one uint8 label 1..10 per image,
stored here as 0..9; the 100,000 ``unlabeled`` images get label -1.

Splits: ``train`` (5,000), ``test`` (8,000), ``unlabeled`` (100,000) and
``train+unlabeled`` (the usual SSL pre-training set). The tarball can be read
directly (two streaming passes over 2.6 GB on the first load of a split);
``download=True`` extracts it once, which makes later first loads faster.

Sizes are those of the official release (`MAX_ROWS`): a file or tar member
declaring more images than its part has is refused before anything is
allocated for it, and label/name files are read with matching limits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from localssl.data.archive import is_tar_name, iter_tar_files, read_exact
from localssl.data.base import (
    DATASETS,
    Allocator,
    DatasetError,
    DatasetLoader,
    DatasetNotFoundError,
    DatasetSpec,
    Plan,
    Source,
    require_root,
)
from localssl.data.download import STL10_BINARY, fetch, not_found_message
from localssl.data.extract import safe_extract
from localssl.data.files import SizeLimit, open_regular, read_regular, regular_size

SIZE = 96
IMAGE_BYTES = 3 * SIZE * SIZE  # 27648
BIN_DIR = "stl10_binary"
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
#: split -> the parts it concatenates, each (X file, y file or None)
PARTS = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
SPLITS = {
    "train": ["train"],
    "test": ["test"],
    "unlabeled": ["unlabeled"],
    "train+unlabeled": ["train", "unlabeled"],
}
FORMATS = (
    f"the official binary release: {STL10_BINARY.filename} or an extracted {BIN_DIR}/ with "
    "train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt"
)
_CHUNK_ROWS = 1024  # 27 MB of pixels per read
_CHUNK = SizeLimit(_CHUNK_ROWS * IMAGE_BYTES, "one read of STL-10 images")
#: Images in each part of the official release. A file may hold fewer (a
#: subset), never more: the sizes come from the tar header or the file
#: system, and a tiny .tar.gz can declare a member of any size.
MAX_ROWS = {"train": 5_000, "test": 8_000, "unlabeled": 100_000}
#: class_names.txt: ten short names, one a line.
NAMES_LIMIT = SizeLimit(64 << 10, "an STL-10 class_names.txt")
#: Everything the official tarball extracts to: the three X files, the two y files, class_names.txt.
EXTRACTED_BYTES = sum(MAX_ROWS.values()) * IMAGE_BYTES + MAX_ROWS["train"] + MAX_ROWS["test"] + (1 << 20)


def _part(name: str) -> str:
    """``train_X.bin`` -> ``train``."""
    return name.split("_", 1)[0]


def _labels_limit(name: str) -> SizeLimit:
    n = MAX_ROWS[_part(name)]
    return SizeLimit(n, f"an STL-10 {name} ({n:,} labels)")


def rows_in(size: int, where: str, max_rows: int) -> int:
    """Number of images in an ``*_X.bin`` of ``size`` bytes; error unless a whole number up to ``max_rows``."""
    if size % IMAGE_BYTES:
        raise DatasetError(
            f"{where}: size {size} bytes is not a multiple of {IMAGE_BYTES} (3x96x96); "
            "the file is truncated or not an STL-10 image file"
        )
    if size // IMAGE_BYTES > max_rows:
        raise DatasetError(
            f"{where}: {size:,} bytes = {size // IMAGE_BYTES:,} images; this STL-10 file holds at most {max_rows:,}"
        )
    return size // IMAGE_BYTES


def parse_labels(data: bytes, n_images: int, where: str) -> np.ndarray:
    y = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    if y.size != n_images:
        raise DatasetError(f"{where}: {y.size} labels for {n_images} images")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DatasetError(f"{where}: labels must be 1..10, found {y.min()}..{y.max()}")
    return y - 1


def parse_class_names(data: bytes, where: str) -> list[str]:
    names = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    if len(names) != 10:
        raise DatasetError(f"{where}: expected 10 class names, found {len(names)}")
    return names


def to_nhwc(raw: bytes | np.ndarray) -> np.ndarray:
    """Column-major STL-10 records -> ``(N, 96, 96, 3)`` (a view, no copy)."""
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, SIZE, SIZE).transpose(0, 3, 2, 1)


def _copy_rows(
    f: IO[bytes], n_rows: int, wanted: np.ndarray, out: np.ndarray, out_pos: np.ndarray, archive: str, name: str
) -> None:
    """Stream ``n_rows`` records from ``f``, writing records ``wanted`` (sorted) to ``out[out_pos]``."""
    for a in range(0, n_rows, _CHUNK_ROWS):
        b = min(a + _CHUNK_ROWS, n_rows)
        raw = read_exact(f, (b - a) * IMAGE_BYTES, archive, name, _CHUNK)
        lo, hi = np.searchsorted(wanted, [a, b])
        if hi > lo:
            out[out_pos[lo:hi]] = to_nhwc(raw)[wanted[lo:hi] - a]


class STL10Source(Source):
    """One split of STL-10 from a folder or the tarball; pixels are streamed on decode."""

    def __init__(self, path: Path, split: str) -> None:
        self.path = path
        self.is_tar = path.is_file()
        parts = SPLITS[split]
        x_names = [PARTS[p][0] for p in parts]
        small = self._read_small([PARTS[p][1] for p in parts if PARTS[p][1]] + ["class_names.txt"], x_names)
        self.classes = (
            parse_class_names(small["class_names.txt"], self.where("class_names.txt"))
            if "class_names.txt" in small
            else list(STL10_CLASSES)
        )
        self.parts: list[tuple[str, int]] = []  # (X file, rows)
        labels = []
        for p in parts:
            x_name, y_name = PARTS[p]
            if x_name not in self._sizes:
                raise DatasetError(f"{self.where(x_name)}: missing")
            n = rows_in(self._sizes[x_name], self.where(x_name), MAX_ROWS[p])
            self.parts.append((x_name, n))
            if y_name is None:
                labels.append(np.full(n, -1, dtype=np.int64))
            elif y_name not in small:
                raise DatasetError(f"{self.where(y_name)}: missing")
            else:
                labels.append(parse_labels(small[y_name], n, self.where(y_name)))
        self.labels = np.concatenate(labels)

    def where(self, name: str) -> str:
        return f"{self.path} (member {BIN_DIR}/{name})" if self.is_tar else str(self.path / name)

    @staticmethod
    def _in_bin_dir(name: str) -> str | None:
        parts = name.split("/")
        return parts[-1] if len(parts) == 1 or parts[-2] == BIN_DIR else None

    def _read_small(self, small_names: list[str], x_names: list[str]) -> dict[str, bytes]:
        """Read the label/name files; record the sizes of the X files (no pixels read)."""
        out: dict[str, bytes] = {}
        self._sizes: dict[str, int] = {}
        if not self.is_tar:
            for n in small_names:
                if (self.path / n).is_file():  # FIFOs and devices are not files: "missing"
                    out[n] = read_regular(self.path / n, self._small_limit(n))
            for n in x_names:
                if (self.path / n).is_file():
                    self._sizes[n] = regular_size(self.path / n)
            return out
        wanted = set(small_names) | set(x_names)
        for name, size, f in iter_tar_files(self.path, lambda m: self._in_bin_dir(m) in wanted):
            base = name.rsplit("/", 1)[-1]
            if base in x_names:
                # Skipped, not read: the tar header has the size. Checked now, before the stream
                # is skipped through whatever the header declares.
                rows_in(size, self.where(base), MAX_ROWS[_part(base)])
                self._sizes[base] = size
            else:
                out[base] = read_exact(f, size, self.path, name, self._small_limit(base))
        return out

    @staticmethod
    def _small_limit(name: str) -> SizeLimit:
        return NAMES_LIMIT if name == "class_names.txt" else _labels_limit(name)

    def _x_streams(self) -> Iterator[tuple[str, IO[bytes]]]:
        """``(X file name, open stream)`` for every X file of the split, in the cheapest order."""
        names = {x for x, _ in self.parts}
        if not self.is_tar:
            for x in sorted(names):
                n = MAX_ROWS[_part(x)]
                f, _ = open_regular(self.path / x, SizeLimit(n * IMAGE_BYTES, f"an STL-10 {x} of {n:,} images"))
                with f:
                    yield x, f
            return
        for name, _size, f in iter_tar_files(self.path, lambda m: self._in_bin_dir(m) in names):
            yield name.rsplit("/", 1)[-1], f

    def decode(self, indices: np.ndarray, alloc: Allocator) -> np.ndarray:
        out = alloc((len(indices), SIZE, SIZE, 3))
        offsets = {}
        start = 0
        for x, n in self.parts:
            offsets[x] = (start, n)
            start += n
        positions = np.arange(len(indices))
        seen = set()
        for x, f in self._x_streams():
            seen.add(x)
            a, n = offsets[x]
            lo, hi = np.searchsorted(indices, [a, a + n])
            archive, member = (str(self.path), f"{BIN_DIR}/{x}") if self.is_tar else (str(self.path / x), x)
            _copy_rows(f, n, indices[lo:hi] - a, out, positions[lo:hi], archive, member)
        missing = sorted(set(offsets) - seen)
        if missing:
            raise DatasetError(f"{self.path}: {', '.join(missing)} vanished between listing and reading")
        return out


def locate(root: Path) -> Path | list[Path]:
    """The ``stl10_binary`` folder or tarball, or the list of places looked at."""
    if root.is_file():
        return root if is_tar_name(root) else [root]
    if any((root / n).is_file() for n in ("train_X.bin", "test_X.bin", "unlabeled_X.bin")):
        return root
    candidates = [root / BIN_DIR, root / STL10_BINARY.filename]
    for p in candidates:
        if p.exists():
            return p
    return candidates


class STL10Loader(DatasetLoader):
    spec = DatasetSpec(
        name="stl10",
        image_size=96,
        channels=3,
        # Per-channel pixel mean/std of the labelled train split.
        mean=(0.4467, 0.4398, 0.4066),
        std=(0.2603, 0.2566, 0.2713),
        num_classes=10,
        pretrain_split="unlabeled",  # METHODS 2.4: STL-10 *unlabeled* (100k)
        probe_train_split="train",
        test_split="test",
        crop_scale=(0.08, 1.0),
        splits=tuple(SPLITS),
    )

    def plan(self, root: Path | None, split: str, *, download: bool) -> Plan:
        root = require_root(root, "stl10")
        found = locate(root)
        if isinstance(found, list):
            if not download:
                raise DatasetNotFoundError(not_found_message("stl10", found, FORMATS, STL10_BINARY, root))
            tarball = fetch(STL10_BINARY, root, looked_at=found, formats=FORMATS, name="stl10")
            # Extract once: the .bin files are then read without decompressing 2.6 GB per split.
            safe_extract(tarball, root, max_bytes=EXTRACTED_BYTES)
            found = root / BIN_DIR
        path = found
        if path.is_dir():
            names = [PARTS[p][0] for p in SPLITS[split]] + [PARTS[p][1] for p in SPLITS[split] if PARTS[p][1]]
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise DatasetError(f"{path}: incomplete STL-10 folder, missing {', '.join(missing)}")
            files = [path / n for n in names]
            if (path / "class_names.txt").is_file():
                files.append(path / "class_names.txt")
        else:
            files = [path]
        return Plan(files=files, where=str(path), build=lambda: STL10Source(path, split))


DATASETS.register("stl10")(STL10Loader())
