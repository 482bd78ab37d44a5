"""Reader for the canonical MNIST IDX files (LeCun et al.), raw or gzipped.

The four files are ``{train,t10k}-images-idx3-ubyte`` and
``{train,t10k}-labels-idx1-ubyte``, each optionally ending in ``.gz``.
The IDX header is: two zero bytes, a type code (0x08 = unsigned byte), the
number of dimensions, then one big-endian uint32 per dimension; the data
follow in C order. We check every part of that against the file's actual
size, so that a truncated download or a file of the wrong kind is a
``ValueError`` that names the file instead of a reshape error (or, worse,
silently short data).

Used by the theory experiments (METHODS 3: the authors' MNIST patch setting)
and usable by any loader that wants ``(uint8 images (N, 28, 28), int64
labels (N,))``.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
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


def _read_bytes(path: Path) -> bytes:
    """The file's (decompressed) bytes; a corrupt gzip stream is a ValueError naming the file."""
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    return path.read_bytes()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read any IDX file (raw or ``.gz``) into a native-endian numpy array.

    Raises ``ValueError`` (message starting with the file path) when the
    magic number is malformed, the type code is unknown, or the payload size
    does not match the dimensions in the header (truncated or padded file).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (first two bytes must be 0)")
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (unknown type code {type_code:#x})")
    if ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (zero dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header} for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {what}: header says dims {tuple(dims)} = {expected} payload bytes, "
            f"file has {got}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _check_magic(path: Path, expected: int) -> None:
    # The magic number is checked before decoding the payload, so a labels
    # file passed as images says so instead of failing on the dimensions.
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(4)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    else:
        with open(path, "rb") as fh:
            head = fh.read(4)
    if len(head) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(head)} bytes)")
    magic = struct.unpack(">I", head)[0]
    if magic != expected:
        raise ValueError(f"{path}: bad magic number {magic} (0x{magic:08x}), expected {expected} (0x{expected:08x})")


def read_mnist_images(path: str | os.PathLike[str], *, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """MNIST images file -> uint8 array ``(N, 28, 28)``; validates magic 2051 and the image size."""
    path = Path(path)
    _check_magic(path, IMAGES_MAGIC)
    arr = read_idx(path)
    if arr.ndim != 3 or tuple(arr.shape[1:]) != tuple(size):
        raise ValueError(f"{path}: expected images of shape (N, {size[0]}, {size[1]}), header says {arr.shape}")
    return arr.astype(np.uint8, copy=False)


def read_mnist_labels(path: str | os.PathLike[str], *, num_classes: int = 10) -> np.ndarray:
    """MNIST labels file -> int64 array ``(N,)``; validates magic 2049 and that labels are < num_classes."""
    path = Path(path)
    _check_magic(path, LABELS_MAGIC)
    arr = read_idx(path)
    if arr.ndim != 1:
        raise ValueError(f"{path}: expected a 1-d labels file, header says {arr.shape}")
    if arr.size and int(arr.max()) >= num_classes:
        raise ValueError(f"{path}: label {int(arr.max())} out of range [0, {num_classes})")
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
        raise ValueError(f"{img_path}: {len(images)} images but {lab_path} has {len(labels)} labels")
    return images, labels
