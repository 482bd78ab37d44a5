"""Reading and extracting tar and zip archives without trusting their member names.

Data set archives come from the internet. A member named ``../../.bashrc``, an
absolute path, a symlink to ``/etc`` or a device node must never be written,
and must not be silently skipped either: the archive is refused as a whole,
with an `UnsafeArchiveError` that names the archive and the member. Every
function here checks *every* member it passes over, whether or not the caller
wanted that member.

Loaders read members straight out of the archive (`iter_tar`, `ZipReader`), so
nothing is extracted to disk in normal use. `safe_extract` is there for the
cases where extraction pays (STL-10's 2.6 GB tarball, read several times).

I/O and format errors (bad gzip, truncated tar, bad zip, CRC mismatch) become
`DatasetError` naming the archive and, where known, the member.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from localssl.data.base import DatasetError, PathLike

#: Errors the standard library raises for damaged archives.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError)

# PEP 706 (Python 3.12 and security releases of 3.8-3.11); an empty tuple matches nothing.
_FILTER_ERROR = getattr(tarfile, "FilterError", ())

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class UnsafeArchiveError(DatasetError):
    """An archive member would escape the destination or is not a plain file/dir/link."""


def is_tar_name(path: PathLike) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def is_zip_name(path: PathLike) -> bool:
    return str(path).lower().endswith(".zip")


def normalise_member(archive: PathLike, name: str) -> str:
    """The member's path in canonical ``a/b/c`` form, or `UnsafeArchiveError`.

    Backslashes count as separators too: an archive made on Windows may say
    ``..\\evil``, and extraction on Windows would honour it.
    """
    unified = name.replace("\\", "/")
    if not unified or unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing the archive")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the archive (..); refusing it")
    return "/".join(parts)


def _check_link(archive: PathLike, name: str, target: str, hard: bool) -> None:
    """A link may only point at another place inside the archive."""
    what = "hardlink" if hard else "symlink"
    unified = target.replace("\\", "/")
    if not unified or unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: {what} member {name!r} -> {target!r} is absolute; refusing it")
    # A hardlink's target is an archive path; a symlink's is relative to its own folder.
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    resolved = posixpath.normpath(posixpath.join(base, unified))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        raise UnsafeArchiveError(
            f"{archive}: {what} member {name!r} -> {target!r} points outside the archive; refusing it"
        )


def check_tar_member(archive: PathLike, member: tarfile.TarInfo) -> str:
    """Validate one tar member; return its normalised name."""
    name = normalise_member(archive, member.name)
    if member.issym():
        _check_link(archive, member.name, member.linkname, hard=False)
    elif member.islnk():
        _check_link(archive, member.name, member.linkname, hard=True)
    elif not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(
            f"{archive}: member {member.name!r} is a device, fifo or other special file; refusing the archive"
        )
    return name


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def check_zip_member(archive: PathLike, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """Validate one zip member; return its normalised name."""
    name = normalise_member(archive, info.filename)
    mode = info.external_attr >> 16
    if _zip_is_symlink(info):
        target = _zip_read(archive, zf, info).decode("utf-8", "replace")
        _check_link(archive, info.filename, target, hard=False)
    elif mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a special file; refusing the archive")
    return name


def _zip_read(archive: PathLike, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return zf.read(info)
    except (*_ARCHIVE_ERRORS, RuntimeError) as e:  # RuntimeError: encrypted member
        raise DatasetError(f"{archive}: cannot read member {info.filename!r}: {e}") from e


# ----------------------------------------------------------------------------- tar


def iter_tar_files(path: PathLike, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, int, IO[bytes]]]:
    """Stream a (possibly compressed) tar once, yielding ``(name, size, fileobj)`` of wanted files.

    Streaming mode (``r|*``) reads the archive front to back exactly once,
    which is the fast way through a ``.tar.gz`` (random access into gzip means
    decompressing again from the start). ``fileobj`` is only valid until the
    next item. Links inside the archive are checked but not followed. Every
    member is validated, wanted or not.
    """
    member_name = None
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                member_name = member.name
                name = check_tar_member(path, member)
                if not member.isreg() or (want is not None and not want(name)):
                    continue
                f = tf.extractfile(member)
                if f is None:  # pragma: no cover - isreg() members always have data
                    continue
                yield name, member.size, f
                member_name = None
    except UnsafeArchiveError:
        raise
    except _ARCHIVE_ERRORS as e:
        where = f"member {member_name!r}" if member_name else "archive"
        raise DatasetError(f"{path}: corrupt or truncated tar archive ({where}): {type(e).__name__}: {e}") from e


def read_exact(f: IO[bytes], size: int, archive: PathLike, name: str) -> bytes:
    """Read ``size`` bytes of a member, as a `DatasetError` if the archive ends early."""
    try:
        data = f.read(size)
    except _ARCHIVE_ERRORS as e:
        raise DatasetError(f"{archive}: corrupt or truncated member {name!r}: {type(e).__name__}: {e}") from e
    if len(data) != size:
        raise DatasetError(f"{archive}: member {name!r} is truncated ({len(data)} of {size} bytes)")
    return data


def iter_tar(path: PathLike, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """Like `iter_tar_files` but yields ``(name, bytes)``."""
    for name, size, f in iter_tar_files(path, want):
        yield name, read_exact(f, size, path, name)


def peek_tar(path: PathLike, count: int = 16) -> list[str]:
    """Names of the first ``count`` members (cheap: reads only the head of the archive)."""
    names: list[str] = []
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                names.append(normalise_member(path, member.name))
                if len(names) >= count:
                    break
    except UnsafeArchiveError:
        raise
    except _ARCHIVE_ERRORS as e:
        raise DatasetError(f"{path}: not a readable tar archive: {type(e).__name__}: {e}") from e
    return names


# ----------------------------------------------------------------------------- zip


class ZipReader:
    """A zip opened for random access, every member validated on open.

    ``names`` maps each regular file's normalised name to its `ZipInfo`; zip
    keeps a central directory, so members are read one by one without
    extracting (or decompressing) the rest.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            self._zf = zipfile.ZipFile(self.path)
        except _ARCHIVE_ERRORS as e:
            raise DatasetError(f"{self.path}: not a readable zip archive: {type(e).__name__}: {e}") from e
        self.names: dict[str, zipfile.ZipInfo] = {}
        try:
            for info in self._zf.infolist():
                name = check_zip_member(self.path, self._zf, info)
                if not info.is_dir() and not _zip_is_symlink(info):
                    self.names[name] = info
        except BaseException:
            self._zf.close()
            raise

    def read(self, name: str) -> bytes:
        try:
            info = self.names[name]
        except KeyError:
            raise DatasetError(f"{self.path}: member {name!r} is missing") from None
        return _zip_read(self.path, self._zf, info)

    def close(self) -> None:
        self._zf.close()

    def __enter__(self) -> ZipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- extraction


def safe_extract(archive: PathLike, dest: PathLike) -> Path:
    """Extract a tar or zip into ``dest`` after validating every member; return ``dest``.

    Uses tarfile's ``data`` extraction filter where Python has it (3.12, and
    3.8-3.11 security releases) on top of our own check, so permissions and
    ownership from the archive are not applied either.
    """
    archive = Path(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if is_zip_name(archive):
        with ZipReader(archive) as zr:
            for name in zr.names:
                target = dest.joinpath(*name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zr.read(name))
        return dest
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            members = tf.getmembers()
            for m in members:
                check_tar_member(archive, m)
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - old Pythons without PEP 706
                tf.extractall(dest, members=members)
    except UnsafeArchiveError:
        raise
    except _FILTER_ERROR as e:  # the stdlib filter caught something our check let through
        raise UnsafeArchiveError(f"{archive}: {e}") from e
    except _ARCHIVE_ERRORS as e:
        raise DatasetError(f"{archive}: corrupt or truncated archive: {type(e).__name__}: {e}") from e
    return dest
