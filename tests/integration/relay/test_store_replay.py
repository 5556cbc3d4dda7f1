"""The store's pending replay point (docs/operations.md, Replay), run against every backend."""

from __future__ import annotations

import pytest

from relay_server.store import Store

from .conftest import StoreBackend, new_tenant


async def test_a_replay_point_stays_until_settled_done(store: Store) -> None:
    """Reading the point leaves it recorded (a second link reads it too); settling it done
    removes it."""
    tenant = await new_tenant(store, "acme")
    assert await store.pending_replay(tenant.agent_id) is None
    await store.request_replay(tenant.agent_id, 7)
    assert await store.pending_replay(tenant.agent_id) == 7
    assert await store.pending_replay(tenant.agent_id) == 7
    await store.settle_replay(tenant.agent_id, 7, None)
    assert await store.pending_replay(tenant.agent_id) is None


@pytest.mark.parametrize(
    ("taken", "now", "rest", "after"),
    [
        (2, 2, 5, 5),  # the link got the agent from 2 to 5: the next link goes on at 5
        (2, 8, 5, 5),  # a newer request from 8 meanwhile: the lower point covers both
        (2, 1, 5, 1),  # a newer request from 1 meanwhile: it covers both, kept
        (2, 8, None, 8),  # done, but a newer request meanwhile: that one stays
        (2, None, 5, None),  # another link finished it meanwhile: nothing comes back
    ],
)
async def test_settling_a_replay_compares_with_the_point_recorded_now(
    store: Store, taken: int, now: int | None, rest: int | None, after: int | None
) -> None:
    """A link settles the point it read; what another link or request recorded meanwhile
    is never lost and never made to replay less."""
    tenant = await new_tenant(store, "acme")
    if now is not None:
        await store.request_replay(tenant.agent_id, now)
    await store.settle_replay(tenant.agent_id, taken, rest)
    assert await store.pending_replay(tenant.agent_id) == after


async def test_a_newer_replay_request_replaces_a_pending_one(store: Store) -> None:
    """The last request wins, including a replay from the very start (0)."""
    tenant = await new_tenant(store, "acme")
    await store.request_replay(tenant.agent_id, 7)
    await store.request_replay(tenant.agent_id, 0)
    assert await store.pending_replay(tenant.agent_id) == 0


async def test_replay_requests_are_per_agent(store: Store) -> None:
    """One agent's request is not another's; an unknown agent records nothing."""
    first = await new_tenant(store, "acme")
    second = await new_tenant(store, "other")
    await store.request_replay(first.agent_id, 3)
    await store.request_replay("ag_missing", 3)
    await store.settle_replay("ag_missing", 3, None)
    await store.settle_replay(second.agent_id, 3, 5)
    assert await store.pending_replay(second.agent_id) is None
    assert await store.pending_replay("ag_missing") is None
    assert await store.pending_replay(first.agent_id) == 3


async def test_a_pending_replay_goes_with_its_account(store: Store) -> None:
    """Deleting the account forgets its agents' pending replays."""
    tenant = await new_tenant(store, "acme")
    await store.request_replay(tenant.agent_id, 3)
    assert await store.delete_account(tenant.account_id)
    assert await store.pending_replay(tenant.agent_id) is None


async def test_a_replay_request_survives_a_reopen(
    store: Store, store_backend: StoreBackend
) -> None:
    """The point is durable: another store instance on the same data reads it, and what it
    settles the first one sees."""
    tenant = await new_tenant(store, "acme")
    await store.request_replay(tenant.agent_id, 5)
    other = await store_backend.open()
    try:
        assert await other.pending_replay(tenant.agent_id) == 5
        await other.settle_replay(tenant.agent_id, 5, 9)
    finally:
        await other.close()
    assert await store.pending_replay(tenant.agent_id) == 9
