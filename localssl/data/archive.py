"""Reading tar and zip archives without trusting their member names, types or sizes.

Data set archives come from the internet. A member named ``../../.bashrc``, an
absolute path, a symlink to ``/etc``, a device node or a name that appears
twice must never be written or silently picked, and must not be silently
skipped either: the archive is refused as a whole, with an
`UnsafeArchiveError` that names the archive and the member. Every function
here checks *every* member it passes over, whether or not the caller wanted
that member.

Sizes are not trusted either: a few kilobytes of gzip can declare a member of
gigabytes. Whoever reads a member passes a `SizeLimit` derived from the
format, and the member is refused from its header before it is read; zip
members are read with a cap, so a header that lies gets no further than one
byte past what it declared. Tar's own extension headers (long names, pax
records) are bounded too (`MAX_TAR_HEADER_BYTES`).

Loaders read members straight out of the archive (`iter_tar`, `ZipReader`), so
nothing is extracted to disk in normal use; `localssl.data.extract` extracts
where that pays. I/O and format errors (bad gzip, truncated tar, bad zip, CRC
mismatch) become `DatasetError` naming the archive and, where known, the member.
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
from localssl.data.files import SizeLimit

#: Errors the standard library raises for damaged archives.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

#: tarfile reads a GNU long-name or pax header whole, whatever size it
#: declares. A long name is at most a few KB (PATH_MAX is 4096) and pax
#: records hold a few names and numbers; 1 MiB is far above both.
MAX_TAR_HEADER_BYTES = 1 << 20

#: A symlink member's data is its target path.
LINK_TARGET = SizeLimit(4096, "a symlink target (PATH_MAX)")


class UnsafeArchiveError(DatasetError):
    """An archive member would escape the destination, is not a plain file/dir/link, or is ambiguous."""


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
    """A link may only point at another place inside the archive (lexically: links are never followed here)."""
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


class _Names:
    """Names seen so far in one archive: a second copy of a file is refused, not silently picked.

    Which copy a reader or extractor uses differs (tar extraction keeps the
    last, a streaming reader sees the first), so an archive that holds one
    member twice has no single meaning. A folder listed twice is harmless.
    """

    def __init__(self, archive: PathLike) -> None:
        self.archive = archive
        self._is_dir: dict[str, bool] = {}

    def add(self, name: str, is_dir: bool, raw: str) -> None:
        seen = self._is_dir.get(name)
        if seen is not None and not (seen and is_dir):
            raise UnsafeArchiveError(
                f"{self.archive}: member {raw!r} appears more than once; refusing the archive "
                "(which copy is meant is ambiguous)"
            )
        self._is_dir[name] = is_dir


# ----------------------------------------------------------------------------- tar


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized long-name and pax headers before tarfile reads them.

    `_proc_member` is the hook tarfile documents for subclasses; everything
    else is tarfile's own processing.
    """

    _HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)  # fmt: skip

    def _proc_member(self, tarfile_obj: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self._HEADER_TYPES and self.size > MAX_TAR_HEADER_BYTES:
            raise UnsafeArchiveError(
                f"{tarfile_obj.name}: a long-name/pax header declares {self.size:,} bytes "
                f"(the limit is {MAX_TAR_HEADER_BYTES:,}); refusing the archive"
            )
        return super()._proc_member(tarfile_obj)


def open_tar(path: PathLike, mode: str = "r|*") -> tarfile.TarFile:
    """``tarfile.open`` with bounded extension headers (streaming by default)."""
    return tarfile.open(path, mode=mode, tarinfo=_BoundedTarInfo)


def iter_tar_members(path: PathLike) -> Iterator[tuple[tarfile.TarInfo, str, IO[bytes] | None]]:
    """Stream a (possibly compressed) tar once: ``(member, normalised name, data or None)`` for every member.

    Every member is validated (`check_tar_member`, duplicates) before it is
    yielded; ``data`` is None for folders and links and only valid until the
    next item. Damage is a `DatasetError` naming the archive and the member.
    """
    member_name = None
    names = _Names(path)
    try:
        with open_tar(path) as tf:
            for member in tf:
                member_name = member.name
                name = check_tar_member(path, member)
                names.add(name, member.isdir(), member.name)
                yield member, name, tf.extractfile(member) if member.isreg() else None
                member_name = None
    except UnsafeArchiveError:
        raise
    except _ARCHIVE_ERRORS as e:
        where = f"member {member_name!r}" if member_name else "archive"
        raise DatasetError(f"{path}: corrupt or truncated tar archive ({where}): {type(e).__name__}: {e}") from e


def iter_tar_files(path: PathLike, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, int, IO[bytes]]]:
    """Stream a tar once, yielding ``(name, declared size, fileobj)`` of the wanted regular files.

    Streaming mode (``r|*``) reads the archive front to back exactly once,
    which is the fast way through a ``.tar.gz`` (random access into gzip means
    decompressing again from the start). ``fileobj`` is only valid until the
    next item. Links inside the archive are checked but not followed. Every
    member is validated, wanted or not. Read a member with `read_exact`,
    which checks the declared size against a limit first.
    """
    for member, name, f in iter_tar_members(path):
        if f is not None and (want is None or want(name)):
            yield name, member.size, f


def read_exact(f: IO[bytes], size: int, archive: PathLike, name: str, limit: SizeLimit) -> bytes:
    """Read ``size`` bytes of a member within ``limit``; `DatasetError` if over it or if the archive ends early.

    The size is checked before anything is read: it is what the member's
    header declares, and a small compressed archive can declare gigabytes.
    """
    limit.check(f"{archive} (member {name!r})", size)
    try:
        data = f.read(size)
    except _ARCHIVE_ERRORS as e:
        raise DatasetError(f"{archive}: corrupt or truncated member {name!r}: {type(e).__name__}: {e}") from e
    if len(data) != size:
        raise DatasetError(f"{archive}: member {name!r} is truncated ({len(data)} of {size} bytes)")
    return data


def iter_tar(path: PathLike, want: Callable[[str], bool] | None, limit: SizeLimit) -> Iterator[tuple[str, bytes]]:
    """Like `iter_tar_files` but yields ``(name, bytes)``; a wanted member over ``limit`` is an error."""
    for name, size, f in iter_tar_files(path, want):
        yield name, read_exact(f, size, path, name, limit)


def peek_tar(path: PathLike, count: int = 16) -> list[str]:
    """Names of the first ``count`` members (cheap: reads only the head of the archive)."""
    names: list[str] = []
    try:
        with open_tar(path) as tf:
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


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def open_zip_member(
    archive: PathLike, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: SizeLimit | None
) -> IO[bytes]:
    """Open one member for reading after checking its declared size against ``limit`` (None: a stream)."""
    if limit is not None:
        limit.check(f"{archive} (member {info.filename!r})", info.file_size)
    try:
        return zf.open(info)
    except (*_ARCHIVE_ERRORS, RuntimeError) as e:  # RuntimeError: encrypted member
        raise DatasetError(f"{archive}: cannot read member {info.filename!r}: {e}") from e


def _zip_read(archive: PathLike, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: SizeLimit) -> bytes:
    with open_zip_member(archive, zf, info, limit) as f:
        try:
            # One byte past the declared size: a member that decompresses to more is caught here,
            # not after reading all of it.
            data = f.read(info.file_size + 1)
        except (*_ARCHIVE_ERRORS, RuntimeError) as e:
            raise DatasetError(f"{archive}: cannot read member {info.filename!r}: {e}") from e
    if len(data) != info.file_size:
        raise DatasetError(
            f"{archive}: member {info.filename!r} holds {'more' if len(data) > info.file_size else 'less'} "
            f"than the {info.file_size:,} bytes its header declares"
        )
    return data


def check_zip_member(archive: PathLike, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """Validate one zip member; return its normalised name."""
    name = normalise_member(archive, info.filename)
    mode = info.external_attr >> 16
    if _zip_is_symlink(info):
        target = _zip_read(archive, zf, info, LINK_TARGET).decode("utf-8", "replace")
        _check_link(archive, info.filename, target, hard=False)
    elif mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a special file; refusing the archive")
    return name


class ZipReader:
    """A zip opened for random access, every member validated on open.

    ``names`` maps each regular file's normalised name to its `ZipInfo`; zip
    keeps a central directory, so members are read one by one without
    extracting (or decompressing) the rest. ``links`` lists the symlink
    members (checked to stay inside, never followed). A name that appears
    twice is refused.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            self._zf = zipfile.ZipFile(self.path)
        except _ARCHIVE_ERRORS as e:
            raise DatasetError(f"{self.path}: not a readable zip archive: {type(e).__name__}: {e}") from e
        self.names: dict[str, zipfile.ZipInfo] = {}
        self.links: list[str] = []
        seen = _Names(self.path)
        try:
            for info in self._zf.infolist():
                name = check_zip_member(self.path, self._zf, info)
                seen.add(name, info.is_dir(), info.filename)
                if _zip_is_symlink(info):
                    self.links.append(name)
                elif not info.is_dir():
                    self.names[name] = info
        except BaseException:
            self._zf.close()
            raise

    def _info(self, name: str) -> zipfile.ZipInfo:
        try:
            return self.names[name]
        except KeyError:
            raise DatasetError(f"{self.path}: member {name!r} is missing") from None

    def read(self, name: str, limit: SizeLimit) -> bytes:
        """The bytes of member ``name``; refused from its header if it declares more than ``limit``."""
        return _zip_read(self.path, self._zf, self._info(name), limit)

    def open(self, name: str, limit: SizeLimit | None = None) -> tuple[IO[bytes], int]:
        """``(stream, declared size)`` of member ``name``, for copying it without holding it in memory.

        The stream is not capped: read at most the declared size (plus one byte, to detect a lie).
        """
        info = self._info(name)
        return open_zip_member(self.path, self._zf, info, limit), info.file_size

    def close(self) -> None:
        self._zf.close()

    def __enter__(self) -> ZipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
