"""Small file helpers shared by the relay and the agent."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private_file", "ensure_private_dir"]


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
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # O_CREAT's mode is filtered by umask, and an old tmp keeps its mode
    os.replace(tmp, path)
