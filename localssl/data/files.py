"""Plain files on disk: only regular files, and never more bytes than their format allows.

A data folder is not always what it looks like. A FIFO named ``x.png`` blocks
``read()`` forever, a symlink to ``/dev/zero`` reads until memory runs out,
and a 7 GB file named ``data_batch_1`` is read whole by ``Path.read_bytes``.
So every loader reads plain files through this module:

- `read_regular` / `open_regular` refuse anything that is not a regular file
  (after following symlinks) *before* opening it, and check again on the
  open descriptor, so a file swapped for a FIFO in between cannot block the
  read (the descriptor is opened non-blocking);
- the size is checked against a `SizeLimit` that the loader derives from its
  format (a CIFAR-10 batch holds at most 10,000 images, an image file at most
  `localssl.data.images.MAX_IMAGE_PIXELS` pixels, ...) before one byte is read;
- `list_regular_files` walks a folder and sets aside everything else, so that
  a loader can skip it with a warning naming it.

Archive members get the same size checks in `localssl.data.archive`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from localssl.data.base import DatasetError, PathLike


@dataclass(frozen=True)
class SizeLimit:
    """The most bytes a file of some kind may hold, and why (said in the error).

    ``what`` finishes the sentence "more than ..." in the error message, e.g.
    ``"a CIFAR-10 batch of 10,000 images"``; say there how to raise the
    limit if a legitimate file could need more.
    """

    max_bytes: int
    what: str

    def check(self, where: str, size: int) -> None:
        """`DatasetError` naming ``where`` if ``size`` bytes exceed the limit."""
        if size > self.max_bytes:
            raise DatasetError(
                f"{where}: {size:,} bytes, more than {self.what} can take ({self.max_bytes:,} bytes); "
                "refusing to read it"
            )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def regular_size(path: PathLike) -> int:
    """Size of ``path`` (symlinks followed); `DatasetError` unless it is a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return st.st_size


def open_regular(path: PathLike, limit: SizeLimit) -> tuple[IO[bytes], int]:
    """Open a regular file within ``limit`` for reading; return ``(file, size)``.

    Checked twice: by path before opening (opening a device can have effects
    of its own), and on the open descriptor (the path may have been swapped
    in between). ``O_NONBLOCK`` keeps a FIFO swapped in from blocking the open.
    """
    limit.check(str(path), regular_size(path))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
        limit.check(str(path), st.st_size)
    except BaseException:
        f.close()
        raise
    return f, st.st_size


def read_regular(path: PathLike, limit: SizeLimit) -> bytes:
    """The bytes of a regular file within ``limit``; `DatasetError` naming it otherwise.

    Reads at most one byte more than the size the file had when opened, so a
    file that grows while it is read is an error, not an unbounded read.
    """
    f, size = open_regular(path, limit)
    with f:
        try:
            data = f.read(size + 1)
        except OSError as e:
            raise DatasetError(f"{path}: cannot read ({e})") from e
    if len(data) != size:
        raise DatasetError(f"{path}: changed size while being read ({size} bytes, then {len(data)})")
    return data


def list_regular_files(root: Path) -> tuple[list[str], list[str]]:
    """Walk ``root``: ``(regular files, everything else)``, as ``a/b/c`` names relative to it.

    Regular files include symlinks to regular files, wherever they point: a
    folder of links into a larger data set is a common way to make a subset,
    and what the link points at is read with the same checks as any file.
    Set aside (second list): FIFOs, sockets, devices, dangling links, and
    links to folders (not followed: a link to an ancestor would never end).

    The order is that of a sorted top-down ``os.walk``: a folder's files,
    then its subfolders one by one. A folder that cannot be listed is a
    `DatasetError` naming it (``os.walk`` would skip it silently).
    """
    files: list[str] = []
    other: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(root / rel if rel else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DatasetError(f"{root / rel}: cannot list folder ({e})") from e
        subdirs = []
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(name)
                elif e.is_file(follow_symlinks=True):  # d_type for plain files: no extra syscall
                    files.append(name)
                else:
                    other.append(name)
            except OSError:  # vanished, or a link we may not stat
                other.append(name)
        stack.extend(reversed(subdirs))
    return files, other
