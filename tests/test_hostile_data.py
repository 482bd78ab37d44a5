"""Hostile inputs for every loader: malformed, truncated, oversized and code-executing files.

Each must give a `DatasetError` whose message names the file (and the member
or key), allocate a bounded amount of memory (`bounded_memory`: tracemalloc
sees Python objects and numpy arrays), never hang, and execute nothing. The
files are small: what they *declare* is large (see ``hostile_inputs``).
Archive-level attacks (links, extraction, tar headers) are in
``test_hostile_archives.py``.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hostile_inputs import (
    bounded_memory,
    eps_bytes,
    png_declaring,
    run_isolated,
    sparse_file,
    tar_declaring,
    write_tar,
    write_zip,
    zip_declaring,
)
from test_data import _encode, _Evil, make_cifar_files, make_stl_dir, py2_pickle, write_cifar_tar, write_tiny_zip

from localssl.data import DatasetError, UnsafeArchiveError, UnsafePickleError, load_dataset

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

BATCH = "cifar-10-batches-py"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="not applicable: no FIFOs on this OS")


class _Reduce:
    """Pickles as ``func(*args)``: how a hostile pickle makes the unpickler call something."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _cifar_tar(tmp_path: Path, member: str, data: bytes, n: int = 2) -> Path:
    files, _, _ = make_cifar_files(n)
    files[member] = data
    return write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)


# ============================================================================ CIFAR-10: pickles


def _huge_reconstruct() -> bytes:
    # numpy's reconstructor asked for the array itself, never followed by its bytes: ~600 KB
    # (a few KB gzipped) that declare 300,000 images (921 MB), with as many labels.
    return py2_pickle({b"data": _Reduce(_reconstruct, np.ndarray, (300_000, 3072), b"B"), b"labels": [0] * 300_000})


def test_cifar_pickle_declaring_300000_images_is_refused_before_allocating():
    from localssl.data.cifar10 import parse_batch

    with bounded_memory(48), pytest.raises(UnsafePickleError, match=r"data_batch_1.*_reconstruct with shape"):
        parse_batch(_huge_reconstruct(), "x/data_batch_1")


def test_cifar_batch_of_more_than_10000_images_is_refused(tmp_path):
    files, _, _ = make_cifar_files(2)
    files["data_batch_1"] = py2_pickle({b"data": np.zeros((10_001, 3072), np.uint8), b"labels": [0] * 10_001})
    d = tmp_path / BATCH
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    with pytest.raises(DatasetError, match=r"data_batch_1.*10001 images.*1\.\.10000"):
        load_dataset("cifar10", d, "train")


def _memo_bomb() -> bytes:
    # A dict stored in memo slot 4,194,304: CPython's unpickler sizes its memo table by the index.
    return b"\x80\x02}r" + struct.pack("<I", 1 << 22) + b"."


def _bytes8_bomb() -> bytes:
    # BINBYTES8 declaring 1 GiB: CPython allocates the buffer before reading into it.
    return b"\x80\x04\x8e" + struct.pack("<Q", 1 << 30) + b"xx."


HOSTILE_PICKLES = {
    "os.system": lambda marker: pickle.dumps(_Evil(marker), protocol=2),
    "os.system-in-batch": lambda marker: py2_pickle({b"data": _Evil(marker), b"labels": [0]}),
    "huge-reconstruct": lambda marker: _huge_reconstruct(),
    "ndarray-called": lambda marker: py2_pickle(
        {b"data": _Reduce(np.ndarray, (300_000, 3072), np.dtype("u1")), b"labels": [0] * 300_000}
    ),
    "object-dtype": lambda marker: pickle.dumps({b"data": np.array([1, 2], dtype=object), b"labels": [0]}),
    "structured-dtype": lambda marker: pickle.dumps({b"data": np.zeros(2, "u1,u1"), b"labels": [0]}),
    "codecs-rot13": lambda marker: pickle.dumps({b"data": _Reduce(codecs.encode, "x", "rot13")}, protocol=2),
    "memo-bomb": lambda marker: _memo_bomb(),
    "bytes8-bomb": lambda marker: _bytes8_bomb(),
}


@pytest.mark.parametrize("kind", list(HOSTILE_PICKLES))
def test_cifar_hostile_pickles_are_refused_and_execute_nothing(tmp_path, kind):
    marker = tmp_path / "pwned"
    tar = _cifar_tar(tmp_path, "data_batch_1", HOSTILE_PICKLES[kind](marker))
    expected = DatasetError if kind == "bytes8-bomb" else UnsafePickleError
    with bounded_memory(48), pytest.raises(expected, match=rf"cifar-10-python\.tar\.gz.*{BATCH}/data_batch_1"):
        load_dataset("cifar10", tar, "train")
    assert not marker.exists(), "the pickle's payload ran"


MALFORMED_BATCHES = {
    "not-a-dict": (lambda: py2_pickle([1, 2, 3]), "expected a dict"),
    "data-is-a-list": (lambda: py2_pickle({b"data": [[0] * 3072], b"labels": [0]}), "'data'"),
    "data-is-float": (lambda: py2_pickle({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}), "'data'"),
    "labels-are-text": (lambda: py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"3"]}), "'labels'"),
    "labels-too-few": (lambda: py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "labels"),
    "labels-out-of-range": (lambda: py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), "0..9"),
    "truncated-pickle": (lambda: make_cifar_files(2)[0]["data_batch_1"][:500], "not a readable pickle"),
}


@pytest.mark.parametrize("kind", list(MALFORMED_BATCHES))
def test_cifar_malformed_batches_name_member_and_key(tmp_path, kind):
    build, key = MALFORMED_BATCHES[kind]
    tar = _cifar_tar(tmp_path, "data_batch_1", build())
    with bounded_memory(32), pytest.raises(DatasetError, match=rf"{BATCH}/data_batch_1.*{key}"):
        load_dataset("cifar10", tar, "train")


def test_cifar_malformed_meta_names_it(tmp_path):
    tar = _cifar_tar(tmp_path, "batches.meta", py2_pickle({b"label_names": [b"a"] * 9}))
    with pytest.raises(DatasetError, match=r"batches\.meta.*label_names"):
        load_dataset("cifar10", tar, "test")


def _resave(data: bytes, protocol: int | str, str_keys: bool) -> bytes:
    """A batch as Python 3 would write it back after loading it (numpy-int labels)."""
    d = pickle.loads(data, encoding="latin1" if str_keys else "bytes")
    key = "labels" if str_keys else b"labels"
    if key in d:  # numpy integers: an int64 array, or a list of numpy scalars
        labels = d[key]
        d[key] = np.array(labels, np.int64) if str_keys else [np.int64(v) if i % 2 else np.int32(v)
                                                              for i, v in enumerate(labels)]  # fmt: skip
    if protocol == "2-numpy1":  # the module names numpy 1.x writes
        return pickle.dumps(d, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    return pickle.dumps(d, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5, "2-numpy1"])
@pytest.mark.parametrize("str_keys", [False, True], ids=["bytes-keys", "str-keys"])
def test_cifar_batches_resaved_by_python3_load(tmp_path, protocol, str_keys):
    files, (x, y), (tx, ty) = make_cifar_files(3)
    files = {name: _resave(data, protocol, str_keys) for name, data in files.items()}
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    train = load_dataset("cifar10", tmp_path, "train")
    np.testing.assert_array_equal(train.images, x)
    np.testing.assert_array_equal(train.labels, y)
    test = load_dataset("cifar10", tmp_path, "test")
    np.testing.assert_array_equal(test.images, tx)
    assert test.classes[0] == "airplane"


# ============================================================================ CIFAR-10: files


def test_cifar_tar_member_declaring_more_than_a_batch_is_refused_before_reading(tmp_path):
    files, _, _ = make_cifar_files(2)
    members = [(f"{BATCH}/{n}", d) for n, d in files.items() if n != "data_batch_1"]
    tar = tar_declaring(tmp_path / "cifar-10-python.tar.gz", members, f"{BATCH}/data_batch_1", 1 << 30)
    with bounded_memory(32), pytest.raises(DatasetError, match=r"data_batch_1.*more than a CIFAR-10 batch"):
        load_dataset("cifar10", tar, "train")


@needs_fifo
def test_cifar_folder_oversized_or_special_files(tmp_path):
    files, _, _ = make_cifar_files(2)
    d = tmp_path / BATCH
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "test_batch").unlink()
    os.mkfifo(d / "test_batch")  # is_file() is False: reported, never opened
    with pytest.raises(DatasetError, match=r"test_batch"):
        load_dataset("cifar10", d, "test")
    sparse_file(d / "data_batch_2", 80 << 20)  # 80 MB that a read_bytes() would take whole
    with bounded_memory(32), pytest.raises(DatasetError, match=r"data_batch_2.*more than a CIFAR-10 batch"):
        load_dataset("cifar10", d, "train")


def test_cifar_tar_with_a_member_twice_names_it(tmp_path):
    files, _, _ = make_cifar_files(2)
    members = [(f"{BATCH}/{n}", d) for n, d in files.items()] + [(f"{BATCH}/data_batch_1", files["data_batch_2"])]
    tar = write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(UnsafeArchiveError, match=r"cifar-10-python\.tar\.gz.*data_batch_1.*more than once"):
        load_dataset("cifar10", tar, "train")


# ============================================================================ MNIST


def _idx_header(*dims: int) -> bytes:
    return struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def test_mnist_gzip_declaring_more_than_60000_images_is_refused_before_reading(tmp_path):
    from localssl.data.mnist import read_mnist_images

    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:  # 55 MB of zeros in ~0.2 MB: a valid file
        f.write(_idx_header(70_000, 28, 28))
        for _ in range(70):
            f.write(bytes(1000 * 28 * 28))
    with bounded_memory(16), pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz.*70000.*more than"):
        read_mnist_images(path)


def test_mnist_raw_header_is_checked_against_the_file_size_before_reading(tmp_path):
    from localssl.data.mnist import read_mnist_images

    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(_idx_header(100, 28, 28))
    sparse_file(path, 16 + 40_000 * 28 * 28)  # 31 MB of payload where the header says 100 images
    with bounded_memory(8), pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.*trailing"):
        read_mnist_images(path)


@needs_fifo
def test_mnist_fifo_and_device_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(fifo)
    dev = tmp_path / "train-labels-idx1-ubyte"
    dev.symlink_to(os.devnull)
    out = run_isolated(
        "from localssl.data.mnist import read_mnist_images, read_mnist_labels\n"
        f"for f, p in ((read_mnist_images, {str(fifo)!r}), (read_mnist_labels, {str(dev)!r})):\n"
        "    try: f(p)\n"
        "    except ValueError as e: print(e)\n"
    )
    assert out.returncode == 0, out.stderr
    assert f"{fifo}: is a FIFO" in out.stdout and f"{dev}: is a device" in out.stdout


# ============================================================================ STL-10


def _stl_members(tmp_path: Path, drop: str) -> list[tuple[str, bytes]]:
    src = tmp_path / "src"
    make_stl_dir(src)
    return [(f"stl10_binary/{p.name}", p.read_bytes()) for p in sorted(src.iterdir()) if p.name != drop]


@pytest.mark.parametrize(
    "member, declared, split, match",
    [
        ("unlabeled_X.bin", 100_001 * 27648, "unlabeled", r"unlabeled_X\.bin.*100,001 images.*at most 100,000"),
        ("train_X.bin", 5_001 * 27648, "train", r"train_X\.bin.*at most 5,000"),
        ("train_y.bin", 1 << 30, "train", r"train_y\.bin.*more than an STL-10 train_y\.bin"),
        ("class_names.txt", 1 << 30, "test", r"class_names\.txt.*more than"),
    ],
)
def test_stl10_tar_members_declaring_more_than_the_release_are_refused(tmp_path, member, declared, split, match):
    tar = tar_declaring(tmp_path / "stl10_binary.tar.gz", _stl_members(tmp_path, member), f"stl10_binary/{member}",
                        declared)  # fmt: skip
    with bounded_memory(32), pytest.raises(DatasetError, match=rf"stl10_binary\.tar\.gz.*{match}"):
        load_dataset("stl10", tar, split)


def test_stl10_folder_oversized_and_malformed_files(tmp_path):
    d = tmp_path / "stl10_binary"
    make_stl_dir(d)
    sparse_file(d / "train_X.bin", 5_001 * 27648)  # 138 MB on paper
    with bounded_memory(16), pytest.raises(DatasetError, match=r"train_X\.bin.*at most 5,000"):
        load_dataset("stl10", d, "train")
    (d / "test_y.bin").write_bytes(bytes([0, 11]))
    with pytest.raises(DatasetError, match=r"test_y\.bin.*1\.\.10"):
        load_dataset("stl10", d, "test")
    (d / "class_names.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match=r"class_names\.txt.*10 class names"):
        load_dataset("stl10", d, "unlabeled")


def test_stl10_tar_with_a_member_twice_names_it(tmp_path):
    members = _stl_members(tmp_path, "")
    tar = write_tar(tmp_path / "stl10_binary.tar", members + [members[-1]])
    with pytest.raises(UnsafeArchiveError, match=rf"stl10_binary\.tar.*{members[-1][0]}.*more than once"):
        load_dataset("stl10", tar, "train")


# ============================================================================ images (Tiny ImageNet, image folders)

HOSTILE_IMAGES = {
    # Content picks the decoder, not the name: EPS goes to Ghostscript, an external program.
    "eps": (eps_bytes, "not a JPEG, PNG, BMP, WEBP file"),
    # 3.8 KB of PNG would become 432 MB of RGB; refused from the header.
    "pixel-bomb": (lambda: png_declaring(12_000, 12_000), "12000x12000 = 144,000,000 pixels"),
}


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail if PIL decodes pixel data of an EPS or any image (the hostile images must be refused first)."""
    from PIL import EpsImagePlugin, ImageFile

    good = ImageFile.ImageFile.load

    def load(self):
        if self.size[0] * self.size[1] > 1 << 20 or isinstance(self, EpsImagePlugin.EpsImageFile):
            raise AssertionError(f"decoded a {self.format} of {self.size}")
        return good(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", load)



# ============================================================================ Tiny ImageNet

TINY_IMAGE = "tiny-imagenet-200/train/n01000000/images/n01000000_0.JPEG"


@pytest.mark.parametrize(
    "member, match",
    [(TINY_IMAGE, "more than an image file"), ("tiny-imagenet-200/wnids.txt", "more than a Tiny ImageNet text file")],
)
def test_tinyimagenet_zip_member_declaring_400_mb_is_refused_before_reading(tmp_path, member, match):
    z = tmp_path / "tiny-imagenet-200.zip"
    write_tiny_zip(z)
    zip_declaring(z, member, 400_000_000)
    with bounded_memory(32), pytest.raises(DatasetError, match=rf"tiny-imagenet-200\.zip.*{member}.*{match}"):
        load_dataset("tinyimagenet", z, "train")


def test_tinyimagenet_zip_member_larger_than_declared_is_an_error(tmp_path):
    z = tmp_path / "tiny-imagenet-200.zip"
    write_tiny_zip(z)
    zip_declaring(z, TINY_IMAGE, 10)
    with pytest.raises(DatasetError, match=rf"tiny-imagenet-200\.zip.*{TINY_IMAGE}"):
        load_dataset("tinyimagenet", z, "train")


@pytest.mark.parametrize("kind", ["eps", "pixel-bomb"])
def test_tinyimagenet_hostile_images(tmp_path, kind, no_decoding):
    z = tmp_path / "tiny-imagenet-200.zip"
    write_tiny_zip(z)
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("tiny-imagenet-200/train/n01000000/images/n01000000_7.JPEG", HOSTILE_IMAGES[kind][0]())
    with pytest.raises(DatasetError, match=rf"n01000000_7\.JPEG.*{HOSTILE_IMAGES[kind][1]}"):
        load_dataset("tinyimagenet", z, "train")


def test_tinyimagenet_zip_with_a_member_twice_names_it(tmp_path):
    members = [("tiny-imagenet-200/wnids.txt", b"n01000000\n"), ("tiny-imagenet-200/wnids.txt", b"n02000000\n")]
    z = write_zip(tmp_path / "tiny-imagenet-200.zip", members)
    with pytest.raises(UnsafeArchiveError, match=r"tiny-imagenet-200\.zip.*wnids\.txt.*more than once"):
        load_dataset("tinyimagenet", z, "train")


# ============================================================================ image folders

def _good_images() -> list[tuple[str, bytes]]:
    return [(f"{c}/{i}.png", _encode(np.full((8, 8, 3), 40 * k + i, np.uint8))) for k, c in enumerate("ab")
            for i in range(2)]  # fmt: skip


def _tree(kind: str, base: Path, members: list[tuple[str, bytes]]) -> Path:
    if kind == "zip":
        return write_zip(base.with_suffix(".zip"), members)
    if kind in ("tar", "tar.gz"):
        return write_tar(base.with_suffix(f".{kind}"), members)
    for name, data in members:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(data)
    return base


@pytest.mark.parametrize("kind", ["folder", "zip", "tar.gz"])
@pytest.mark.parametrize("image", list(HOSTILE_IMAGES))
def test_imagefolder_hostile_images_are_refused_before_decoding(tmp_path, kind, image, no_decoding):
    build, match = HOSTILE_IMAGES[image]
    root = _tree(kind, tmp_path / "d", _good_images() + [("b/9.png", build())])
    with bounded_memory(32), pytest.raises(DatasetError, match=rf"b/9\.png.*{match}"):
        load_dataset("imagefolder", root, "all")


def test_imagefolder_pixel_limit_can_be_raised_and_says_how(tmp_path, monkeypatch):
    root = _tree("folder", tmp_path / "d", _good_images())
    monkeypatch.setattr("localssl.data.images.MAX_IMAGE_PIXELS", 63)
    with pytest.raises(DatasetError, match=r"8x8 = 64 pixels.*limit of 63.*LOCALSSL_MAX_IMAGE_PIXELS"):
        load_dataset("imagefolder", root, "all")
    monkeypatch.setenv("LOCALSSL_MAX_IMAGE_PIXELS", "64")
    assert len(load_dataset("imagefolder", root, "all")) == 4


@pytest.mark.parametrize("kind", ["folder", "zip", "tar.gz"])
def test_imagefolder_oversized_image_files_are_refused_before_reading(tmp_path, kind):
    from localssl.data.images import image_file_limit

    declared = image_file_limit().max_bytes + 1
    good = _good_images()
    if kind == "folder":
        root = _tree(kind, tmp_path / "d", good)
        sparse_file(root / "b/9.png", declared)
    elif kind == "zip":
        root = zip_declaring(_tree(kind, tmp_path / "d", good + [("b/9.png", good[0][1])]), "b/9.png", declared)
    else:
        root = tar_declaring(tmp_path / "d.tar.gz", good, "b/9.png", declared)
    with bounded_memory(32), pytest.raises(DatasetError, match=r"b/9\.png.*more than an image file"):
        load_dataset("imagefolder", root, "all")


def test_imagefolder_skips_devices_and_dangling_links_with_a_warning(tmp_path, caplog):
    root = _tree("folder", tmp_path / "d", _good_images())
    (root / "a/null.png").symlink_to(os.devnull)
    (root / "a/dangling.png").symlink_to(tmp_path / "nowhere.png")
    (root / "b/loop").symlink_to(root)  # a link to a folder is not followed
    with caplog.at_level(logging.WARNING, logger="localssl.data.imagefolder"):
        data = load_dataset("imagefolder", root, "all")
    assert len(data) == 4
    assert "skipping 3 entries that are not regular files: a/dangling.png, a/null.png, b/loop" in caplog.text


@needs_fifo
def test_imagefolder_fifo_is_skipped_without_hanging(tmp_path):
    root = _tree("folder", tmp_path / "d", _good_images())
    os.mkfifo(root / "a/x.png")
    out = run_isolated(
        "import logging; logging.basicConfig()\n"
        "from localssl.data import load_dataset\n"
        f"print(len(load_dataset('imagefolder', {str(root)!r}, 'all', cache_dir={str(tmp_path / 'c')!r})))\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4" and "a/x.png" in out.stderr


@needs_fifo
def test_read_regular_refuses_special_files_before_opening(tmp_path):
    from localssl.data.files import SizeLimit, read_regular

    os.mkfifo(tmp_path / "fifo")
    limit = SizeLimit(1 << 20, "a test file")
    for path, kind in ((tmp_path / "fifo", "a FIFO"), (Path("/dev/zero"), "a device"), (tmp_path, "a folder")):
        with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}: is {kind}"):
            read_regular(path, limit)


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_imagefolder_archive_with_a_member_twice_names_it(tmp_path, kind):
    # Before: RuntimeError "Source asked for shape (4, ...), expected (5, ...)" from deep in the cache.
    good = _good_images()
    root = _tree(kind, tmp_path / "d", good + [("a/0.png", _encode(np.zeros((8, 8, 3), np.uint8)))])
    with pytest.raises(UnsafeArchiveError, match=rf"{re.escape(str(root))}: member 'a/0\.png' appears more than once"):
        load_dataset("imagefolder", root, "all")
