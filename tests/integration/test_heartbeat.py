"""Heartbeats: "connected but receiving nothing" (issue 6; docs/protocol.md, Heartbeat).

A real ``AgentLink`` with a real SQLite inbox talks to the relay's real public app. The fault is
a relay whose sender for one link stops offering events while the WebSocket stays healthy
(pings answered, frames read): a stand-in for a stuck sender task or a lost wake-up. Only the
first link of the agent is affected, so a reconnect cures it, as it would in production.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink, LinkState
from relay_server.agent_ws import AgentLink as RelayLink
from shared.config import AgentConfig, LinkConfig, SubscriptionConfig
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public
from tests.helpers.timing import MS
from tests.integration.agent.test_disk_faults import FailingCommits

BEAT = 50 * MS
"""Relay heartbeat interval."""
STALL = 150 * MS
"""Agent stall timeout."""
STEP = 5 * MS
WAIT = 5000 * MS


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
    link: AgentLink
    inbox: Inbox
    records: list[logging.LogRecord]

    def named(self, event: str, logger: str = "relay_agent.link") -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == logger and r.getMessage() == event]

    def heartbeats_received(self) -> int:
        return sum(1 for r in self.records
                   if r.name == "shared.link.session" and r.getMessage().startswith("< heartbeat"))


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@asynccontextmanager
async def running_agent(
    tmp_path: Path, *, subscription: SubscriptionConfig | None = None
) -> AsyncIterator[Setup]:
    link_config = LinkConfig(heartbeat_interval=BEAT, stall_timeout=STALL)
    config = relay_config(tmp_path / "relay", link=link_config)
    records: list[logging.LogRecord] = []
    handler = _Keep(records)
    # The agent's session logs "< heartbeat head=N" at DEBUG (its module logger); the relay's
    # sessions log through their own adapters, under relay_server.agent_ws.
    watched = [logging.getLogger(name) for name in
               ("shared.link.session", "relay_agent.link", "relay_server.agent_ws")]
    levels = [logger.level for logger in watched]
    for logger in watched:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        async with serve_public(config) as relay:
            agent_id, key = await relay.add_agent()
            agent_dir = tmp_path / "agent"
            agent_dir.mkdir()
            inbox = await Inbox.open(agent_dir / "inbox.db")
            agent_config = AgentConfig(
                relay_url=relay.base, agent_id=agent_id, relay_id=relay.relay_id,
                data_dir=agent_dir, backoff_initial=20 * MS, backoff_max=100 * MS,
                link=link_config, subscription=subscription or SubscriptionConfig(),
            )
            link = AgentLink(agent_config, private_key=key, inbox=inbox)
            task = asyncio.create_task(link.run())
            try:
                await until(lambda: link.status.state is LinkState.CONNECTED, what="welcome")
                yield Setup(relay, link, inbox, records)
                assert not task.done(), task
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await inbox.close()
    finally:
        for logger, level in zip(watched, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def stall_first_link(monkeypatch: pytest.MonkeyPatch) -> list[RelayLink]:
    """The relay's first agent link never offers an event; later links work normally."""
    original = RelayLink._offer_available
    stuck: list[RelayLink] = []

    async def offer(self: RelayLink) -> None:
        if not stuck:
            stuck.append(self)
        if self is stuck[0]:
            return
        await original(self)

    monkeypatch.setattr(RelayLink, "_offer_available", offer)
    return stuck


async def test_agent_reconnects_when_heartbeats_announce_events_that_never_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link whose relay sender is stuck (socket healthy) is closed by the agent as stalled
    (4013) and the next link delivers every event, once."""
    stuck = stall_first_link(monkeypatch)
    async with running_agent(tmp_path) as s:
        ids = await s.relay.append(5)
        took = await until(lambda: s.inbox.last_seq() >= 5, what="the events after a reconnect")
        local = [e.event["id"] for e in await s.inbox.read(None, 100)]
        assert len(stuck) == 1 and stuck[0].ws.close_code == 4013
        assert len(s.named("link.stalled")) == 1
        # The relay learns why: the agent's error frame names the close code.
        told = s.named("agent.peer_error", "relay_server.agent_ws")
        assert [r.__dict__["error"] for r in told] == ["stalled"]
        assert len(s.named("agent.connected")) == 2
    print(f"\nstuck sender: events committed {took:.3f} s after the append "
          f"(heartbeat {BEAT:g} s, stall timeout {STALL:g} s); lost "
          f"{len(set(ids) - set(local))}, duplicated {len(local) - len(set(local))}")
    assert local == ids


async def test_a_caught_up_routed_agent_is_never_judged_stalled(tmp_path: Path) -> None:
    """A routed agent whose filter matches none of the account's new events has everything:
    heartbeat rounds pass (sending it nothing, or frames saying so) without a stall or a
    reconnect, while the log keeps growing."""
    routed = SubscriptionConfig(types=["call.*"])
    async with running_agent(tmp_path, subscription=routed) as s:
        hub = s.relay.services.hub
        for _ in range(8):
            rounds = hub.heartbeat_rounds
            await s.relay.append(3)  # sms.received: not for this agent
            await until(lambda: hub.heartbeat_rounds >= rounds + 2, what="two heartbeat rounds")
        assert s.named("link.stalled") == []
        assert len(s.named("agent.connected")) == 1
        assert s.inbox.last_seq() == 0


async def test_an_agent_that_cannot_commit_is_not_judged_stalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent whose own inbox holds acks back is behind by its own doing: heartbeats ahead
    of it do not make it reconnect."""
    async with running_agent(tmp_path) as s:
        failing = FailingCommits(s.inbox, monkeypatch)
        await s.relay.append(3)
        await until(lambda: failing.attempts >= 1, what="a failed commit")
        beats = s.heartbeats_received()
        await until(lambda: s.heartbeats_received() >= beats + 6, what="six heartbeats")
        assert s.named("link.stalled") == []
        await failing.heal()
        await until(lambda: s.inbox.last_seq() >= 3, what="the commit after the fault")
        assert len(s.named("agent.connected")) == 1

