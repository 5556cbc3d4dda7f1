"""Retention on a running relay, both backends (docs/redis.md, Retention; docs/protocol.md).

Soft limits never drop what an agent has not acked; hard limits do, and the agent is told:
its ``welcome`` carries ``trimmed_through``, and a connected link that reaches the hole is
closed with 4012 ``behind_retention`` first.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay_server.retention import trim_account
from shared.config import LinkConfig, RetentionConfig, ServerConfig
from shared.link.frames import CloseCode
from shared.link.session import EventReceived
from tests.helpers.relay_app import Agent

from .conftest import Instance, StoreBackend, Tenant, new_tenant, running_instance
from .test_store import make_event

SOFT = RetentionConfig(interval=None, max_events=2, max_age=None, hard_max_events=None)
HARD = RetentionConfig(interval=None, max_events=2, max_age=None, hard_max_events=3)


@pytest.fixture
async def instance(store_backend: StoreBackend, tmp_path: Path) -> AsyncIterator[Instance]:
    config = ServerConfig(
        data_dir=tmp_path,
        store=store_backend.url,
        link=LinkConfig(window=2),
        retention=RetentionConfig(interval=None),
    )
    async with running_instance(config) as running:
        yield running


async def append(instance: Instance, tenant: Tenant, count: int) -> list[int]:
    seqs = []
    for n in range(count):
        result = await instance.store.append_event(make_event(tenant.account_id, n), xon_id=None)
        seqs.append(result.stored.seq)
    instance.services.hub.notify(tenant.account_id)
    return seqs


async def test_soft_limits_keep_what_an_agent_has_not_acked(instance: Instance) -> None:
    """Beyond max_events, events go only up to the slowest live agent's cursor."""
    tenant = await new_tenant(instance.store)
    seqs = await append(instance, tenant, 6)
    await instance.store.set_cursor(tenant.agent_id, seqs[1])
    assert await trim_account(instance.store, tenant.account_id, SOFT, now=time.time()) == 2
    assert await instance.store.trimmed_through(tenant.account_id) == seqs[1]
    await instance.store.revoke_agent(tenant.agent_id, now=time.time())
    # A revoked agent holds nothing back: the count limit alone applies now.
    assert await trim_account(instance.store, tenant.account_id, SOFT, now=time.time()) == 2
    remaining = await instance.store.read_events(tenant.account_id, after=0, limit=10)
    assert [e.seq for e in remaining] == seqs[4:]


async def test_an_agent_behind_a_hard_trim_is_told_at_its_welcome(instance: Instance) -> None:
    """Past hard_max_events the unacked events go; the agent's next welcome says up to which
    seq, and delivery resumes after it."""
    tenant = await new_tenant(instance.store)
    seqs = await append(instance, tenant, 6)
    assert await trim_account(instance.store, tenant.account_id, HARD, now=time.time()) == 3
    agent = await Agent(instance, tenant.agent_id, tenant.private_key).connect()
    welcomed = await agent.welcome()
    assert welcomed.resume_after == 0 and welcomed.trimmed_through == seqs[2]
    assert await agent.events(2) == seqs[3:5]
    await agent.close()


async def test_a_connected_agent_reaching_a_hard_trim_is_closed_then_told(
    instance: Instance,
) -> None:
    """The hole opens while the link is up (window full): the link closes with 4012 before
    anything after the hole goes out; the reconnect's welcome names the hole."""
    tenant = await new_tenant(instance.store)
    agent = await Agent(instance, tenant.agent_id, tenant.private_key).connect()
    assert (await agent.welcome()).trimmed_through == 0
    seqs = await append(instance, tenant, 8)
    assert await agent.events(2) == seqs[:2]  # the window (2) is full now
    await trim_account(instance.store, tenant.account_id, HARD, now=time.time())
    await agent.ack(seqs[1])
    closed = await agent.closed()
    assert closed.code == CloseCode.BEHIND_RETENTION
    assert not any(isinstance(e, EventReceived) for e in await agent.read())
    again = await Agent(
        instance, tenant.agent_id, tenant.private_key, resume_after=seqs[1]
    ).connect()
    welcomed = await again.welcome()
    trimmed = await instance.store.trimmed_through(tenant.account_id)
    assert welcomed.trimmed_through == trimmed > seqs[1]
    assert (await again.events(1))[0] == trimmed + 1
    await again.close()
