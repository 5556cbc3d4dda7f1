"""Link test helpers: a small relay (a real SQLite store, an AgentHub and the ``/v1/agent``
route, served by aiohttp on 127.0.0.1 with an ephemeral port) and a test agent (the real
``AgentSession`` driven by a ``websockets`` client)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from relay_server import agent_ws
from relay_server.appkeys import config_key, hub_key, relay_id_key, store_key
from relay_server.hub import AgentHub
from relay_server.store import open_store
from relay_server.store.base import AgentRecord, Store
from shared import crypto
from shared.config import LimitsConfig, LinkConfig, ServerConfig
from shared.events import RawRequest, XonEvent, format_time
from shared.link.frames import SUBPROTOCOL
from shared.link.session import AgentSession, Closed, EventReceived, Welcomed
from tests.helpers.timing import MS


class LinkTarget(Protocol):
    """Where a test agent connects: the WebSocket URL and the relay identity to expect."""

    @property
    def url(self) -> str: ...

    @property
    def relay_id(self) -> str: ...


@dataclass(slots=True)
class Relay:
    """A running test relay."""

    url: str
    """``ws://127.0.0.1:PORT/v1/agent``"""
    store: Store
    hub: AgentHub
    relay_id: str
    account_id: str

    async def add_agent(self, name: str = "pc") -> tuple[AgentRecord, crypto.Ed25519PrivateKey]:
        """An enrolled agent of the test account and its private key."""
        code = crypto.new_token()
        pending = await self.store.create_agent(
            account_id=self.account_id,
            name=name,
            code_hash=crypto.hash_secret(code),
            code_expires_at=time.time() + 3600,
        )
        key = crypto.generate_private_key()
        agent = await self.store.enroll_agent(
            code_hash=crypto.hash_secret(code),
            public_key=crypto.public_key_b64(key),
            now=time.time(),
        )
        assert agent.id == pending.id
        return agent, key

    async def append(self, count: int, *, account_id: str | None = None) -> list[int]:
        """Commit ``count`` events to an account's log and notify the hub; returns their seqs."""
        account = account_id or self.account_id
        seqs = []
        for _ in range(count):
            token = crypto.new_token(6)
            event = XonEvent(
                id=f"ev-{token}",
                account=account,
                type="sms.received",
                received_at=format_time(time.time()),
                params={"n": token},
                request=RawRequest(
                    method="GET", path="/sms.received", query=f"n={token}", content_type="",
                    body=b"",
                ),
            )
            result = await self.store.append_event(event, xon_id=None)
            seqs.append(result.stored.seq)
        self.hub.notify(account)
        return seqs


@asynccontextmanager
async def running_relay(
    tmp_path: Path,
    *,
    link: LinkConfig | None = None,
    close_timeout: float = 10.0,
    limits: LimitsConfig | None = None,
) -> AsyncIterator[Relay]:
    """Serve ``/v1/agent`` until the block ends; the hub shuts down first, as in the real app."""
    store = await open_store(f"sqlite:///{tmp_path / 'relay.db'}", exclusive=True)
    try:
        config = ServerConfig(
            data_dir=tmp_path, link=link or LinkConfig(), limits=limits or LimitsConfig()
        )
        relay_id = await store.relay_id()
        hub = AgentHub(store, relay_id=relay_id, link=config.link, close_timeout=close_timeout)
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
            yield Relay(
                url=f"ws://127.0.0.1:{port}/v1/agent",
                store=store,
                hub=hub,
                relay_id=relay_id,
                account_id=account.id,
            )
        finally:
            await runner.cleanup()
    finally:
        await store.close()


WAIT = 5000 * MS
"""Bound on any single wait for the relay; generous, never reached when things work."""


class Agent:
    """A test agent: one websockets connection driving a real AgentSession."""

    def __init__(
        self,
        relay: LinkTarget,
        agent_id: str,
        key: crypto.Ed25519PrivateKey,
        *,
        resume_after: int = 0,
    ) -> None:
        self.relay = relay
        self.agent_id = agent_id
        self.key = key
        self.resume_after = resume_after
        self.sent: list[str] = []
        """Every frame this agent wrote, for replay tests."""
        self.close_code: int | None = None
        self.unacked: list[int] = []

    async def connect(self) -> Agent:
        self.ws = await connect(
            self.relay.url, subprotocols=[Subprotocol(SUBPROTOCOL)], open_timeout=WAIT
        )
        self.session = AgentSession(
            agent_id=self.agent_id,
            relay_id=self.relay.relay_id,
            private_key=self.key,
            resume_after=self.resume_after,
            auth_timeout=WAIT,
            now=asyncio.get_running_loop().time(),
            client="tests",
        )
        await self._flush()
        return self

    async def _flush(self) -> None:
        for text in self.session.data_to_send():
            self.sent.append(text)
            try:
                await self.ws.send(text)
            except ConnectionClosed:
                return  # the relay closed first; the next read() reports how

    async def read(self) -> list[Any]:
        """Feed one inbound message (or the close) to the session; return its events."""
        now = asyncio.get_running_loop().time
        try:
            async with asyncio.timeout(WAIT):
                text = await self.ws.recv()
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd else None
            self.session.receive_closed(self.close_code, exc.rcvd.reason if exc.rcvd else "", now())
        else:
            assert isinstance(text, str)
            self.session.receive_message(text, now())
        await self._flush()
        events = self.session.events_received()
        for event in events:
            if isinstance(event, EventReceived):
                self.unacked.append(event.seq)
        return events

    async def read_until(self, kind: type, count: int = 1) -> list[Any]:
        """Read until ``count`` events of ``kind`` arrived; fail on an unexpected close."""
        found: list[Any] = []
        for _ in range(10_000):
            for event in await self.read():
                if isinstance(event, kind):
                    found.append(event)
                elif isinstance(event, Closed):
                    raise AssertionError(f"link closed while waiting for {kind.__name__}: {event}")
            if len(found) >= count:
                return found
        raise AssertionError("read_until never finished")

    async def welcome(self) -> Welcomed:
        (welcomed,) = await self.read_until(Welcomed)
        return welcomed  # type: ignore[no-any-return]

    async def events(self, count: int) -> list[int]:
        """The seqs of the next ``count`` events."""
        return [e.seq for e in await self.read_until(EventReceived, count)]

    async def ack(self, seq: int) -> None:
        self.session.ack(seq)
        self.unacked = [s for s in self.unacked if s > seq]
        await self._flush()

    async def closed(self) -> Closed:
        """Read until the link is closed; return the session's Closed event."""
        for _ in range(10_000):
            for event in await self.read():
                if isinstance(event, Closed):
                    return event
        raise AssertionError("the link never closed")

    async def close(self) -> None:
        await self.ws.close()


async def raw_connect(relay: LinkTarget) -> ClientConnection:
    return await connect(relay.url, subprotocols=[Subprotocol(SUBPROTOCOL)], open_timeout=WAIT)


async def raw_close_code(ws: ClientConnection) -> int | None:
    """Read until the relay closes ``ws``; return its close code."""
    async with asyncio.timeout(WAIT):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` every 10 ms for at most WAIT."""
    for _ in range(int(WAIT / (10 * MS))):
        if await check():
            return
        await asyncio.sleep(10 * MS)
    raise AssertionError("condition never became true")
