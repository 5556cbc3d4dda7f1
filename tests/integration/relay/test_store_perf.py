"""The Store contract where the backends take shortcuts for speed (docs/performance.md).

SQLite caches ingress key lookups and writes cursors and ``last_seen`` behind; none of that may
show through the contract: a changed key is seen at once by the instance that changed it, and
a recorded cursor is read back at once and survives a clean close. Run against every backend.
"""

from __future__ import annotations

import time

from relay_server.store import Store
from shared import crypto

from .conftest import StoreBackend
from .test_store import new_account, new_agent


async def _keyed_account(store: Store, name: str) -> tuple[str, str]:
    key_hash = crypto.hash_secret(crypto.new_token())
    record = await store.create_account(name=name, ingress_key_hash=key_hash)
    return record.id, key_hash


async def test_a_looked_up_key_stops_working_at_once_after_rotation(store: Store) -> None:
    """A key found a moment ago is refused right after a rotation without overlap."""
    account_id, old_hash = await _keyed_account(store, "acme")
    found = await store.account_by_ingress_hash(old_hash)
    assert found is not None and found.id == account_id
    new_hash = crypto.hash_secret(crypto.new_token())
    await store.rotate_ingress_key(account_id, new_hash=new_hash, old_valid_until=time.time() - 1)
    assert await store.account_by_ingress_hash(old_hash) is None
    by_new = await store.account_by_ingress_hash(new_hash)
    assert by_new is not None and by_new.ingress_key_hash == new_hash


async def test_a_looked_up_key_is_gone_with_its_account(store: Store) -> None:
    """Deleting an account refuses its key at once, though it was just looked up."""
    account_id, key_hash = await _keyed_account(store, "doomed")
    assert await store.account_by_ingress_hash(key_hash) is not None
    assert await store.delete_account(account_id) is True
    assert await store.account_by_ingress_hash(key_hash) is None


async def test_a_looked_up_account_shows_its_changes(store: Store) -> None:
    """A rename or a new X-on API URL shows in the next lookup by ingress key."""
    account_id, key_hash = await _keyed_account(store, "acme")
    assert await store.account_by_ingress_hash(key_hash) is not None
    await store.rename_account(account_id, "acme-ltd")
    await store.update_account(account_id, xon_api_url="https://xon.test/api")
    found = await store.account_by_ingress_hash(key_hash)
    assert found is not None
    assert (found.name, found.xon_api_url) == ("acme-ltd", "https://xon.test/api")


async def test_cursors_read_back_latest_value_at_once(store: Store) -> None:
    """The latest set_cursor wins, even when it moves back, and is read back at once."""
    agent_id, _ = await new_agent(store, await new_account(store))
    for seq in (5, 9, 7):
        await store.set_cursor(agent_id, seq)
    assert await store.get_cursor(agent_id) == 7
    await store.touch_agent(agent_id, now=12.5)
    await store.touch_agent(agent_id, now=13.5)
    agent = await store.get_agent(agent_id)
    assert agent is not None and agent.last_seen == 13.5
    listed = await store.list_agents()
    assert [a.last_seen for a in listed if a.id == agent_id] == [13.5]


async def test_cursor_and_last_seen_survive_a_clean_close(store_backend: StoreBackend) -> None:
    """Values recorded just before close are in the store when it is opened again."""
    store = await store_backend.open()
    agent_id, _ = await new_agent(store, await new_account(store))
    await store.set_cursor(agent_id, 41)
    await store.touch_agent(agent_id, now=77.0)
    await store.close()
    reopened = await store_backend.open()
    try:
        assert await reopened.get_cursor(agent_id) == 41
        agent = await reopened.get_agent(agent_id)
        assert agent is not None and agent.last_seen == 77.0
    finally:
        await reopened.close()
