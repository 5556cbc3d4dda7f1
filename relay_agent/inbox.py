"""The agent's local inbox: a SQLite log of the events the relay delivered.

DESIGN principle 1: the agent acks an event to the relay only after it is committed here, so the
database runs in WAL mode with ``synchronous=FULL`` (a commit survives a power cut). Every
statement runs in one worker thread, which owns the connection; the event loop never blocks on
disk.

Each stored event gets a *cursor* (``INTEGER PRIMARY KEY AUTOINCREMENT``: increasing, never
reused, even after pruning). Local apps read by cursor (DESIGN §Agent local API). The relay's
``seq`` is kept separately: ``last_seq()`` is the resume point sent in ``hello``.

Duplicates (same event ``id``, DESIGN principle 1) are not stored twice, but their seq still
moves ``last_seq`` so that the relay does not send them again.

Retention (by count and by age) deletes the oldest events and records the highest cursor it
deleted, so a reader who fell behind it gets a clear :class:`CursorExpired` instead of silently
missing events.

The same database keeps the latest status items the relay sent (DESIGN §Link protocol, Status),
one row per item key, so that ``GET /v1/status`` answers at once after a restart, even with the
relay unreachable. A snapshot replaces every row; a change replaces the rows of its keys unless
the stored value is newer (a higher relay ``seq``: a late frame from another relay instance must
not roll a value back).

The ``positions`` table keeps the durable cursor of every reader the agent tracks itself
(docs/delivery.md): named consumers (``consumer:NAME``), forward targets (``forward:NAME``) and
TCP targets (``tcp:NAME``). A position only moves forward, and only when its reader acked, so
it survives restarts and never skips an event silently.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import ApiError, StoreError
from shared.events import format_time

__all__ = [
    "Inbox",
    "InboxEvent",
    "InboxStats",
    "CommitResult",
    "CursorExpired",
    "StatusView",
    "offline_stats",
    "offline_positions",
]

T = TypeVar("T")

WITHHELD_REASONS = ("other", "too_large", "not_encodable")
"""The reasons a stand-in may give (docs/delivery.md, Withheld events), by the code the
``meta`` table keeps for the last one; a reason this version does not know counts as
``other``."""

TAIL_EVENTS = 256
"""Newest events kept in memory after their commit (as their stored JSON text), so that a
reader keeping up (a long-poll, a push target) is answered without a trip to the worker thread,
where it would also queue behind the commit in progress. About 1 KB each."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    cursor      INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    seq         INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    stored_at   REAL NOT NULL,
    event       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_stored_at ON events (stored_at);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS positions (
    name       TEXT PRIMARY KEY,
    cursor     INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS status (
    key       TEXT PRIMARY KEY,
    seq       INTEGER,
    item      TEXT NOT NULL,
    stored_at REAL NOT NULL
);
"""


class CursorExpired(ApiError):
    """The reader's cursor is older than what retention kept (410)."""

    def __init__(self, after: int, oldest: int) -> None:
        super().__init__(
            410,
            "cursor_expired",
            f"cursor {after} was pruned by retention; the oldest available cursor is "
            f"{oldest} (read with after={oldest} to continue, or without after to start over)",
        )
        self.oldest = oldest


@dataclass(frozen=True, slots=True)
class InboxEvent:
    cursor: int
    event: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The event object of DESIGN §Agent local API, with its cursor as an opaque string."""
        return {**self.event, "cursor": str(self.cursor)}


@dataclass(frozen=True, slots=True)
class CommitResult:
    stored: int
    """Events newly stored (duplicates excluded)."""
    last_seq: int


@dataclass(frozen=True, slots=True)
class InboxStats:
    events: int
    last_cursor: int
    last_seq: int
    pruned_cursor: int
    withheld: int = 0
    """Stand-ins received for events the relay could not send (docs/delivery.md)."""
    withheld_reason: str | None = None
    """The reason of the last one (``None``: none yet)."""


@dataclass(frozen=True, slots=True)
class StatusView:
    items: list[dict[str, Any]]
    """The latest item of each key, ordered by key, as the relay sent it."""
    updated_at: float | None
    """When the agent last stored a status frame (None: never)."""


def _status_rows(items: Sequence[Any], now: float) -> list[tuple[str, int | None, str]]:
    """(key, seq, JSON) for each well-formed item; an item needs a non-empty string ``key``."""
    rows = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("key"), str) and item["key"]:
            # Every value served has a time, even if the relay sent none (DESIGN §Agent local
            # API: "latest status values with their times").
            item = {"received_at": format_time(now), **item}
            seq = item.get("seq")
            rows.append((
                item["key"],
                seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
                json.dumps(item, separators=(",", ":"), ensure_ascii=False),
            ))
    return rows  # in frame order: of two items with one key, the upsert keeps the later


class Inbox:
    """The SQLite inbox. Build it with :meth:`open`; :meth:`close` it when done."""

    def __init__(
        self,
        path: Path,
        *,
        max_events: int | None,
        max_age: float | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_events = max_events
        self.max_age = max_age
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inbox")
        self._db: sqlite3.Connection | None = None
        self._last_seq = 0
        self._last_cursor = 0
        self._pruned_cursor = 0
        self._withheld = 0
        self._withheld_reason: int | None = None
        self._changed = asyncio.Event()
        self._released = False
        # (cursor, event JSON) of the newest committed events, consecutive cursors. Appended by
        # the worker thread, read by the event loop: the lock keeps a read from seeing it half
        # changed.
        self._tail: deque[tuple[int, str]] = deque(maxlen=TAIL_EVENTS)
        self._tail_lock = threading.Lock()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        max_events: int | None = None,
        max_age: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Inbox:
        inbox = cls(path, max_events=max_events, max_age=max_age, clock=clock)
        try:
            await inbox._run(inbox._open_sync)
        except BaseException:
            inbox._executor.shutdown(wait=False)
            raise
        return inbox

    async def close(self) -> None:
        self.release_waiters()
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    # -- state kept in memory, mirrored from the database -------------------------------------

    def last_seq(self) -> int:
        """Highest relay seq committed: the resume point for the next ``hello``."""
        return self._last_seq

    @property
    def last_cursor(self) -> int:
        return self._last_cursor

    @property
    def pruned_cursor(self) -> int:
        """Highest cursor retention deleted (0: none)."""
        return self._pruned_cursor

    @property
    def released(self) -> bool:
        """True once :meth:`release_waiters` ran: waits return at once, readers should stop."""
        return self._released

    # -- writes --------------------------------------------------------------------------------

    async def commit(self, items: Sequence[tuple[int, dict[str, Any]]]) -> CommitResult:
        """Store ``(seq, event)`` pairs in one transaction; return after it is durable.

        Then wake long-polls and apply retention.

        Raises:
            StoreError: the database failed; nothing was committed (do not ack).
        """
        result = await self._run(self._commit_sync, list(items))
        if result.stored:
            self._wake()
        if self.max_events is not None and self._count_maybe_over():
            await self.prune()
        return result

    async def prune(self) -> int:
        """Apply retention now; return how many events were deleted."""
        return await self._run(self._prune_sync)

    async def save_status(self, items: Sequence[Any], *, snapshot: bool) -> int:
        """Store status items (a snapshot replaces all); return how many were well-formed.

        Raises:
            StoreError: the database failed; nothing was changed.
        """
        return await self._run(self._save_status_sync, list(items), snapshot)

    async def init_position(self, name: str, cursor: int) -> int:
        """Create reader ``name`` at ``cursor`` unless it exists; return its stored cursor."""
        return await self._run(self._init_position_sync, name, cursor)

    async def advance_position(self, name: str, cursor: int) -> int:
        """Move reader ``name`` forward to ``cursor`` (created if new; never moved back).

        Returns:
            The stored cursor afterwards, which is higher than ``cursor`` when the reader
            was already past it.
        """
        return await self._run(self._advance_position_sync, name, cursor)

    async def delete_position(self, name: str) -> bool:
        """Forget reader ``name``; False if there was none."""
        return await self._run(self._delete_position_sync, name)

    # -- reads ---------------------------------------------------------------------------------

    async def position(self, name: str) -> int | None:
        """Reader ``name``'s stored cursor, or None for a reader never seen."""
        return await self._run(self._position_sync, name)

    async def positions(self, prefix: str) -> dict[str, int]:
        """Every reader whose name starts with ``prefix``, by name (prefix removed)."""
        return await self._run(self._positions_sync, prefix)

    async def read(
        self, after: int | None, limit: int, max_bytes: int | None = None
    ) -> list[InboxEvent]:
        """Events with cursor > ``after``, oldest first; ``None`` means from the oldest kept.

        At most ``limit`` events, and no more than ``max_bytes`` of their stored JSON (``None``:
        no byte budget): the page ends before the event that would pass it, but the first event
        is always taken, however large, so a reader never stalls on it.

        Raises:
            CursorExpired: ``after`` is below the highest pruned cursor.
        """
        rows = self._read_tail(after, limit, max_bytes)
        if rows is None:
            rows = await self._run(self._read_sync, after, limit, max_bytes)
        return [InboxEvent(cursor, json.loads(text)) for cursor, text in rows]

    def _read_tail(
        self, after: int | None, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, str]] | None:
        """What :meth:`_read_sync` would return, from memory; ``None`` when the tail does not
        hold every event after ``after`` up to the newest one committed."""
        start = self._pruned_cursor if after is None else after
        with self._tail_lock:
            if not self._tail or self._tail[-1][0] != self._last_cursor:
                return None  # empty, or a commit is between the worker and the loop
            first = self._tail[0][0]
            if start + 1 < first:
                return None  # older than the tail: the database has it
            # Checked like _read_sync does; a prune running now is ordered after this read.
            if after is not None and after < self._pruned_cursor:
                raise CursorExpired(after, self._pruned_cursor)
            skip = max(0, start + 1 - first)
            return _page(itertools.islice(self._tail, skip, skip + limit), max_bytes)

    async def wait_beyond(self, after: int | None, timeout: float) -> None:
        """Return once an event with cursor > ``after`` is committed, or after ``timeout``."""
        threshold = 0 if after is None else after
        try:
            async with asyncio.timeout(timeout):
                while self._last_cursor <= threshold and not self._released:
                    await self._changed.wait()
        except TimeoutError:
            return

    def release_waiters(self) -> None:
        """Wake every long-poll for good (shutdown): they answer with what they have."""
        self._released = True
        self._wake()

    async def read_status(self) -> StatusView:
        """The stored status items, ordered by key."""
        return await self._run(self._read_status_sync)

    async def stats(self) -> InboxStats:
        count = await self._run(self._count_sync)
        reason = self._withheld_reason
        return InboxStats(
            count, self._last_cursor, self._last_seq, self._pruned_cursor, self._withheld,
            None if reason is None else WITHHELD_REASONS[reason],
        )

    # -- worker-thread side --------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"inbox database {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "inbox is closed"
        return self._db

    def _open_sync(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # DESIGN principle 1: an acked event must survive a crash or power cut.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        except BaseException:
            db.close()
            raise
        self._db = db
        self._last_seq = int(meta.get("last_seq", 0))
        self._pruned_cursor = int(meta.get("pruned_cursor", 0))
        self._last_cursor = int(row[0]) if row else 0
        self._withheld = int(meta.get("withheld", 0))
        reason = meta.get("withheld_reason")
        self._withheld_reason = None if reason is None else int(reason)

    def _commit_sync(self, items: list[tuple[int, dict[str, Any]]]) -> CommitResult:
        db = self._conn()
        now = self._clock()
        rows = [
            (
                str(event["id"]),
                seq,
                str(event.get("received_at", "")),
                now,
                json.dumps(event, separators=(",", ":"), ensure_ascii=False),
            )
            for seq, event in items
        ]
        # A duplicate's seq counts too: the relay must not send it again.
        last_seq = max((seq for seq, _ in items), default=self._last_seq)
        last_seq = max(last_seq, self._last_seq)
        # Stand-ins above the resume point are new ones (a replay's resends are not).
        withheld = [
            _withheld_code(event) for seq, event in items
            if seq > self._last_seq and "withheld" in event
        ]
        last_cursor = self._last_cursor
        db.execute("BEGIN IMMEDIATE")
        try:
            # One executemany for the batch (not a statement call per event); the changes
            # counter tells how many were new, the AUTOINCREMENT sequence the last cursor.
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO events (id, seq, received_at, stored_at, event)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            stored = db.total_changes - before
            if stored:
                row = db.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
                ).fetchone()
                last_cursor = max(last_cursor, int(row[0]))
            meta = [("last_seq", last_seq)]
            if withheld:
                meta += [("withheld", self._withheld + len(withheld)),
                         ("withheld_reason", withheld[-1])]
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                meta,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._remember(rows, stored, last_cursor)
        self._last_seq = last_seq
        self._last_cursor = last_cursor
        if withheld:
            self._withheld += len(withheld)
            self._withheld_reason = withheld[-1]
        return CommitResult(stored, last_seq)

    def _remember(self, rows: list[tuple[str, int, str, float, str]], stored: int,
                  last_cursor: int) -> None:
        """Put a committed batch in the tail (worker thread)."""
        with self._tail_lock:
            if stored != len(rows) or last_cursor != self._last_cursor + stored:
                # Duplicates were ignored: which row got which cursor is unknown here. The
                # tail starts again with the next batch; reads before that go to the database.
                self._tail.clear()
                return
            first = last_cursor - stored + 1
            if self._tail and self._tail[-1][0] + 1 != first:
                self._tail.clear()
            self._tail.extend(zip(range(first, last_cursor + 1), (row[4] for row in rows)))

    def _count_maybe_over(self) -> bool:
        assert self.max_events is not None
        return self._last_cursor - self._pruned_cursor > self.max_events

    def _prune_sync(self) -> int:
        db = self._conn()
        cutoffs: list[int] = []
        if self.max_events is not None:
            row = db.execute(
                "SELECT cursor FROM events ORDER BY cursor DESC LIMIT 1 OFFSET ?",
                (self.max_events,),
            ).fetchone()
            if row:
                cutoffs.append(int(row[0]))
        if self.max_age is not None:
            row = db.execute(
                "SELECT MAX(cursor) FROM events WHERE stored_at < ?",
                (self._clock() - self.max_age,),
            ).fetchone()
            if row and row[0] is not None:
                cutoffs.append(int(row[0]))
        if not cutoffs:
            return 0
        cutoff = max(cutoffs)
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = db.execute("DELETE FROM events WHERE cursor <= ?", (cutoff,)).rowcount
            pruned = max(self._pruned_cursor, cutoff)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('pruned_cursor', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (pruned,),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._pruned_cursor = pruned
        return int(deleted)

    def _save_status_sync(self, items: list[Any], snapshot: bool) -> int:
        db = self._conn()
        now = self._clock()
        rows = _status_rows(items, now)
        db.execute("BEGIN IMMEDIATE")
        try:
            if snapshot:
                db.execute("DELETE FROM status")
            db.executemany(
                "INSERT INTO status (key, seq, item, stored_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET seq = excluded.seq, item = excluded.item,"
                " stored_at = excluded.stored_at"
                " WHERE status.seq IS NULL OR excluded.seq IS NULL OR excluded.seq >= status.seq",
                [(key, seq, item, now) for key, seq, item in rows],
            )
            # meta holds integers: the time goes in as milliseconds.
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('status_updated_ms', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (round(now * 1000),),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(rows)

    def _read_status_sync(self) -> StatusView:
        db = self._conn()
        rows = db.execute("SELECT item FROM status ORDER BY key").fetchall()
        updated = db.execute(
            "SELECT value FROM meta WHERE key = 'status_updated_ms'"
        ).fetchone()
        return StatusView(
            [json.loads(text) for (text,) in rows],
            None if updated is None else int(updated[0]) / 1000,
        )

    def _read_sync(
        self, after: int | None, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, str]]:
        # Checked here, in the thread that prunes, so a prune cannot slip in between.
        if after is not None and after < self._pruned_cursor:
            raise CursorExpired(after, self._pruned_cursor)
        rows = self._conn().execute(
            "SELECT cursor, event FROM events WHERE cursor > ? ORDER BY cursor LIMIT ?",
            (self._pruned_cursor if after is None else after, limit),
        )
        # Rows are stepped one at a time: those past the byte budget are never loaded.
        return _page(((int(c), str(e)) for c, e in rows), max_bytes)

    def _init_position_sync(self, name: str, cursor: int) -> int:
        db = self._conn()
        db.execute(
            "INSERT OR IGNORE INTO positions (name, cursor, updated_at) VALUES (?, ?, ?)",
            (name, cursor, self._clock()),
        )
        return int(db.execute("SELECT cursor FROM positions WHERE name = ?", (name,))
                   .fetchone()[0])

    def _advance_position_sync(self, name: str, cursor: int) -> int:
        db = self._conn()
        db.execute(
            "INSERT INTO positions (name, cursor, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor,"
            " updated_at = excluded.updated_at WHERE excluded.cursor > positions.cursor",
            (name, cursor, self._clock()),
        )
        return int(db.execute("SELECT cursor FROM positions WHERE name = ?", (name,))
                   .fetchone()[0])

    def _delete_position_sync(self, name: str) -> bool:
        return self._conn().execute("DELETE FROM positions WHERE name = ?", (name,)).rowcount > 0

    def _position_sync(self, name: str) -> int | None:
        row = self._conn().execute(
            "SELECT cursor FROM positions WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _positions_sync(self, prefix: str) -> dict[str, int]:
        return _positions(self._conn(), prefix)

    def _count_sync(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM events").fetchone()[0])

    # -- long-poll wake-up ---------------------------------------------------------------------

    def _wake(self) -> None:
        # One Event per generation: waiters of this generation wake, later ones wait anew.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _page(rows: Iterable[tuple[int, str]], max_bytes: int | None) -> list[tuple[int, str]]:
    """``rows`` up to ``max_bytes`` of event JSON (UTF-8), the first one whatever its size."""
    page: list[tuple[int, str]] = []
    total = 0
    for cursor, text in rows:
        if max_bytes is not None:
            total += len(text) if text.isascii() else len(text.encode())
            if page and total > max_bytes:
                break
        page.append((cursor, text))
    return page


def _withheld_code(event: dict[str, Any]) -> int:
    withheld = event.get("withheld")
    reason = withheld.get("reason") if isinstance(withheld, dict) else None
    return WITHHELD_REASONS.index(reason) if reason in WITHHELD_REASONS else 0


def _positions(db: sqlite3.Connection, prefix: str) -> dict[str, int]:
    rows = db.execute(
        "SELECT name, cursor FROM positions WHERE substr(name, 1, ?) = ? ORDER BY name",
        (len(prefix), prefix),
    )
    return {str(name)[len(prefix):]: int(cursor) for name, cursor in rows}


def offline_positions(path: Path) -> dict[str, int] | None:
    """Every stored reader cursor of an inbox no agent has open, by full name
    (``consumer:NAME``, ``forward:NAME``, ``tcp:NAME``); ``None`` if there is no inbox.

    For ``xon-relay-agent status``: the backlog of a reader is ``last_cursor - cursor``.
    """
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'positions'"
            ).fetchone()
            return _positions(db, "") if exists else {}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"inbox database {path}: {exc}") from exc


def offline_stats(path: Path) -> InboxStats | None:
    """Counts from an inbox no agent has open (``status``); ``None`` if there is no inbox.

    Opened read-only so that looking never creates or changes anything.
    """
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            count = int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"inbox database {path}: {exc}") from exc
    return InboxStats(
        count,
        int(row[0]) if row else 0,
        int(meta.get("last_seq", 0)),
        int(meta.get("pruned_cursor", 0)),
    )
