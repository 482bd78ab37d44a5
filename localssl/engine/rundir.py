"""Run folders: one run per folder, held under an exclusive lock.

Two runs writing to one folder leave a silent mix of both (one's checkpoint,
the other's config, interleaved metrics). A run therefore holds an
``fcntl.flock`` on ``RUN/.localssl.lock`` from before it writes anything
until it exits. The kernel drops the lock when the holding process dies,
however it dies (``kill -9`` included), so a stale lock needs no PID
guessing: a lock that can be taken is free. The file itself stays in the
folder (unlinking it would let a third process lock a fresh inode while a
second still holds the old one); it only records who holds it, for the
message the next run prints.

A new run also needs an empty (or new) folder: files a user put there would
otherwise be overwritten or mixed with the run's. The files of an earlier
attempt that never reached a checkpoint (config and metrics of a run killed
before its first one) are not a run, and a new run starts over on them.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from localssl.atomic import remove_orphans
from localssl.config import ConfigError

LOCK = ".localssl.lock"
# What `train` writes before its first checkpoint (and the lock): an
# unfinished attempt's leftovers, which a new run in the folder replaces.
RUN_ARTIFACTS = frozenset({LOCK, "config.yaml", "config.yaml.tmp", "metrics.jsonl", "metrics.csv"})


class RunFolderLock:
    """An exclusive, non-blocking lock on a run folder; a context manager.

    ``acquire`` fails at once (no waiting) with a `ConfigError` that names the
    folder and the holder's PID, host and start time.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fh: IO[str] | None = None

    def acquire(self) -> RunFolderLock:
        # "a+": create if missing, never truncate a holder's record before we own the lock.
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fh.close()
                raise
            fh.seek(0)
            holder = fh.read().strip() or "a process that has not written its record yet"
            fh.close()
            raise ConfigError(
                f"{self.folder} is in use by another localssl run ({holder}): wait for it to end, or choose "
                "another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()  # closing the last descriptor drops the flock

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def prepare_run_folder(out: str | Path, resume: bool) -> RunFolderLock:
    """Lock ``out`` for a run (a new one, or ``resume``) and check that it may go there.

    The checks run while the lock is held, so two runs started together
    cannot both find the folder free. Returns the held lock; on any error
    the lock is released before raising.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        kind = "a file" if out.is_file() else "a device or other special file"
        raise ConfigError(f"--out {out} is {kind}, not a folder: a run writes several files into its folder")
    try:
        if resume:
            if not out.is_dir():
                raise ConfigError(f"cannot resume: {out} does not exist")
        else:
            out.mkdir(parents=True, exist_ok=True)
        lock = RunFolderLock(out).acquire()
    except OSError as e:  # read-only, not ours, a file where a parent folder should be
        raise ConfigError(f"--out {out}: cannot create or write the run folder "
                          f"({e.strerror or e}{f': {e.filename}' if e.filename else ''})") from None
    try:
        # Temp files of writers killed mid-write (a checkpoint can be 100s of MB); the
        # lock means no live run writes here, but a probe may: only dead writers' go.
        remove_orphans(out)
        if not resume:
            _check_new_run_folder(out)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_new_run_folder(out: Path) -> None:
    from localssl.engine.checkpoint import CHECKPOINT

    if (out / CHECKPOINT).exists():
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    # Temporary files of an interrupted atomic write are the run's too.
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in RUN_ARTIFACTS and not (p.name.startswith(".") and ".tmp-" in p.name))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ConfigError(
            f"--out {out} already holds other files ({shown}): a new run needs an empty or new folder, so that "
            "nothing in it is overwritten or mixed with the run's files"
        )


__all__ = ["RunFolderLock", "prepare_run_folder", "LOCK"]
