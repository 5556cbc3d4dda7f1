"""The local token: rotated on disk, picked up by the running agent without a restart.

DESIGN §Agent local API: the token is the content of ``local-token`` in the data dir, readable
by its user only. :func:`rotate_token` replaces the file atomically (a reader sees the old
token or the new one, never a torn file). The running agent holds a :class:`TokenFile`, which
stats the file on every check and re-reads it when the file changed: an ``os.stat`` costs
microseconds, and comparing inode and ``mtime_ns`` catches an atomic replace even within one
timestamp tick.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shared import crypto
from shared.files import write_private_file

from . import acl
from .acl import AclApi
from .enroll import TOKEN_FILE
from .winacl import system_api

__all__ = ["TokenFile", "StaticToken", "TokenSource", "rotate_token", "read_token"]

log = logging.getLogger(__name__)


def read_token(path: Path) -> str:
    """The token in ``path``, stripped.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is empty.
    """
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def rotate_token(data_dir: Path, *, acl_api: AclApi | None = None) -> str:
    """Write a new local token to ``data_dir/local-token`` (0600, atomically); return it.

    A running agent accepts the new token from its next request on and refuses the old one;
    status-page sessions opened with the old token end too. On Windows the new file gets the
    old one's access list back (:func:`relay_agent.acl.kept_readers`): the local apps' account
    can still read it.

    Args:
        acl_api: the ACL calls; None: the system's (:func:`relay_agent.winacl.system_api`).

    Raises:
        OSError: the file or its access list cannot be written.
    """
    path = data_dir / TOKEN_FILE
    api = acl_api or system_api()
    readers = acl.kept_readers(path, api) if api is not None else []
    token = crypto.new_token()
    # Made inside the data dir, the new file inherits its private access list until the
    # token's own is set.
    write_private_file(path, token + "\n")
    if api is not None:
        acl.protect_secret(path, api, readers=readers)
    log.info("agent.token_rotated", extra={"path": str(data_dir / TOKEN_FILE)})
    return token


class StaticToken:
    """A token fixed for the app's lifetime (tests, embedding)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the local token must not be empty")
        self._token = token

    def current(self) -> str:
        return self._token


class TokenFile:
    """The token in a file, re-read whenever the file is replaced or modified."""

    def __init__(self, path: Path, *, initial: str | None = None) -> None:
        """Args:
            path: the ``local-token`` file.
            initial: the token already read from ``path`` (saves a read; checked on first use
                anyway, since the file may have changed since).

        Raises:
            OSError, ValueError: ``initial`` is None and the file is unreadable or empty.
        """
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = initial if initial else read_token(path)
        self._broken = False

    def current(self) -> str:
        """The token to accept now.

        A file that vanished or became unreadable or empty keeps the last good token (the
        agent must not lock its apps out, nor accept anything); a warning is logged once.
        """
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                token = read_token(self.path)
                self._token, self._stamp = token, stamp
            self._broken = False
        except (OSError, ValueError) as exc:
            if not self._broken:
                log.warning("agent.token_unreadable",
                            extra={"path": str(self.path), "error": str(exc),
                                   "detail": "keeping the last good token"})
                self._broken = True
        return self._token


TokenSource = StaticToken | TokenFile
