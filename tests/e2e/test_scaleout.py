"""Two ``xon-relay-server run`` processes on one Redis (issue 5, docs/scaling.md).

Real relay processes (``--store redis://...?prefix=...``, a fresh prefix per test), a test
agent (tests/helpers/relay_app.py) that moves between them, X-on requests over HTTP. Accounts
and agents are made straight in the shared store. What must hold: every event answered 2xx is
delivered, in seq order per link, duplicates only with the same id and seq.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay_server.store import Store, open_store
from shared.link.frames import CloseCode
from shared.link.session import Closed, EventReceived
from tests.e2e.conftest import Procs, read_json, wait_until
from tests.helpers.relay_app import Agent
from tests.helpers.timing import MS
from tests.integration.relay.conftest import OwnRedis, Tenant, new_tenant, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CONFIG = """
[cluster]
poll_interval = 0.2
recheck_interval = 0.2
handover_timeout = 0.5

[retention]
interval = "none"
"""
HTTP_TIMEOUT = 3000 * MS


@dataclass
class RelayProc:
    """One relay process; a ``LinkTarget`` for the test agent."""

    procs: Procs
    proc: Any
    base_url: str
    admin_url: str
    token: str
    relay_id: str

    @property
    def url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/v1/agent"

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def start_relay(procs: Procs, data_dir: Path, store_url: str, relay_id: str) -> RelayProc:
    data_dir.mkdir(parents=True)
    (data_dir / "relay.toml").write_text(CONFIG, encoding="utf-8")
    proc = procs.start(
        "xon-relay-server",
        "run",
        "--config",
        str(data_dir / "relay.toml"),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--store",
        store_url,
    )

    def admin() -> dict[str, Any] | None:
        assert proc.poll() is None, procs.tail()
        data = read_json(data_dir / "admin.json")
        return data if data is not None and data.get("pid") == proc.pid else None

    info = await wait_until(admin, "relay admin.json", procs=procs)
    relay = RelayProc(
        procs=procs,
        proc=proc,
        base_url=str(info["public_url"]).rstrip("/"),
        admin_url=str(info["admin_url"]).rstrip("/"),
        token=str(info["token"]),
        relay_id=relay_id,
    )
    await wait_until(lambda: ready(relay), "relay /readyz", procs=procs)
    return relay


async def ready(relay: RelayProc) -> bool:
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(relay.base_url + "/readyz") as resp:
                return resp.status == 200
    except aiohttp.ClientError:
        return False


@dataclass
class Burst:
    """X-on requests n = 0..count-1, round-robin over the targets, one at a time."""

    tenant: Tenant
    targets: list[RelayProc]
    count: int
    acked: set[str] = field(default_factory=set)
    statuses: list[int] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Set it to end the burst between two requests (none is left in flight)."""

    async def run(self, *, pause: float = 0.0) -> None:
        async with aiohttp.ClientSession() as http:
            for n in range(self.count):
                if self.stop.is_set():
                    return
                target = self.targets[n % len(self.targets)]
                url = f"{target.base_url}/xon/{self.tenant.ingress_key}/sms.received"
                try:
                    async with http.post(
                        url,
                        params={"n": str(n)},
                        timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT),
                    ) as resp:
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0  # the instance is gone: not acknowledged
                self.statuses.append(status)
                if status == 200:
                    self.acked.add(str(n))
                if pause:
                    await asyncio.sleep(pause)


@dataclass
class Inbox:
    """What the agent received: each event id once, with the seq it came with."""

    by_id: dict[str, tuple[int, str]] = field(default_factory=dict)
    acked: int = 0

    @property
    def params(self) -> set[str]:
        return {n for _, n in self.by_id.values()}

    async def receive(
        self,
        agent: Agent,
        *,
        until: int | None = None,
        want: set[str] | None = None,
        ack: bool = True,
    ) -> Closed | None:
        """Read (acking, unless told not to) until ``until`` events came on this link,
        ``want`` is all in, or the link closed (returned)."""
        last_seq = agent.resume_after
        received = 0
        for _ in range(100_000):
            if until is not None and received >= until:
                return None
            if want is not None and want <= self.params:
                return None
            for event in await agent.read():
                if isinstance(event, Closed):
                    return event
                if isinstance(event, EventReceived):
                    # DESIGN §Link protocol: in order per link; a duplicate keeps id and seq.
                    assert event.seq > last_seq
                    last_seq = event.seq
                    known = self.by_id.setdefault(
                        event.event["id"], (event.seq, event.event["params"]["n"])
                    )
                    assert known[0] == event.seq
                    received += 1
                    if ack:
                        await agent.ack(event.seq)
                        self.acked = event.seq
        raise AssertionError("the agent never got what it waited for")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A redis-server of this test's own, which it may kill."""
    yield from private_redis(tmp_path / "redis")


@pytest.fixture
async def shared_store(redis_store_url: str) -> AsyncIterator[Store]:
    store = await open_store(redis_store_url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def pair(
    procs: Procs, tmp_path: Path, redis_store_url: str, shared_store: Store
) -> tuple[RelayProc, RelayProc]:
    relay_id = await shared_store.relay_id()
    a = await start_relay(procs, tmp_path / "a", redis_store_url, relay_id)
    b = await start_relay(procs, tmp_path / "b", redis_store_url, relay_id)
    return a, b


async def assert_log_delivered(store: Store, tenant: Tenant, inbox: Inbox) -> None:
    """No gap: every event in the account's log reached the agent."""
    stored = await store.read_events(tenant.account_id, after=0, limit=100_000)
    assert {e.event.id for e in stored} == set(inbox.by_id)


async def test_agent_moves_between_instances_mid_stream(
    pair: tuple[RelayProc, RelayProc], shared_store: Store
) -> None:
    """Agent on A, ingress on B; the agent moves to B halfway with some events unacked: no
    loss, no gap, in order, the unacked ones again with the same id and seq."""
    a, b = pair
    tenant = await new_tenant(shared_store)
    inbox = Inbox()
    agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
    await agent.welcome()
    burst = Burst(tenant, [b], 300)
    sending = asyncio.create_task(burst.run())
    assert await inbox.receive(agent, until=100) is None
    # Leave a few unacked: B sends them again, with the same ids and seqs.
    assert await inbox.receive(agent, until=10, ack=False) is None
    await agent.close()
    moved = await Agent(b, tenant.agent_id, tenant.private_key, resume_after=inbox.acked).connect()
    await moved.welcome()
    await sending
    assert burst.acked == {str(n) for n in range(300)}
    assert await inbox.receive(moved, want=burst.acked) is None
    await assert_log_delivered(shared_store, tenant, inbox)
    await moved.close()


async def test_killing_the_instance_that_holds_the_agent_loses_nothing(
    pair: tuple[RelayProc, RelayProc], shared_store: Store
) -> None:
    """kill -9 of the agent's instance during a burst over both: every event answered 2xx
    reaches the agent once it reconnects to the survivor."""
    a, b = pair
    tenant = await new_tenant(shared_store)
    inbox = Inbox()
    agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
    await agent.welcome()
    burst = Burst(tenant, [a, b], 400)
    sending = asyncio.create_task(burst.run())
    assert await inbox.receive(agent, until=50) is None
    a.kill9()
    closed = await inbox.receive(agent)
    assert closed is not None
    survivor = await Agent(
        b, tenant.agent_id, tenant.private_key, resume_after=inbox.acked
    ).connect()
    await survivor.welcome()
    await sending
    assert 0 in burst.statuses  # some requests did hit the dead instance
    assert await inbox.receive(survivor, want=burst.acked) is None
    assert burst.acked <= inbox.params
    await assert_log_delivered(shared_store, tenant, inbox)
    await survivor.close()


async def test_revoking_on_one_instance_cuts_the_agent_on_the_other(
    pair: tuple[RelayProc, RelayProc], shared_store: Store
) -> None:
    """Revoke through A's admin API while the agent is on B: B closes it with 4403."""
    a, b = pair
    tenant = await new_tenant(shared_store)
    agent = await Agent(b, tenant.agent_id, tenant.private_key).connect()
    await agent.welcome()
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{a.admin_url}/v1/agents/{tenant.agent_id}/revoke",
            headers={"Authorization": f"Bearer {a.token}"},
        ) as resp:
            assert resp.status == 200
    closed = await agent.closed()
    print(f"revoke on A -> agent on B closed {closed.code} in {time.monotonic() - started:.3f} s")
    assert closed.code == CloseCode.REVOKED


async def test_redis_restart_during_traffic_loses_nothing(
    procs: Procs, tmp_path: Path, own_redis: OwnRedis
) -> None:
    """Redis killed during a burst: 503s (never a false 2xx) and /readyz 503 while down, the
    agent stays connected; Redis back: everything resumes, every 2xx delivered."""
    await own_redis.start()
    url = f"redis://127.0.0.1:{own_redis.port}/0?prefix=xontest:restart:"
    store = await open_store(url)
    try:
        relay_id = await store.relay_id()
        a = await start_relay(procs, tmp_path / "a", url, relay_id)
        b = await start_relay(procs, tmp_path / "b", url, relay_id)
        tenant = await new_tenant(store)
        inbox = Inbox()
        agent = await Agent(b, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        burst = Burst(tenant, [a], 100_000)
        sending = asyncio.create_task(burst.run(pause=2 * MS))
        assert await inbox.receive(agent, until=20) is None
        own_redis.kill()
        await wait_until(lambda: 503 in burst.statuses, "a 503 while Redis is down")
        assert not await ready(a)
        await own_redis.start()
        down = burst.statuses.index(503)
        await wait_until(
            lambda: 200 in burst.statuses[down:], "a 2xx after Redis came back", procs=procs
        )
        await wait_until(lambda: ready(a), "/readyz after Redis came back", procs=procs)
        burst.stop.set()
        await sending
        # A 503 whose reply Redis lost may still have stored its event: the log is the truth,
        # and it holds every event answered 2xx.
        logged = await store.read_events(tenant.account_id, after=0, limit=100_000)
        assert burst.acked <= {e.event.params["n"] for e in logged}
        # The same link, never closed, delivers all of it.
        assert await inbox.receive(agent, want={e.event.params["n"] for e in logged}) is None
        assert set(burst.statuses) <= {200, 503}
        await assert_log_delivered(store, tenant, inbox)
        await agent.close()
    finally:
        await store.close()
