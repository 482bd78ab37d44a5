"""Fetching the official archives, with checksums, and the error you get when you cannot.

Downloads go to a temporary file next to the destination and are moved into
place with `os.replace` only after the MD5 matches, so an interrupted or
corrupted transfer never leaves a file that a later run would trust.

Without ``download=True`` nothing touches the network: a missing data set is a
`DatasetNotFoundError` that says where we looked, which formats we read and
which URL to fetch by hand (many clusters have no internet on compute nodes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localssl.data.base import DatasetError, DatasetNotFoundError


@dataclass(frozen=True)
class Resource:
    """One official file: where it lives, what it is called, and its MD5 as published."""

    url: str
    filename: str
    md5: str
    size_bytes: int | None = None


# MD5 values are the ones torchvision (CIFAR-10, STL-10) and many public loaders
# (Tiny ImageNet: 248,100,043 bytes) check against.
CIFAR10_PYTHON = Resource(
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    170_498_071,
)
STL10_BINARY = Resource(
    "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
    "stl10_binary.tar.gz",
    "91f7769df0f17e558f3565bffb0c7dfb",
)
TINY_IMAGENET = Resource(
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    "tiny-imagenet-200.zip",
    "90528d7ca1a48142e341f4ef8d21d0de",
    248_100_043,
)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: Path, md5: str | None = None, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (atomically), checking ``md5``; return ``dest``.

    An existing ``dest`` with the right checksum is kept. Network errors are
    raised as they come (``urllib.error.URLError``/``OSError``); a checksum
    mismatch is a `DatasetError` and leaves nothing behind.
    """
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = _progress(total, dest.name)
            try:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            finally:
                bar.close()
        got = h.hexdigest()
        if md5 is not None and got != md5:
            raise DatasetError(f"{url}: downloaded file has MD5 {got}, expected {md5}; not keeping it")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def _progress(total: int | None, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but not a vital one

        class _Null:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...

        return _Null()
    # disable=None: no bar when stderr is not a terminal (logs, CI).
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None)


def not_found_message(
    name: str, looked_at: Sequence[Path], formats: str, resource: Resource | None, root: Path | None
) -> str:
    """A multi-line explanation: where we looked, what we can read, what to fetch."""
    lines = [f"{name}: no data set found."]
    if looked_at:
        lines.append("Looked for:")
        lines += [f"  - {p}" for p in looked_at]
    lines.append(f"Readable formats: {formats}")
    if resource is not None:
        into = root if root is not None else Path(".")
        lines.append(
            f"To get it, download {resource.url} (MD5 {resource.md5}) by hand into {into}/, "
            f"or pass download=True (needs internet)."
        )
    return "\n".join(lines)


def fetch(resource: Resource, root: Path, *, looked_at: Sequence[Path], formats: str, name: str) -> Path:
    """Download ``resource`` into folder ``root``; on any failure, the full not-found message."""
    dest = root / resource.filename
    try:
        return download_file(resource.url, dest, resource.md5)
    except DatasetError as e:  # checksum mismatch
        raise DatasetNotFoundError(f"{e}\n" + not_found_message(name, looked_at, formats, resource, root)) from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DatasetNotFoundError(
            f"{name}: download of {resource.url} failed ({type(e).__name__}: {e}).\n"
            + not_found_message(name, looked_at, formats, resource, root)
        ) from e
