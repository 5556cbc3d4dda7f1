"""The hub's heartbeat rounds (docs/protocol.md, Heartbeat; docs/performance.md, bench 3): one
log-head read per account per round however many links, and frames only to agents that lack
events. Real SQLite or Redis stores, real WebSockets on 127.0.0.1, the real ``AgentSession``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from relay_server import agent_ws
from relay_server.appkeys import config_key, hub_key, relay_id_key, store_key
from relay_server.hub import AgentHub
from relay_server.store.base import Store
from relay_server.store.sqlite import SqliteStore
from shared import crypto
from shared.config import LinkConfig, ServerConfig
from shared.link.session import Closed, EventReceived, HeartbeatReceived, StatusReceived
from tests.helpers.relay_app import WAIT, Agent, Relay
from tests.helpers.timing import MS
from tests.integration.relay.conftest import StoreBackend

BEAT = 30 * MS
"""Heartbeat interval of the relays here."""
STEP = 2 * MS


class CountingStore(SqliteStore):
    """The real SQLite store, recording each log-head read with the hub round it fell in."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round: Callable[[], int] = lambda: 0
        self.head_reads: list[tuple[int, str]] = []
        """(heartbeat rounds finished before the read, account id)"""

    async def head_seq(self, account_id: str) -> int:
        self.head_reads.append((self.round(), account_id))
        return await super().head_seq(account_id)


@asynccontextmanager
async def serving(tmp_path: Path, store: Store) -> AsyncIterator[Relay]:
    """``/v1/agent`` on ``store`` with heartbeats every BEAT; no poll (the hub is not started),
    so a link's sender runs only when this relay's appends notify it."""
    config = ServerConfig(data_dir=tmp_path, link=LinkConfig(heartbeat_interval=BEAT))
    relay_id = await store.relay_id()
    hub = AgentHub(store, relay_id=relay_id, link=config.link)
    app = web.Application()
    app[config_key] = config
    app[store_key] = store
    app[hub_key] = hub
    app[relay_id_key] = relay_id
    app.router.add_get("/v1/agent", agent_ws.handle)

    async def stop_hub(_: web.Application) -> None:
        await hub.shutdown()

    app.on_shutdown.append(stop_hub)
    account = await store.create_account(
        name="acme", ingress_key_hash=crypto.hash_secret(crypto.new_token())
    )
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield Relay(url=f"ws://127.0.0.1:{port}/v1/agent", store=store, hub=hub,
                    relay_id=relay_id, account_id=account.id)
    finally:
        await runner.cleanup()
        await hub.close()


async def rounds_done(hub: AgentHub, count: int) -> None:
    """Wait (bounded) until the hub finished ``count`` heartbeat rounds."""
    for _ in range(int(WAIT / STEP)):
        if hub.heartbeat_rounds >= count:
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"only {hub.heartbeat_rounds} of {count} heartbeat rounds")


async def connected(relay: Relay, *, resume_after: int = 0) -> Agent:
    """A new agent of ``relay``'s account, through welcome and status snapshot: its link is
    judged from the next round on."""
    record, key = await relay.add_agent()
    agent = await Agent(relay, record.id, key, resume_after=resume_after).connect()
    await agent.welcome()
    await agent.read_until(StatusReceived)
    return agent


async def frames_until_event(agent: Agent) -> list[Any]:
    """Every session event up to and including the next delivered event."""
    seen: list[Any] = []
    for _ in range(1000):
        events = await agent.read()
        seen += events
        assert not any(isinstance(e, Closed) for e in events), seen
        if any(isinstance(e, EventReceived) for e in events):
            return seen
    raise AssertionError("no event arrived")


async def test_an_agent_that_has_everything_gets_no_heartbeat(tmp_path: Path) -> None:
    """Resumed at the log's head, nothing in flight: rounds pass without a frame; the next
    event is the first thing the agent receives."""
    store = await SqliteStore.open(tmp_path / "relay.db")
    try:
        async with serving(tmp_path, store) as relay:
            seqs = await relay.append(3)
            agent = await connected(relay, resume_after=seqs[-1])
            await rounds_done(relay.hub, relay.hub.heartbeat_rounds + 4)
            (seq,) = await relay.append(1)
            seen = await frames_until_event(agent)
            assert [e for e in seen if isinstance(e, HeartbeatReceived)] == []
            assert [e.seq for e in seen if isinstance(e, EventReceived)] == [seq]
            await agent.close()
    finally:
        await store.close()


async def test_an_agent_with_unacked_events_gets_heartbeats(tmp_path: Path) -> None:
    """Events offered and not acked: each round names the last one offered."""
    store = await SqliteStore.open(tmp_path / "relay.db")
    try:
        async with serving(tmp_path, store) as relay:
            agent = await connected(relay)
            seqs = await relay.append(2)
            assert await agent.events(2) == seqs
            beats = await agent.read_until(HeartbeatReceived, 2)
            assert [b.head for b in beats] == [seqs[-1]] * 2
            await agent.close()
    finally:
        await store.close()


async def test_an_agent_whose_sender_missed_events_is_told_the_stores_head(
    tmp_path: Path, store_backend: StoreBackend
) -> None:
    """Another instance appends and this relay's link is never woken (a lost wake-up): the
    round reads the head from the store and announces it to the idle agent."""
    here, elsewhere = await store_backend.open(), await store_backend.open()
    try:
        async with serving(tmp_path, here) as relay:
            agent = await connected(relay)
            other = Relay(url="", store=elsewhere, relay_id=relay.relay_id,
                          hub=AgentHub(elsewhere, relay_id=relay.relay_id, link=LinkConfig()),
                          account_id=relay.account_id)
            (seq,) = await other.append(1)  # notifies the other instance's hub alone
            (beat,) = await agent.read_until(HeartbeatReceived)
            assert beat.head == seq
            await agent.close()
    finally:
        await elsewhere.close()
        await here.close()


async def test_one_head_read_per_account_per_round_however_many_links(tmp_path: Path) -> None:
    """Three links on one account, two on another, none on a third: each round reads the head
    of each of the two served accounts once, and never the third's."""
    store = await CountingStore.open(tmp_path / "relay.db")
    assert isinstance(store, CountingStore)
    try:
        async with serving(tmp_path, store) as relay:
            store.round = lambda: relay.hub.heartbeat_rounds
            second = await store.create_account(
                name="second", ingress_key_hash=crypto.hash_secret(crypto.new_token())
            )
            idle = await store.create_account(
                name="idle", ingress_key_hash=crypto.hash_secret(crypto.new_token())
            )
            on_second = Relay(url=relay.url, store=store, hub=relay.hub,
                              relay_id=relay.relay_id, account_id=second.id)
            on_idle = Relay(url=relay.url, store=store, hub=relay.hub,
                            relay_id=relay.relay_id, account_id=idle.id)
            agents = [await connected(relay) for _ in range(3)]
            agents += [await connected(on_second) for _ in range(2)]
            await on_idle.add_agent()  # enrolled, never connected
            first = relay.hub.heartbeat_rounds + 1  # the first round begun with every link
            await rounds_done(relay.hub, first + 3)
            for number in range(first, first + 3):
                reads = Counter(account for n, account in store.head_reads if n == number)
                assert reads == {relay.account_id: 1, second.id: 1}, f"round {number}"
            for agent in agents:
                await agent.close()
    finally:
        await store.close()
