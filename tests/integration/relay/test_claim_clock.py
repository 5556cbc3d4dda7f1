"""CTOX claims do not depend on the instances' clocks (docs/scaling.md, Clocks).

On Redis a claim carries a lease that expires by Redis's clock, so a relay whose clock runs
30 s ahead does not declare a call still in flight through another relay lost: it waits, and
answers that relay's result. On SQLite (one instance, one clock) the caller's clock decides.
"""

from __future__ import annotations

import asyncio
import time

from relay_server.ctox import CtoxService, request_hash
from relay_server.store import Store
from relay_server.store.base import CommandRecord
from shared import crypto
from shared.config import CtoxConfig
from shared.link import frames
from tests.helpers.timing import MS

from .conftest import StoreBackend

SKEW = 30.0
CALL = {"destination": "+441632960123", "target": "201"}


def accepted() -> frames.CommandResult:
    return frames.CommandResult(request_id="a-1", status=202, content_type="application/json",
                                body_b64="e30=", headers={})


async def claim_now(store: Store, account_id: str, key: str, *, hold: float) -> CommandRecord:
    """Instance A (a right clock) claims ``key`` for ``hold`` seconds; the pending record."""
    now = time.time()
    digest = request_hash("make_call", CALL)
    assert await store.claim_command(account_id, key, request_hash=digest, now=now,
                                     claim_deadline=now + hold, expires_at=now + 3600) is None
    record = await store.get_command(account_id, key, now=now)
    assert record is not None
    return record


async def test_claim_is_overdue_by_the_store_clock(store_backend: StoreBackend) -> None:
    """A caller 30 s ahead sees a live claim as overdue only on SQLite (whose one instance
    cannot be skewed against itself); on Redis only once the lease expired by Redis's clock."""
    store = await store_backend.open()
    try:
        account = await store.create_account(
            name="acme", ingress_key_hash=crypto.hash_secret(crypto.new_token()))
        record = await claim_now(store, account.id, "k", hold=300 * MS)
        assert not await store.claim_overdue(record, now=time.time())
        skewed = await store.claim_overdue(record, now=time.time() + SKEW)
        assert skewed is (store_backend.name == "sqlite")
        # Both clocks past the deadline: overdue everywhere (bounded wait for the lease).
        for _ in range(200):
            if await store.claim_overdue(record, now=time.time() + SKEW):
                break
            await asyncio.sleep(10 * MS)
        assert await store.claim_overdue(record, now=time.time() + SKEW)
    finally:
        await store.close()


async def test_a_skewed_relay_waits_for_the_call_in_flight(redis_store_url: str) -> None:
    """Two relays on one Redis: A holds the claim (its X-on call takes 1 s); B, 30 s ahead,
    gets the same command, waits instead of storing 502 outcome_unknown, and answers A's 202."""
    from relay_server.store import open_store

    store = await open_store(redis_store_url)
    relay_b = CtoxService(store, CtoxConfig(timeout=500 * MS, claim_grace=500 * MS),
                          clock=lambda: time.time() + SKEW, poll_interval=20 * MS)
    try:
        account = await store.create_account(
            name="acme", ingress_key_hash=crypto.hash_secret(crypto.new_token()),
            xon_api_url="http://127.0.0.1:9/", xon_api_key="k")
        await claim_now(store, account.id, "once", hold=1000 * MS)
        command = frames.Command(request_id="b-1", ctox_type="make_call", params=CALL,
                                 idempotency_key="once")
        waiting = asyncio.create_task(relay_b.execute(account.id, command))
        await asyncio.sleep(300 * MS)  # B polls the store meanwhile; A's call is in flight
        assert not waiting.done()
        now = time.time()
        await store.finish_command(account.id, "once", request_hash=request_hash("make_call", CALL),
                                   result=accepted(), now=now, expires_at=now + 3600)
        result = await asyncio.wait_for(waiting, 5000 * MS)
        assert (result.status, result.error) == (202, "")
    finally:
        await relay_b.close()
        await store.close()
