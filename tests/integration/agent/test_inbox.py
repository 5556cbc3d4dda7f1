"""The SQLite inbox: durable commits, dedup by event id, retention, long-poll wake-ups."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path

import pytest

from relay_agent.inbox import TAIL_EVENTS, CursorExpired, Inbox, offline_stats
from tests.helpers.clock import FakeClock
from tests.helpers.timing import MS

from .support import make_event


async def test_commit_stores_events_in_cursor_order(inbox: Inbox) -> None:
    """Committed events read back oldest first, each with a cursor, and last_seq follows."""
    result = await inbox.commit([(10, make_event(1)), (12, make_event(2)), (15, make_event(3))])
    assert result.stored == 3 and result.last_seq == 15
    events = await inbox.read(None, 100)
    assert [e.event["id"] for e in events] == ["ev-1", "ev-2", "ev-3"]
    assert [e.cursor for e in events] == sorted(e.cursor for e in events)
    assert events[0].to_json()["cursor"] == str(events[0].cursor)
    assert inbox.last_seq() == 15


async def test_duplicate_id_is_ignored_but_its_seq_counts(inbox: Inbox) -> None:
    """DESIGN principle 1: a resent event is not stored twice, yet moves the resume point."""
    await inbox.commit([(1, make_event(1))])
    result = await inbox.commit([(2, make_event(1)), (3, make_event(2))])
    assert result.stored == 1
    assert inbox.last_seq() == 3
    assert [e.event["id"] for e in await inbox.read(None, 100)] == ["ev-1", "ev-2"]
    only_dup = await inbox.commit([(7, make_event(2))])
    assert only_dup.stored == 0 and inbox.last_seq() == 7


async def test_read_after_cursor_pages_each_event_once(inbox: Inbox) -> None:
    """Reading after the last cursor returned yields every event exactly once, in order."""
    await inbox.commit([(n, make_event(n)) for n in range(1, 8)])
    seen: list[str] = []
    after = None
    while page := await inbox.read(after, 3):
        seen += [e.event["id"] for e in page]
        after = page[-1].cursor
    assert seen == [f"ev-{n}" for n in range(1, 8)]


async def test_reopened_inbox_keeps_everything(tmp_path: Path) -> None:
    """Events, last_seq, the last cursor and the pruned cursor survive a close and reopen."""
    path = tmp_path / "box.db"
    first = await Inbox.open(path, max_events=2)
    await first.commit([(n, make_event(n)) for n in range(1, 5)])
    before = await first.stats()
    await first.close()
    second = await Inbox.open(path, max_events=2)
    try:
        assert await second.stats() == before
        assert second.last_seq() == 4
        assert [e.event["id"] for e in await second.read(None, 10)] == ["ev-3", "ev-4"]
        await second.commit([(5, make_event(5))])
        assert (await second.read(None, 10))[-1].cursor > before.last_cursor
    finally:
        await second.close()


async def test_retention_by_count_expires_old_cursors(tmp_path: Path) -> None:
    """Only the newest max_events stay; a reader behind the pruned cursor gets a clear 410."""
    box = await Inbox.open(tmp_path / "box.db", max_events=3)
    try:
        await box.commit([(n, make_event(n)) for n in range(1, 4)])
        first = (await box.read(None, 1))[0].cursor
        await box.commit([(n, make_event(n)) for n in range(4, 7)])
        kept = await box.read(None, 100)
        assert [e.event["id"] for e in kept] == ["ev-4", "ev-5", "ev-6"]
        with pytest.raises(CursorExpired) as info:
            await box.read(first, 10)
        assert info.value.http_status == 410 and info.value.code == "cursor_expired"
        assert str(box.pruned_cursor) in str(info.value)
        # The pruned cursor itself is fine: everything after it is still there.
        assert [e.event["id"] for e in await box.read(box.pruned_cursor, 10)][0] == "ev-4"
    finally:
        await box.close()


async def test_retention_by_age_drops_old_events(tmp_path: Path) -> None:
    """Events stored longer ago than max_age go at the next prune."""
    clock = FakeClock(1000.0)
    box = await Inbox.open(tmp_path / "box.db", max_age=60.0, clock=clock)
    try:
        await box.commit([(1, make_event(1)), (2, make_event(2))])
        clock.advance(30.0)
        await box.commit([(3, make_event(3))])
        assert await box.prune() == 0
        clock.advance(31.0)
        assert await box.prune() == 2
        assert [e.event["id"] for e in await box.read(None, 10)] == ["ev-3"]
        with pytest.raises(CursorExpired):
            await box.read(0, 10)
    finally:
        await box.close()


async def test_wait_beyond_wakes_on_commit(inbox: Inbox) -> None:
    """A long-poll waiting past the last cursor returns as soon as an event is committed."""
    waiter = asyncio.create_task(inbox.wait_beyond(None, 5000 * MS))
    await asyncio.sleep(0)
    assert not waiter.done()
    await inbox.commit([(1, make_event(1))])
    await asyncio.wait_for(waiter, 2000 * MS)


async def test_wait_beyond_returns_after_timeout(inbox: Inbox) -> None:
    """With nothing new, the wait simply ends at its timeout."""
    await inbox.wait_beyond(None, 20 * MS)
    assert await inbox.read(None, 10) == []


async def test_release_waiters_ends_long_polls(inbox: Inbox) -> None:
    """At shutdown, waiting long-polls return at once."""
    waiter = asyncio.create_task(inbox.wait_beyond(None, 60.0))
    await asyncio.sleep(0)
    inbox.release_waiters()
    await asyncio.wait_for(waiter, 2000 * MS)


async def test_database_runs_wal_with_full_sync(inbox: Inbox) -> None:
    """The inbox runs in WAL mode with synchronous=FULL (DESIGN principle 1)."""
    modes = await inbox._run(
        lambda: (
            inbox._conn().execute("PRAGMA journal_mode").fetchone()[0],
            inbox._conn().execute("PRAGMA synchronous").fetchone()[0],
        )
    )
    assert modes == ("wal", 2)


async def test_offline_stats_reads_counts_without_writing(tmp_path: Path) -> None:
    """status reads an inbox no agent holds, read-only; no inbox at all gives None."""
    path = tmp_path / "box.db"
    assert offline_stats(path) is None
    box = await Inbox.open(path)
    await box.commit([(4, make_event(1)), (9, make_event(2))])
    await box.close()
    mtime = os.stat(path).st_mtime_ns
    stats = offline_stats(path)
    assert stats is not None
    assert (stats.events, stats.last_seq) == (2, 9)
    assert os.stat(path).st_mtime_ns == mtime


async def test_reads_near_the_head_are_answered_from_memory(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader within the newest TAIL_EVENTS events never waits for the worker thread;
    an older cursor, or none, still reads the database."""
    count = TAIL_EVENTS + 10
    await inbox.commit([(n, make_event(n)) for n in range(1, count + 1)])
    via_database = [(e.cursor, e.event) for e in await inbox.read(0, count)]
    database_reads: list[int | None] = []
    read_sync = inbox._read_sync

    def counting(after: int | None, limit: int, max_bytes: int | None) -> list[tuple[int, str]]:
        database_reads.append(after)
        return read_sync(after, limit, max_bytes)

    monkeypatch.setattr(inbox, "_read_sync", counting)
    head = inbox.last_cursor
    for after in (head - TAIL_EVENTS, head - 3, head):
        events = await inbox.read(after, 5)
        assert [(e.cursor, e.event) for e in events] == [
            (c, ev) for c, ev in via_database if c > after][:5]
    assert database_reads == []
    await inbox.read(head - TAIL_EVENTS - 1, 5)
    await inbox.read(None, 5)
    assert database_reads == [head - TAIL_EVENTS - 1, None]


async def test_memory_reads_match_the_database_through_duplicates_and_pruning(
    tmp_path: Path,
) -> None:
    """Whatever mix of new events, resent ones and retention: every read answered from
    memory equals the database's answer, and expired cursors still get 410."""
    rng = random.Random(7)
    box = await Inbox.open(tmp_path / "box.db", max_events=400)
    try:
        seq = from_memory = 0
        for _ in range(60):
            batch = []
            for _ in range(rng.randint(1, 40)):
                seq += 1
                batch.append((seq, make_event(seq)))
            if rng.random() < 0.15:
                # A resend of an earlier event: stored once, so the batch's cursors are unknown.
                batch.insert(rng.randrange(len(batch)), (seq, make_event(rng.randint(1, seq))))
            await box.commit(batch)
            if rng.random() < 0.1:
                await box.prune()
            head = box.last_cursor
            for after in {None, 0, box.pruned_cursor, head, *(
                    rng.randint(max(0, head - 300), head) for _ in range(5))}:
                limit = rng.randint(1, 50)
                try:
                    expected = await box._run(box._read_sync, after, limit)
                except CursorExpired:
                    with pytest.raises(CursorExpired):
                        await box.read(after, limit)
                    continue
                from_memory += box._read_tail(after, limit) is not None
                got = await box.read(after, limit)
                assert [(e.cursor, e.event) for e in got] == [
                    (c, json.loads(text)) for c, text in expected]
        assert from_memory > 100  # the comparison did cover the memory path
    finally:
        await box.close()
