"""The store's operations methods (docs/operations.md), run against every backend."""

from __future__ import annotations

import time

import pytest

from relay_server.ingress import new_event_id
from relay_server.store import Store
from shared import crypto
from shared.errors import ApiError
from shared.events import RawRequest, XonEvent, format_time

from .conftest import new_tenant


def make_event(account: str, *, at: float | None = None) -> XonEvent:
    now = time.time() if at is None else at
    return XonEvent(
        id=new_event_id(now),
        account=account,
        type="call.started",
        received_at=format_time(now),
        params={"caller": "201"},
        request=RawRequest(method="GET", path="", query="caller=201", content_type="", body=b""),
    )


async def append(store: Store, account: str, count: int) -> list[XonEvent]:
    events = [make_event(account) for _ in range(count)]
    for event in events:
        await store.append_event(event, xon_id=None)
    return events


async def test_rename_account_moves_the_name(store: Store) -> None:
    """After a rename the new name finds the account, the old one nothing."""
    tenant = await new_tenant(store, "acme")
    renamed = await store.rename_account(tenant.account_id, "acme-ltd")
    assert renamed is not None and renamed.name == "acme-ltd"
    found = await store.get_account("acme-ltd")
    assert found is not None and found.id == tenant.account_id
    assert await store.get_account("acme") is None
    assert await store.rename_account("acc_missing", "x") is None


async def test_rename_account_refuses_a_taken_name(store: Store) -> None:
    """Renaming onto another account's name is a 409 and changes nothing."""
    first = await new_tenant(store, "acme")
    await new_tenant(store, "other")
    with pytest.raises(ApiError) as caught:
        await store.rename_account(first.account_id, "other")
    assert (caught.value.http_status, caught.value.code) == (409, "account_exists")
    kept = await store.get_account(first.account_id)
    assert kept is not None and kept.name == "acme"
    assert (await store.rename_account(first.account_id, "acme")) is not None


async def test_rotated_key_overlaps_until_its_deadline(store: Store) -> None:
    """The replaced key still finds the account until its deadline; the new one at once."""
    tenant = await new_tenant(store)
    old_hash = crypto.hash_secret(tenant.ingress_key)
    new_hash = crypto.hash_secret(crypto.new_token())
    deadline = time.time() + 3600
    rotated = await store.rotate_ingress_key(
        tenant.account_id, new_hash=new_hash, old_valid_until=deadline
    )
    assert rotated is not None and rotated.ingress_key_hash == new_hash
    by_new = await store.account_by_ingress_hash(new_hash)
    by_old = await store.account_by_ingress_hash(old_hash)
    assert by_new is not None and by_new.id == tenant.account_id
    assert by_old is not None and by_old.id == tenant.account_id
    assert by_old.ingress_key_hash == old_hash
    assert await store.previous_ingress_keys(tenant.account_id, now=time.time()) == [deadline]
    assert await store.previous_ingress_keys(tenant.account_id, now=deadline) == []


async def test_rotation_without_overlap_drops_the_old_key(store: Store) -> None:
    """A deadline in the past retires the old key at once; missing accounts answer None."""
    tenant = await new_tenant(store)
    old_hash = crypto.hash_secret(tenant.ingress_key)
    new_hash = crypto.hash_secret(crypto.new_token())
    await store.rotate_ingress_key(
        tenant.account_id, new_hash=new_hash, old_valid_until=time.time() - 1
    )
    assert await store.account_by_ingress_hash(old_hash) is None
    assert await store.account_by_ingress_hash(new_hash) is not None
    assert await store.previous_ingress_keys(tenant.account_id, now=time.time()) == []
    missing = await store.rotate_ingress_key("acc_missing", new_hash="x", old_valid_until=0.0)
    assert missing is None


async def test_delete_account_removes_everything_it_owns(store: Store) -> None:
    """Deleting an account drops its agents, log and keys; other accounts stay."""
    doomed = await new_tenant(store, "doomed")
    kept = await new_tenant(store, "kept")
    events = await append(store, doomed.account_id, 3)
    kept_events = await append(store, kept.account_id, 2)
    await store.rotate_ingress_key(
        doomed.account_id, new_hash="f" * 64, old_valid_until=time.time() + 60
    )
    assert await store.delete_account(doomed.account_id) is True
    assert await store.get_account("doomed") is None
    assert await store.get_agent(doomed.agent_id) is None
    assert await store.account_by_ingress_hash(crypto.hash_secret(doomed.ingress_key)) is None
    assert await store.account_by_ingress_hash("f" * 64) is None
    assert await store.get_event(events[0].id) is None
    assert await store.read_events(doomed.account_id, after=0, limit=10) == []
    assert [a.id for a in await store.list_accounts()] == [kept.account_id]
    assert [a.id for a in await store.list_agents()] == [kept.agent_id]
    assert (await store.get_event(kept_events[1].id)) is not None
    assert await store.delete_account(doomed.account_id) is False


async def test_rename_agent(store: Store) -> None:
    """An agent's display name changes; an unknown agent answers None."""
    tenant = await new_tenant(store)
    renamed = await store.rename_agent(tenant.agent_id, "front desk")
    assert renamed is not None and renamed.name == "front desk"
    agent = await store.get_agent(tenant.agent_id)
    assert agent is not None and agent.name == "front desk"
    assert await store.rename_agent("agt_missing", "x") is None


async def test_get_event_by_id(store: Store) -> None:
    """An event is found by id, in its account or across all; others' ids are not."""
    first = await new_tenant(store, "first")
    second = await new_tenant(store, "second")
    mine = await append(store, first.account_id, 3)
    theirs = await append(store, second.account_id, 1)
    found = await store.get_event(mine[1].id)
    assert found is not None and found.event == mine[1]
    in_account = await store.get_event(mine[2].id, account_id=first.account_id)
    assert in_account is not None and in_account.event.id == mine[2].id
    assert await store.get_event(theirs[0].id, account_id=first.account_id) is None
    assert await store.get_event(new_event_id(time.time())) is None


async def test_recent_events_are_newest_first(store: Store) -> None:
    """recent_events pages backwards from the head with ``before``."""
    tenant = await new_tenant(store)
    events = await append(store, tenant.account_id, 5)
    newest = await store.recent_events(tenant.account_id, limit=2)
    assert [s.event.id for s in newest] == [events[4].id, events[3].id]
    older = await store.recent_events(tenant.account_id, limit=10, before=newest[-1].seq)
    assert [s.event.id for s in older] == [e.id for e in reversed(events[:3])]
    assert await store.recent_events("acc_missing", limit=5) == []


async def test_count_after_counts_the_backlog(store: Store) -> None:
    """count_after counts the account's events above a seq, not other accounts'."""
    tenant = await new_tenant(store, "first")
    other = await new_tenant(store, "second")
    await append(store, tenant.account_id, 2)
    await append(store, other.account_id, 3)
    await append(store, tenant.account_id, 2)
    seqs = [s.seq for s in await store.read_events(tenant.account_id, after=0, limit=10)]
    assert await store.count_after(tenant.account_id, 0) == 4
    assert await store.count_after(tenant.account_id, seqs[1]) == 2
    assert await store.count_after(tenant.account_id, seqs[3]) == 0
    assert await store.count_after("acc_missing", 0) == 0
