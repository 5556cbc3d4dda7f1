"""Slow consumer (issue 6): an agent that stops reading its socket.

A raw WebSocket client authenticates like an agent (the sans-I/O ``AgentSession`` does the
handshake), then stops reading at the transport (``pause_reading``), so neither events nor the
relay's pings are read any more. The relay must hold no more than its window of events for it,
cut it once its pings go unanswered (liveness scaled down), and keep delivering to another
agent of the same account meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink, LinkState
from shared import crypto
from shared.config import AgentConfig, LinkConfig
from shared.link import OPEN, SUBPROTOCOL, AgentSession
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public
from tests.helpers.timing import MS

WINDOW = 16
PING = 200 * MS
EVENTS = 300
STEP = 5 * MS
WAIT = 5000 * MS


async def until(check: Callable[[], bool], *, what: str) -> float:
    """Poll every STEP until ``check()`` holds; the loop time when it did (bounded)."""
    loop = asyncio.get_running_loop()
    for _ in range(int(WAIT / STEP)):
        if check():
            return loop.time()
        await asyncio.sleep(STEP)
    raise AssertionError(f"timed out waiting for {what}")


async def authenticate(
    relay: PublicRelay, agent_id: str, key: crypto.Ed25519PrivateKey
) -> ClientConnection:
    """Open a link and finish the handshake, reading only what the handshake needs."""
    ws = await connect(relay.ws_url, subprotocols=[Subprotocol(SUBPROTOCOL)],
                       ping_interval=None, compression=None)
    loop = asyncio.get_running_loop()
    session = AgentSession(agent_id=agent_id, relay_id=relay.relay_id, private_key=key,
                           resume_after=0, auth_timeout=WAIT, now=loop.time())
    for _ in range(10):
        for text in session.data_to_send():
            await ws.send(text)
        if session.state is OPEN:
            return ws
        message = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(message, str)
        session.receive_message(message, loop.time())
    raise AssertionError(f"handshake did not finish: {session.close_requested}")


def deliveries(relay: PublicRelay) -> int:
    value = relay.services.hub.metrics.registry.get_sample_value("xon_relay_deliveries_total")
    return int(value or 0)


async def test_agent_that_stops_reading_is_bounded_by_the_window_and_cut(tmp_path: Path) -> None:
    """The stuck agent gets at most a window of events, is dropped after its pings go
    unanswered, and the other agent of the account receives every event meanwhile."""
    link_config = LinkConfig(window=WINDOW, ping_interval=PING, ping_timeout=PING)
    async with serve_public(relay_config(tmp_path / "relay", link=link_config)) as relay:
        hub = relay.services.hub
        loop = asyncio.get_running_loop()
        good_id, good_key = await relay.add_agent()
        agent_dir = tmp_path / "good"
        agent_dir.mkdir()
        inbox = await Inbox.open(agent_dir / "inbox.db")
        config = AgentConfig(relay_url=relay.base, agent_id=good_id, relay_id=relay.relay_id,
                             data_dir=agent_dir, backoff_initial=20 * MS, backoff_max=100 * MS,
                             link=link_config)
        good = AgentLink(config, private_key=good_key, inbox=inbox)
        task = asyncio.create_task(good.run())
        stuck_id, stuck_key = await relay.add_agent()
        ws: ClientConnection | None = None
        try:
            await until(lambda: good.status.state is LinkState.CONNECTED, what="the good agent")
            # The log holds the burst before the stuck agent connects, so its link is offered
            # a full window at once, however long the appends took.
            sent_before = deliveries(relay)
            appended = loop.time()
            ids = await relay.append(EVENTS)
            ws = await authenticate(relay, stuck_id, stuck_key)
            ws.transport.pause_reading()  # from here on, nothing is read from the socket
            paused = loop.time()
            done = await until(lambda: inbox.last_seq() >= len(ids), what="every event")
            stuck_online_at_done = stuck_id in hub.online()
            cut = await until(lambda: stuck_id not in hub.online(), what="the stuck agent cut")
            local = [e.event["id"] for e in await inbox.read(None, 10 * EVENTS)]
            to_stuck = deliveries(relay) - sent_before - len(local)
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await inbox.close()
            if ws is not None:
                ws.transport.abort()
    print(f"\nslow consumer: window {WINDOW}, sent to the stuck agent {to_stuck} of {EVENTS}, "
          f"cut {cut - paused:.3f} s after it stopped reading (keepalive {2 * PING:g} s, pong "
          f"wait {PING:g} s); the other agent got {len(local)}/{EVENTS} "
          f"{done - appended:.3f} s after the burst began, stuck link "
          f"{'still open' if stuck_online_at_done else 'already cut'} by then")
    assert local == ids
    assert 0 < to_stuck <= WINDOW
