"""Builders of hostile files for the loader tests: small on disk, whatever they declare.

Nothing here allocates what the files declare: a tar header or a zip central
directory that *says* gigabytes, a PNG header that says 12000 x 12000, a
sparse file whose size is set without writing it. `bounded_memory` asserts
that the code under test did not allocate it either (tracemalloc sees Python
objects and numpy arrays).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import localssl

REPO = Path(localssl.__file__).resolve().parents[1]


@contextmanager
def bounded_memory(max_mib: float) -> Iterator[None]:
    """Fail unless the block's peak of traced allocations stays under ``max_mib``."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert peak < max_mib * 2**20, f"allocated {peak / 2**20:.1f} MiB, expected under {max_mib} MiB"


def _tar_raw(members: Sequence[tuple[str, bytes]]) -> bytes:
    """The tar blocks of regular files ``members``, in order (a name may repeat), without the end blocks."""
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w")  # never closed: closing writes the end-of-archive blocks
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()[: tf.offset]


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar (gzipped if the name ends in .gz) of regular files, in order; a name may repeat."""
    _write_maybe_gz(path, _tar_raw(members) + b"\0" * 1024)
    return path


def tar_declaring(path: Path, members: Sequence[tuple[str, bytes]], last: str, declared: int) -> Path:
    """``members`` as a tar, then a header for ``last`` declaring ``declared`` bytes, and the archive ends.

    What a gzip bomb looks like to a reader that trusts the header: the
    bytes would come, but the loader must refuse before asking for them.
    """
    info = tarfile.TarInfo(last)
    info.size = declared
    _write_maybe_gz(path, _tar_raw(members) + info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 512)
    return path


def tar_with_header(path: Path, kind: bytes, declared: int) -> Path:
    """A tar whose first header is a GNU long-name (``b"L"``) or pax (``b"x"``) record declaring ``declared`` bytes."""
    info = tarfile.TarInfo("././@LongLink" if kind == b"L" else "pax")
    info.type = kind
    info.size = declared
    _write_maybe_gz(path, info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024)
    return path


def _write_maybe_gz(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def write_zip(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """A zip of the given members, in order; a repeated name is written twice (zipfile only warns)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def zip_declaring(path: Path, member: str, declared: int) -> Path:
    """Rewrite the central-directory entry of ``member`` so that it declares ``declared`` bytes."""
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    count, _size, offset = struct.unpack_from("<HII", data, end + 10)
    for _ in range(count):
        n, m, k = struct.unpack_from("<HHH", data, offset + 28)
        if data[offset + 46 : offset + 46 + n].decode() == member:
            struct.pack_into("<I", data, offset + 24, declared)  # uncompressed size
        offset += 46 + n + m + k
    path.write_bytes(bytes(data))
    return path


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header says ``width`` x ``height`` RGB (its pixel data is a stub)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def eps_bytes() -> bytes:
    """An 8x8 Encapsulated PostScript image: PIL would hand it to Ghostscript to decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "EPS")
    return buf.getvalue()


def sparse_file(path: Path, size: int) -> Path:
    """``path`` (kept if it exists) extended to ``size`` bytes, taking no disk space (or time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.truncate(path, size)
    return path


def run_isolated(code: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python on this checkout; a hang fails the test instead of the suite."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the loader hung (no result after {timeout} s)") from None
