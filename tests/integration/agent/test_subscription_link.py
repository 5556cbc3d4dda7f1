"""Routing (docs/protocol.md, Routing): the agent's configured subscription travels in its
hello over a real WebSocket and reaches the relay session as ``HelloReceived.subscription``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import WSMsgType, web

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink
from shared import crypto
from shared.config import AgentConfig, LinkConfig, SubscriptionConfig
from shared.link.frames import SUBPROTOCOL
from shared.link.session import HelloReceived, RelaySession
from shared.subscription import Subscription
from tests.helpers.timing import MS

RELAY_ID = "relay-routing"


@asynccontextmanager
async def hello_recorder(
    public_key: str, hellos: asyncio.Queue[HelloReceived]
) -> AsyncIterator[str]:
    """A relay endpoint made of the real RelaySession that records each hello; its URL."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,))
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        session = RelaySession(relay_id=RELAY_ID, nonce=crypto.new_nonce(), window=8,
                               auth_timeout=5000 * MS, now=loop.time())
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            session.receive_message(msg.data, loop.time())
            for event in session.events_received():
                if isinstance(event, HelloReceived):
                    hellos.put_nowait(event)
                    session.agent_found(public_key, "acct-1")
            for text in session.data_to_send():
                await ws.send_str(text)
        return ws

    app = web.Application()
    app.router.add_get("/v1/agent", handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _first_hello(tmp_path: Path, subscription: SubscriptionConfig) -> HelloReceived:
    key = crypto.generate_private_key()
    hellos: asyncio.Queue[HelloReceived] = asyncio.Queue()
    async with hello_recorder(crypto.public_key_b64(key), hellos) as url:
        config = AgentConfig(relay_url=url, agent_id="agent-r", relay_id=RELAY_ID,
                             data_dir=tmp_path, backoff_initial=10 * MS, backoff_max=100 * MS,
                             link=LinkConfig(auth_timeout=5000 * MS), subscription=subscription)
        inbox = await Inbox.open(tmp_path / "inbox.db")
        task = asyncio.create_task(AgentLink(config, private_key=key, inbox=inbox).run())
        try:
            return await asyncio.wait_for(hellos.get(), 5000 * MS)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await inbox.close()


async def test_configured_subscription_reaches_hello_received(tmp_path: Path) -> None:
    """[subscription] in the agent's config arrives parsed at the relay session."""
    subscription = SubscriptionConfig(types=["call.arriving"],
                                      params={"dialled": ["0201234567"]})
    hello = await _first_hello(tmp_path, subscription)
    assert hello.agent_id == "agent-r"
    assert hello.subscription == Subscription(("call.arriving",),
                                              (("dialled", ("0201234567",)),))


async def test_agent_without_subscription_asks_for_everything(tmp_path: Path) -> None:
    """No [subscription]: the hello carries none, so the relay sends every event."""
    hello = await _first_hello(tmp_path, SubscriptionConfig())
    assert hello.subscription is None
