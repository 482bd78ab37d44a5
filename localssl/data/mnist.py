"""Reader for the canonical MNIST IDX files (LeCun et al.), raw or gzipped.

The four files are ``{train,t10k}-images-idx3-ubyte`` and
``{train,t10k}-labels-idx1-ubyte``, each optionally ending in ``.gz``.
The IDX header is: two zero bytes, a type code (0x08 = unsigned byte), the
number of dimensions, then one big-endian uint32 per dimension; the data
follow in C order. We check every part of that against the file's actual
size, so that a truncated download or a file of the wrong kind is a
`DatasetError` (a ``ValueError``) that names the file instead of a reshape
error (or, worse, silently short data). The header is checked against the
file *before* the payload is read, and a MNIST file may declare at most
`MNIST_MAX_ITEMS` items, so a tiny (gzipped) file cannot make us allocate
gigabytes.

Used by the theory experiments (METHODS 3: the authors' MNIST patch setting)
and usable by any loader that wants ``(uint8 images (N, 28, 28), int64
labels (N,))``.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from localssl.data.base import DatasetError
from localssl.data.files import SizeLimit, open_regular

__all__ = [
    "IDX_MAX_BYTES",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "MNIST_MAX_ITEMS",
    "MNIST_FILES",
    "find_mnist_file",
    "load_mnist",
    "read_idx",
    "read_mnist_images",
    "read_mnist_labels",
]

#: magic numbers of the two MNIST file kinds: 0x00000803 (ubyte, 3 dims) and
#: 0x00000801 (ubyte, 1 dim).
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

#: split -> (images file stem, labels file stem); ".gz" is optional on disk.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_ALIASES = {"train": "train", "test": "t10k", "t10k": "t10k"}

# IDX type code -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


#: What `read_idx` reads at most unless told otherwise (the payload, decompressed).
IDX_MAX_BYTES = 1 << 30
#: MNIST's training split has 60,000 images (t10k 10,000): the most a MNIST file may declare.
MNIST_MAX_ITEMS = 60_000


def _read(path: Path, max_bytes: int, magic: int | None) -> np.ndarray:
    """Read an IDX file whose payload is at most ``max_bytes``; check its magic number if given.

    The header is read and checked against the file before the payload is:
    a raw file's size must match the dimensions exactly, and a gzipped one
    is decompressed only up to one byte past what the header declares, so
    neither a lying header nor a gzip bomb makes us allocate more than
    ``max_bytes``.
    """
    # Compressed data is at most a little larger than the payload (stored deflate blocks).
    f, file_size = open_regular(path, SizeLimit(max_bytes + max_bytes // 100 + (1 << 16), "this IDX file"))
    gz = path.name.endswith(".gz")
    with f:
        try:
            fh = gzip.GzipFile(fileobj=f, mode="rb") if gz else f
            head = fh.read(4)
            if len(head) < 4:
                raise DatasetError(f"{path}: too short for an IDX header ({len(head)} bytes)")
            if magic is not None and struct.unpack(">I", head)[0] != magic:
                got = struct.unpack(">I", head)[0]
                raise DatasetError(f"{path}: bad magic number {got} (0x{got:08x}), expected {magic} (0x{magic:08x})")
            zero, type_code, ndim = struct.unpack(">HBB", head)
            if zero != 0:
                raise DatasetError(f"{path}: bad IDX magic number 0x{head.hex()} (first two bytes must be 0)")
            if type_code not in _IDX_DTYPES:
                raise DatasetError(f"{path}: bad IDX magic number 0x{head.hex()} (unknown type code {type_code:#x})")
            if ndim == 0:
                raise DatasetError(f"{path}: bad IDX magic number 0x{head.hex()} (zero dimensions)")
            raw_dims = fh.read(4 * ndim)
            header = 4 + 4 * ndim
            if len(raw_dims) < 4 * ndim:
                raise DatasetError(
                    f"{path}: truncated IDX header ({4 + len(raw_dims)} bytes, need {header} for {ndim} dims)"
                )
            dims = struct.unpack(f">{ndim}I", raw_dims)
            dtype = _IDX_DTYPES[type_code]
            expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
            if expected > max_bytes:
                raise DatasetError(
                    f"{path}: header says dims {tuple(dims)} = {expected:,} payload bytes, more than the "
                    f"{max_bytes:,} this file may hold; refusing to read it"
                )
            got = file_size - header if not gz else None  # known before reading, for a raw file
            if got is None or got == expected:
                data = fh.read(expected + 1)
                got = len(data)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DatasetError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: IDX file {what}: header says dims {tuple(dims)} = {expected} payload bytes, "
            f"file has {got}{'' if not gz else ' (or more)' if got > expected else ''}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str], *, max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """Read any IDX file (raw or ``.gz``) into a native-endian numpy array.

    Raises `DatasetError` (a ``ValueError``; message starting with the file
    path) when the magic number is malformed, the type code is unknown, the
    payload size does not match the dimensions in the header (truncated or
    padded file), or the header declares more than ``max_bytes``. Only
    regular files are read (a FIFO or device is refused, not opened).
    """
    return _read(Path(path), max_bytes, None)


def read_mnist_images(
    path: str | os.PathLike[str], *, size: tuple[int, int] = (28, 28), max_items: int = MNIST_MAX_ITEMS
) -> np.ndarray:
    """MNIST images file -> uint8 array ``(N, 28, 28)``; validates magic 2051, the image size and N <= max_items."""
    path = Path(path)
    arr = _read(path, max_items * size[0] * size[1], IMAGES_MAGIC)
    if arr.ndim != 3 or tuple(arr.shape[1:]) != tuple(size):
        raise DatasetError(f"{path}: expected images of shape (N, {size[0]}, {size[1]}), header says {arr.shape}")
    return arr.astype(np.uint8, copy=False)


def read_mnist_labels(
    path: str | os.PathLike[str], *, num_classes: int = 10, max_items: int = MNIST_MAX_ITEMS
) -> np.ndarray:
    """MNIST labels file -> int64 array ``(N,)``; validates magic 2049, labels < num_classes and N <= max_items."""
    path = Path(path)
    arr = _read(path, max_items, LABELS_MAGIC)
    if arr.ndim != 1:
        raise DatasetError(f"{path}: expected a 1-d labels file, header says {arr.shape}")
    if arr.size and int(arr.max()) >= num_classes:
        raise DatasetError(f"{path}: label {int(arr.max())} out of range [0, {num_classes})")
    return arr.astype(np.int64)


def find_mnist_file(root: str | os.PathLike[str], stem: str) -> Path:
    """``root/stem`` or ``root/stem.gz`` (the raw file wins when both exist)."""
    root = Path(root)
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {root}")


def load_mnist(root: str | os.PathLike[str], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load one MNIST split from a folder holding the canonical IDX files.

    ``split`` is ``"train"`` or ``"test"`` (alias ``"t10k"``). Returns
    ``(images uint8 (N, 28, 28), labels int64 (N,))``; the two files must
    hold the same number of samples.
    """
    try:
        key = _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown MNIST split {split!r}; valid: train, test (t10k)") from None
    img_stem, lab_stem = MNIST_FILES[key]
    img_path = find_mnist_file(root, img_stem)
    lab_path = find_mnist_file(root, lab_stem)
    images = read_mnist_images(img_path)
    labels = read_mnist_labels(lab_path)
    if len(images) != len(labels):
        raise DatasetError(f"{img_path}: {len(images)} images but {lab_path} has {len(labels)} labels")
    return images, labels
