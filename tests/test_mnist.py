"""Tests of the MNIST IDX reader (localssl.data.mnist)."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from localssl.data.mnist import load_mnist, read_idx, read_mnist_images, read_mnist_labels

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = Path(os.environ.get("LOCALSSL_MNIST_DIR", SHARED / "mnist"))


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """Encode a uint8 array as IDX (the header computed from the array unless ``magic`` is given)."""
    magic = (0x08 << 8 | arr.ndim) if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7).astype(np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_roundtrip(tmp_path, small, gz):
    images, labels = small
    ext = ".gz" if gz else ""
    _write(tmp_path / f"train-images-idx3-ubyte{ext}", _idx_bytes(images))
    _write(tmp_path / f"train-labels-idx1-ubyte{ext}", _idx_bytes(labels))
    x, y = load_mnist(tmp_path, "train")
    assert x.dtype == np.uint8 and x.shape == (7, 28, 28)
    assert y.dtype == np.int64 and y.shape == (7,)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_names_the_file(tmp_path, small, gz):
    images, _ = small
    data = _idx_bytes(images)[:-100]
    path = _write(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")), data)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte") as e:
        read_mnist_images(path)
    assert "truncated" in str(e.value)


def test_truncated_gzip_stream_names_the_file(tmp_path, small):
    images, _ = small
    path = _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(images))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # cut the compressed stream itself
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        read_mnist_images(path)


def test_trailing_bytes_rejected(tmp_path, small):
    _, labels = small
    path = _write(tmp_path / "labels", _idx_bytes(labels) + b"\x00")
    with pytest.raises(ValueError, match="labels"):
        read_mnist_labels(path)


def test_bad_magic_names_the_file(tmp_path, small):
    images, labels = small
    # A labels file where images are expected.
    lab = _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic"):
        read_mnist_images(lab)
    # Non-zero leading bytes (not an IDX file at all).
    junk = _write(tmp_path / "junk-images", b"\x1f\x8b" + _idx_bytes(images)[2:])
    with pytest.raises(ValueError, match="junk-images"):
        read_idx(junk)
    with pytest.raises(ValueError, match="junk-images"):
        read_mnist_images(junk)


def test_wrong_image_size_rejected(tmp_path):
    path = _write(tmp_path / "imgs", _idx_bytes(np.zeros((2, 27, 28), np.uint8)))
    with pytest.raises(ValueError, match="imgs"):
        read_mnist_images(path)


def test_label_range_and_count_mismatch(tmp_path, small):
    images, labels = small
    bad = _write(tmp_path / "lab", _idx_bytes(np.array([1, 12], np.uint8)))
    with pytest.raises(ValueError, match="lab.*range"):
        read_mnist_labels(bad)
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(images))
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(labels[:5]))
    with pytest.raises(ValueError, match="t10k-images"):
        load_mnist(tmp_path, "test")
    with pytest.raises(FileNotFoundError):
        load_mnist(tmp_path, "train")


@pytest.mark.slow
def test_real_mnist():
    if not MNIST_DIR.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"MNIST not found at {MNIST_DIR} (set LOCALSSL_MNIST_DIR)")
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_mnist(MNIST_DIR, split)
        assert x.shape == (n, 28, 28) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert y.min() == 0 and y.max() == 9
        assert 20 < x.mean() < 45  # real digits, not zeros
