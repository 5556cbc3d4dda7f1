"""Small file helpers shared by the relay and the agent."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

__all__ = ["write_private_file", "ensure_private_dir", "restrict_mode", "NotOurs"]


class NotOurs(PermissionError):
    """A file or directory is open to other users and owned by someone else, so this process
    will not change its mode; ``str()`` says what to do."""


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed; a new directory is readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_private_file(path: Path, data: bytes | str) -> None:
    """Write a secret file atomically, readable and writable by its owner only (0600).

    The temporary file is created 0600 before any byte is written, so the secret is never
    readable by others, not even for an instant.
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            view = memoryview(raw)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)  # O_CREAT's mode is filtered by umask, and an old tmp keeps its mode
        os.replace(tmp, path)
    except BaseException:
        # A full disk, say: leave the old file as it was and no half-written copy beside it.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def restrict_mode(path: Path, mode: int) -> int | None:
    """Make ``path`` no more open than ``mode`` (``0o700`` for a directory, ``0o600`` for a
    file), when it exists.

    A path we own is tightened with ``chmod``; one owned by another user is left alone and
    refused, since changing it could break whoever owns it (its owner should, or the
    process should run as its owner). Not on Windows, whose modes do not say who may read.

    Returns:
        The old permission bits when they were tightened; ``None`` when ``path`` is missing
        or was private already.

    Raises:
        NotOurs: ``path`` grants more than ``mode`` and is not ours.
        OSError: ``path`` cannot be examined or changed.
    """
    if os.name != "posix":
        return None
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    old = stat.S_IMODE(info.st_mode)
    if not old & ~mode & 0o777:
        return None
    if info.st_uid != os.geteuid():
        raise NotOurs(
            f"{path} is open to other users (mode {old:04o}) and owned by uid {info.st_uid},"
            f" not this process (uid {os.geteuid()}): make it {mode:04o} or run as its owner"
        )
    os.chmod(path, old & mode)
    return old
