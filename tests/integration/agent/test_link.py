"""The agent's link against the real relay app on 127.0.0.1 (DESIGN §Link protocol)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay_agent.inbox import CommitResult, Inbox
from relay_agent.link import AgentLink, LinkState, backoff_delay, websocket_url
from shared import crypto
from shared.config import AgentConfig, LinkConfig
from shared.errors import Revoked, Unauthorized
from shared.link import CloseCode
from tests.helpers.timing import MS

from .support import RelayUnderTest, eventually, serve_relay


class RecordingInbox(Inbox):
    """An inbox that records every delivered seq and can hold commits at a gate."""

    seqs: list[int]
    gate: asyncio.Event | None = None
    entered: asyncio.Event

    async def commit(self, items: Sequence[tuple[int, dict[str, Any]]]) -> CommitResult:
        self.seqs.extend(seq for seq, _ in items)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return await super().commit(items)


async def open_inbox(path: Path) -> RecordingInbox:
    box = await RecordingInbox.open(path)
    assert isinstance(box, RecordingInbox)
    box.seqs = []
    box.entered = asyncio.Event()
    return box


def agent_config(tmp_path: Path, relay_url: str, agent_id: str, relay_id: str) -> AgentConfig:
    return AgentConfig(
        relay_url=relay_url, agent_id=agent_id, relay_id=relay_id, data_dir=tmp_path,
        backoff_initial=10 * MS, backoff_max=100 * MS,
        link=LinkConfig(auth_timeout=5000 * MS),
    )


@asynccontextmanager
async def running_link(
    config: AgentConfig, key: crypto.Ed25519PrivateKey, inbox: Inbox
) -> AsyncIterator[tuple[AgentLink, asyncio.Task[Any]]]:
    link = AgentLink(config, private_key=key, inbox=inbox)
    task = asyncio.create_task(link.run())
    try:
        yield link, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_backoff_is_exponential_with_full_jitter_and_a_cap() -> None:
    """Delay = random share of min(cap, initial·2^attempt); never above the cap."""
    top = [backoff_delay(n, initial=1.0, cap=30.0, rand=lambda: 1.0) for n in range(8)]
    assert top == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_delay(3, initial=1.0, cap=30.0, rand=lambda: 0.25) == 2.0
    assert backoff_delay(10_000, initial=1.0, cap=30.0, rand=lambda: 0.5) == 15.0


def test_websocket_url_follows_the_relay_scheme() -> None:
    """http → ws, https → wss, path /v1/agent under any base path."""
    assert websocket_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/v1/agent"
    assert websocket_url("https://relay.example/base/") == "wss://relay.example/base/v1/agent"


async def test_events_are_committed_then_acked(tmp_path: Path, relay: RelayUnderTest) -> None:
    """Delivered events land in the inbox; the relay's cursor moves only after the commit."""
    agent_id, key = await relay.add_agent()
    inbox = await open_inbox(tmp_path / "inbox.db")
    inbox.gate = asyncio.Event()
    config = agent_config(tmp_path, relay.url, agent_id, relay.services.relay_id)
    try:
        async with running_link(config, key, inbox) as (link, _):
            await eventually(lambda: link.status.state is LinkState.CONNECTED, what="welcome")
            seqs = await relay.append(5)
            await asyncio.wait_for(inbox.entered.wait(), 5000 * MS)
            # DESIGN principle 1: nothing is acked while the commit is still pending.
            assert await relay.cursor(agent_id) == 0
            inbox.gate.set()

            async def acked() -> bool:
                return await relay.cursor(agent_id) == seqs[-1]

            await eventually(acked, what="the ack of the last event")
            assert inbox.last_seq() == seqs[-1]
            assert [e.event["id"] for e in await inbox.read(None, 10)] == [
                e.event.id for e in await relay.services.store.read_events(
                    relay.account_id, after=0, limit=10)
            ]
            assert link.status.last_event_at is not None
            assert link.status.connected_since is not None
    finally:
        await inbox.close()


async def test_link_resumes_from_the_inbox_after_a_relay_restart(tmp_path: Path) -> None:
    """After the relay restarts, the agent reconnects with back-off and resumes after its
    last committed seq: every event arrives, none twice."""
    relay_dir = tmp_path / "relay"
    inbox = await open_inbox(tmp_path / "inbox.db")
    task: asyncio.Task[Any] | None = None
    try:
        async with serve_relay(relay_dir) as relay:
            port = relay.port
            agent_id, key = await relay.add_agent()
            config = agent_config(tmp_path, relay.url, agent_id, relay.services.relay_id)
            first = await relay.append(3)
            link = AgentLink(config, private_key=key, inbox=inbox)
            task = asyncio.create_task(link.run())
            await eventually(lambda: inbox.last_seq() == first[-1], what="first events")
        # The relay is gone (goaway, close, listener down): reconnects fail for now.
        await eventually(lambda: "Refused" in (link.status.last_error or ""),
                         what="a refused reconnect")
        assert link.status.state is not LinkState.CONNECTED
        async with serve_relay(relay_dir, port=port) as relay:
            second = await relay.append(3)
            await eventually(lambda: inbox.last_seq() == second[-1], what="events after restart")
            assert not task.done()
        assert inbox.seqs == first + second
        assert len(await inbox.read(None, 100)) == 6
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await inbox.close()


async def test_first_connect_failure_retries_until_the_relay_appears(tmp_path: Path) -> None:
    """With no relay listening the link keeps retrying; it connects once the relay is up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay_dir = tmp_path / "relay"
    async with serve_relay(relay_dir) as relay:
        agent_id, key = await relay.add_agent()
        relay_id = relay.services.relay_id
    config = agent_config(tmp_path, f"http://127.0.0.1:{port}", agent_id, relay_id)
    inbox = await open_inbox(tmp_path / "inbox.db")
    try:
        async with running_link(config, key, inbox) as (link, task):
            await eventually(lambda: link.status.last_error is not None, what="connect failure")
            assert "Error" in (link.status.last_error or "")
            async with serve_relay(relay_dir, port=port) as relay:
                await eventually(lambda: link.status.state is LinkState.CONNECTED, what="connect")
                assert link.status.last_error is None
    finally:
        await inbox.close()


async def test_revoked_agent_stops_with_revoked(tmp_path: Path, relay: RelayUnderTest) -> None:
    """Close 4403 is fatal: run() raises Revoked instead of reconnecting."""
    agent_id, key = await relay.add_agent()
    inbox = await open_inbox(tmp_path / "inbox.db")
    config = agent_config(tmp_path, relay.url, agent_id, relay.services.relay_id)
    try:
        async with running_link(config, key, inbox) as (link, task):
            await eventually(lambda: link.status.state is LinkState.CONNECTED, what="connect")
            await relay.services.store.revoke_agent(agent_id, now=0.0)
            await relay.services.hub.disconnect(agent_id, CloseCode.REVOKED, "agent revoked")
            with pytest.raises(Revoked):
                await asyncio.wait_for(task, 5000 * MS)
    finally:
        await inbox.close()


async def test_revoked_agent_cannot_reconnect(tmp_path: Path, relay: RelayUnderTest) -> None:
    """A revoked agent that connects again is refused at once and stops."""
    agent_id, key = await relay.add_agent()
    await relay.services.store.revoke_agent(agent_id, now=0.0)
    inbox = await open_inbox(tmp_path / "inbox.db")
    config = agent_config(tmp_path, relay.url, agent_id, relay.services.relay_id)
    try:
        async with running_link(config, key, inbox) as (_, task):
            with pytest.raises((Revoked, Unauthorized)):
                await asyncio.wait_for(task, 5000 * MS)
    finally:
        await inbox.close()


async def test_unknown_agent_stops_with_unauthorized(tmp_path: Path, relay: RelayUnderTest) -> None:
    """Close 4401 for an agent the relay does not know is fatal too."""
    inbox = await open_inbox(tmp_path / "inbox.db")
    config = agent_config(tmp_path, relay.url, "agent-unknown", relay.services.relay_id)
    try:
        async with running_link(config, crypto.generate_private_key(), inbox) as (_, task):
            with pytest.raises(Unauthorized):
                await asyncio.wait_for(task, 5000 * MS)
    finally:
        await inbox.close()


async def test_foreign_relay_identity_is_refused(tmp_path: Path, relay: RelayUnderTest) -> None:
    """The agent refuses a relay whose id differs from the one recorded at enrollment."""
    agent_id, key = await relay.add_agent()
    inbox = await open_inbox(tmp_path / "inbox.db")
    config = agent_config(tmp_path, relay.url, agent_id, "some-other-relay")
    try:
        async with running_link(config, key, inbox) as (_, task):
            with pytest.raises(Unauthorized):
                await asyncio.wait_for(task, 5000 * MS)
        assert inbox.seqs == []
    finally:
        await inbox.close()


@pytest.mark.parametrize("status", [401, 403])
async def test_http_refusal_on_upgrade_is_fatal(tmp_path: Path, status: int) -> None:
    """HTTP 401/403 on the WebSocket upgrade stops the link with Unauthorized."""
    async def refuse(_: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "unauthorized", "message": "no"}},
                                 status=status)

    app = web.Application()
    app.router.add_get("/v1/agent", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    inbox = await open_inbox(tmp_path / "inbox.db")
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with running_link(agent_config(tmp_path, url, "a", "r"),
                                crypto.generate_private_key(), inbox) as (_, task):
            with pytest.raises(Unauthorized, match=str(status)):
                await asyncio.wait_for(task, 5000 * MS)
    finally:
        await inbox.close()
        await runner.cleanup()


async def test_server_errors_on_upgrade_are_retried(tmp_path: Path) -> None:
    """A 503 on the upgrade is transient: the link records it and keeps trying."""
    calls = 0

    async def busy(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/v1/agent", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    inbox = await open_inbox(tmp_path / "inbox.db")
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with running_link(agent_config(tmp_path, url, "a", "r"),
                                crypto.generate_private_key(), inbox) as (link, task):
            await eventually(lambda: calls >= 3, what="three attempts")
            assert "503" in (link.status.last_error or "")
            assert not task.done()
    finally:
        await inbox.close()
        await runner.cleanup()
