"""Several relay instances on one Redis (issue 5, docs/scaling.md), in one test process.

Each instance is a full relay (services, both listeners) on its own port, sharing one Redis key
prefix; agents are the test agent of tests/helpers/relay_app.py. The process-level versions
(kill -9, Redis restart) are in tests/e2e/test_scaleout.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay_server.store import open_store
from relay_server.store.redis import RedisStore
from shared.config import ClusterConfig, RetentionConfig, ServerConfig
from shared.errors import StoreError
from shared.link.frames import CloseCode
from shared.link.session import EventReceived, StatusReceived
from tests.helpers.relay_app import Agent
from tests.helpers.timing import MS

from .conftest import ADMIN_TOKEN, Instance, OwnRedis, Tenant, new_tenant, running_instance
from .test_store import make_event, new_account

pytestmark = pytest.mark.redis

SLOW_POLL = ClusterConfig(poll_interval=60.0, recheck_interval=60.0, handover_timeout=60.0)
"""Fallbacks out of the way: whatever happens within a test's waits came over the bus."""
FAST_FALLBACK = ClusterConfig(
    poll_interval=50 * MS, recheck_interval=50 * MS, handover_timeout=300 * MS
)

Pair = Callable[..., Any]


@pytest.fixture
def make_pair(redis_store_url: str, tmp_path: Path) -> Callable[..., Any]:
    """Factory: two instances (A, B) on the test's Redis prefix, with these cluster settings."""

    @asynccontextmanager
    async def make(cluster: ClusterConfig) -> AsyncIterator[tuple[Instance, Instance]]:
        async with AsyncExitStack() as stack:
            instances = []
            for name in "ab":
                config = ServerConfig(
                    data_dir=tmp_path / name,
                    store=redis_store_url,
                    cluster=cluster,
                    retention=RetentionConfig(interval=None),
                )
                instances.append(await stack.enter_async_context(running_instance(config)))
            yield instances[0], instances[1]

    return make


async def ingress(instance: Instance, tenant: Tenant, n: int, **params: str) -> int:
    """One X-on request to ``instance``; returns the HTTP status."""
    query = {"n": str(n), **params}
    event_type = params.pop("type", "sms.received")
    async with aiohttp.ClientSession() as http:
        url = f"{instance.base_url}/xon/{tenant.ingress_key}/{event_type}"
        async with http.post(url, params=query) as resp:
            return resp.status


async def received_params(agent: Agent, count: int) -> list[str]:
    """The ``n`` param of the next ``count`` events, acked as they arrive."""
    found: list[str] = []
    for event in await agent.read_until(EventReceived, count):
        found.append(event.event["params"]["n"])
        await agent.ack(event.seq)
    return found


async def test_events_taken_on_one_instance_reach_an_agent_on_the_other(make_pair: Pair) -> None:
    """Agent on A, ingress on B: delivered in order by the pub/sub wake-up alone."""
    async with make_pair(SLOW_POLL) as (a, b):
        tenant = await new_tenant(a.store)
        agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        for n in range(10):
            assert await ingress(b, tenant, n) == 200
        assert await received_params(agent, 10) == [str(n) for n in range(10)]
        await agent.close()


async def test_the_poll_delivers_when_no_notification_comes(
    make_pair: Pair, redis_store_url: str
) -> None:
    """An event committed without any wake-up (a lost one) still arrives, by the poll."""
    async with make_pair(FAST_FALLBACK) as (a, _):
        tenant = await new_tenant(a.store)
        agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        silent = await open_store(redis_store_url)  # a writer that tells nobody
        try:
            await silent.append_event(make_event(tenant.account_id, "quiet"), xon_id=None)
        finally:
            await silent.close()
        assert await received_params(agent, 1) == ["quiet"]
        await agent.close()


async def test_status_changes_reach_agents_on_other_instances(make_pair: Pair) -> None:
    """A status event taken on B is pushed as a status change to the agent on A."""
    async with make_pair(SLOW_POLL) as (a, b):
        tenant = await new_tenant(a.store)
        agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        (snapshot,) = await agent.read_until(StatusReceived)
        assert snapshot.snapshot and snapshot.items == []
        assert await ingress(b, tenant, 1, type="messages.waiting", mailbox="201", count="3") == 200
        (change,) = await agent.read_until(StatusReceived)
        assert not change.snapshot
        assert [(i["key"], i["params"]["count"]) for i in change.items] == [
            ("messages.waiting?mailbox=201", "3")
        ]
        await agent.close()


async def revoke_on(instance: Instance, agent_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{instance.admin_url}/v1/agents/{agent_id}/revoke",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data


async def test_revoking_on_one_instance_cuts_the_link_on_the_other(make_pair: Pair) -> None:
    """Revoke on A while the agent is on B: B closes the link with 4403 (by broadcast)."""
    async with make_pair(SLOW_POLL) as (a, b):
        tenant = await new_tenant(a.store)
        agent = await Agent(b, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        started = time.monotonic()
        answer = await revoke_on(a, tenant.agent_id)
        assert answer["revoked"] and not answer["disconnected"]  # not connected to A
        closed = await agent.closed()
        print(f"revoke on A -> link on B closed in {time.monotonic() - started:.3f} s")
        assert closed.code == CloseCode.REVOKED


async def test_the_recheck_cuts_a_revoked_agent_without_a_broadcast(make_pair: Pair) -> None:
    """A revocation written straight to the store (no broadcast) still cuts the link."""
    async with make_pair(FAST_FALLBACK) as (a, _):
        tenant = await new_tenant(a.store)
        agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        await a.store.revoke_agent(tenant.agent_id, now=time.time())
        assert (await agent.closed()).code == CloseCode.REVOKED


async def test_the_newest_link_wins_across_instances(make_pair: Pair) -> None:
    """Same agent on A, then on B: A's link closes with 4010 before B sends, and every later
    event goes out on B only."""
    async with make_pair(SLOW_POLL) as (a, b):
        tenant = await new_tenant(a.store)
        old = await Agent(a, tenant.agent_id, tenant.private_key).connect()
        await old.welcome()
        started = time.monotonic()
        new = await Agent(b, tenant.agent_id, tenant.private_key).connect()
        await new.welcome()
        print(f"handover from A to B took {time.monotonic() - started:.3f} s")
        assert (await old.closed()).code == CloseCode.REPLACED
        assert old.unacked == []
        for n in range(5):
            assert await ingress(a, tenant, n) == 200
        assert await received_params(new, 5) == [str(n) for n in range(5)]
        await new.close()


async def test_a_new_link_waits_out_a_dead_holder_then_sends(make_pair: Pair) -> None:
    """The previous holder died without releasing: the new link sends after the handover
    timeout, without help from anyone."""
    async with make_pair(FAST_FALLBACK) as (a, _):
        tenant = await new_tenant(a.store)
        await a.store.claim_link(tenant.agent_id, owner="dead-instance")
        assert await ingress(a, tenant, 1) == 200
        agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        assert await received_params(agent, 1) == ["1"]
        await agent.close()


async def test_a_redis_outage_keeps_links_and_refuses_ingress(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    """Redis down: ingress 503, /readyz 503, the agent stays connected; Redis back: the same
    link delivers what is taken next, and nothing acknowledged before is lost."""
    await own_redis.start()
    config = ServerConfig(
        data_dir=tmp_path / "a",
        store=f"redis://127.0.0.1:{own_redis.port}/0",
        cluster=FAST_FALLBACK,
        retention=RetentionConfig(interval=None),
    )
    async with running_instance(config) as a:
        tenant = await new_tenant(a.store)
        agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        assert await ingress(a, tenant, 1) == 200
        own_redis.kill()
        assert await ingress(a, tenant, 2) == 503
        async with aiohttp.ClientSession() as http:
            async with http.get(a.base_url + "/readyz") as resp:
                assert resp.status == 503
        await own_redis.start()
        for _ in range(100):  # the pool reconnects on first use; bounded: 100 x 20 ms
            if await ingress(a, tenant, 3) == 200:
                break
            await asyncio.sleep(20 * MS)
        assert await received_params(agent, 2) == ["1", "3"]
        await agent.close()


async def test_wait_for_missing_replicas_refuses_the_write(redis_store_url: str) -> None:
    """redis_wait_replicas: fewer replicas than asked within the timeout is a StoreError (503),
    never a 2xx."""
    store = await open_store(redis_store_url, wait_replicas=1, wait_timeout=50 * MS)
    try:
        account_id = await new_account(store)
        with pytest.raises(StoreError, match="replicas acknowledged"):
            await store.append_event(make_event(account_id, 1), xon_id=None)
    finally:
        await store.close()


async def test_waitaof_is_refused_at_open_on_redis_before_7_2(redis_store_url: str) -> None:
    """redis_wait_aof needs WAITAOF (Redis 7.2): an older server is refused when opening."""
    probe = await RedisStore.open(redis_store_url)
    try:
        info = await probe.client.info("server")
    finally:
        await probe.close()
    major, minor = (int(x) for x in str(info["redis_version"]).split(".")[:2])
    if (major, minor) >= (7, 2):
        store = await open_store(redis_store_url, wait_aof=True)
        await store.close()
        return
    with pytest.raises(StoreError, match="needs Redis 7.2"):
        await open_store(redis_store_url, wait_aof=True)
