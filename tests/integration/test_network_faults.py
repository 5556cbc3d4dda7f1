"""Network faults between the real agent and the real relay (issue 6, network scenarios).

The agent (``relay_agent.link.AgentLink`` with a real SQLite inbox) reaches the relay's public
app (``tests.helpers.public_relay``, production runner options) through a
:class:`~tests.helpers.faultproxy.FaultProxy`. Liveness is scaled down through the config
(``LinkConfig.ping_interval``/``ping_timeout``, ``AgentConfig.backoff_*``), so the scenarios
take a fraction of a second each. Every run ends with the queue checker of issue 6: lost,
duplicated, unexpected and redelivered counts over event ids, printed for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay_agent.inbox import CommitResult, Inbox
from relay_agent.link import AgentLink, LinkState
from shared.config import AgentConfig, LimitsConfig, LinkConfig
from tests.helpers.faultproxy import FaultProxy
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public
from tests.helpers.timing import MS

PING = 100 * MS
"""Ping interval and pong timeout on both ends: a dead link is due within 2 × PING."""
BACKOFF_INITIAL = 20 * MS
BACKOFF_MAX = 200 * MS
WAIT = 5000 * MS
STEP = 5 * MS


class CountingInbox(Inbox):
    """An inbox that records every seq it committed, redeliveries included."""

    delivered: list[int]

    async def commit(self, items: Sequence[tuple[int, dict[str, Any]]]) -> CommitResult:
        result = await super().commit(items)
        # Only now: recorded before the commit, a seq counted as delivered could still be
        # missing from the inbox that check_queue reads (a flake under load).
        self.delivered.extend(seq for seq, _ in items)
        return result


@dataclass(slots=True)
class Tally:
    """The queue checker's counts for one run (issue 6, invariants)."""

    sent: int
    lost: int
    duplicated: int
    unexpected: int
    redelivered: int
    in_order: bool

    def __str__(self) -> str:
        return (f"sent={self.sent} lost={self.lost} duplicated={self.duplicated} "
                f"unexpected={self.unexpected} redelivered={self.redelivered} "
                f"in_order={self.in_order}")


async def check_queue(relay: PublicRelay, inbox: CountingInbox) -> Tally:
    """Relay log vs the agent's inbox: every committed id once, cursors strictly increasing."""
    committed = await relay.event_ids()
    local = await inbox.read(None, 1_000_000)
    ids = [e.event["id"] for e in local]
    cursors = [e.cursor for e in local]
    return Tally(
        sent=len(committed),
        lost=len(set(committed) - set(ids)),
        duplicated=len(ids) - len(set(ids)),
        unexpected=len(set(ids) - set(committed)),
        redelivered=len(inbox.delivered) - len(set(inbox.delivered)),
        in_order=all(a < b for a, b in zip(cursors, cursors[1:], strict=False)),
    )


async def until(check: Callable[[], bool], *, what: str, limit: float = WAIT) -> float:
    """Poll every STEP until ``check()`` holds; the seconds it took. Fails after ``limit``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(int(limit / STEP)):
        if check():
            return loop.time() - started
        await asyncio.sleep(STEP)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass(slots=True)
class Setup:
    relay: PublicRelay
    proxy: FaultProxy
    link: AgentLink
    inbox: CountingInbox
    agent_id: str

    def connected(self) -> bool:
        return self.link.status.state is LinkState.CONNECTED

    def relay_sees_agent(self) -> bool:
        return self.agent_id in self.relay.services.hub.online()

    async def deliver(self, count: int) -> None:
        """Append ``count`` events and wait until the agent committed all of them."""
        await self.relay.append(count)
        total = len(await self.relay.event_ids())

        def done() -> bool:
            return len({*self.inbox.delivered}) >= total

        await until(done, what=f"{total} events in the inbox")


@asynccontextmanager
async def agent_via_proxy(tmp_path: Path, *, ping: float = PING) -> AsyncIterator[Setup]:
    link_config = LinkConfig(ping_interval=ping, ping_timeout=ping, auth_timeout=1000 * MS)
    config = relay_config(
        tmp_path / "relay", link=link_config, limits=LimitsConfig(source_rate=None)
    )
    async with serve_public(config) as relay, FaultProxy("127.0.0.1", relay.port) as proxy:
        agent_id, key = await relay.add_agent()
        agent_dir = tmp_path / "agent"
        agent_dir.mkdir()
        inbox = await CountingInbox.open(agent_dir / "inbox.db")
        assert isinstance(inbox, CountingInbox)
        inbox.delivered = []
        agent_config = AgentConfig(
            relay_url=f"http://127.0.0.1:{proxy.port}", agent_id=agent_id,
            relay_id=relay.relay_id, data_dir=agent_dir,
            backoff_initial=BACKOFF_INITIAL, backoff_max=BACKOFF_MAX, link=link_config,
        )
        link = AgentLink(agent_config, private_key=key, inbox=inbox)
        task = asyncio.create_task(link.run())
        setup = Setup(relay, proxy, link, inbox, agent_id)
        try:
            await until(setup.connected, what="the first welcome")
            yield setup
            assert not task.done(), task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await inbox.close()


async def test_blackholed_link_is_dropped_by_the_relay_and_resumes_without_loss(
    tmp_path: Path,
) -> None:
    """A link that goes silent (no FIN, no RST) is dropped by the relay's heartbeat; once the
    route is back the agent reconnects, resumes from its inbox and nothing is lost."""
    async with agent_via_proxy(tmp_path) as s:
        await s.deliver(5)
        s.proxy.blackhole()
        # Committed at the relay while the route is dead: they must arrive after it returns.
        await s.relay.append(5)
        relay_took = await until(lambda: not s.relay_sees_agent(), what="the relay to drop it")
        s.proxy.pass_through()
        await until(s.relay_sees_agent, what="the agent to reconnect")
        await s.deliver(5)
        tally = await check_queue(s.relay, s.inbox)
    keepalive = 2 * PING  # the relay pings after ping_interval + ping_timeout of silence
    print(f"\nblack hole: relay detected in {relay_took:.3f} s "
          f"(keepalive {keepalive:g} s, pong wait {keepalive / 2:g} s); {tally}")
    assert (tally.sent, tally.lost, tally.duplicated, tally.unexpected) == (15, 0, 0, 0)
    assert tally.in_order


async def test_blackholed_link_is_detected_by_the_agent_within_the_liveness_bound(
    tmp_path: Path,
) -> None:
    """The agent's own pings notice a silent link within a few ping periods, without any
    help from the relay (its FIN is held by the black hole too)."""
    async with agent_via_proxy(tmp_path) as s:
        await s.deliver(1)
        s.proxy.blackhole()
        bound = 10 * (PING + PING)
        try:
            agent_took = await until(lambda: not s.connected(), what="the agent to drop it",
                                     limit=bound)
        finally:
            s.proxy.pass_through()
        print(f"\nblack hole: agent detected in {agent_took:.3f} s (bound {bound:g} s)")


async def test_five_resets_in_a_row_reconnect_each_time_with_jittered_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Five RSTs in a row: the agent reconnects after each one, its back-off delays are
    jittered and within the cap, and events committed in between all arrive once."""
    caplog.set_level(logging.INFO, logger="relay_agent.link")
    async with agent_via_proxy(tmp_path) as s:
        for _ in range(5):
            await s.deliver(2)
            accepted = s.proxy.accepted
            assert s.proxy.reset() == 1
            await until(lambda: s.proxy.accepted > accepted, what="a new connection")
            await until(s.connected, what="the agent to reconnect")
        await s.deliver(2)
        tally = await check_queue(s.relay, s.inbox)
    delays = [
        float(r.__dict__["delay"]) for r in caplog.records if r.getMessage() == "link.reconnecting"
    ]
    print(f"\n5 resets: reconnect delays {[round(d, 4) for d in delays]}; {tally}")
    assert len(delays) >= 5
    assert all(0.0 <= d <= BACKOFF_MAX for d in delays)
    assert len(set(delays)) > 1, "back-off delays are not jittered"
    assert (tally.sent, tally.lost, tally.duplicated, tally.unexpected) == (12, 0, 0, 0)
    assert tally.in_order


async def test_delayed_and_throttled_link_still_delivers_everything(tmp_path: Path) -> None:
    """Latency well below the pong timeout and a narrow pipe slow the link without breaking
    it (the relay waits ping_interval / 2 for a pong: 0.5 s here, while 50 queued events at
    10 ms per chunk can hold a pong back longer than the 0.05 s of the other tests)."""
    async with agent_via_proxy(tmp_path, ping=1000 * MS) as s:
        s.proxy.delay = 10 * MS
        s.proxy.throttle = 64 * 1024
        accepted = s.proxy.accepted
        await s.deliver(50)
        tally = await check_queue(s.relay, s.inbox)
        assert s.proxy.accepted == accepted, "the link was dropped"
    print(f"\ndelay 10 ms + 64 KiB/s: {tally}")
    assert (tally.sent, tally.lost, tally.duplicated, tally.unexpected) == (50, 0, 0, 0)
