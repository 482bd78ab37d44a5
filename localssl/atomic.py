"""All-or-nothing files, and the clean-up of what killed writers leave behind.

Every file localssl writes that a later step reads (checkpoints, configs,
probe results, cache entries) is first written to a hidden temp file beside
it and renamed over it, so a reader sees the old file or the new one, never a
half-written one. A writer killed with ``kill -9`` cannot remove its temp
file, so temp names carry the writer's PID and host
(``.NAME.tmp-PID@HOST...``): `remove_orphans` deletes those of processes
that no longer exist on this host, and leaves alone those of live processes
and of other hosts (a cache folder may be shared over NFS).
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# Earlier versions wrote ".NAME.tmp-PID" (no host): read as this host's.
_TEMP = re.compile(r"^\..+\.tmp-(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9_-]+))?(?:[.].*)?$")


def _host() -> str:
    # No dots: what follows the host in a name (a suffix) starts with one.
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_marker() -> str:
    """``tmp-PID@HOST``: what a temp file's name says about its writer."""
    return f"tmp-{os.getpid()}@{_host()}"


def temp_path(path: str | Path) -> Path:
    """The hidden temp file beside ``path`` that this process writes before renaming it over ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{temp_marker()}")


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` all or nothing: yield a temp file beside it, renamed over it if the block succeeds.

    The temp file is opened on entry, so a folder that cannot take the file
    fails before any work is done; it is removed if the block fails.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the temp files in ``folder`` left by dead processes of this host; return what was removed.

    A PID that was reused by an unrelated live process keeps its orphan: the
    safe side, since a live writer's file must never be removed.
    """
    folder = Path(folder)
    removed = []
    host = _host()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if m is None or (m["host"] or host) != host or _alive(int(m["pid"])):
            continue
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:
            pass  # e.g. a read-only shared folder: leaving it is harmless
    return removed


__all__ = ["atomic_file", "remove_orphans", "temp_marker", "temp_path"]
