"""Extracting a tar or zip to disk, for the cases where that pays (STL-10's 2.6 GB tarball).

Everything is decided here, not by tarfile: the extraction filters of PEP 706
(``filter="data"``) exist only on Python 3.12 and security releases of
3.8-3.11, and ``requires-python`` admits Pythons without them. Two rules
make the result independent of that:

1. Links are refused. None of the supported data sets ships one, and a link
   is the only member whose meaning depends on what is already on disk: a
   chain of harmless-looking relative links (``x -> .``, ``x/x/x/y ->
   ../../..``) passes any check that looks at names alone, yet puts
   ``x/x/x/y/f.png`` three folders above the destination.
2. Every path is built one folder at a time under the *real* destination
   (`os.path.realpath`), refusing any part that is already a symlink, and
   the final path is resolved again and must still lie inside it; files are
   opened with ``O_NOFOLLOW``.

Files get default permissions (the archive's modes, owners and times are not
applied), as with the ``data`` filter.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path
from typing import IO

from localssl.data.archive import (
    UnsafeArchiveError,
    ZipReader,
    is_zip_name,
    iter_tar_members,
)
from localssl.data.base import DatasetError, PathLike
from localssl.data.files import SizeLimit

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def _refuse_link(archive: Path, name: str) -> None:
    raise UnsafeArchiveError(
        f"{archive}: member {name!r} is a link; links are not extracted (no supported data set has any); "
        "refusing the archive"
    )


def _inside(real_dest: str, path: str) -> bool:
    return os.path.commonpath([real_dest, path]) == real_dest


def _make_dirs(archive: Path, real_dest: str, parts: list[str]) -> str:
    """Create ``real_dest/parts...`` one folder at a time; return its path. No part may be a link."""
    cur = real_dest
    for part in parts:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            raise UnsafeArchiveError(
                f"{archive}: {cur} is already a symlink in the destination; refusing to extract through it"
            )
        if not os.path.isdir(cur):
            os.mkdir(cur)  # FileExistsError where a file is in the way: a DatasetError in safe_extract
    return cur


def _write(archive: Path, real_dest: str, name: str, src: IO[bytes], size: int) -> None:
    parts = name.split("/")
    parent = _make_dirs(archive, real_dest, parts[:-1])
    target = os.path.join(parent, parts[-1])
    if os.path.islink(target) or not _inside(real_dest, os.path.realpath(target)):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside {real_dest}; refusing it")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | _BINARY, 0o644)
    with os.fdopen(fd, "wb") as out:
        # Copy at most the declared size plus one byte, in chunks: never the whole member in memory.
        copied = 0
        while copied <= size:
            block = src.read(min(1 << 20, size + 1 - copied))
            if not block:
                break
            out.write(block)
            copied += len(block)
    if copied != size:
        raise DatasetError(f"{archive}: member {name!r} holds {copied:,} bytes, its header says {size:,}")


def _total(archive: Path, sizes: list[int], max_bytes: int | None) -> None:
    if max_bytes is not None:
        SizeLimit(max_bytes, "the extraction (max_bytes)").check(f"{archive} (all members)", sum(sizes))


def _extract_tar(archive: Path, real_dest: str, max_bytes: int | None) -> None:
    # Pass 1 validates every member (names, types, duplicates, total size) before anything is written.
    sizes = []
    for member, name, _ in iter_tar_members(archive):
        if member.issym() or member.islnk():
            _refuse_link(archive, name)
        sizes.append(member.size if member.isreg() else 0)
    _total(archive, sizes, max_bytes)
    for member, name, f in iter_tar_members(archive):
        if member.isdir() and name:
            _make_dirs(archive, real_dest, name.split("/"))
        elif f is not None and name:
            _write(archive, real_dest, name, f, member.size)


def _extract_zip(archive: Path, real_dest: str, max_bytes: int | None) -> None:
    with ZipReader(archive) as zr:  # validates every member on open
        if zr.links:
            _refuse_link(archive, zr.links[0])
        _total(archive, [info.file_size for info in zr.names.values()], max_bytes)
        for name in zr.names:
            src, size = zr.open(name)  # streamed, and capped at its declared size by _write
            with src:
                _write(archive, real_dest, name, src, size)


def safe_extract(archive: PathLike, dest: PathLike, *, max_bytes: int | None = None) -> Path:
    """Extract a tar or zip into ``dest`` (created if missing); return ``dest``.

    Only folders and regular files are written; links, devices, absolute or
    ``..`` names and members that appear twice refuse the whole archive
    (`UnsafeArchiveError` naming it and the member) before anything is
    written, and no path may pass through a symlink already in ``dest``.
    ``max_bytes``: refuse an archive whose members declare more in total
    (checked before writing, and each copy is capped at its declared size).
    Independent of tarfile's extraction filters (see the module docstring).
    """
    archive = Path(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    real_dest = os.path.realpath(dest)
    try:
        if is_zip_name(archive):
            _extract_zip(archive, real_dest, max_bytes)
        else:
            _extract_tar(archive, real_dest, max_bytes)
    except DatasetError:
        raise
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f"{archive}: cannot extract into {dest}: {type(e).__name__}: {e}") from e
    return dest
