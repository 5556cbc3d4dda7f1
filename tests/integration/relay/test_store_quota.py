"""Per-account byte quotas in the store (docs/redis.md, Quotas), on SQLite and Redis alike.

The counters move in the append's own atomic step and in the trim's, so the refusal is exact
whatever the batching: an account reaches its quota and no further, another account is not
affected, a repeat is still answered, and retention gives the bytes back.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from relay_server.retention import trim_account
from relay_server.store import Store, open_store
from relay_server.store.base import AccountUsage, QuotaExceeded
from shared import crypto
from shared.config import RetentionConfig
from shared.events import XonId

from .conftest import StoreBackend
from .test_store import make_event, new_account, new_agent

BODY = b"\x00" * 20_000


async def test_usage_counts_appends_and_trims(store: Store) -> None:
    """Each append adds its event and at least its body's bytes; a trim takes back exactly
    what the trimmed appends added; a repeat adds nothing."""
    account = await new_account(store)
    assert await store.account_usage(account) == AccountUsage(events=0, bytes=0)
    sizes = []
    for n in range(4):
        before = (await store.account_usage(account)).bytes
        await store.append_event(make_event(account, n, body=BODY), xon_id=XonId(f"x{n}", "d"))
        sizes.append((await store.account_usage(account)).bytes - before)
    assert all(size > len(BODY) for size in sizes)
    await store.append_event(make_event(account, 0, body=BODY), xon_id=XonId("x0", "d"))
    assert await store.account_usage(account) == AccountUsage(events=4, bytes=sum(sizes))
    assert await store.trim_events(account, through=2, limit=100) == 2
    assert await store.account_usage(account) == AccountUsage(events=2, bytes=sum(sizes[2:]))


async def test_quota_refuses_past_the_ceiling_and_only_that_account(store: Store) -> None:
    """Concurrent appends of one account stop at its quota (never past it, whatever the
    batch), the refusal names the figures, another account keeps appending, and a trim makes
    room again."""
    hostile, other = await new_account(store, "hostile"), await new_account(store, "other")
    await store.append_event(make_event(hostile, "probe", body=BODY), xon_id=None)
    size = (await store.account_usage(hostile)).bytes
    quota = size * 5 + size // 2  # room for 5 events, not 6

    results = await asyncio.gather(
        *(store.append_event(make_event(hostile, n, body=BODY), xon_id=None, max_bytes=quota)
          for n in range(10)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(refused) == 6 and len(results) - len(refused) == 4
    usage = await store.account_usage(hostile)
    assert usage.events == 5 and size * 5 - 100 < usage.bytes <= quota
    assert (refused[0].http_status, refused[0].code) == (507, "quota_exceeded")
    assert refused[0].limit == quota and refused[0].used + refused[0].size > quota

    # Another tenant, same quota, same store: unaffected.
    for n in range(5):
        await store.append_event(make_event(other, n, body=BODY), xon_id=None, max_bytes=quota)
    assert (await store.account_usage(other)).events == 5

    head = await store.head_seq(hostile)
    assert await store.trim_events(hostile, through=head - 1, limit=100) == 4
    await store.append_event(make_event(hostile, "after", body=BODY), xon_id=None,
                             max_bytes=quota)
    assert (await store.account_usage(hostile)).events == 2


async def test_a_repeat_is_answered_over_quota(store: Store) -> None:
    """X-on retrying an event that was stored gets its 2xx even when the account is full."""
    account = await new_account(store)
    first = await store.append_event(make_event(account, 1, body=BODY), xon_id=XonId("x", "d"))
    full = (await store.account_usage(account)).bytes
    again = await store.append_event(make_event(account, 1, body=BODY), xon_id=XonId("x", "d"),
                                     max_bytes=full)
    assert again.duplicate and again.stored.seq == first.stored.seq
    with pytest.raises(QuotaExceeded):
        await store.append_event(make_event(account, 2, body=BODY), xon_id=None, max_bytes=full)


async def test_deleting_an_account_drops_its_counters(store_backend: StoreBackend) -> None:
    """A deleted account leaves no usage behind (a new account starts at zero)."""
    store = await store_backend.open()
    try:
        account = await new_account(store)
        await store.append_event(make_event(account, 1, body=BODY), xon_id=None)
        assert await store.delete_account(account)
        assert await store.account_usage(account) == AccountUsage(events=0, bytes=0)
    finally:
        await store.close()


async def test_sqlite_file_from_before_the_counters_is_counted_when_opened(
    tmp_path: Path,
) -> None:
    """A relay.db written before ``account_usage`` existed gets its counters from its events
    at open, equal to what the appends would have counted."""
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    store = await open_store(url)
    account = await new_account(store)
    for n in range(3):
        await store.append_event(make_event(account, n, body=BODY), xon_id=XonId(f"x{n}", "d"))
    counted = await store.account_usage(account)
    await store.close()
    with sqlite3.connect(tmp_path / "relay.db") as db:
        db.execute("DROP TABLE account_usage")
    db.close()
    store = await open_store(url)
    try:
        assert await store.account_usage(account) == counted
    finally:
        await store.close()


async def test_retention_by_bytes_drops_acked_events_until_the_log_fits(store: Store) -> None:
    """``retention.max_bytes`` trims the oldest acked events until the log fits (the newest
    stays); an event an agent has not acked is kept, as with the other soft limits."""
    account = await new_account(store)
    for n in range(10):
        await store.append_event(make_event(account, n, body=BODY), xon_id=None)
    usage = await store.account_usage(account)
    limit = usage.bytes * 4 // 10 + 100  # room for 4 of the 10
    config = RetentionConfig(max_events=None, hard_max_events=None, max_age=None,
                             max_bytes=limit)
    for _ in range(5):  # bounded: each pass converges on the average size
        if not await trim_account(store, account, config, now=time.time()):
            break
    after = await store.account_usage(account)
    assert after.bytes <= limit and after.events == 4
    assert await store.trimmed_through(account) == 6

    # An enrolled agent that acked nothing holds every remaining event.
    other = await new_account(store, "other")
    agent_id, code = await new_agent(store, other)
    await store.enroll_agent(code_hash=crypto.hash_secret(code), public_key="k", now=time.time())
    for n in range(10):
        await store.append_event(make_event(other, n, body=BODY), xon_id=None)
    assert await trim_account(store, other, config, now=time.time()) == 0
    assert (await store.account_usage(other)).events == 10
