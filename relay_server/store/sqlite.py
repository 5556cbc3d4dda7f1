"""The embedded SQLite store (DESIGN §Storage: SQLite, WAL, batched commits).

Every write runs on one dedicated thread that owns the only write connection, so SQLite never
sees two writing threads and the event loop never blocks on disk.

Group commit, for every write: a caller (an event append, a link claim or release, a status
item, an admin change, ...) puts its write in a bounded queue and waits; one writer task takes
everything queued (up to ``batch_size``), runs it in queue order in ONE transaction and wakes
each caller only after that COMMIT returned (DESIGN principle 1: nothing is reported done
before it is durable). Each write but an event append runs under its own ``SAVEPOINT``: one that
raises is undone alone and its caller gets the exception, the rest of the batch commits (an
append's one INSERT is undone by SQLite itself when it fails: see ``_append``). When the
transaction itself fails, every caller of the batch gets ``StoreError``. A caller cancelled
while its write is still queued gives the write up; once its batch began, the write commits all
the same. While one batch is being committed the next one gathers, so under load one fsync
serves many writes: ingress events as much as a reconnect storm's link claims and releases
(docs/performance.md).

Agent cursors (``set_cursor``) and ``last_seen`` (``touch_agent``) are written behind: the call
records the value in memory (latest wins) and returns; the writer stores every recorded value
in its next transaction, together with the writes of that batch (docs/performance.md). Reads
of this instance see the recorded values at once. A crash can lose the last ones: a cursor
that is too low only means re-delivery, which the agent drops by event id (DESIGN principle 1,
at least once), and makes retention keep a little more.

A link's read of what was just appended is served from memory: the writer hands each committed
event to an :class:`~relay_server.store.tail.EventTail` before its caller hears of the commit,
and ``read_events`` asks the tail first (it answers only when sure to hold every event asked
for; see its docstring for why that holds and the net under it).

The writer serves every tenant, so nothing one request does stops it (docs/operations.md,
Readiness): a write that raises fails alone, a failed transaction fails its batch only, and a
written-behind value SQLite cannot bind is dropped (logged once, with the agent id) rather than
retried in every later transaction. A failed commit fails readiness until one succeeds again;
:meth:`SqliteStore.ping` then commits a small write itself, so readiness comes back when the
disk does, traffic or not (it does so on a quiet store too: an old commit says little about
now). Only when the writer cannot go on (its connection is left in an unknown state, disk
faults persist, or a bug escapes it) does the store fail for good: the cause is logged once
with its traceback, every call raises ``StoreError`` and :meth:`SqliteStore.wait_failed`
returns, so the process can exit and be restarted.

``relay.db`` holds every account's X-on API key: the store creates it, its WAL, shared-memory
and lock files owner-only (0600) and tightens looser ones it owns (docs/deployment.md, Files
and modes).

Other reads run on a second thread with its own connection (WAL lets it read while the writer
commits), so a lookup never queues behind an fsync. Ingress key lookups are also cached in
memory for ``_ACCOUNT_TTL`` seconds: this instance's own key changes drop the cache at once,
another process's (an admin CLI on the same file) are seen within the TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from shared import oslock
from shared.errors import ApiError, StoreError
from shared.events import RawRequest, XonEvent, XonId, format_time
from shared.files import NotOurs, restrict_mode
from shared.link.frames import CommandResult

from .base import (
    AccountRecord,
    AccountUsage,
    AgentRecord,
    AppendResult,
    CommandRecord,
    LinkCheck,
    LinkClaim,
    QuotaExceeded,
    StatusItem,
    StoredEvent,
    check_int,
    result_from_json,
    result_to_json,
    stored_xon_id,
)
from .tail import MAX_EVENTS, EventTail

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_ACCOUNT_TTL = 1.0
"""Seconds an ingress key lookup is served from memory (see the module docstring)."""
_ACCOUNT_CACHE_SIZE = 10_000
"""Cached lookups at most (one per account in use); beyond it the cache starts afresh."""

_DISK_FAULTS = {
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_READONLY,
}
"""Primary result codes of a failed commit that a restart may cure and waiting will not (an
I/O error, a file made read-only or replaced). A full disk (``SQLITE_FULL``) is not among them:
it fails readiness but the writer waits for space, since a restart cannot make any."""
_FRESH = 10.0
"""Seconds for which a successful commit shows readiness; after that :meth:`SqliteStore.ping`
commits a probe of its own."""
_LOW_SPACE = 1 << 20
"""Bytes free under which a failure to open the database is blamed on a full disk."""
_DISK_FAULT_COMMITS = 3
"""Failed commits in a row, all disk faults, that stop the writer (with ``disk_fault_grace``)."""

FaultHook = Callable[[str, sqlite3.Connection], None]
"""A test seam (see ``SqliteStore(faults=...)``)."""


class _WriterBroken(Exception):
    """The write connection is in an unknown state (its ROLLBACK failed): it cannot go on."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    ingress_key_hash TEXT NOT NULL UNIQUE,
    xon_api_url TEXT NOT NULL DEFAULT '',
    xon_api_key TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    code_hash TEXT UNIQUE,
    code_expires_at REAL,
    public_key TEXT,
    enrolled_at REAL,
    revoked_at REAL,
    last_seen REAL,
    cursor INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS agents_account ON agents(account_id);
CREATE TABLE IF NOT EXISTS events (
    account_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL UNIQUE,
    xon_id TEXT,
    xon_digest TEXT,
    type TEXT NOT NULL,
    received_at TEXT NOT NULL,
    params TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    query TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_account_seq ON events(account_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedup ON events(account_id, xon_id, xon_digest);
CREATE TABLE IF NOT EXISTS account_seqs (
    account_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    account_id TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    claim_deadline REAL NOT NULL,
    expires_at REAL NOT NULL,
    result TEXT,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX IF NOT EXISTS commands_expires ON commands(expires_at);
CREATE TABLE IF NOT EXISTS status_items (
    account_id TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE TABLE IF NOT EXISTS links (
    agent_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS retention (
    account_id TEXT PRIMARY KEY,
    trimmed_through INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS previous_ingress_keys (
    key_hash TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    valid_until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS replays (
    agent_id TEXT PRIMARY KEY,
    after_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS account_usage (
    account_id TEXT PRIMARY KEY,
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
"""

_ROW_OVERHEAD = 64
"""Bytes counted per event besides its fields (seq, rowid, index entries, roughly)."""

_ROW_BYTES = (
    "length(CAST(id AS BLOB)) + length(CAST(coalesce(xon_id, '') AS BLOB))"
    " + length(CAST(coalesce(xon_digest, '') AS BLOB)) + length(CAST(type AS BLOB))"
    " + length(CAST(received_at AS BLOB)) + length(CAST(params AS BLOB))"
    " + length(CAST(method AS BLOB)) + length(CAST(path AS BLOB))"
    " + length(CAST(query AS BLOB)) + length(CAST(content_type AS BLOB)) + length(body)"
    f" + {_ROW_OVERHEAD}"
)
"""An events row's stored bytes in SQL: the same sum as :func:`_row_bytes`, so what a trim
subtracts is exactly what the append added (docs/redis.md, Quotas)."""

SCHEMA_VERSION = 2
"""``meta.schema_version`` of the tables above. 1 (no such row): the release before per-account
seqs and request digests, upgraded in place by :func:`_migrate_from_1` (docs/deployment.md,
Upgrading)."""

_EVENT_COLUMNS = (
    "seq, id, account_id, type, received_at, params, method, path, query, content_type, body"
)
_AGENT_COLUMNS = "id, account_id, name, created_at, public_key, enrolled_at, revoked_at, last_seen"
_ACCOUNT_COLUMNS = "id, name, created_at, ingress_key_hash, xon_api_url, xon_api_key"
_COMMAND_COLUMNS = "account_id, key, request_hash, claimed_at, claim_deadline, expires_at, result"


@dataclass(slots=True, eq=False)
class _Write(Generic[T]):
    """One queued write: :meth:`run` applies it on the store thread inside the writer's
    transaction; :meth:`settle` answers its caller on the event loop once that committed."""

    apply: Callable[[sqlite3.Connection], T]
    done: asyncio.Future[T]
    savepoint: bool
    """False for an event append: its failed INSERT undoes itself (see ``_append``)."""
    on_commit: Callable[[Any], None] | None = None
    """Called with the result once committed, before the caller hears (keeps the tail whole)."""
    result: Any = None
    error: Exception | None = None

    def run(self, conn: sqlite3.Connection) -> None:
        """Apply the write; when it raises, undo it alone and keep the exception for the caller.

        Raises only when the failure ended the whole transaction.
        """
        if self.savepoint:
            conn.execute("SAVEPOINT write")
        try:
            self.result = self.apply(conn)
        except Exception as exc:
            if not conn.in_transaction:
                raise  # SQLite rolled the whole transaction back (disk full, I/O error)
            if self.savepoint:
                conn.execute("ROLLBACK TO write")
            self.error = exc
        if self.savepoint:
            conn.execute("RELEASE write")

    def settle(self) -> None:
        """Answer the caller with the committed result or the write's own exception."""
        if self.done.done():  # the caller was cancelled
            return
        if self.error is None:
            self.done.set_result(self.result)
        elif isinstance(self.error, sqlite3.Error):
            self.done.set_exception(_store_error(self.error))
        else:
            self.done.set_exception(self.error)

    def fail(self, error: StoreError) -> None:
        if not self.done.done():
            self.done.set_exception(error)


class SqliteStore:
    """:class:`~relay_server.store.base.Store` on one SQLite file.

    Open it with :meth:`open`; ``commit_count`` counts the writer's commits (tests, metrics).
    """

    def __init__(
        self,
        *,
        batch_size: int = 256,
        queue_size: int = 4096,
        tail_events: int = MAX_EVENTS,
        disk_fault_grace: float = 30.0,
        faults: FaultHook | None = None,
    ) -> None:
        """See :meth:`open`, which passes its keyword arguments here.

        Args:
            disk_fault_grace: seconds for which commits may fail with disk faults (I/O error,
                corruption, a read-only file) before the writer gives up; it also needs
                ``_DISK_FAULT_COMMITS`` such failures in a row.
            faults: a test seam, called on the store thread with the write connection at each
                step of a transaction (``"begin"``, ``"commit"``); an exception it raises is
                that step's failure. It may also change the connection (``PRAGMA
                max_page_count`` makes a real full disk).
        """
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-read")
        self._conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._batch_size = batch_size
        # None asks the writer for a transaction of written-behind values alone.
        self._queue: asyncio.Queue[_Write[Any] | None] = asyncio.Queue(maxsize=queue_size)
        self._cursors: dict[str, int] = {}
        """Cursors set but not yet committed (latest wins)."""
        self._touches: dict[str, float] = {}
        """``last_seen`` times recorded but not yet committed."""
        self._flush_queued = False
        self._accounts: dict[str, tuple[float, AccountRecord]] = {}
        """Ingress key hash → (monotonic expiry, account): positive lookups only."""
        self._account_generation = 0
        self._tail_events = tail_events
        self._tail: EventTail | None = None
        """Only in a store opened ``exclusive`` (see :meth:`open`)."""
        self._lock: IO[bytes] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._disk_fault_grace = disk_fault_grace
        self._faults = faults
        self._commit_error: StoreError | None = None
        """Why the last commit failed; ``None`` once one succeeded (readiness)."""
        self._last_commit_at: float | None = None
        """Monotonic time of the last commit that succeeded (readiness)."""
        self._failed_commits = 0
        """Commits failed in a row (logged once per run of failures)."""
        self._disk_faults_since: float | None = None
        """Monotonic time of the first of the disk faults in a row, if the last was one."""
        self._disk_fault_count = 0
        self._failure: StoreError | None = None
        """Set when the writer cannot go on: every call raises it from then on."""
        self._failed = asyncio.Event()
        self.commit_count = 0
        """Transactions committed so far: one per batch of writes and written-behind values,
        each one fsync."""

    @classmethod
    async def open(cls, path: Path, *, exclusive: bool = False, **kwargs: Any) -> SqliteStore:
        """Open (creating if needed) the database at ``path``.

        ``exclusive`` (the relay server): no other store may have the file open meanwhile, which
        lets links read what was just appended from memory (:class:`EventTail`). Otherwise the
        file may be shared with other non-exclusive stores (tests, tools), every read queries
        it, and only an exclusive open is refused. Where the OS has no ``flock`` (Windows)
        nothing is locked and no store keeps a tail.

        The database and its companion files are made owner-only (0600; see the module
        docstring).

        Raises:
            StoreError: the file cannot be opened or initialised, is in use by a store that
                excludes this one, or is readable by others and not ours to tighten.
        """
        store = cls(**kwargs)
        _make_private(path)
        store._lock = _lock(path, exclusive=exclusive)
        try:
            await store._run(lambda: store._connect(path))
            # After the writer made the schema: the reader only ever reads.
            await store._read(lambda: store._connect_reader(path))
            if exclusive and store._lock is not None:
                floors = await store._run(store._last_assigned_seqs)
                store._tail = EventTail(floors=floors, max_events=store._tail_events)
        except StoreError as exc:
            store._unlock()
            await store._run_unchecked(store._close_conn)
            store._executor.shutdown(wait=True)
            store._reader.shutdown(wait=True)
            raise StoreError(f"sqlite: cannot open {path}: {_open_failure(exc, path)}") from exc
        store._writer = asyncio.create_task(store._write_loop(), name="sqlite-store-writer")
        return store

    # -- plumbing ------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T], thread: ThreadPoolExecutor | None = None) -> T:
        """Run ``fn`` on the store thread (or ``thread``); sqlite errors become ``StoreError``."""
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(thread or self._executor, fn)
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    async def _read(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the read thread (its own connection: never waits for a commit)."""
        return await self._run(fn, self._reader)

    async def _run_unchecked(self, fn: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, fn)

    def _connect(self, path: Path) -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # DESIGN principle 1: a commit must survive power loss before X-on gets its 2xx.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            _prepare_schema(conn)
        except (sqlite3.Error, StoreError):
            conn.close()
            raise
        self._conn = conn

    def _last_assigned_seqs(self) -> dict[str, int]:
        """Each account's highest seq ever assigned: its later appends are above it (its
        counter never goes back), so a new tail starts complete from there."""
        rows = self._db().execute("SELECT account_id, last_seq FROM account_seqs")
        return {str(account_id): int(last) for account_id, last in rows}

    def _connect_reader(self, path: Path) -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error:
            conn.close()
            raise
        self._read_conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:  # pragma: no cover - open() guarantees it
            raise StoreError("store is not open")
        return self._conn

    def _rdb(self) -> sqlite3.Connection:
        """The read connection (on the read thread only)."""
        if self._read_conn is None:  # pragma: no cover - open() guarantees it
            raise StoreError("store is not open")
        return self._read_conn

    async def _tx(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        savepoint: bool = True,
        on_commit: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``fn`` in the writer's next transaction (module docstring); return its result,
        or raise its exception, once that transaction committed.

        Raises:
            StoreError: the store is closed, ``fn`` failed in SQLite, or the commit failed.
        """
        self._check_writable()
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # A bounded queue: when the disk falls behind, writers wait here.
        await self._queue.put(_Write(fn, done, savepoint, on_commit))
        return await done

    def _check_writable(self) -> None:
        if self._failure is not None:
            raise StoreError(str(self._failure))  # a fresh one per caller: tracebacks stay apart
        if self._closing or self._writer is None or self._writer.done():
            raise StoreError("store is closed")

    async def _write_loop(self) -> None:
        """Commit what is queued, batch after batch, until :meth:`close` cancels it.

        A failure of one batch is that batch's (:meth:`_commit`); anything escaping here is a
        bug in the writer itself, which then fails every later write (:meth:`_fail`).
        """
        try:
            while True:
                taken = [await self._queue.get()]
                try:
                    while len(taken) < self._batch_size and not self._queue.empty():
                        taken.append(self._queue.get_nowait())
                    self._flush_queued = False
                    # A caller cancelled before its batch began gave its write up.
                    writes = [w for w in taken if w is not None and not w.done.cancelled()]
                    await self._commit(writes)
                    if self._failure is not None:
                        break
                finally:
                    for _ in taken:
                        self._queue.task_done()
        except Exception as exc:
            self._fail(exc, "the store writer failed")
        # Failed for good: answer whatever is still queued, and anything queued later.
        while True:
            write = await self._queue.get()
            if write is not None:
                write.fail(StoreError(str(self._failure or "store is closed")))
            self._queue.task_done()

    async def _commit(self, writes: list[_Write[Any]]) -> None:
        """Run ``writes`` and store the written-behind values in one transaction, then answer
        each write's caller."""
        cursors, touches = dict(self._cursors), dict(self._touches)
        if not (writes or cursors or touches):
            return
        try:
            dropped = await self._run(lambda: self._commit_batch(writes, cursors, touches))
        except Exception as exc:
            error = self._commit_failed(exc, len(writes))
            # The written-behind values stay recorded: the next transaction retries them.
            for write in writes:
                write.fail(error)
            return
        self._commit_succeeded()
        # Refused values are forgotten with the committed ones: retrying them would fail
        # every later transaction's values the same way.
        self._forget_written(cursors, touches)
        _log_dropped(dropped, cursors, touches)
        try:
            for write in writes:
                if write.error is None and write.on_commit is not None:
                    write.on_commit(write.result)
                write.settle()
        except Exception:
            # Committed, but what serves reads from memory may have missed it: fail for good
            # (the caller of the loop) rather than serve an incomplete tail.
            for write in writes:
                write.fail(StoreError("sqlite: the store writer failed"))
            raise

    def _commit_batch(
        self, writes: list[_Write[Any]], cursors: dict[str, int], touches: dict[str, float]
    ) -> dict[str, set[str]]:
        """One immediate transaction on the store thread: the written-behind values, then
        ``writes`` in queue order (each keeps its own result or exception).

        Returns:
            The agent ids, by column, whose written-behind value SQLite could not take.
        """
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._fault("begin", conn)
            dropped = {
                "cursor": _write_behind(conn, "cursor", cursors),
                "last_seen": _write_behind(conn, "last_seen", touches),
            }
            for write in writes:
                write.run(conn)
            self._fault("commit", conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    raise _WriterBroken(f"ROLLBACK failed: {exc}") from exc
            raise
        return dropped

    def _fault(self, step: str, conn: sqlite3.Connection) -> None:
        if self._faults is not None:
            self._faults(step, conn)

    def _commit_succeeded(self) -> None:
        self.commit_count += 1
        self._last_commit_at = time.monotonic()
        if self._failed_commits:
            log.info("store.commit_recovered", extra={"failed_commits": self._failed_commits})
        self._commit_error = None
        self._failed_commits = self._disk_fault_count = 0
        self._disk_faults_since = None

    def _commit_failed(self, exc: Exception, writes: int) -> StoreError:
        """Note a failed transaction (readiness fails until a commit succeeds) and give up
        for good when the writer cannot go on; returns the error for the batch's callers."""
        cause = exc.__cause__ if isinstance(exc, StoreError) else exc
        if isinstance(exc, StoreError):
            error = StoreError(str(exc))
        else:
            error = StoreError(f"sqlite: commit failed: {type(exc).__name__}: {exc}")
        error.__cause__ = cause
        self._commit_error = error
        self._failed_commits += 1
        if isinstance(exc, _WriterBroken):
            self._fail(exc, "the store writer failed")
            return error
        if self._failed_commits == 1:
            # Once per run of failures (a full disk fails every batch): the next success
            # logs store.commit_recovered with the count.
            unexpected = not isinstance(cause, sqlite3.Error)
            log.log(
                logging.ERROR if unexpected else logging.WARNING,
                "store.commit_failed",
                extra={"writes": writes, "error": str(error)},
                exc_info=cause if unexpected else None,
            )
        if _is_disk_fault(cause):
            now = time.monotonic()
            if self._disk_faults_since is None:
                self._disk_faults_since = now
            self._disk_fault_count += 1
            if (
                self._disk_fault_count >= _DISK_FAULT_COMMITS
                and now - self._disk_faults_since >= self._disk_fault_grace
            ):
                self._fail(exc, "commits keep failing with disk faults")
        else:
            self._disk_faults_since, self._disk_fault_count = None, 0
        return error

    def _fail(self, exc: BaseException, why: str) -> None:
        """The writer cannot go on: log the cause once, with its traceback, fail readiness
        and every later call, and wake :meth:`wait_failed`."""
        if self._failure is not None:
            return
        cause = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ else exc
        self._failure = StoreError(f"sqlite: {why}: {type(cause).__name__}: {cause}")
        self._failure.__cause__ = cause
        log.critical("store.failed", extra={"error": str(self._failure)}, exc_info=cause)
        self._failed.set()

    async def wait_failed(self) -> BaseException:
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    def _forget_written(self, cursors: dict[str, int], touches: dict[str, float]) -> None:
        """Drop the committed values, unless a newer one was recorded meanwhile."""
        for agent_id, seq in cursors.items():
            if self._cursors.get(agent_id) == seq:
                del self._cursors[agent_id]
        for agent_id, now in touches.items():
            if self._touches.get(agent_id) == now:
                del self._touches[agent_id]

    async def close(self) -> None:
        """Commit what is queued, then close. Idempotent."""
        if self._closed:
            return
        self._closing = True
        if self._writer is not None and not self._writer.done():
            await self._queue.join()
            self._writer.cancel()  # now idle in queue.get()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._failure is None:
            # Values left over by a failed commit: one last try, then they are lost
            # (re-delivery).
            await self._commit([])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._reader, self._close_read_conn)
        await loop.run_in_executor(self._executor, self._close_conn)
        self._closed = True
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _close_read_conn(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    async def ping(self) -> None:
        self._check_writable()
        last = self._last_commit_at
        if self._commit_error is None and last is not None and time.monotonic() - last < _FRESH:
            await self._read(lambda: self._rdb().execute("SELECT 1").fetchone())
            return

        # Only a commit shows that one can succeed now: after a failed one (the disk may have
        # room again; waiting for traffic would not do when readiness keeps it away), and on
        # a quiet store (a disk that filled up meanwhile, a commit that hangs).
        def probe(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('ready_probe', ?)",
                (format_time(time.time()),),
            )

        await self._tx(probe)

    async def relay_id(self) -> str:
        def get_or_make(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT value FROM meta WHERE key = 'relay_id'").fetchone()
            if row is not None:
                return str(row[0])
            relay_id = "rly_" + secrets.token_urlsafe(12)
            conn.execute("INSERT INTO meta (key, value) VALUES ('relay_id', ?)", (relay_id,))
            return relay_id

        return await self._tx(get_or_make)

    # -- accounts ------------------------------------------------------------------------------

    async def create_account(
        self, *, name: str, ingress_key_hash: str, xon_api_url: str = "", xon_api_key: str = ""
    ) -> AccountRecord:
        record = AccountRecord(
            id="acc_" + secrets.token_urlsafe(9),
            name=name,
            created_at=time.time(),
            ingress_key_hash=ingress_key_hash,
            xon_api_url=xon_api_url,
            xon_api_key=xon_api_key,
        )

        def insert(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise ApiError(409, "account_exists", f"an account named {name!r} exists")
            conn.execute(
                f"INSERT INTO accounts ({_ACCOUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.created_at,
                    record.ingress_key_hash,
                    record.xon_api_url,
                    record.xon_api_key,
                ),
            )

        await self._tx(insert)
        return record

    async def get_account(self, id_or_name: str) -> AccountRecord | None:
        return await self._read(
            lambda: self._one_account("id = ? OR name = ? ORDER BY id = ? DESC", (id_or_name,) * 3)
        )

    async def account_by_ingress_hash(self, key_hash: str) -> AccountRecord | None:
        if self._closed:
            raise StoreError("store is closed")
        cached = self._accounts.get(key_hash)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        generation = self._account_generation

        def select() -> AccountRecord | None:
            current = self._one_account("ingress_key_hash = ?", (key_hash,))
            if current is not None:
                return current
            row = (
                self._rdb()
                .execute(
                    "SELECT account_id FROM previous_ingress_keys"
                    " WHERE key_hash = ? AND valid_until > ?",
                    (key_hash, time.time()),
                )
                .fetchone()
            )
            found = None if row is None else self._one_account("id = ?", (row[0],))
            return None if found is None else replace(found, ingress_key_hash=key_hash)

        account = await self._read(select)
        # Only current keys are cached (a previous key's deadline is checked every time), and
        # nothing read while a key change committed (the generation moved meanwhile).
        if (
            account is not None
            and account.ingress_key_hash == key_hash
            and generation == self._account_generation
        ):
            if len(self._accounts) >= _ACCOUNT_CACHE_SIZE:
                self._accounts.clear()
            self._accounts[key_hash] = (time.monotonic() + _ACCOUNT_TTL, account)
        return account

    async def _account_tx(
        self, fn: Callable[[sqlite3.Connection], T], on_commit: Callable[[T], None] | None = None
    ) -> T:
        """``_tx`` for a write that changes accounts: every cached lookup is dropped after it,
        also when the caller is cancelled (the write may commit all the same)."""
        try:
            return await self._tx(fn, on_commit=on_commit)
        finally:
            self._forget_accounts()

    def _forget_accounts(self) -> None:
        """An account changed on this instance: drop every cached lookup."""
        self._account_generation += 1
        self._accounts.clear()

    async def list_accounts(self) -> list[AccountRecord]:
        def select() -> list[AccountRecord]:
            rows = self._rdb().execute(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, id"
            )
            return [_account(row) for row in rows]

        return await self._read(select)

    async def update_account(
        self, account_id: str, *, xon_api_url: str | None = None, xon_api_key: str | None = None
    ) -> AccountRecord | None:
        def update(conn: sqlite3.Connection) -> AccountRecord | None:
            row = conn.execute(
                "UPDATE accounts SET xon_api_url = COALESCE(?, xon_api_url),"
                " xon_api_key = COALESCE(?, xon_api_key)"
                f" WHERE id = ? RETURNING {_ACCOUNT_COLUMNS}",
                (xon_api_url, xon_api_key, account_id),
            ).fetchone()
            return None if row is None else _account(row)

        return await self._account_tx(update)

    def _one_account(self, where: str, args: tuple[str, ...]) -> AccountRecord | None:
        row = (
            self._rdb()
            .execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE {where} LIMIT 1", args)
            .fetchone()
        )
        return None if row is None else _account(row)

    # -- agents --------------------------------------------------------------------------------

    async def create_agent(
        self, *, account_id: str, name: str, code_hash: str, code_expires_at: float
    ) -> AgentRecord:
        record = AgentRecord(
            id="agt_" + secrets.token_urlsafe(9),
            account_id=account_id,
            name=name,
            created_at=time.time(),
        )

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO agents (id, account_id, name, created_at, code_hash, code_expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, account_id, name, record.created_at, code_hash, code_expires_at),
            )

        await self._tx(insert)
        return record

    async def enroll_agent(self, *, code_hash: str, public_key: str, now: float) -> AgentRecord:
        def enroll(conn: sqlite3.Connection) -> AgentRecord | None:
            # The code is spent (set to NULL) in the same statement that checks it, so it can
            # be used once even by racing requests.
            row = conn.execute(
                "UPDATE agents SET public_key = ?, enrolled_at = ?, code_hash = NULL,"
                " code_expires_at = NULL"
                " WHERE code_hash = ? AND code_expires_at > ? AND revoked_at IS NULL"
                " AND public_key IS NULL"
                f" RETURNING {_AGENT_COLUMNS}",
                (public_key, now, code_hash, now),
            ).fetchone()
            return None if row is None else _agent(row)

        agent = await self._tx(enroll)
        if agent is None:
            raise ApiError(400, "invalid_code", "enrollment code is invalid, used or expired")
        return agent

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        def select() -> AgentRecord | None:
            row = (
                self._rdb()
                .execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE id = ?", (agent_id,))
                .fetchone()
            )
            return None if row is None else _agent(row)

        touched = self._touches.get(agent_id)
        agent = await self._read(select)
        return None if agent is None else self._with_touch(agent, touched)

    def _with_touch(self, agent: AgentRecord, touched: float | None) -> AgentRecord:
        """``agent`` with its newest ``last_seen``: the row's, a value recorded before the row
        was read (``touched``; the writer may have committed and forgotten it while the read
        ran on an older snapshot), or one recorded since."""
        seen = [t for t in (agent.last_seen, touched, self._touches.get(agent.id)) if t is not None]
        return replace(agent, last_seen=max(seen)) if seen else agent

    async def list_agents(self, account_id: str | None = None) -> list[AgentRecord]:
        def select() -> list[AgentRecord]:
            sql = f"SELECT {_AGENT_COLUMNS} FROM agents"
            args: tuple[str, ...] = ()
            if account_id is not None:
                sql += " WHERE account_id = ?"
                args = (account_id,)
            rows = self._rdb().execute(sql + " ORDER BY created_at, id", args)
            return [_agent(row) for row in rows]

        touched = dict(self._touches)
        agents = await self._read(select)
        return [self._with_touch(agent, touched.get(agent.id)) for agent in agents]

    async def revoke_agent(self, agent_id: str, *, now: float) -> AgentRecord | None:
        def revoke(conn: sqlite3.Connection) -> AgentRecord | None:
            # An unused enrollment code dies with the agent.
            row = conn.execute(
                "UPDATE agents SET revoked_at = COALESCE(revoked_at, ?), code_hash = NULL"
                f" WHERE id = ? RETURNING {_AGENT_COLUMNS}",
                (now, agent_id),
            ).fetchone()
            return None if row is None else _agent(row)

        return await self._tx(revoke)

    async def touch_agent(self, agent_id: str, *, now: float) -> None:
        # Written behind (module docstring): a reconnect storm makes one transaction.
        self._check_writable()
        self._touches[agent_id] = now
        self._queue_flush()

    # -- events and cursors --------------------------------------------------------------------

    def _queue_flush(self) -> None:
        """Make sure the writer runs soon for the written-behind values."""
        if self._flush_queued:
            return
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            return  # the writer is busy: it takes the values with its next batch
        self._flush_queued = True

    async def append_event(
        self, event: XonEvent, *, xon_id: XonId | None, max_bytes: int | None = None
    ) -> AppendResult:
        check_int("max_bytes", max_bytes)
        return await self._tx(
            lambda conn: _append(conn, event, xon_id, max_bytes), savepoint=False,
            on_commit=self._took,
        )

    async def account_usage(self, account_id: str) -> AccountUsage:
        def select() -> AccountUsage:
            row = self._rdb().execute(
                "SELECT events, bytes FROM account_usage WHERE account_id = ?", (account_id,)
            ).fetchone()
            return AccountUsage(events=0, bytes=0) if row is None else AccountUsage(
                events=int(row[0]), bytes=int(row[1]))

        return await self._read(select)

    def _took(self, result: AppendResult) -> None:
        if self._tail is not None and not result.duplicate:
            self._tail.add(result.stored)

    async def read_events(self, account_id: str, *, after: int, limit: int) -> list[StoredEvent]:
        check_int("after", after)
        check_int("limit", limit)
        held = None if self._tail is None else self._tail.read(account_id, after=after, limit=limit)
        if held is not None:
            await asyncio.sleep(0)  # like every store call, give the loop a turn
            return held

        def select() -> list[StoredEvent]:
            rows = self._rdb().execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE account_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (account_id, after, limit),
            )
            return [_stored(row) for row in rows]

        return await self._read(select)

    async def head_seq(self, account_id: str) -> int:
        def select() -> int:
            row = (
                self._rdb()
                .execute("SELECT MAX(seq) FROM events WHERE account_id = ?", (account_id,))
                .fetchone()
            )
            return int(row[0] or 0)

        head = await self._read(select)
        if self._tail is not None:
            self._tail.check_head(account_id, head)
        return head

    async def get_cursor(self, agent_id: str) -> int:
        recorded = self._cursors.get(agent_id)
        if recorded is not None:
            return recorded

        def select() -> int:
            row = (
                self._rdb()
                .execute("SELECT cursor FROM agents WHERE id = ?", (agent_id,))
                .fetchone()
            )
            return 0 if row is None else int(row[0])

        return await self._read(select)

    async def set_cursor(self, agent_id: str, seq: int) -> None:
        # Written behind (module docstring): an ack no longer waits for an fsync of its own.
        check_int("seq", seq)
        self._check_writable()
        self._cursors[agent_id] = seq
        self._queue_flush()

    # -- link ownership (docs/scaling.md) ------------------------------------------------------

    async def claim_link(self, agent_id: str, *, owner: str) -> LinkClaim:
        def claim(conn: sqlite3.Connection) -> LinkClaim:
            if conn.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,)).fetchone() is None:
                raise StoreError(f"unknown agent {agent_id!r}")
            row = conn.execute(
                "SELECT epoch, owner FROM links WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            epoch, previous = (0, "") if row is None else (int(row[0]), str(row[1]))
            conn.execute(
                "INSERT INTO links (agent_id, epoch, owner) VALUES (?, ?, ?) ON CONFLICT"
                " (agent_id) DO UPDATE SET epoch = excluded.epoch, owner = excluded.owner",
                (agent_id, epoch + 1, owner),
            )
            return LinkClaim(epoch=epoch + 1, previous_owner=previous)

        return await self._tx(claim)

    async def release_link(self, agent_id: str, *, epoch: int) -> None:
        check_int("epoch", epoch)

        def release(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE links SET owner = '' WHERE agent_id = ? AND epoch = ?", (agent_id, epoch)
            )

        await self._tx(release)

    async def check_links(self, agent_ids: Sequence[str]) -> dict[str, LinkCheck]:
        ids = list(agent_ids)

        def select() -> dict[str, LinkCheck]:
            found: dict[str, LinkCheck] = {}
            # SQLite limits host parameters (999 in old builds): ask in chunks.
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = self._rdb().execute(
                    "SELECT agents.id, agents.revoked_at, COALESCE(links.epoch, 0) FROM agents"
                    " LEFT JOIN links ON links.agent_id = agents.id"
                    f" WHERE agents.id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                for agent_id, revoked_at, epoch in rows:
                    found[agent_id] = LinkCheck(epoch=int(epoch), revoked=revoked_at is not None)
            return found

        return await self._read(select)

    # -- retention (docs/redis.md, Retention) ---------------------------------------------------

    async def retention_cut(
        self, account_id: str, *, keep_events: int | None, keep_since: float | None
    ) -> int:
        def select() -> int:
            db = self._rdb()
            cut = 0
            if keep_events is not None:
                row = db.execute(
                    "SELECT seq FROM events WHERE account_id = ? ORDER BY seq DESC"
                    " LIMIT 1 OFFSET ?",
                    (account_id, keep_events),
                ).fetchone()
                cut = 0 if row is None else int(row[0])
            if keep_since is not None:
                # received_at is ISO 8601 UTC of one fixed width: text order is time order.
                row = db.execute(
                    "SELECT MAX(seq) FROM events WHERE account_id = ? AND received_at < ?",
                    (account_id, format_time(keep_since)),
                ).fetchone()
                cut = max(cut, int(row[0] or 0))
            return cut

        return await self._read(select)

    async def trim_events(self, account_id: str, *, through: int, limit: int) -> int:
        def trim(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = conn.execute(
                "SELECT seq FROM events WHERE account_id = ? AND seq <= ? AND seq <"
                " (SELECT MAX(seq) FROM events WHERE account_id = ?) ORDER BY seq LIMIT ?",
                (account_id, through, account_id, limit),
            ).fetchall()
            if not rows:
                return 0, 0
            last = int(rows[-1][0])
            # What the append added for these rows, taken back in the same transaction.
            count, size = conn.execute(
                f"SELECT COUNT(*), coalesce(SUM({_ROW_BYTES}), 0) FROM events"
                " WHERE account_id = ? AND seq <= ?",
                (account_id, last),
            ).fetchone()
            conn.execute(
                "UPDATE account_usage SET events = events - ?, bytes = bytes - ?"
                " WHERE account_id = ?",
                (count, size, account_id),
            )
            conn.execute("DELETE FROM events WHERE account_id = ? AND seq <= ?", (account_id, last))
            conn.execute(
                "INSERT INTO retention (account_id, trimmed_through) VALUES (?, ?) ON CONFLICT"
                " (account_id) DO UPDATE SET trimmed_through ="
                " MAX(trimmed_through, excluded.trimmed_through)",
                (account_id, last),
            )
            return len(rows), last

        def trimmed(result: tuple[int, int]) -> None:
            if self._tail is not None and result[0]:
                self._tail.forget(account_id, through=result[1])

        count, _ = await self._tx(trim, on_commit=trimmed)
        return count

    async def trimmed_through(self, account_id: str) -> int:
        def select() -> int:
            row = (
                self._rdb()
                .execute(
                    "SELECT trimmed_through FROM retention WHERE account_id = ?", (account_id,)
                )
                .fetchone()
            )
            return 0 if row is None else int(row[0])

        return await self._read(select)

    # -- CTOX idempotency ---------------------------------------------------------------------

    async def claim_command(
        self,
        account_id: str,
        key: str,
        *,
        request_hash: str,
        now: float,
        claim_deadline: float,
        expires_at: float,
    ) -> CommandRecord | None:
        def claim(conn: sqlite3.Connection) -> CommandRecord | None:
            # The writer's BEGIN IMMEDIATE holds the write lock: check-then-insert is atomic.
            existing = _one_command(conn, account_id, key)
            if existing is not None and existing.expires_at > now:
                return existing
            conn.execute(
                f"INSERT OR REPLACE INTO commands ({_COMMAND_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (account_id, key, request_hash, now, claim_deadline, expires_at),
            )
            return None

        return await self._tx(claim)

    async def claim_overdue(self, record: CommandRecord, *, now: float) -> bool:
        await asyncio.sleep(0)  # like every store call, give the loop a turn
        return now >= record.claim_deadline

    async def get_command(self, account_id: str, key: str, *, now: float) -> CommandRecord | None:
        def select() -> CommandRecord | None:
            record = _one_command(self._rdb(), account_id, key)
            return record if record is not None and record.expires_at > now else None

        return await self._read(select)

    async def finish_command(
        self,
        account_id: str,
        key: str,
        *,
        request_hash: str,
        result: CommandResult,
        now: float,
        expires_at: float,
    ) -> CommandRecord:
        def finish(conn: sqlite3.Connection) -> CommandRecord:
            existing = _one_command(conn, account_id, key)
            if existing is not None and existing.expires_at > now:
                if existing.result is not None:
                    return existing
                conn.execute(
                    "UPDATE commands SET result = ?, expires_at = ?"
                    " WHERE account_id = ? AND key = ?",
                    (result_to_json(result), expires_at, account_id, key),
                )
            else:
                conn.execute(
                    f"INSERT OR REPLACE INTO commands ({_COMMAND_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (account_id, key, request_hash, now, now, expires_at, result_to_json(result)),
                )
            stored = _one_command(conn, account_id, key)
            assert stored is not None
            return stored

        return await self._tx(finish)

    async def release_command(self, account_id: str, key: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM commands WHERE account_id = ? AND key = ? AND result IS NULL",
                (account_id, key),
            )

        await self._tx(delete)

    async def purge_commands(self, *, now: float) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM commands WHERE expires_at <= ?", (now,)).rowcount

        return await self._tx(delete)

    # -- status cache -------------------------------------------------------------------------

    async def put_status(self, item: StatusItem) -> bool:
        check_int("seq", item.seq)

        def upsert(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO status_items (account_id, key, seq, item) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (account_id, key) DO UPDATE SET seq = excluded.seq,"
                " item = excluded.item WHERE excluded.seq > status_items.seq",
                (item.account_id, item.key, item.seq, json.dumps(item.to_json())),
            )
            return cur.rowcount > 0

        return await self._tx(upsert)

    async def status_snapshot(self, account_id: str) -> list[StatusItem]:
        def select() -> list[StatusItem]:
            rows = self._rdb().execute(
                "SELECT item FROM status_items WHERE account_id = ? ORDER BY key", (account_id,)
            )
            return [StatusItem.from_json(account_id, json.loads(row[0])) for row in rows]

        return await self._read(select)

    # -- operations (docs/operations.md) -------------------------------------------------------

    async def rename_account(self, account_id: str, name: str) -> AccountRecord | None:
        def update(conn: sqlite3.Connection) -> AccountRecord | None:
            taken = conn.execute(
                "SELECT 1 FROM accounts WHERE name = ? AND id != ?", (name, account_id)
            ).fetchone()
            if taken:
                raise ApiError(409, "account_exists", f"an account named {name!r} exists")
            row = conn.execute(
                f"UPDATE accounts SET name = ? WHERE id = ? RETURNING {_ACCOUNT_COLUMNS}",
                (name, account_id),
            ).fetchone()
            return None if row is None else _account(row)

        return await self._account_tx(update)

    async def rotate_ingress_key(
        self, account_id: str, *, new_hash: str, old_valid_until: float
    ) -> AccountRecord | None:
        now = time.time()

        def rotate(conn: sqlite3.Connection) -> AccountRecord | None:
            row = conn.execute(
                "SELECT ingress_key_hash FROM accounts WHERE id = ?", (account_id,)
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM previous_ingress_keys WHERE valid_until <= ?", (now,))
            if old_valid_until > now:
                conn.execute(
                    "INSERT OR REPLACE INTO previous_ingress_keys (key_hash, account_id,"
                    " valid_until) VALUES (?, ?, ?)",
                    (row[0], account_id, old_valid_until),
                )
            updated = conn.execute(
                "UPDATE accounts SET ingress_key_hash = ? WHERE id = ?"
                f" RETURNING {_ACCOUNT_COLUMNS}",
                (new_hash, account_id),
            ).fetchone()
            return _account(updated)

        return await self._account_tx(rotate)

    async def previous_ingress_keys(self, account_id: str, *, now: float) -> list[float]:
        def select() -> list[float]:
            rows = self._rdb().execute(
                "SELECT valid_until FROM previous_ingress_keys"
                " WHERE account_id = ? AND valid_until > ? ORDER BY valid_until",
                (account_id, now),
            )
            return [float(row[0]) for row in rows]

        return await self._read(select)

    async def delete_account(self, account_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            args = (account_id,)
            for owned in ("links", "replays"):
                conn.execute(
                    f"DELETE FROM {owned} WHERE agent_id IN"
                    " (SELECT id FROM agents WHERE account_id = ?)",
                    args,
                )
            for table in (
                "agents", "events", "account_seqs", "commands", "status_items", "retention",
                "account_usage",
            ):
                conn.execute(f"DELETE FROM {table} WHERE account_id = ?", args)
            conn.execute("DELETE FROM previous_ingress_keys WHERE account_id = ?", args)
            return conn.execute("DELETE FROM accounts WHERE id = ?", args).rowcount > 0

        def deleted(_: bool) -> None:
            if self._tail is not None:
                self._tail.forget(account_id)

        return await self._account_tx(delete, deleted)

    async def rename_agent(self, agent_id: str, name: str) -> AgentRecord | None:
        def update(conn: sqlite3.Connection) -> AgentRecord | None:
            row = conn.execute(
                f"UPDATE agents SET name = ? WHERE id = ? RETURNING {_AGENT_COLUMNS}",
                (name, agent_id),
            ).fetchone()
            return None if row is None else _agent(row)

        return await self._tx(update)

    async def get_event(
        self, event_id: str, *, account_id: str | None = None
    ) -> StoredEvent | None:
        def select() -> StoredEvent | None:
            sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?"
            args: tuple[str, ...] = (event_id,)
            if account_id is not None:
                sql += " AND account_id = ?"
                args += (account_id,)
            row = self._rdb().execute(sql, args).fetchone()
            return None if row is None else _stored(row)

        return await self._read(select)

    async def recent_events(
        self, account_id: str, *, limit: int, before: int | None = None
    ) -> list[StoredEvent]:
        check_int("limit", limit)
        check_int("before", before)

        def select() -> list[StoredEvent]:
            rows = self._rdb().execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE account_id = ? AND seq < ?"
                " ORDER BY seq DESC LIMIT ?",
                (account_id, before if before is not None else 2**63 - 1, limit),
            )
            return [_stored(row) for row in rows]

        return await self._read(select)

    async def count_after(self, account_id: str, after: int) -> int:
        check_int("after", after)

        def select() -> int:
            row = (
                self._rdb()
                .execute(
                    "SELECT COUNT(*) FROM events WHERE account_id = ? AND seq > ?",
                    (account_id, after),
                )
                .fetchone()
            )
            return int(row[0])

        return await self._read(select)

    # -- replay (docs/operations.md, Replay) ----------------------------------------------------

    async def request_replay(self, agent_id: str, after_seq: int) -> None:
        check_int("after_seq", after_seq)

        def record(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO replays (agent_id, after_seq) SELECT id, ? FROM agents WHERE id = ?"
                " ON CONFLICT (agent_id) DO UPDATE SET after_seq = excluded.after_seq",
                (after_seq, agent_id),
            )

        await self._tx(record)

    async def pending_replay(self, agent_id: str) -> int | None:
        # Every handshake asks and almost none has a replay: a read, never a write.
        def pending() -> int | None:
            row = (
                self._rdb()
                .execute("SELECT after_seq FROM replays WHERE agent_id = ?", (agent_id,))
                .fetchone()
            )
            return None if row is None else int(row[0])

        return await self._read(pending)

    async def settle_replay(self, agent_id: str, taken: int, rest: int | None) -> None:
        check_int("taken", taken)
        check_int("rest", rest)

        def settle(conn: sqlite3.Connection) -> None:
            if rest is None:
                conn.execute(
                    "DELETE FROM replays WHERE agent_id = ? AND after_seq = ?", (agent_id, taken)
                )
            else:
                conn.execute(
                    "UPDATE replays SET after_seq = CASE WHEN after_seq = ? THEN ?"
                    " ELSE MIN(after_seq, ?) END WHERE agent_id = ?",
                    (taken, rest, rest, agent_id),
                )

        await self._tx(settle)


def _one_command(conn: sqlite3.Connection, account_id: str, key: str) -> CommandRecord | None:
    row = conn.execute(
        f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE account_id = ? AND key = ?",
        (account_id, key),
    ).fetchone()
    if row is None:
        return None
    return CommandRecord(
        account_id=row[0],
        key=row[1],
        request_hash=row[2],
        claimed_at=row[3],
        claim_deadline=row[4],
        expires_at=row[5],
        result=None if row[6] is None else result_from_json(row[6]),
    )


def _row_bytes(event: XonEvent, xon_id: XonId | None, params: str) -> int:
    """An events row's stored bytes (:data:`_ROW_BYTES` in SQL)."""
    req = event.request
    texts = (
        event.id, "" if xon_id is None else xon_id.value, "" if xon_id is None else xon_id.digest,
        event.type, event.received_at, params, req.method, req.path, req.query, req.content_type,
    )
    return sum(len(t.encode()) for t in texts) + len(req.body) + _ROW_OVERHEAD


def _append(
    conn: sqlite3.Connection, event: XonEvent, xon_id: XonId | None, max_bytes: int | None
) -> AppendResult:
    """Insert ``event`` inside the writer's transaction; a repeat resolves to the first copy.

    Rows inserted earlier in the same transaction are visible here, so a repeat within one
    batch also finds its first copy. The account's counter moves first: an INSERT that fails
    after it leaves a skipped seq, which seqs may have (docs/protocol.md, Sequence numbers),
    and never a counter behind the log.
    """
    reused = False
    # An id seen for the first time (the usual case) costs one index probe.
    if xon_id is not None and conn.execute(
        "SELECT 1 FROM events WHERE account_id = ? AND xon_id = ? LIMIT 1",
        (event.account, xon_id.value),
    ).fetchone():
        row = conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events"
            " WHERE account_id = ? AND xon_id = ? AND xon_digest = ?",
            (event.account, xon_id.value, xon_id.digest),
        ).fetchone()
        if row is not None:
            return AppendResult(stored=_stored(row), duplicate=True)
        reused = True
    params = json.dumps(event.params, ensure_ascii=False)
    size = _row_bytes(event, xon_id, params)
    if max_bytes is not None:
        # Before any write: this append is not in a savepoint, and the refusal is its own.
        row = conn.execute(
            "SELECT bytes FROM account_usage WHERE account_id = ?", (event.account,)
        ).fetchone()
        used = 0 if row is None else int(row[0])
        if used + size > max_bytes:
            raise QuotaExceeded(event.account, used=used, size=size, limit=max_bytes)
    # Per account (docs/protocol.md, Sequence numbers): a seq tells nothing of other tenants.
    (seq,) = conn.execute(
        "INSERT INTO account_seqs (account_id, last_seq) VALUES (?, 1) ON CONFLICT (account_id)"
        " DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq",
        (event.account,),
    ).fetchone()
    req = event.request
    conn.execute(
        "INSERT INTO events (account_id, seq, id, xon_id, xon_digest, type, received_at, params,"
        " method, path, query, content_type, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.account,
            seq,
            event.id,
            None if xon_id is None else xon_id.value,
            None if xon_id is None else xon_id.digest,
            event.type,
            event.received_at,
            params,
            req.method,
            req.path,
            req.query,
            req.content_type,
            req.body,
        ),
    )
    conn.execute(
        "INSERT INTO account_usage (account_id, events, bytes) VALUES (?, 1, ?) ON CONFLICT"
        " (account_id) DO UPDATE SET events = events + 1, bytes = bytes + excluded.bytes",
        (event.account, size),
    )
    return AppendResult(
        stored=StoredEvent(seq=int(seq), event=event), duplicate=False, xon_id_reused=reused
    )


def _prepare_schema(conn: sqlite3.Connection) -> None:
    """Create the tables, or bring a database of an older release up to :data:`SCHEMA_VERSION`,
    in one transaction: a failed upgrade leaves the file as it was (docs/deployment.md,
    Upgrading).

    Raises:
        StoreError: the file was written by a newer release.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"sqlite: the database has schema {version}, written by a newer release; this"
                f" one reads schema {SCHEMA_VERSION} (restore the backup taken before upgrading)"
            )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 1:
            events = _migrate_from_1(conn)
            log.info(
                "store.upgraded",
                extra={"backend": "sqlite", "from_schema": 1, "schema": 2, "events": events},
            )
        else:
            _create_tables(conn)
        if "events" in tables and "account_usage" not in tables:
            _count_usage(conn)
        # Only a new or just upgraded file lacks the row (schema 1 had none).
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _count_usage(conn: sqlite3.Connection) -> None:
    """Fill ``account_usage`` for a file written before it existed (its counters are kept up
    to date from then on by every append, trim and deletion)."""
    _create_tables(conn)
    conn.execute(
        f"INSERT INTO account_usage (account_id, events, bytes) SELECT account_id, COUNT(*),"
        f" SUM({_ROW_BYTES}) FROM events GROUP BY account_id"
    )


def _create_tables(conn: sqlite3.Connection) -> None:
    # Statement by statement: executescript would commit the open transaction first.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _schema_version(conn: sqlite3.Connection) -> int:
    """:data:`SCHEMA_VERSION` for a new file; 1 for one without the row (its first release).

    Raises:
        StoreError: the row holds no version number.
    """
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "events" not in tables:
        return SCHEMA_VERSION
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        return 1
    if not str(row[0]).isdigit():
        raise StoreError(f"sqlite: the database has an unreadable schema version {row[0]!r}")
    return int(row[0])


def _migrate_from_1(conn: sqlite3.Connection) -> int:
    """Schema 1 → 2, inside the caller's transaction; returns how many events it kept.

    Schema 1 numbered events with one counter for all accounts and keyed dedup on the X-on id
    alone. Each event keeps its seq (already increasing per account); every account's own
    counter starts at the old counter's high mark, the one value sure to be above every seq it
    ever handed out. Each stored X-on id gets the digest of its own stored request (or the
    envelope marker), so only a true repeat of it matches (docs/delivery.md, Duplicates).
    """
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    high = conn.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    floor = max(0 if row is None else int(row[0]), int(high or 0))
    conn.execute("DROP INDEX IF EXISTS events_account_seq")
    conn.execute("DROP INDEX IF EXISTS events_account_xon_id")
    conn.execute("ALTER TABLE events RENAME TO events_v1")
    _create_tables(conn)
    conn.create_function("xon_v1_digest", 6, _v1_digest, deterministic=True)
    copied = conn.execute(
        "INSERT INTO events (account_id, seq, id, xon_id, xon_digest, type, received_at, params,"
        " method, path, query, content_type, body)"
        " SELECT account_id, seq, id, xon_id,"
        " xon_v1_digest(xon_id, method, path, query, content_type, body),"
        " type, received_at, params, method, path, query, content_type, body"
        " FROM events_v1 ORDER BY seq"
    )
    conn.execute("DROP TABLE events_v1")
    conn.execute(
        "INSERT INTO account_seqs (account_id, last_seq)"
        " SELECT id, ? FROM accounts UNION SELECT DISTINCT account_id, ? FROM events",
        (floor, floor),
    )
    return int(copied.rowcount)


def _v1_digest(
    value: str | None, method: str, path: str, query: str, content_type: str, body: bytes
) -> str | None:
    if value is None:
        return None
    request = RawRequest(
        method=str(method),
        path=str(path),
        query=str(query),
        content_type=str(content_type),
        body=bytes(body),
    )
    return stored_xon_id(str(value), request).digest


def _write_behind(conn: sqlite3.Connection, column: str, values: dict[str, Any]) -> set[str]:
    """Store written-behind values of one ``agents`` column in the writer's transaction.

    Returns:
        The agent ids whose value SQLite refused (a cursor beyond 64 bits): left out, so the
        rest commits.
    """
    if not values:
        return set()
    sql = f"UPDATE agents SET {column} = ? WHERE id = ?"
    conn.execute("SAVEPOINT behind")
    try:
        conn.executemany(sql, [(value, agent_id) for agent_id, value in values.items()])
    except Exception:
        if not conn.in_transaction:
            raise  # SQLite rolled the whole transaction back (disk full, I/O error)
        # Rare: find the values at fault one by one.
        conn.execute("ROLLBACK TO behind")
        refused = set()
        for agent_id, value in values.items():
            try:
                conn.execute(sql, (value, agent_id))
            except Exception:
                if not conn.in_transaction:
                    raise
                refused.add(agent_id)
        conn.execute("RELEASE behind")
        return refused
    conn.execute("RELEASE behind")
    return set()


def _log_dropped(
    dropped: dict[str, set[str]], cursors: dict[str, int], touches: dict[str, float]
) -> None:
    """One warning per written-behind value SQLite refused (it was left out and forgotten)."""
    for column, agent_ids in dropped.items():
        values: dict[str, Any] = cursors if column == "cursor" else touches
        for agent_id in sorted(agent_ids):
            log.warning(
                "store.value_dropped",
                extra={
                    "agent_id": agent_id,
                    "column": column,
                    "value": repr(values.get(agent_id))[:40],
                },
            )


def _is_disk_fault(exc: BaseException | None) -> bool:
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    return code is not None and code & 0xFF in _DISK_FAULTS


def _make_private(path: Path) -> None:
    """Create the database owner-only (SQLite gives its WAL and shared-memory files the
    database's mode), and tighten it and its companions if an older version left them open."""
    try:
        if os.name == "posix":
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for suffix in ("", "-wal", "-shm", ".lock"):
            companion = path.with_name(path.name + suffix)
            old = restrict_mode(companion, 0o600)
            if old is not None:
                log.warning(
                    "store.file_tightened", extra={"path": str(companion), "mode": f"{old:04o}"}
                )
    except NotOurs as exc:
        raise StoreError(f"sqlite: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"sqlite: cannot open {path}: {exc.strerror or exc}") from exc


def _open_failure(exc: StoreError, path: Path) -> str:
    """Why SQLite could not open ``path``, saying so when its disk is full: SQLite reports
    that as an I/O error when the WAL index cannot grow."""
    reason = str(exc).removeprefix("sqlite: ")
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return reason
    return f"its disk is full ({reason})" if free < _LOW_SPACE else reason


def _lock(path: Path, *, exclusive: bool) -> IO[bytes] | None:
    """Hold ``<path>.lock``: exclusively, or shared with other non-exclusive stores. The lock
    goes with the descriptor, so a killed relay never leaves it held."""
    if sys.platform == "win32":  # pragma: no cover - no shared locks there: see SqliteStore.open
        return None
    try:
        return oslock.hold(
            path.with_name(path.name + ".lock"), shared=not exclusive, write_pid=False
        )
    except oslock.LockHeld as exc:
        raise StoreError(f"sqlite: {path} is in use by another relay process") from exc
    except OSError as exc:
        # Named after the database: a missing or read-only directory is the same for both.
        raise StoreError(f"sqlite: cannot open {path}: {exc.strerror}") from exc


def _store_error(exc: sqlite3.Error) -> StoreError:
    error = StoreError(f"sqlite: {exc}")
    error.__cause__ = exc
    return error


def _account(row: tuple[Any, ...]) -> AccountRecord:
    return AccountRecord(
        id=row[0],
        name=row[1],
        created_at=row[2],
        ingress_key_hash=row[3],
        xon_api_url=row[4],
        xon_api_key=row[5],
    )


def _agent(row: tuple[Any, ...]) -> AgentRecord:
    return AgentRecord(
        id=row[0],
        account_id=row[1],
        name=row[2],
        created_at=row[3],
        public_key=row[4],
        enrolled_at=row[5],
        revoked_at=row[6],
        last_seen=row[7],
    )


def _stored(row: tuple[Any, ...]) -> StoredEvent:
    return StoredEvent(
        seq=row[0],
        event=XonEvent(
            id=row[1],
            account=row[2],
            type=row[3],
            received_at=row[4],
            params=json.loads(row[5]),
            request=RawRequest(
                method=row[6], path=row[7], query=row[8], content_type=row[9], body=bytes(row[10])
            ),
        ),
    )
