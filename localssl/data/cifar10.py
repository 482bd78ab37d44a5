"""CIFAR-10: the official python archive, or the same images as a JPEG image-folder tree.

Official format (https://www.cs.toronto.edu/~kriz/cifar.html):
``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, each a
Python 2 pickle of a dict with bytes keys: ``b'data'`` is a 10000x3072 uint8
array, channel-major (1024 red, then green, then blue values, rows first), and
``b'labels'`` a list of ints 0..9. ``batches.meta`` holds ``b'label_names'``.

Pickles can run arbitrary code on load, and these come from the internet, so
they go through `localssl.data.safepickle`, which admits only what numpy and
Python write for plain arrays and scalars (official Python 2 batches and
Python 3 re-saves at protocols 2-5 alike) and refuses everything else,
naming the file and the global, before it can be called.

What a file can make us allocate is bounded by the format: a batch member or
file over `BATCH_LIMIT` is refused before it is read, and a batch must hold
1..`MAX_BATCH_IMAGES` images of exactly 3072 bytes with one label each.

Where to look, in order, under ``root`` (``root`` may also be any of these itself):
``cifar-10-batches-py/``, ``cifar-10-python.tar.gz``, ``cifar10-jpeg.tar.gz``,
an image-folder tree ``cifar10/{train,test}/<class>/`` (or ``root/{train,test}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from localssl.data.archive import is_tar_name, is_zip_name, iter_tar, peek_tar
from localssl.data.base import (
    DATASETS,
    ArraySource,
    DatasetError,
    DatasetLoader,
    DatasetNotFoundError,
    DatasetSpec,
    Plan,
    Source,
    require_root,
)
from localssl.data.download import CIFAR10_PYTHON, fetch, not_found_message
from localssl.data.files import SizeLimit, read_regular
from localssl.data.imagefolder import tree_plan
from localssl.data.safepickle import restricted_loads

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
BATCH_DIR = "cifar-10-batches-py"
SPLIT_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META_FILE = "batches.meta"
JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
FORMATS = (
    f"the official python archive ({CIFAR10_PYTHON.filename} or an extracted {BATCH_DIR}/ with "
    f"data_batch_1..5, test_batch, {META_FILE}), or a JPEG image-folder tree "
    f"cifar10/{{train,test}}/<class>/*.jpg (folder or {JPEG_ARCHIVE})"
)


#: The official batches hold 10,000 images each; a file claiming more is not a CIFAR-10 batch.
MAX_BATCH_IMAGES = 10_000
IMAGE_BYTES = 3 * 32 * 32
#: The most bytes a batch (or batches.meta) file may have. A Python 3 re-save at protocol 2
#: stores the pixel bytes as latin-1 text in UTF-8, up to 2 bytes per pixel byte; labels and
#: file names of 10,000 images add ~0.3 MB (the official data_batch_1 is 31,035,704 bytes).
BATCH_LIMIT = SizeLimit(2 * MAX_BATCH_IMAGES * IMAGE_BYTES + (4 << 20), "a CIFAR-10 batch of 10,000 images")


def _str_keys(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a dict, the pickle holds a {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One official batch -> uint8 ``(N, 32, 32, 3)`` images and int64 labels, 1 <= N <= `MAX_BATCH_IMAGES`."""
    d = _str_keys(restricted_loads(data, where), where)
    missing = [k for k in ("data", "labels") if k not in d]
    if missing:
        raise DatasetError(f"{where}: not a CIFAR-10 batch, missing key(s) {', '.join(missing)}")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != IMAGE_BYTES:
        raise DatasetError(
            f"{where}: 'data' must be a uint8 N x {IMAGE_BYTES} array, got "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    if not 1 <= x.shape[0] <= MAX_BATCH_IMAGES:
        raise DatasetError(f"{where}: 'data' holds {x.shape[0]} images; a CIFAR-10 batch holds 1..{MAX_BATCH_IMAGES}")
    y = _labels(d["labels"], where)
    if y.shape != (x.shape[0],):
        raise DatasetError(f"{where}: {x.shape[0]} images but {y.size} labels")
    if y.min() < 0 or y.max() > 9:
        raise DatasetError(f"{where}: labels outside 0..9 (min {y.min()}, max {y.max()})")
    # Channel-major rows: (N, C, H, W) -> (N, H, W, C).
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def _labels(obj: Any, where: str) -> np.ndarray:
    """'labels': a list (or 1-d array) of integers, Python or numpy; anything else names the key."""
    items = obj.tolist() if isinstance(obj, np.ndarray) and obj.ndim == 1 else obj
    if not isinstance(items, list) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                              for v in items):  # fmt: skip
        raise DatasetError(f"{where}: 'labels' must be a list of integers, got {type(obj).__name__}")
    try:
        return np.array(items, dtype=np.int64)
    except OverflowError as e:
        raise DatasetError(f"{where}: 'labels' holds an integer out of range ({e})") from e


def parse_meta(data: bytes, where: str) -> list[str]:
    d = _str_keys(restricted_loads(data, where), where)
    names = d.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DatasetError(f"{where}: expected 'label_names' with 10 entries")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


class PythonBatches:
    """Reads the official batches from a folder or a tar archive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_tar = path.is_file()

    def read(self, files: list[str]) -> dict[str, bytes]:
        if not self.is_tar:
            out = {}
            for f in files:
                out[f] = read_regular(self.path / f, BATCH_LIMIT)
            return out
        wanted = set(files)

        def want(name: str) -> bool:
            parts = name.split("/")
            return len(parts) >= 2 and parts[-2] == BATCH_DIR and parts[-1] in wanted

        out = {}
        for name, data in iter_tar(self.path, want, BATCH_LIMIT):
            out[name.rsplit("/", 1)[-1]] = data
        missing = [f for f in files if f not in out]
        if missing:
            raise DatasetError(f"{self.path}: missing member(s) {', '.join(f'{BATCH_DIR}/{m}' for m in missing)}")
        return out

    def where(self, f: str) -> str:
        return f"{self.path} (member {BATCH_DIR}/{f})" if self.is_tar else str(self.path / f)


def python_plan(path: Path, split: str) -> Plan:
    batches = PythonBatches(path)
    files = SPLIT_FILES[split] + [META_FILE]
    if not batches.is_tar:
        missing = [f for f in files if not (path / f).is_file()]  # FIFOs, devices: not files
        if missing:
            raise DatasetError(
                f"{path}: incomplete CIFAR-10 folder, missing (or not regular files) {', '.join(missing)}"
            )

    def build() -> Source:
        raw = batches.read(files)
        classes = parse_meta(raw[META_FILE], batches.where(META_FILE))
        parts = [parse_batch(raw[f], batches.where(f)) for f in SPLIT_FILES[split]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return ArraySource(images, labels, classes)

    plan_files = [path] if batches.is_tar else [path / f for f in files]
    return Plan(files=plan_files, where=str(path), build=build)


def _is_python_tar(path: Path) -> bool:
    if path.name == CIFAR10_PYTHON.filename:
        return True
    return any(BATCH_DIR in n.split("/") for n in peek_tar(path, 4))


def locate(root: Path) -> tuple[str, Path] | list[Path]:
    """``("python", path)`` or ``("jpeg", path)``, or the list of places looked at."""
    if root.is_file():
        if is_tar_name(root) and _is_python_tar(root):
            return "python", root
        if is_tar_name(root) or is_zip_name(root):
            return "jpeg", root
        return [root]
    if (root / "data_batch_1").is_file() or (root / "test_batch").is_file():
        return "python", root
    candidates: list[tuple[str, Path]] = [
        ("python", root / BATCH_DIR),
        ("python", root / CIFAR10_PYTHON.filename),
        ("jpeg", root / JPEG_ARCHIVE),
        ("jpeg", root / "cifar10"),
    ]
    for kind, p in candidates:
        if p.exists():  # an incomplete folder is reported by the plan, not skipped
            return kind, p
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "jpeg", root
    return [p for _, p in candidates] + [root / "{train,test}"]


class Cifar10Loader(DatasetLoader):
    spec = DatasetSpec(
        name="cifar10",
        image_size=32,
        channels=3,
        # Per-channel mean and std over all training pixels (the std is the
        # pixel std, not the 0.2023/0.1994/0.2010 often copied around).
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        num_classes=10,
        pretrain_split="train",
        probe_train_split="train",
        test_split="test",
        crop_scale=(0.25, 1.0),  # METHODS 2.4: 0.25-1 on CIFAR
        splits=("train", "test"),
    )

    def plan(self, root: Path | None, split: str, *, download: bool) -> Plan:
        root = require_root(root, "cifar10")
        found = locate(root)
        if isinstance(found, list):
            if not download:
                raise DatasetNotFoundError(not_found_message("cifar10", found, FORMATS, CIFAR10_PYTHON, root))
            if root.is_file():
                raise DatasetError(f"{root}: not a CIFAR-10 archive; cannot download over a file")
            found = ("python", fetch(CIFAR10_PYTHON, root, looked_at=found, formats=FORMATS, name="cifar10"))
        kind, path = found
        if kind == "python":
            return python_plan(path, split)
        # The JPEG tree is an ImageFolder whose class folders must be CIFAR-10's.
        return tree_plan(path, split, expect_classes=CIFAR10_CLASSES, expect_size=(32, 32), dataset="cifar10")


DATASETS.register("cifar10")(Cifar10Loader())
