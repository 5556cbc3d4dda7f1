"""Disk faults at the agent (issue 6): the inbox cannot commit (disk full, database read-only).

DESIGN principle 1: the agent acks only after its inbox committed. So while the inbox fails
the agent acks nothing, the relay keeps every event (its window bounds what is in flight), the
link stays up, ``/v1/health`` says what is wrong, and once the fault clears the agent commits
what it holds and acks it: nothing is lost or duplicated.

Two real faults: ``PRAGMA query_only`` on the agent's own SQLite connection (the database
refuses writes like a read-only file would, and unlike ``chmod`` this holds for root too), and
"database or disk is full" raised by the commit (a full disk cannot be made without a size-
limited filesystem, so that one is injected).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink, LinkState
from relay_agent.local_api import create_local_app
from shared.config import AgentConfig, LinkConfig
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public
from tests.helpers.timing import MS

from .support import TOKEN, eventually

WINDOW = 8
BEAT = 30 * MS
"""Relay heartbeat interval; the agent's stall timeout is 3 beats (it must not fire)."""


class FailingCommits:
    """Every inbox commit raises "database or disk is full" until :meth:`heal`."""

    def __init__(self, inbox: Inbox, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts = 0
        self.failing = True
        original = inbox._commit_sync

        def commit(items: list[tuple[int, dict[str, Any]]]) -> Any:
            if self.failing:
                self.attempts += 1
                raise sqlite3.OperationalError("database or disk is full")
            return original(items)

        monkeypatch.setattr(inbox, "_commit_sync", commit)

    async def heal(self) -> None:
        self.failing = False


class ReadOnlyInbox:
    """The agent's own connection refuses writes (``PRAGMA query_only``) until :meth:`heal`."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    async def start(self) -> None:
        # The worker thread owns the connection: run the pragma there.
        await self.inbox._run(self.inbox._conn().execute, "PRAGMA query_only = ON")

    async def heal(self) -> None:
        await self.inbox._run(self.inbox._conn().execute, "PRAGMA query_only = OFF")


@dataclass(slots=True)
class Agent:
    relay: PublicRelay
    agent_id: str
    link: AgentLink
    inbox: Inbox
    url: str
    http: aiohttp.ClientSession

    async def health(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.http.get(self.url + "/v1/health", headers=headers) as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body

    async def cursor(self) -> int:
        return await self.relay.services.store.get_cursor(self.agent_id)

    def deliveries(self) -> float:
        """Events the relay has sent to agents (resends count)."""
        value = self.relay.services.hub.metrics.registry.get_sample_value(
            "xon_relay_deliveries_total"
        )
        return value or 0.0


@asynccontextmanager
async def running_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    link_config = LinkConfig(window=WINDOW, heartbeat_interval=BEAT, stall_timeout=3 * BEAT)
    async with serve_public(relay_config(tmp_path / "relay", link=link_config)) as relay:
        agent_id, key = await relay.add_agent()
        data_dir = tmp_path / "agent"
        data_dir.mkdir()
        config = AgentConfig(
            relay_url=relay.base, agent_id=agent_id, relay_id=relay.relay_id, data_dir=data_dir,
            backoff_initial=10 * MS, backoff_max=40 * MS, link=link_config,
        )
        inbox = await Inbox.open(data_dir / "inbox.db")
        link = AgentLink(config, private_key=key, inbox=inbox)
        app = create_local_app(config=config, inbox=inbox, link_status=link.status, token=TOKEN)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        task = asyncio.create_task(link.run())
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with aiohttp.ClientSession() as http:
                await eventually(lambda: link.status.state is LinkState.CONNECTED, what="welcome")
                yield Agent(relay, agent_id, link, inbox, url, http)
            assert not task.done(), task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()
            await inbox.close()


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
async def test_inbox_write_fault_stops_acks_keeps_the_link_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """While the inbox cannot commit: no ack, health reports it, the same link stays up and
    the relay holds at most a window in flight; once it can, every event arrives once."""
    caplog.set_level(logging.INFO, logger="relay_agent.link")
    # The agent's session logs each heartbeat it receives ("< heartbeat head=N") at DEBUG.
    caplog.set_level(logging.DEBUG, logger="shared.link.session")
    async with running_agent(tmp_path) as agent:
        before = await agent.relay.append(3, tag="before-")
        await eventually(lambda: agent.inbox.last_seq() >= 3, what="3 events committed")
        await eventually(lambda: agent.link.status.last_error is None, what="a clean status")
        acked = agent.inbox.last_seq()
        await eventually(_cursor_at(agent, acked), what="the relay to store the ack")
        connected_since = agent.link.status.connected_since
        sent_before = agent.deliveries()

        healer: FailingCommits | ReadOnlyInbox
        if fault == "disk_full":
            healer = FailingCommits(agent.inbox, monkeypatch)
        else:
            healer = ReadOnlyInbox(agent.inbox)
            await healer.start()
        during = await agent.relay.append(3 * WINDOW, tag="during-")
        await eventually(lambda: agent.link.status.inbox_error is not None, what="the fault")
        health = await agent.health()
        assert health["link"] == "connected"
        assert "not acking" in health["last_error"]
        # Stay in the fault for several retries and heartbeats: the link must survive them.
        if isinstance(healer, FailingCommits):
            await eventually(lambda: healer.attempts >= 4, what="four commit attempts")
        await agent_keeps_link(agent, caplog, beats=6)
        assert await agent.cursor() == acked, "the agent acked while its inbox was failing"
        in_flight = int(agent.deliveries() - sent_before)
        assert in_flight <= WINDOW, f"{in_flight} events in flight, window {WINDOW}"
        assert agent.link.status.connected_since == connected_since

        await healer.heal()
        total = len(before) + len(during)
        await eventually(lambda: agent.link.status.inbox_error is None, what="recovery")
        await eventually(lambda: agent.inbox.last_seq() >= total, what="every event")
        await eventually(lambda: agent.link.status.last_error is None, what="a clean status")
        ids = [e.event["id"] for e in await agent.inbox.read(None, 1000)]
        assert ids == before + during
        assert agent.link.status.connected_since == connected_since
        await eventually(_cursor_at(agent, agent.inbox.last_seq()), what="the final ack")
    assert [r for r in caplog.records if r.getMessage() == "link.stalled"] == []
    assert len([r for r in caplog.records if r.getMessage() == "inbox.write_failed"]) == 1
    print(f"\n{fault}: committed {total}, lost {total - len(set(ids))}, "
          f"duplicated {len(ids) - len(set(ids))}, in flight at most {in_flight}/{WINDOW}, "
          "link kept")


def _cursor_at(agent: Agent, seq: int) -> Any:
    async def check() -> bool:
        return await agent.cursor() == seq

    return check


async def agent_keeps_link(agent: Agent, caplog: pytest.LogCaptureFixture, *, beats: int) -> None:
    """Wait for ``beats`` more heartbeats at the agent, checking that the link stays the same."""
    hub = agent.relay.services.hub
    start = hub.online().get(agent.agent_id)
    assert start is not None

    def heartbeats() -> int:
        return sum(1 for r in caplog.records if r.getMessage().startswith("< heartbeat"))

    wanted = heartbeats() + beats

    def done() -> bool:
        assert agent.link.status.state is LinkState.CONNECTED
        assert hub.online().get(agent.agent_id) == start, "the link was replaced"
        return heartbeats() >= wanted

    await eventually(done, what=f"{beats} heartbeats")
