"""SQLite's in-memory tail of committed events (relay_server/store/tail.py) on a real file: what
it serves matches what the file holds, and every way events leave or bypass it sends the read
back to the file. The tail exists only in a store opened ``exclusive`` (the relay server's),
which no other store may share."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from relay_server.store.base import StoredEvent
from relay_server.store.sqlite import SqliteStore
from shared.errors import StoreError
from tests.helpers.timing import MS

from .test_store import env_id, make_event, new_account

WAIT = 10_000 * MS
"""Bound on a wait for the writer thread (the test opens its gate at once)."""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "relay.db"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(path, exclusive=True)
    try:
        yield opened
    finally:
        await opened.close()


def from_file(path: Path, account_id: str, after: int) -> list[tuple[int, str]]:
    """(seq, id) of the account's events after ``after``, as the file holds them."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT seq, id FROM events WHERE account_id = ? AND seq > ? ORDER BY seq",
            (account_id, after),
        ).fetchall()


def ids(events: list[StoredEvent]) -> list[tuple[int, str]]:
    return [(e.seq, e.event.id) for e in events]


async def test_reads_after_appends_come_from_memory_and_match_the_file(
    store: SqliteStore, path: Path
) -> None:
    a, b = await new_account(store, "a"), await new_account(store, "b")
    results = await asyncio.gather(
        *(store.append_event(make_event(a if n % 3 else b, n), xon_id=None) for n in range(60))
    )
    first = min(r.stored.seq for r in results)
    for account_id in (a, b):
        for after in (first - 1, first + 10, first + 59):
            served = await store.read_events(account_id, after=after, limit=1000)
            assert ids(served) == from_file(path, account_id, after)
    served = await store.read_events(a, after=first - 1, limit=5)
    assert [s.seq for s in served] == [
        r.stored.seq for r in results if r.stored.event.account == a
    ][:5]
    # The very objects ingress built: no query, no row decoding.
    ours = {(r.stored.event.account, r.stored.seq): r.stored for r in results}
    assert all(s is ours[(a, s.seq)] for s in served)


async def test_a_duplicate_is_not_held_twice(store: SqliteStore) -> None:
    account_id = await new_account(store)
    first = await store.append_event(make_event(account_id, 1), xon_id=env_id("x1"))
    again = await store.append_event(make_event(account_id, 2), xon_id=env_id("x1"))
    assert again.duplicate
    served = await store.read_events(account_id, after=first.stored.seq - 1, limit=10)
    assert [s.event.id for s in served] == [first.stored.event.id]


async def test_evicted_events_are_read_from_the_file(path: Path) -> None:
    store = await SqliteStore.open(path, exclusive=True, tail_events=4)
    try:
        account_id = await new_account(store)
        results = [
            await store.append_event(make_event(account_id, n), xon_id=None) for n in range(10)
        ]
        first = results[0].stored.seq
        seqs = [r.stored.seq for r in results]
        served = await store.read_events(account_id, after=first - 1, limit=1000)
        assert [s.seq for s in served] == seqs
        assert all(s is not r.stored for s, r in zip(served, results, strict=True))  # the file
        served = await store.read_events(account_id, after=seqs[5], limit=1000)
        assert [s.seq for s in served] == seqs[6:]
        assert all(s is r.stored for s, r in zip(served, results[6:], strict=True))  # memory
    finally:
        await store.close()


async def test_no_other_store_opens_the_file_of_an_exclusive_one(path: Path) -> None:
    store = await SqliteStore.open(path, exclusive=True)
    try:
        for exclusive in (True, False):
            with pytest.raises(StoreError, match="in use by another relay process"):
                await SqliteStore.open(path, exclusive=exclusive)
    finally:
        await store.close()
    shared = await SqliteStore.open(path)
    try:
        await (await SqliteStore.open(path)).close()  # shared stores coexist
        with pytest.raises(StoreError, match="in use by another relay process"):
            await SqliteStore.open(path, exclusive=True)
    finally:
        await shared.close()
    await (await SqliteStore.open(path, exclusive=True)).close()
    assert stat.S_IMODE((path.parent / "relay.db.lock").stat().st_mode) == 0o600


async def test_an_event_written_behind_the_stores_back_is_found_after_a_head_read(
    store: SqliteStore, path: Path
) -> None:
    """The lock is advisory: a tool writing the file with sqlite3 bypasses it. The hub's poll
    reads the head, which sends the read back to the file."""
    account_id = await new_account(store)
    mine = (await store.append_event(make_event(account_id, 1), xon_id=None)).stored
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "INSERT INTO events (id, account_id, seq, type, received_at, params, method, path,"
            " query, content_type, body) VALUES ('ev_x', ?1, (SELECT MAX(seq) + 1 FROM events"
            " WHERE account_id = ?1), 't', 'r', '{}', 'GET', '', '', '', x'')",
            (account_id,),
        )
        conn.commit()
    assert await store.read_events(account_id, after=mine.seq, limit=10) == []
    head = await store.head_seq(account_id)
    served = await store.read_events(account_id, after=mine.seq, limit=10)
    assert [(s.seq, s.event.id) for s in served] == [(head, "ev_x")]


async def test_trimmed_events_are_not_served(store: SqliteStore, path: Path) -> None:
    account_id = await new_account(store)
    results = [await store.append_event(make_event(account_id, n), xon_id=None) for n in range(4)]
    seqs = [r.stored.seq for r in results]
    assert await store.trim_events(account_id, through=seqs[2], limit=100) == 3
    served = await store.read_events(account_id, after=seqs[0] - 1, limit=10)
    assert (
        [s.seq for s in served] == [seqs[3]] == [seq for seq, _ in from_file(path, account_id, 0)]
    )


async def test_a_deleted_accounts_events_are_not_served(store: SqliteStore) -> None:
    account_id = await new_account(store)
    appended = await store.append_event(make_event(account_id, 1), xon_id=None)
    assert await store.delete_account(account_id)
    assert await store.read_events(account_id, after=appended.stored.seq - 1, limit=10) == []


async def test_an_append_whose_caller_left_mid_commit_is_still_held(path: Path) -> None:
    """The caller (an ingress request whose client hung up) is cancelled after its batch began:
    the event commits all the same and a link must still get it from the tail."""
    loop = asyncio.get_running_loop()
    began, gate = asyncio.Event(), threading.Event()
    holding = False

    def hold(step: str, conn: sqlite3.Connection) -> None:
        if holding and step == "begin":
            loop.call_soon_threadsafe(began.set)
            gate.wait(WAIT)  # bounded: the test opens the gate right after cancelling the caller

    store = await SqliteStore.open(path, exclusive=True, faults=hold)
    try:
        account_id = await new_account(store)
        floor = await store.head_seq(account_id)
        holding = True
        append = asyncio.create_task(store.append_event(make_event(account_id, 1), xon_id=None))
        await asyncio.wait_for(began.wait(), WAIT)
        holding = False
        assert not append.done()
        append.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await append
        # A later batch: the first committed.
        await store.trim_events(account_id, through=0, limit=1)
        served = await store.read_events(account_id, after=floor, limit=10)
        assert len(served) == 1 and served[0].event.params["n"] == "1"
    finally:
        await store.close()
