"""Relay store backends behind one interface (:class:`~relay_server.store.base.Store`)."""

from __future__ import annotations

from pathlib import Path

from shared.errors import StoreError
from shared.redis_url import REDIS_SCHEMES

from .base import AccountRecord, AgentRecord, AppendResult, Store, StoredEvent

__all__ = ["open_store", "Store", "AccountRecord", "AgentRecord", "AppendResult", "StoredEvent"]

_SQLITE = "sqlite:///"


async def open_store(
    url: str,
    *,
    exclusive: bool = False,
    wait_replicas: int = 0,
    wait_aof: bool = False,
    wait_timeout: float = 1.0,
) -> Store:
    """Open the store named by ``url`` (DESIGN §Command line ``--store``).

    ``sqlite:///path/relay.db`` (the parent directory must exist) or
    ``redis://[:password@]host:port/db[?prefix=P]``, ``redis+sentinel://h1,h2/service/db``
    or ``redis+cluster://h1,h2`` (``rediss`` for TLS; docs/redis.md). The ``wait_*``
    settings (``ServerConfig.cluster``) apply to Redis only: each append pipeline is followed
    by ``WAIT wait_replicas`` and/or ``WAITAOF 1 wait_replicas``. ``exclusive`` applies to
    SQLite only: the relay server's own file, which no other process may open meanwhile
    (:meth:`SqliteStore.open <relay_server.store.sqlite.SqliteStore.open>`).

    Raises:
        StoreError: unknown scheme, unavailable backend, or the store cannot be opened.
    """
    if url.startswith(_SQLITE):
        from .sqlite import SqliteStore

        path = url[len(_SQLITE) :]
        if not path:
            raise StoreError("sqlite store URL needs a path: sqlite:///path/relay.db")
        # sqlite:///relative and sqlite:////absolute both name a file path after the prefix.
        return await SqliteStore.open(Path(path), exclusive=exclusive)
    if url.lower().startswith(REDIS_SCHEMES):
        try:
            from .redis import RedisStore
        except ImportError as exc:  # the optional [redis] extra is not installed
            raise StoreError("the redis store needs the [redis] extra (redis-py)") from exc

        return await RedisStore.open(
            url, wait_replicas=wait_replicas, wait_aof=wait_aof, wait_timeout=wait_timeout
        )
    raise StoreError(f"unknown store URL scheme: {url.split(':', 1)[0]!r}")
