"""SQLite's group commit for every write (relay_server/store/sqlite.py, module docstring).

The writer runs whatever is queued, of every kind, in one transaction: each write but an
append under its own savepoint, one COMMIT (one fsync) for all, callers answered only after it.
The Store contract itself runs on every backend in test_store*.py; these tests check the
SQLite mechanics on a real file, and read what was committed through a connection of their
own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from relay_server.store.base import AgentRecord, AppendResult, LinkClaim, StatusItem
from relay_server.store.sqlite import SqliteStore
from shared import crypto
from shared.errors import StoreError

from .test_store import env_id, make_event, new_account, new_agent

NOW = 1_800_000_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "relay.db"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(path)
    try:
        yield opened
    finally:
        await opened.close()


def committed(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows as another connection sees them: only what was committed."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, args).fetchall()


def status(account_id: str, seq: int) -> StatusItem:
    return StatusItem(
        account_id=account_id,
        key="messages.waiting?mailbox=201",
        type="messages.waiting",
        ids={"mailbox": "201"},
        params={"mailbox": "201", "count": str(seq)},
        event_id=f"ev{seq}",
        seq=seq,
        received_at="2026-11-26T10:00:00.000Z",
    )


async def test_concurrent_writes_of_every_kind_share_one_commit(
    store: SqliteStore, path: Path
) -> None:
    """Appends, link claims and releases, status, CTOX claims, enrollment and a cursor queued
    together are one transaction; each caller gets its own answer, committed when it comes."""
    account_id = await new_account(store)
    agent_id, _ = await new_agent(store, account_id)
    pending_id, code = await new_agent(store, account_id)
    before = store.commit_count
    results = await asyncio.gather(
        store.append_event(make_event(account_id, 1), xon_id=env_id("x1")),
        store.claim_link(agent_id, owner="inst-a"),
        store.append_event(make_event(account_id, 2), xon_id=env_id("x1")),
        store.release_link(agent_id, epoch=1),
        store.put_status(status(account_id, 1)),
        store.claim_command(
            account_id, "k1", request_hash="h", now=NOW, claim_deadline=NOW + 5, expires_at=NOW + 60
        ),
        store.enroll_agent(code_hash=crypto.hash_secret(code), public_key="pk", now=time.time()),
        store.set_cursor(agent_id, 7),
    )
    assert store.commit_count - before == 1
    first, claim, duplicate, _, stored_status, command, enrolled, _ = results
    assert isinstance(first, AppendResult) and not first.duplicate
    assert isinstance(duplicate, AppendResult) and duplicate.duplicate
    assert duplicate.stored == first.stored
    assert claim == LinkClaim(epoch=1, previous_owner="")
    assert stored_status is True and command is None
    assert isinstance(enrolled, AgentRecord)
    assert enrolled.id == pending_id and enrolled.public_key == "pk"
    # The claim and then the release of the same agent ran in queue order.
    assert committed(path, "SELECT epoch, owner FROM links") == [(1, "")]
    assert committed(path, "SELECT seq FROM events") == [(first.stored.seq,)]
    assert committed(path, "SELECT cursor FROM agents WHERE id = ?", agent_id) == [(7,)]
    assert committed(path, "SELECT public_key FROM agents WHERE id = ?", pending_id) == [("pk",)]
    assert committed(path, "SELECT COUNT(*) FROM status_items") == [(1,)]
    assert committed(path, "SELECT key FROM commands") == [("k1",)]


async def test_writes_keep_queue_order_within_a_batch(store: SqliteStore, path: Path) -> None:
    """A release queued before a claim of the same agent finds nothing to release."""
    account_id = await new_account(store)
    agent_id, _ = await new_agent(store, account_id)
    await store.claim_link(agent_id, owner="inst-a")
    before = store.commit_count
    await asyncio.gather(
        store.release_link(agent_id, epoch=2),
        store.claim_link(agent_id, owner="inst-b"),
        store.release_link(agent_id, epoch=1),
    )
    assert store.commit_count - before == 1
    assert committed(path, "SELECT epoch, owner FROM links") == [(2, "inst-b")]


async def test_a_failing_write_is_undone_alone_and_the_rest_commits(
    store: SqliteStore, path: Path
) -> None:
    """A write that raises (its own exception, a constraint, a duplicate event id) rolls back
    to its savepoint only; its caller gets the error, the batch's other writes commit."""
    account_id = await new_account(store)
    agent_id, code = await new_agent(store, account_id)
    first = make_event(account_id, 1)
    same_id = dataclasses.replace(make_event(account_id, 2), id=first.id)

    def half_then_raise(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('half', 'written')")
        conn.execute("UPDATE agents SET name = 'renamed'")
        raise ValueError("the write changed its mind")

    before = store.commit_count
    results = await asyncio.gather(
        store.claim_link(agent_id, owner="inst-a"),
        store._tx(half_then_raise),
        store.append_event(first, xon_id=None),
        store.create_agent(  # the code's hash is taken: UNIQUE constraint
            account_id=account_id,
            name="copy",
            code_hash=crypto.hash_secret(code),
            code_expires_at=NOW,
        ),
        store.append_event(same_id, xon_id=None),
        store.claim_link("agt_unknown", owner="inst-a"),
        store.put_status(status(account_id, 1)),
        return_exceptions=True,
    )
    assert store.commit_count - before == 1
    claim, raised, appended, copy, same_id_error, unknown, stored_status = results
    assert claim == LinkClaim(epoch=1, previous_owner="")
    assert isinstance(raised, ValueError)
    assert isinstance(appended, AppendResult)
    assert isinstance(copy, StoreError) and "UNIQUE" in str(copy)
    assert isinstance(same_id_error, StoreError) and "UNIQUE" in str(same_id_error)
    assert isinstance(unknown, StoreError)
    assert stored_status is True
    assert committed(path, "SELECT key FROM meta WHERE key = 'half'") == []
    assert committed(path, "SELECT name FROM agents") == [("pc",)]
    assert committed(path, "SELECT id, seq FROM events") == [(first.id, appended.stored.seq)]
    assert committed(path, "SELECT epoch, owner FROM links") == [(1, "inst-a")]
    assert committed(path, "SELECT COUNT(*) FROM status_items") == [(1,)]


async def test_a_failed_commit_fails_every_write_of_the_batch(
    store: SqliteStore, path: Path
) -> None:
    """When the COMMIT itself fails, nothing of the batch is stored and every caller gets
    StoreError; written-behind values stay recorded for the next commit."""
    account_id = await new_account(store)
    agent_id, _ = await new_agent(store, account_id)

    def orphan_agent(conn: sqlite3.Connection) -> None:
        # Deferred foreign keys are checked by COMMIT: the whole transaction fails there.
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute(
            "INSERT INTO agents (id, account_id, name, created_at)"
            " VALUES ('agt_orphan', 'acc_missing', 'orphan', 0)"
        )

    before = store.commit_count
    results = await asyncio.gather(
        store.claim_link(agent_id, owner="inst-a"),
        store._tx(orphan_agent),
        store.append_event(make_event(account_id, 1), xon_id=None),
        store.set_cursor(agent_id, 5),
        return_exceptions=True,
    )
    assert store.commit_count == before
    claim, orphan, appended, _ = results
    for result in (claim, orphan, appended):
        assert isinstance(result, StoreError) and "FOREIGN KEY" in str(result)
    assert committed(path, "SELECT COUNT(*) FROM links") == [(0,)]
    assert committed(path, "SELECT COUNT(*) FROM events") == [(0,)]
    assert committed(path, "SELECT id FROM agents WHERE id = 'agt_orphan'") == []
    assert await store.get_cursor(agent_id) == 5
    # The store goes on; the next commit stores the cursor kept from the failed one.
    assert await store.claim_link(agent_id, owner="inst-a") == LinkClaim(
        epoch=1, previous_owner=""
    )
    assert committed(path, "SELECT cursor FROM agents WHERE id = ?", agent_id) == [(5,)]


async def test_a_write_cancelled_while_queued_is_given_up(store: SqliteStore, path: Path) -> None:
    """A caller cancelled before its batch began: its write is dropped, the batch goes on."""
    account_id = await new_account(store)
    agent_id, _ = await new_agent(store, account_id)
    claim = asyncio.create_task(store.claim_link(agent_id, owner="inst-a"))
    put = asyncio.create_task(store.put_status(status(account_id, 1)))
    await asyncio.sleep(0)  # one loop step: both tasks queue their write, the writer waits
    assert store._queue.qsize() == 2
    claim.cancel()
    assert await put is True
    with pytest.raises(asyncio.CancelledError):
        await claim
    assert committed(path, "SELECT COUNT(*) FROM links") == [(0,)]
    assert (await store.claim_link(agent_id, owner="inst-a")).epoch == 1


async def test_close_commits_queued_writes_and_refuses_later_ones(path: Path) -> None:
    """Writes queued before close() are committed; one issued once close() began is refused."""
    store = await SqliteStore.open(path)
    account_id = await new_account(store)
    agent_id, _ = await new_agent(store, account_id)
    claim, stored_status, _, late = await asyncio.gather(
        store.claim_link(agent_id, owner="inst-a"),
        store.put_status(status(account_id, 1)),
        store.close(),
        store.release_link(agent_id, epoch=1),
        return_exceptions=True,
    )
    assert claim == LinkClaim(epoch=1, previous_owner="")
    assert stored_status is True
    assert isinstance(late, StoreError) and str(late) == "store is closed"
    assert committed(path, "SELECT epoch, owner FROM links") == [(1, "inst-a")]
    assert committed(path, "SELECT COUNT(*) FROM status_items") == [(1,)]
    with pytest.raises(StoreError, match="store is closed"):
        await store.claim_link(agent_id, owner="inst-a")
