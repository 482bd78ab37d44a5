"""Tests of localssl.data: every loader on small files written in exactly the official format.

Nothing here downloads anything or writes outside ``tmp_path``: the cache goes
to a temporary ``LOCALSSL_CACHE`` (autouse fixture below) and the network is
never touched (``urlopen`` is patched to fail where a test could reach it).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from localssl.data import (
    CIFAR10_CLASSES,
    DATASETS,
    SHAPES10_CLASSES,
    DatasetError,
    DatasetNotFoundError,
    ImageArray,
    UnsafeArchiveError,
    UnsafePickleError,
    channel_stats,
    dataset_spec,
    download_file,
    load_dataset,
    make_shapes10,
    safe_extract,
    select_balanced,
)
from localssl.data.download import md5sum

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Keep every cache write inside the test's tmp dir, never in ~/.cache."""
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network must not be touched")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _cache_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "cache"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _encode(img: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(img) if mode is None else Image.fromarray(img).convert(mode)
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


# ============================================================================ CIFAR-10


class _Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote the official CIFAR-10 batches.

    Python 2 ``str`` (our bytes) becomes SHORT_BINSTRING/BINSTRING opcodes and
    numpy's reconstructor is named ``numpy.core.multiarray._reconstruct``, as
    in the files from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin1")
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _cifar_batch(images: np.ndarray, labels: list[int], label: bytes) -> bytes:
    # Official rows: 1024 red, 1024 green, 1024 blue values, each row-major.
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
    return py2_pickle(
        {
            b"batch_label": label,
            b"labels": list(labels),
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
        }
    )


def make_cifar_files(n_per_batch: int = 4, seed: int = 0, drop_key: str | None = None):
    """Official batch files as {name: bytes}, plus the expected train/test arrays."""
    rng = np.random.default_rng(seed)
    files = {}
    train_x, train_y = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        if b == 1:
            x[0] = 0
            x[0, 5, 7, 2] = 255  # blue at row 5, column 7: byte 2*1024 + 5*32 + 7 of row 0
        files[f"data_batch_{b}"] = _cifar_batch(x, y, f"training batch {b} of 5".encode())
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 10, n_per_batch)]
    files["test_batch"] = _cifar_batch(tx, ty, b"testing batch 1 of 1")
    files["batches.meta"] = py2_pickle(
        {b"num_cases_per_batch": n_per_batch, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    )
    if drop_key is not None:
        batch = pickle.loads(files["data_batch_1"], encoding="bytes")
        files["data_batch_1"] = py2_pickle({k: v for k, v in batch.items() if k != drop_key.encode()})
    return files, (np.concatenate(train_x), np.array(train_y)), (tx, np.array(ty))


def write_cifar_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        d = tarfile.TarInfo("cifar-10-batches-py")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in files.items():
            _add_bytes(tf, f"cifar-10-batches-py/{name}", data)
    return path


def test_py2_pickle_writer_matches_the_official_opcodes():
    # Guard for the helper itself: the globals are the Python 2 numpy names.
    import pickletools

    data = make_cifar_files(1)[0]["data_batch_1"]
    ops = {(op.name, arg) for op, arg, _ in pickletools.genops(data)}
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops
    assert ("SHORT_BINSTRING", b"data") in ops or ("SHORT_BINSTRING", "data") in ops


def test_cifar10_python_tar_gz(tmp_path):
    files, (x, y), (tx, ty) = make_cifar_files()
    tar = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    train = load_dataset("cifar10", tmp_path, "train")
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, x)
    np.testing.assert_array_equal(train.labels, y)
    assert train.images[0, 5, 7, 2] == 255 and int(train.images[0].sum()) == 255
    assert train.classes == CIFAR10_CLASSES
    test = load_dataset("cifar10", tar, "test")  # root may be the archive itself
    np.testing.assert_array_equal(test.images, tx)
    np.testing.assert_array_equal(test.labels, ty)


def test_cifar10_extracted_folder(tmp_path):
    files, (x, y), _ = make_cifar_files()
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    for root in (tmp_path, d):
        train = load_dataset("cifar10", root, "train")
        np.testing.assert_array_equal(train.images, x)
        np.testing.assert_array_equal(train.labels, y)


def test_cifar10_truncated_archive_names_the_file(tmp_path):
    files, _, _ = make_cifar_files()
    tar = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    _truncate(tar, 0.6)
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, "train")


def test_cifar10_missing_key_names_file_and_key(tmp_path):
    files, _, _ = make_cifar_files(drop_key="labels")
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    with pytest.raises(DatasetError, match=r"data_batch_1.*labels"):
        load_dataset("cifar10", tmp_path, "train")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("member", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("writer", ["official-looking", "plain"])
def test_cifar10_refuses_code_executing_pickle(tmp_path, member, writer):
    marker = tmp_path / "pwned"
    files, _, _ = make_cifar_files()
    if writer == "plain":
        files[member] = pickle.dumps(_Evil(marker), protocol=2)
    else:  # the payload hidden in an otherwise well-formed batch dict
        files[member] = py2_pickle({b"data": _Evil(marker), b"labels": [0], b"label_names": []})
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    with pytest.raises(UnsafePickleError, match=rf"{member}.*(posix|os|nt)\.system"):
        load_dataset("cifar10", tmp_path, "train")
    assert not marker.exists(), "the pickle's payload ran"


def test_cifar10_jpeg_imagefolder_layout(tmp_path):
    # The layout of the shared cifar10-jpeg.tar.gz: cifar10/{train,test}/<class>/NNNN.jpg
    rng = np.random.default_rng(1)
    with tarfile.open(tmp_path / "cifar10-jpeg.tar.gz", "w:gz") as tf:
        for split in ("train", "test"):
            for k, c in enumerate(CIFAR10_CLASSES):
                img = np.full((32, 32, 3), 20 * k, np.uint8) + rng.integers(0, 3, (32, 32, 3), dtype=np.uint8)
                _add_bytes(tf, f"cifar10/{split}/{c}/0000.jpg", _encode(img, "JPEG"))
    data = load_dataset("cifar10", tmp_path, "test")
    assert data.classes == CIFAR10_CLASSES
    np.testing.assert_array_equal(data.labels, np.arange(10))
    np.testing.assert_allclose(data.images.reshape(10, -1).mean(1), 20 * np.arange(10) + 1, atol=3)


def test_cifar10_missing_names_paths_formats_and_url(tmp_path, no_network):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg and "cifar10-jpeg.tar.gz" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match=r"(?s)download of http.*stl10_binary.tar.gz.*Looked for"):
        load_dataset("stl10", tmp_path, "train", download=True)
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*"))


def test_download_file_checks_md5_and_is_atomic(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello data" * 1000)
    good = md5sum(src)
    dest = download_file(src.as_uri(), tmp_path / "out" / "file.bin", good)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(DatasetError, match="MD5"):
        download_file(src.as_uri(), tmp_path / "out" / "bad.bin", "0" * 32)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file.bin"]


# ============================================================================ STL-10


def make_stl_dir(d: Path, n_train: int = 3, n_test: int = 2, n_unl: int = 4, seed: int = 0):
    """Official STL-10 binaries: per image 3x96x96 bytes, column-major (c, w, h)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unl)):
        raw = bytearray(rng.integers(0, 200, n * 27648, dtype=np.uint8).tobytes())
        if split == "train":
            # Image 1, channel 2 (blue), row h=3, column w=80: byte c*96*96 + w*96 + h.
            raw[1 * 27648 + 2 * 9216 + 80 * 96 + 3] = 255
        (d / f"{split}_X.bin").write_bytes(bytes(raw))
        # Reference decoding, written out index by index (no transpose trick).
        arr = np.frombuffer(bytes(raw), np.uint8).reshape(n, 3, 96, 96)
        ref = np.empty((n, 96, 96, 3), np.uint8)
        for c in range(3):
            ref[:, :, :, c] = arr[:, c].swapaxes(1, 2)  # [n, w, h] -> [n, h, w]
        labels = None
        if split != "unlabeled":
            labels = rng.integers(1, 11, n).astype(np.uint8)
            (d / f"{split}_y.bin").write_bytes(labels.tobytes())
        out[split] = (ref, labels)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    return out, names


def test_stl10_folder_layout_and_pixel_order(tmp_path):
    ref, names = make_stl_dir(tmp_path / "stl10_binary")
    train = load_dataset("stl10", tmp_path, "train")
    assert train.images.shape == (3, 96, 96, 3)
    assert train.images[1, 3, 80, 2] == 255  # (h=3, w=80, c=blue), not (80, 3)
    assert train.images[1, 80, 3, 2] != 255
    np.testing.assert_array_equal(train.images, ref["train"][0])
    np.testing.assert_array_equal(train.labels, ref["train"][1].astype(np.int64) - 1)
    assert train.classes == names
    unl = load_dataset("stl10", tmp_path / "stl10_binary", "unlabeled")
    assert (unl.labels == -1).all() and len(unl) == 4
    both = load_dataset("stl10", tmp_path, "train+unlabeled")
    np.testing.assert_array_equal(both.images, np.concatenate([ref["train"][0], ref["unlabeled"][0]]))
    np.testing.assert_array_equal(both.labels[:3], train.labels)
    assert (both.labels[3:] == -1).all()


def test_stl10_tar_gz(tmp_path):
    ref, _ = make_stl_dir(tmp_path / "src" / "stl10_binary")
    with tarfile.open(tmp_path / "stl10_binary.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src" / "stl10_binary", arcname="stl10_binary")
    test = load_dataset("stl10", tmp_path / "stl10_binary.tar.gz", "test")
    np.testing.assert_array_equal(test.images, ref["test"][0])
    np.testing.assert_array_equal(test.labels, ref["test"][1].astype(np.int64) - 1)
    # max_items decodes a subset straight from the stream, the same one subset() picks.
    sub = load_dataset("stl10", tmp_path / "stl10_binary.tar.gz", "train+unlabeled", max_items=3)
    full = load_dataset("stl10", tmp_path / "src", "train+unlabeled")
    ref_sub = full.subset(3)
    np.testing.assert_array_equal(sub.images, ref_sub.images)
    np.testing.assert_array_equal(sub.labels, ref_sub.labels)


def test_stl10_wrong_size_names_the_file(tmp_path):
    make_stl_dir(tmp_path / "stl10_binary")
    x = tmp_path / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-1])
    with pytest.raises(DatasetError, match=r"train_X\.bin.*27648"):
        load_dataset("stl10", tmp_path, "train")


def test_stl10_truncated_tar_names_the_file(tmp_path):
    make_stl_dir(tmp_path / "src" / "stl10_binary")
    tar = tmp_path / "stl10_binary.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(tmp_path / "src" / "stl10_binary", arcname="stl10_binary")
    _truncate(tar, 0.5)
    with pytest.raises(DatasetError, match="stl10_binary.tar.gz"):
        load_dataset("stl10", tar, "unlabeled")


# ============================================================================ Tiny ImageNet

WNIDS = ["n03000000", "n01000000", "n02000000"]  # deliberately not sorted


def _tiny_colour(wnid: str, i: int) -> int:
    return 40 * WNIDS.index(wnid) + 10 * i + 20


def write_tiny_zip(path: Path, top: str = "tiny-imagenet-200", per_class: int = 2) -> dict[str, str]:
    """Official layout; returns val file -> wnid. One train image is grayscale."""
    val = {}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/wnids.txt", "\n".join(WNIDS) + "\n")
        zf.writestr(f"{top}/words.txt", "".join(f"{w}\tthing {w}, other name\n" for w in WNIDS))
        for w in WNIDS:
            boxes = []
            for i in range(per_class):
                img = np.full((64, 64, 3), _tiny_colour(w, i), np.uint8)
                mode = "L" if (w == WNIDS[0] and i == 0) else None
                zf.writestr(f"{top}/train/{w}/images/{w}_{i}.JPEG", _encode(img, "JPEG", mode))
                boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63")
            zf.writestr(f"{top}/train/{w}/{w}_boxes.txt", "\n".join(boxes))
        lines = []
        for j, w in enumerate([WNIDS[2], WNIDS[0], WNIDS[1], WNIDS[2]]):
            zf.writestr(f"{top}/val/images/val_{j}.JPEG", _encode(np.full((64, 64, 3), 7 * j, np.uint8), "JPEG"))
            lines.append(f"val_{j}.JPEG\t{w}\t1\t2\t50\t60")
            val[f"val_{j}.JPEG"] = w
        zf.writestr(f"{top}/val/val_annotations.txt", "\n".join(lines) + "\n")
    return val


def test_tinyimagenet_zip(tmp_path):
    val = write_tiny_zip(tmp_path / "tiny-imagenet-200.zip")
    train = load_dataset("tinyimagenet", tmp_path / "tiny-imagenet-200.zip", "train")
    classes = sorted(WNIDS)
    assert train.classes == classes and train.images.shape == (6, 64, 64, 3)
    for img, lab in zip(train.images, train.labels):
        w = classes[lab]
        means = img.reshape(-1, 3).mean(0)
        assert any(abs(means[0] - _tiny_colour(w, i)) < 3 for i in range(2)), (w, means)
        assert np.ptp(means) < 2  # grey everywhere, including the grayscale JPEG turned RGB
    v = load_dataset("tinyimagenet", tmp_path, "val")  # found from its folder
    assert [classes[k] for k in v.labels] == [val[f"val_{j}.JPEG"] for j in range(4)]
    np.testing.assert_allclose(v.images.reshape(4, -1).mean(1), [0, 7, 14, 21], atol=2)
    with pytest.raises(DatasetNotFoundError, match="test"):
        load_dataset("tinyimagenet", tmp_path, "test")


def test_tinyimagenet_subset_zip_name_and_extracted_folder(tmp_path):
    write_tiny_zip(tmp_path / "tiny-imagenet-200-subset100.zip")
    a = load_dataset("tinyimagenet", tmp_path, "train")  # any tiny-imagenet-200*.zip in root
    safe_extract(tmp_path / "tiny-imagenet-200-subset100.zip", tmp_path / "x")
    b = load_dataset("tinyimagenet", tmp_path / "x", "train")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_tinyimagenet_corrupt_zip_and_member(tmp_path):
    z = tmp_path / "tiny-imagenet-200.zip"
    write_tiny_zip(z)
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("tiny-imagenet-200/train/n01000000/images/n01000000_9.JPEG", b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"tiny-imagenet-200\.zip.*n01000000_9\.JPEG"):
        load_dataset("tinyimagenet", z, "train")
    write_tiny_zip(z)
    _truncate(z, 0.5)
    with pytest.raises(DatasetError, match=r"tiny-imagenet-200\.zip"):
        load_dataset("tinyimagenet", z, "val")


# ============================================================================ ImageFolder

CLASSES = ["cat", "dog"]


def _folder_img(k: int, i: int) -> np.ndarray:
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 100 * k + i
    img[i, 2 * k, 1] = 255  # a pixel that says which file it came from
    return img


def _folder_files(wrapper: str = "") -> dict[str, bytes]:
    files = {}
    for split, n in (("train", 3), ("test", 2)):
        for k, c in enumerate(CLASSES):
            for i in range(n):
                files[f"{wrapper}{split}/{c}/{i:04d}.png"] = _encode(_folder_img(k, i))
    files[f"{wrapper}README.txt"] = b"not an image"
    return files


def _write_tree(kind: str, base: Path, files: dict[str, bytes]) -> Path:
    if kind == "folder":
        for name, data in files.items():
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            (base / name).write_bytes(data)
        return base
    if kind == "zip":
        path = base.with_suffix(".zip")
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return path
    path = base.with_suffix(".tar.gz")
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            _add_bytes(tf, name, data)
    return path


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_imagefolder_reads_folder_and_archives(tmp_path, kind):
    root = _write_tree(kind, tmp_path / "data", _folder_files(wrapper="mydata/" if kind != "folder" else ""))
    train = load_dataset("imagefolder", root, "train")
    assert train.classes == CLASSES and len(train) == 6
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(train.images, np.stack([_folder_img(k, i) for k in (0, 1) for i in range(3)]))
    test = load_dataset("imagefolder", root, "test")
    np.testing.assert_array_equal(test.labels, [0, 0, 1, 1])
    with pytest.raises(DatasetError, match=r"unknown split 'val'.*test, train"):
        load_dataset("imagefolder", root, "val")


def test_imagefolder_flat_layout_split_all(tmp_path):
    files = {f"{c}/{i}.png": _encode(_folder_img(k, i)) for k, c in enumerate(CLASSES) for i in range(2)}
    root = _write_tree("folder", tmp_path / "flat", files)
    data = load_dataset("imagefolder", root, "all")
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])
    with pytest.raises(DatasetError, match="'all'"):
        load_dataset("imagefolder", root, "train")


def test_imagefolder_size_mismatch_names_file_or_resizes(tmp_path):
    files = {f"{c}/{i}.png": _encode(_folder_img(k, i)) for k, c in enumerate(CLASSES) for i in range(2)}
    files["dog/odd.png"] = _encode(np.zeros((10, 12, 3), np.uint8))
    root = _write_tree("zip", tmp_path / "mixed", files)
    with pytest.raises(DatasetError, match=r"odd\.png.*pass --resize S, or resize=S"):
        load_dataset("imagefolder", root, "all")
    data = load_dataset("imagefolder", root, "all", resize=16)
    assert data.images.shape == (5, 16, 16, 3)


def _gray_files(n: int = 3) -> dict[str, bytes]:
    return {f"{c}/{i}.png": _encode(np.full((6, 6), 10 * k + i, np.uint8)) for k, c in enumerate(CLASSES)
            for i in range(n)}


def test_imagefolder_grayscale_stays_single_channel_and_colour_makes_rgb(tmp_path):
    files = _gray_files()
    root = _write_tree("zip", tmp_path / "gray", files)
    gray = load_dataset("imagefolder", root, "all")
    assert gray.images.shape == (6, 6, 6, 1)
    np.testing.assert_array_equal(gray.images[:, 0, 0, 0], [0, 1, 2, 10, 11, 12])
    spec = dataset_spec("imagefolder").resolved(gray)
    assert spec.channels == 1 and spec.mean == gray.channel_stats()[0] and len(spec.std) == 1
    # One colour file (mode RGB) anywhere makes the split RGB, the gray files tripled.
    files["dog/9.png"] = _encode(np.dstack([np.full((6, 6), v, np.uint8) for v in (200, 100, 50)]))
    mixed = load_dataset("imagefolder", _write_tree("folder", tmp_path / "mixed", files), "all")
    assert mixed.images.shape == (7, 6, 6, 3)
    np.testing.assert_array_equal(mixed.images[0, 0, 0], [0, 0, 0])
    np.testing.assert_array_equal(mixed.images[3, 0, 0], [10, 10, 10])
    np.testing.assert_array_equal(mixed.images[-1, 0, 0], [200, 100, 50])
    # The channel count follows the files' mode: an RGB file of gray pixels is still RGB.
    rgb = {k: _encode(np.full((6, 6), 10 * i, np.uint8), mode="RGB") for i, k in enumerate(_gray_files())}
    assert load_dataset("imagefolder", _write_tree("tar.gz", tmp_path / "rgb", rgb), "all").images.shape[3] == 3


def test_channel_stats_are_exact_and_kept_in_the_cache(tmp_path):
    import math
    from fractions import Fraction

    x = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 2), dtype=np.uint8)
    mean, std = channel_stats(x)
    for c in range(2):
        v = [int(a) for a in x[..., c].reshape(-1)]
        m = len(v)
        # Exact sums, then correctly rounded divisions: bit-identical to the rational result.
        assert mean[c] == float(Fraction(sum(v), 255 * m))
        assert std[c] == math.sqrt(float(Fraction(sum(a * a for a in v) * m - sum(v) ** 2, 255 * 255 * m * m)))
    assert channel_stats(x[::-1]) == (mean, std)  # order-free

    root = _write_tree("folder", tmp_path / "d", _folder_files())
    first = load_dataset("imagefolder", root, "train")
    meta = next(p for p in _cache_files(tmp_path) if p.suffix == ".json")
    m = json.loads(meta.read_text())
    assert (tuple(m["mean"]), tuple(m["std"])) == channel_stats(np.array(first.images)) == first.stats
    again = load_dataset("imagefolder", root, "train")
    assert again.stats == first.stats  # read back, not recomputed
    # An entry written before the stats were kept still loads; its stats are computed when asked.
    del m["mean"], m["std"]
    meta.write_text(json.dumps(m))
    old = load_dataset("imagefolder", root, "train")
    assert old.stats is None and old.channel_stats() == first.stats


@pytest.mark.parametrize("damage", ["truncate", "bad_image"])
def test_imagefolder_corrupt_archive_names_file(tmp_path, damage):
    files = _folder_files()
    if damage == "bad_image":
        files["train/cat/0001.png"] = b"\x89PNG\r\n\x1a\n garbage"
    root = _write_tree("tar.gz", tmp_path / "d", files)
    if damage == "truncate":
        _truncate(root, 0.5)
        match = r"d\.tar\.gz"
    else:
        match = r"d\.tar\.gz.*train/cat/0001\.png"
    with pytest.raises(DatasetError, match=match):
        load_dataset("imagefolder", root, "train")


def test_bad_gzip_and_bad_zip_are_dataset_errors(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    for name in ("x.tar.gz", "x.zip"):
        with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
            load_dataset("imagefolder", tmp_path / name, "all")


# ============================================================================ archive safety


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tf:
        _add_bytes(tf, "good/cat/0.png", _encode(_folder_img(0, 0)))
        if member.isreg():
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
        else:
            tf.addfile(member)
    return path


def _evil_members() -> dict[str, tarfile.TarInfo]:
    out = {}
    out["../evil"] = tarfile.TarInfo("../evil")
    out["/tmp/localssl-abs-evil"] = tarfile.TarInfo("/tmp/localssl-abs-evil")
    link = tarfile.TarInfo("good/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
    out["good/link"] = link
    hard = tarfile.TarInfo("good/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../outside"
    out["good/hard"] = hard
    dev = tarfile.TarInfo("good/dev")
    dev.type = tarfile.CHRTYPE
    out["good/dev"] = dev
    return out


@pytest.mark.parametrize("name", list(_evil_members()))
def test_tar_unsafe_members_are_refused(tmp_path, name):
    tar = _tar_with(tmp_path / "evil.tar", _evil_members()[name])
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=r"evil\.tar.*" + name.replace(".", r"\.").replace("/", ".")):
        safe_extract(tar, dest)
    with pytest.raises(UnsafeArchiveError, match=r"evil\.tar"):
        load_dataset("imagefolder", tar, "all")  # reading member by member checks too
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()
    assert not Path("/tmp/localssl-abs-evil").exists()


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "a/../../evil.png", "..\\evil.png"])
def test_zip_unsafe_members_are_refused(tmp_path, name):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("good/cat/0.png", _encode(_folder_img(0, 0)))
        zf.writestr(zipfile.ZipInfo(name), b"x")
    with pytest.raises(UnsafeArchiveError, match=r"evil\.zip.*evil\.png"):
        safe_extract(z, tmp_path / "dest")
    with pytest.raises(UnsafeArchiveError, match=r"evil\.zip"):
        load_dataset("imagefolder", z, "all")
    assert not (tmp_path / "evil.png").exists()


def test_zip_symlink_out_is_refused_but_safe_archive_extracts(tmp_path):
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("good/link")
        info.external_attr = 0o120777 << 16  # a symlink entry, as Info-ZIP stores them
        zf.writestr(info, "../../etc/passwd")
    with pytest.raises(UnsafeArchiveError, match=r"link\.zip.*good/link"):
        safe_extract(z, tmp_path / "dest")
    ok = _write_tree("tar.gz", tmp_path / "ok", _folder_files())
    out = safe_extract(ok, tmp_path / "extracted")
    assert (out / "train" / "cat" / "0000.png").is_file()


# ============================================================================ cache


def test_cache_second_load_is_a_memmap_without_decoding(tmp_path, monkeypatch):
    root = _write_tree("tar.gz", tmp_path / "d", _folder_files())
    first = load_dataset("imagefolder", root, "train")
    assert isinstance(first.images, np.memmap) and not first.images.flags.writeable

    def no_decoding(*a, **k):
        raise AssertionError("PIL must not be called on a cache hit")

    monkeypatch.setattr(Image, "open", no_decoding)
    monkeypatch.setattr(tarfile, "open", no_decoding)  # not even a listing pass
    second = load_dataset("imagefolder", root, "train")
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    names = [p.name for p in _cache_files(tmp_path)]
    assert len(names) == 3 and not any(n.startswith(".") for n in names)  # no temp files left


def test_cache_rebuilds_corrupt_entries(tmp_path, caplog):
    root = _write_tree("folder", tmp_path / "d", _folder_files())
    good = np.array(load_dataset("imagefolder", root, "train").images)
    images_npy = next(p for p in _cache_files(tmp_path) if p.name.endswith(".images.npy"))
    _truncate(images_npy, 0.7)
    again = load_dataset("imagefolder", root, "train")
    np.testing.assert_array_equal(again.images, good)
    assert "corrupt cache" in caplog.text
    meta = next(p for p in _cache_files(tmp_path) if p.suffix == ".json")
    m = json.loads(meta.read_text())
    m["shape"] = [1, 8, 8, 3]  # meta that contradicts the arrays
    meta.write_text(json.dumps(m))
    np.testing.assert_array_equal(load_dataset("imagefolder", root, "train").images, good)
    meta.write_text("{not json")
    np.testing.assert_array_equal(load_dataset("imagefolder", root, "train").images, good)


def test_cache_changed_source_is_decoded_again(tmp_path):
    root = _write_tree("folder", tmp_path / "d", _folder_files())
    before = np.array(load_dataset("imagefolder", root, "test").images)
    f = root / "test" / "cat" / "0000.png"
    f.write_bytes(_encode(np.full((8, 8, 3), 77, np.uint8)))
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    after = load_dataset("imagefolder", root, "test")
    assert (after.images[0] == 77).all() and not (before[0] == 77).all()


def test_max_items_same_subset_from_stream_and_from_full_cache(tmp_path, monkeypatch):
    root = _write_tree("zip", tmp_path / "d", _folder_files())
    sub_fresh = load_dataset("imagefolder", root, "train", max_items=4)
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path / "cache2"))
    full = load_dataset("imagefolder", root, "train")
    sub_from_full = load_dataset("imagefolder", root, "train", max_items=4)
    np.testing.assert_array_equal(sub_fresh.images, sub_from_full.images)
    np.testing.assert_array_equal(sub_fresh.labels, sub_from_full.labels)
    assert len(full) == 6 and np.bincount(sub_fresh.labels).tolist() == [2, 2]
    # The normalisation of a subset is the subset's, whichever way it was loaded.
    assert sub_fresh.stats is not None and sub_from_full.stats is None
    assert sub_from_full.channel_stats() == sub_fresh.stats


def test_explicit_cache_dir_argument(tmp_path):
    root = _write_tree("folder", tmp_path / "d", _folder_files())
    load_dataset("imagefolder", root, "test", cache_dir=tmp_path / "elsewhere")
    assert list((tmp_path / "elsewhere" / "imagefolder").glob("*.images.npy"))
    assert not _cache_files(tmp_path)


# ============================================================================ ImageArray, specs, registry


def test_select_balanced_and_subset():
    labels = np.repeat(np.arange(4), [50, 30, 10, 2])
    idx = select_balanced(labels, 20, seed=3)
    assert np.array_equal(idx, np.sort(idx)) and len(set(idx)) == 20
    counts = np.bincount(labels[idx], minlength=4)
    assert counts[3] == 2 and counts[:3].min() >= 5 and counts.max() - counts[:3].min() <= 1
    assert np.array_equal(idx, select_balanced(labels, 20, seed=3))
    assert not np.array_equal(idx, select_balanced(labels, 20, seed=4))
    data = ImageArray(np.zeros((92, 2, 2, 3), np.uint8), labels, ["a", "b", "c", "d"], name="toy")
    sub = data.subset(20, seed=3)
    np.testing.assert_array_equal(sub.labels, labels[idx])
    assert data.subset(1000) is data
    assert "n=92" in repr(data) and "toy" in repr(data) and len(data) == 92


def test_image_array_validates_its_contract():
    with pytest.raises(DatasetError, match="uint8"):
        ImageArray(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2), [], name="x")
    with pytest.raises(DatasetError, match="labels"):
        ImageArray(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3), [], name="x")


def test_shapes10_deterministic_balanced_and_colour_free():
    x, y = make_shapes10(5000, seed=0)
    assert not np.array_equal(make_shapes10(50, seed=1)[0], x[:50])
    assert x.shape == (5000, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [500] * 10
    # Colour carries no class information: per-class mean colours all lie near 127.
    class_means = np.stack([x[y == k].reshape(-1, 3).mean(0) for k in range(10)])
    assert np.abs(class_means - 127.5).max() < 12
    train = load_dataset("shapes10", None, "train")  # a second generation with the same seed
    test = load_dataset("shapes10", None, "test")
    assert np.array_equal(train.images, x) and np.array_equal(train.labels, y) and len(test) == 1000
    assert train.classes == SHAPES10_CLASSES and not train.images.flags.writeable
    assert not np.array_equal(test.images[:10], train.images[:10])
    spec = dataset_spec("shapes10")
    mean, std = channel_stats(x, max_items=2000)
    np.testing.assert_allclose(spec.mean, mean, atol=0.01)
    np.testing.assert_allclose(spec.std, std, atol=0.01)


def test_registry_specs_and_errors(tmp_path):
    assert {"cifar10", "stl10", "tinyimagenet", "imagefolder", "shapes10"} <= set(DATASETS.names())
    assert dataset_spec("cifar10").crop_scale == (0.25, 1.0)
    for name in ("stl10", "tinyimagenet", "imagefolder"):
        assert dataset_spec(name).crop_scale == (0.08, 1.0)
    s = dataset_spec("stl10")
    assert (s.image_size, s.pretrain_split, s.probe_train_split, s.test_split) == (96, "unlabeled", "train", "test")
    assert dataset_spec("tinyimagenet").test_split == "val"
    for name in DATASETS:
        spec = dataset_spec(name)
        published = spec.mean is not None
        assert spec.name == name and (not published or len(spec.mean) == len(spec.std) == spec.channels)
        assert published == (name != "imagefolder")  # named data sets keep their published constants
    with pytest.raises(KeyError, match="cifar10"):
        load_dataset("cifar100", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"unknown split 'valid'.*train, test"):
        load_dataset("cifar10", tmp_path, "valid")
    with pytest.raises(TypeError, match="colour.*accepted options: resize"):
        load_dataset("cifar10", tmp_path, "train", colour=True)
    data = load_dataset("shapes10", None, "test", max_items=100)
    resolved = dataset_spec("imagefolder").resolved(data)
    assert resolved.image_size == 32 and (resolved.mean, resolved.std) == data.channel_stats()
    assert dataset_spec("shapes10").resolved(data).mean == dataset_spec("shapes10").mean


def _bicubic(images: np.ndarray, side: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BICUBIC)) for im in images])


def test_resize_works_for_every_data_set_and_is_cached(tmp_path):
    files, (x, _), _ = make_cifar_files()
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    small = load_dataset("cifar10", tmp_path, "train", resize=16)
    np.testing.assert_array_equal(small.images, _bicubic(x, 16))
    again = load_dataset("cifar10", tmp_path, "train", resize=16)
    assert isinstance(again.images, np.memmap) and again.stats == small.stats
    np.testing.assert_array_equal(load_dataset("cifar10", tmp_path, "train").images, x)  # its own entry
    assert load_dataset("cifar10", tmp_path, "train", resize=None).images.shape == x.shape
    shapes = load_dataset("shapes10", None, "test", max_items=10)
    np.testing.assert_array_equal(load_dataset("shapes10", None, "test", max_items=10, resize=20).images,
                                  _bicubic(shapes.images, 20))


# ============================================================================ real data


def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing and CI=true: the real-data test must run in CI")
        pytest.skip(f"{path} is missing (the shared real-data folder is not on this machine)")
    return path


@pytest.mark.slow
def test_real_cifar10_jpeg_and_tiny_imagenet_subset():
    cifar = _shared("cifar10-jpeg.tar.gz")
    tiny = _shared("tiny-imagenet-200-subset100.zip")
    test = load_dataset("cifar10", SHARED, "test", max_items=2000)
    assert test.classes == CIFAR10_CLASSES and test.images.shape == (2000, 32, 32, 3)
    assert np.bincount(test.labels).tolist() == [200] * 10
    # The shared README gives the test-set channel means (126.0, 123.7, 114.8).
    np.testing.assert_allclose(test.images.reshape(-1, 3).mean(0), (126.0, 123.7, 114.8), atol=2.5)
    again = load_dataset("cifar10", cifar, "test", max_items=2000)  # root = the archive: same cache entry
    assert isinstance(again.images, np.memmap)
    val = load_dataset("tinyimagenet", tiny, "val", max_items=1000)
    assert len(val.classes) == 200 and val.images.shape == (1000, 64, 64, 3)
    assert np.bincount(val.labels, minlength=200).tolist() == [5] * 200
    train = load_dataset("tinyimagenet", SHARED, "train", max_items=600)
    assert np.bincount(train.labels, minlength=200).tolist() == [3] * 200
    assert 60 < train.images.mean() < 160


def test_gzip_helper_sanity():
    # _truncate must really break gzip streams, or the corrupt-file tests prove nothing.
    data = gzip.compress(b"x" * 10000)
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(data[: len(data) // 2])
