"""Decode once, memory-map forever: the uint8 cache behind `load_dataset`.

Decoding 50,000 JPEGs takes seconds to minutes; memory-mapping a ``.npy`` takes
microseconds and shares pages between processes (DDP ranks, probe runs). So
the first load of a split decodes it into three files under the cache dir::

    <cache>/<dataset>/<split>-<digest>.images.npy   uint8 (N, H, W, C)
    <cache>/<dataset>/<split>-<digest>.labels.npy   int64 (N,)
    <cache>/<dataset>/<split>-<digest>.json         meta: shape, classes, source, sizes,
                                                    per-channel mean/std (0..1)

``digest`` hashes the absolute path, size and mtime of every source file plus
the load options, so replacing a file (or passing ``resize=``) gives a new
entry instead of stale pixels. Every file is written to a temporary name and
moved into place with `os.replace` (atomic on POSIX), the meta last: a killed
decode never leaves a half-written entry that looks valid. A cache entry that
fails any check (meta, shapes, dtypes, file sizes, label range) is rebuilt,
never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from localssl.atomic import remove_orphans, temp_marker
from localssl.data.base import DatasetError, ImageArray, PathLike, Plan, channel_stats, select_balanced

log = logging.getLogger(__name__)

#: Bump when the decoded pixels for the same source would change (new decoder
#: semantics); old entries then simply stop matching.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$LOCALSSL_CACHE`` if set, else ``~/.cache/localssl``."""
    env = os.environ.get("LOCALSSL_CACHE")
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "localssl"


def fingerprint(files: Iterable[Path], extra: Mapping[str, Any] | None = None) -> str:
    """Hex digest of (absolute path, size, mtime_ns) of ``files`` and of ``extra``.

    Stat, not content hashing: hashing a 2.5 GB archive on every load would
    cost more than the decode the cache saves.
    """
    h = hashlib.sha256()
    h.update(f"localssl-cache-v{CACHE_VERSION}\n".encode())
    for f in files:
        p = Path(f).absolute()
        try:
            st = p.stat()
        except OSError as e:
            raise DatasetError(f"{p}: cannot stat source file ({e})") from e
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(dict(extra or {}), sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _paths(directory: Path, stem: str) -> tuple[Path, Path, Path]:
    return (
        directory / f"{stem}.images.npy",
        directory / f"{stem}.labels.npy",
        directory / f"{stem}.json",
    )


def read_entry(directory: Path, stem: str) -> ImageArray | None:
    """The cached entry as a read-only memmap, or None if absent or failing any check."""
    img_path, lab_path, meta_path = _paths(directory, stem)
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("stem") != stem:
            raise ValueError("meta does not belong to this entry")
        # Sizes first: they catch a half-replaced entry (new images, old meta)
        # before numpy maps anything.
        if img_path.stat().st_size != meta["images_bytes"] or lab_path.stat().st_size != meta["labels_bytes"]:
            raise ValueError("file sizes differ from the meta")
        images = np.load(img_path, mmap_mode="r", allow_pickle=False)
        labels = np.load(lab_path, allow_pickle=False)
        shape = tuple(meta["shape"])
        classes = list(meta["classes"])
        if images.dtype != np.uint8 or images.shape != shape or len(shape) != 4:
            raise ValueError(f"images are {images.dtype} {images.shape}, meta says uint8 {shape}")
        if labels.dtype != np.int64 or labels.shape != (shape[0],):
            raise ValueError(f"labels are {labels.dtype} {labels.shape}, expected int64 ({shape[0]},)")
        if labels.size and (labels.min() < -1 or labels.max() >= len(classes)):
            raise ValueError("labels out of range")
        stats = None
        if "mean" in meta:  # entries written before the stats were kept compute them when asked
            mean, std = tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
            if len(mean) != shape[3] or len(std) != shape[3]:
                raise ValueError(f"meta has {len(mean)} channel means for {shape[3]}-channel images")
            stats = (mean, std)
        return ImageArray(
            images=images,
            labels=labels,
            classes=classes,
            name=meta["dataset"],
            split=meta["split"],
            source=meta.get("source", ""),
            stats=stats,
        )
    except Exception as e:  # any failure means "rebuild"; the warning says why
        log.warning("ignoring corrupt cache entry %s (%s: %s); it will be rebuilt", meta_path, type(e).__name__, e)
        return None


def write_entry(
    directory: Path,
    stem: str,
    *,
    dataset: str,
    split: str,
    plan: Plan,
    indices: np.ndarray | None,
    source_obj: Any,
    extra_meta: Mapping[str, Any] | None = None,
) -> ImageArray:
    """Decode ``indices`` of ``source_obj`` (a `Source`) into a new cache entry; return it memmapped."""
    directory.mkdir(parents=True, exist_ok=True)
    # A decode killed with kill -9 leaves its temp files (the images alone can be GBs).
    for orphan in remove_orphans(directory):
        log.info("removed %s, left by a decode that was killed", orphan)
    img_path, lab_path, meta_path = _paths(directory, stem)
    labels_all = np.asarray(source_obj.labels, dtype=np.int64)
    if indices is None:
        indices = np.arange(labels_all.shape[0])
    if len(indices) == 0:
        raise DatasetError(f"{plan.where}: no images found for {dataset} split {split!r}")
    temps: list[Path] = []

    def temp(suffix: str) -> Path:
        # The writer's PID and host in the name: how `remove_orphans` tells a killed decode's files.
        fd, name = tempfile.mkstemp(prefix=f".{stem}.{temp_marker()}.", suffix=suffix, dir=directory)
        # mkstemp makes 0600 files; a cache is worth sharing with other users of the machine.
        os.close(fd)
        os.chmod(name, 0o644)
        temps.append(Path(name))
        return Path(name)

    holder: dict[str, Any] = {}

    def alloc(shape: tuple[int, ...]) -> np.ndarray:
        if holder:
            raise RuntimeError("a Source may allocate its output only once")
        if len(shape) != 4 or shape[0] != len(indices):
            raise RuntimeError(f"Source asked for shape {shape}, expected ({len(indices)}, H, W, C)")
        path = temp(".images.npy")
        holder["images"] = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.uint8, shape=tuple(int(s) for s in shape)
        )
        holder["path"] = path
        return holder["images"]

    t0 = time.perf_counter()
    log.info("decoding %s/%s (%d images) from %s into %s", dataset, split, len(indices), plan.where, directory)
    try:
        out = source_obj.decode(np.asarray(indices), alloc)
        if "images" not in holder or out is not holder["images"]:
            raise RuntimeError("Source.decode must fill and return the array from alloc()")
        shape = tuple(int(s) for s in out.shape)
        # Once per entry (normalisation of data sets without published constants).
        mean, std = channel_stats(out)
        out.flush()
        tmp_images = holder["path"]
        del out
        holder.clear()  # close the memmap before the rename
        tmp_labels = temp(".labels.npy")
        with open(tmp_labels, "wb") as f:
            np.save(f, labels_all[indices], allow_pickle=False)
        meta = {
            "version": CACHE_VERSION,
            "stem": stem,
            "dataset": dataset,
            "split": split,
            "shape": list(shape),
            "classes": list(source_obj.classes),
            "source": plan.where,
            # A folder tree has one entry per image; keep the meta small.
            "files": [str(Path(p).absolute()) for p in plan.files[:20]],
            "num_files": len(plan.files),
            "images_bytes": tmp_images.stat().st_size,
            "labels_bytes": tmp_labels.stat().st_size,
            "mean": list(mean),
            "std": list(std),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **dict(extra_meta or {}),
        }
        tmp_meta = temp(".json")
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_images, img_path)
        os.replace(tmp_labels, lab_path)
        os.replace(tmp_meta, meta_path)  # last: its presence marks the entry complete
    finally:
        holder.clear()
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
    log.info("decoded %s/%s in %.1f s", dataset, split, time.perf_counter() - t0)
    entry = read_entry(directory, stem)
    if entry is None:  # only if something else rewrote it meanwhile with garbage
        raise DatasetError(f"{meta_path}: cache entry unreadable right after writing it")
    return entry


def load_or_build(
    dataset: str,
    split: str,
    plan: Plan,
    *,
    cache_dir: PathLike | None = None,
    max_items: int | None = None,
    options: Mapping[str, Any] | None = None,
    version: int = 0,
) -> ImageArray:
    """The cached `ImageArray` for ``plan``: memmapped if cached, else decoded once then memmapped.

    ``version`` is the loader's decoder version (`DatasetLoader.decoder_version`):
    a new one gives new entries; 0 keeps the keys of entries written before
    versions existed.

    With ``max_items``, a full entry that already exists is subset (in memory);
    otherwise only the chosen subset is decoded and cached under its own name.
    Both paths pick the same items (`select_balanced`, seed 0).
    """
    directory = Path(os.path.expanduser(os.fspath(cache_dir))) if cache_dir is not None else default_cache_dir()
    directory = directory / dataset
    key = {"dataset": dataset, "split": split, "options": dict(options or {})}
    if version:
        key["decoder_version"] = version
    digest = fingerprint(plan.files, key)
    safe_split = split.replace("/", "_")
    full_stem = f"{safe_split}-{digest}"
    full = read_entry(directory, full_stem)
    if full is not None:
        return full if max_items is None else full.subset(max_items)
    sub_stem = f"{safe_split}-n{max_items}-{digest}"
    if max_items is not None:
        sub = read_entry(directory, sub_stem)
        if sub is not None:
            return sub
    source_obj = plan.build()
    n = len(source_obj.labels)
    if max_items is None or max_items >= n:
        indices, stem = None, full_stem
    else:
        indices, stem = select_balanced(source_obj.labels, max_items, seed=0), sub_stem
    return write_entry(
        directory,
        stem,
        dataset=dataset,
        split=split,
        plan=plan,
        indices=indices,
        source_obj=source_obj,
        extra_meta={"max_items": max_items, "options": {k: str(v) for k, v in dict(options or {}).items()}},
    )
