"""An exclusive lock on a file, held by the operating system for the life of a descriptor.

The relay holds one beside ``relay.db`` and the agent one in its data dir, so that a second
process on the same files is refused at once instead of sharing them (docs/deployment.md). The
OS releases the lock when the descriptor closes, so a killed process never leaves it held and
no stale-lock clean-up is needed. POSIX uses ``flock``; Windows locks the file's first byte
with ``msvcrt.locking``, which is mandatory there and likewise dies with the process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

__all__ = ["LockHeld", "hold", "holder_pid"]


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is the one it wrote into the file, if any."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is held by {'pid ' + str(pid) if pid else 'another process'}")
        self.path = path
        self.pid = pid


def hold(path: Path, *, shared: bool = False, write_pid: bool = True) -> IO[bytes]:
    """Take the lock on ``path`` (created 0600 if missing) without waiting; keep the returned
    handle open for as long as the lock must be held, and close it to release.

    Args:
        shared: a shared lock, which any number of shared holders may have at once and which
            keeps an exclusive one out (POSIX only; Windows has only exclusive locks).
        write_pid: write this process's id into the file once the lock is held, so that the
            process that is refused can name the holder (:func:`holder_pid`).

    Raises:
        LockHeld: another process holds a conflicting lock.
        OSError: the file cannot be opened.
    """
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b")  # noqa: SIM115
    try:
        _lock(handle, shared=shared)
    except OSError as exc:
        handle.close()
        raise LockHeld(path, holder_pid(path)) from exc
    if write_pid and not shared:
        # The pid goes after byte 0 on Windows, whose lock covers that byte alone and keeps
        # other processes from reading it; POSIX locks are advisory, so byte 0 is fine.
        handle.seek(_PID_OFFSET)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
        handle.flush()
    return handle


def holder_pid(path: Path) -> int | None:
    """The pid the holder of the lock on ``path`` wrote, if it can be read."""
    try:
        with open(path, "rb") as file:
            file.seek(_PID_OFFSET)
            text = file.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    _PID_OFFSET = 1

    def _lock(handle: IO[bytes], *, shared: bool) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)

else:
    import fcntl

    _PID_OFFSET = 0

    def _lock(handle: IO[bytes], *, shared: bool) -> None:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
