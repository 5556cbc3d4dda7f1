"""The store's pending replay point (docs/operations.md, Replay), run against every backend."""

from __future__ import annotations

from relay_server.store import Store

from .conftest import StoreBackend, new_tenant


async def test_a_replay_request_is_taken_once(store: Store) -> None:
    """take_replay returns the recorded point and removes it: the next take finds none."""
    tenant = await new_tenant(store, "acme")
    assert await store.take_replay(tenant.agent_id) is None
    await store.request_replay(tenant.agent_id, 7)
    assert await store.take_replay(tenant.agent_id) == 7
    assert await store.take_replay(tenant.agent_id) is None


async def test_a_newer_replay_request_replaces_a_pending_one(store: Store) -> None:
    """The last request wins, including a replay from the very start (0)."""
    tenant = await new_tenant(store, "acme")
    await store.request_replay(tenant.agent_id, 7)
    await store.request_replay(tenant.agent_id, 0)
    assert await store.take_replay(tenant.agent_id) == 0


async def test_replay_requests_are_per_agent(store: Store) -> None:
    """One agent's request is not another's; an unknown agent records nothing."""
    first = await new_tenant(store, "acme")
    second = await new_tenant(store, "other")
    await store.request_replay(first.agent_id, 3)
    await store.request_replay("ag_missing", 3)
    assert await store.take_replay(second.agent_id) is None
    assert await store.take_replay("ag_missing") is None
    assert await store.take_replay(first.agent_id) == 3


async def test_a_pending_replay_goes_with_its_account(store: Store) -> None:
    """Deleting the account forgets its agents' pending replays."""
    tenant = await new_tenant(store, "acme")
    await store.request_replay(tenant.agent_id, 3)
    assert await store.delete_account(tenant.account_id)
    assert await store.take_replay(tenant.agent_id) is None


async def test_a_replay_request_survives_a_reopen(
    store: Store, store_backend: StoreBackend
) -> None:
    """The point is durable: another store instance on the same data takes it."""
    tenant = await new_tenant(store, "acme")
    await store.request_replay(tenant.agent_id, 5)
    other = await store_backend.open()
    try:
        assert await other.take_replay(tenant.agent_id) == 5
    finally:
        await other.close()
    assert await store.take_replay(tenant.agent_id) is None
