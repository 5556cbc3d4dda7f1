"""Many light agents in one process, for the connection-scale bench (bench.scale).

Each agent is the real :class:`~shared.link.session.AgentSession` over a ``websockets`` client
connection configured like the real agent's (``relay_agent/link.py``: same subprotocol, same
ping interval and timeout, permessage-deflate offered as websockets does by default), without
an inbox or a local API: enough to hold an authenticated, idle link. ``--no-compression`` is an
experiment showing what a link costs without permessage-deflate. After a drop an agent
reconnects the way the real one does, through the same helpers
(``relay_agent.link.reconnect_delay`` and ``busy_retry_after``): full-jitter back-off starting
at ``AgentConfig.backoff_initial``, or, after an upgrade refused as busy, the relay's
``Retry-After`` plus jitter without growing the back-off.

The parent drives it over stdin/stdout, one JSON object per line::

    → (started)             ← {"event": "ready", "connected": N, "failed": F, "seconds": S}
    → storm                 ← {"event": "reauthed", "seconds": S, "retries": R, "busy": B,
                               "failures": {KIND: N}, "cpu": C, "left": L}
    → quit                  (exits)

``storm`` aborts every connection at once (TCP reset, as when a NAT or a network drops), then
reports how long until every agent was welcomed again (``left``: still not welcomed when the
time limit passed; ``retries``: failed attempts, ``busy`` of them refused 503 busy,
``failures``: every failed attempt by kind, e.g. ``connect: TimeoutError``: the phase it failed
in, TCP and WebSocket upgrade or the link handshake, and the exception; ``cpu``: this process's
CPU seconds meanwhile, as the agents share the relay's cores).

    python -m bench.swarm --url WS_URL --relay-id ID --keys FILE [--limit S]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from relay_agent.link import busy_retry_after, reconnect_delay
from shared.config import AgentConfig, LinkConfig
from shared.crypto import Ed25519PrivateKey
from shared.link import SUBPROTOCOL, AgentSession, Welcomed

from .common import own_cpu_seconds

__all__ = ["main"]

_LINK = LinkConfig()
_AGENT = AgentConfig()
_HANDSHAKES = 64
"""Handshakes one swarm runs at once while first connecting (the storm has no such cap)."""


class _Agent:
    def __init__(self, swarm: _Swarm, agent_id: str, key: Ed25519PrivateKey) -> None:
        self.swarm = swarm
        self.agent_id = agent_id
        self.key = key
        self.ws: ClientConnection | None = None
        self.welcomed = asyncio.Event()
        self.welcomed_at = 0.0
        self.retries = 0
        self.busy = 0
        """Of the retries, upgrades the relay refused as busy (503 with Retry-After)."""
        self.phase = "connect"
        """Where the current attempt is: ``connect`` (TCP, upgrade) or ``auth``."""

    async def run(self) -> None:
        """Connect, hold the link; after a drop, wait as the real agent does and connect again.

        As in ``AgentLink.run``: a link that was welcomed restarts the back-off at attempt 0.
        """
        attempt = 0
        first = True
        while True:
            welcomed = False
            retry_after: float | None = None
            try:
                if first:
                    async with self.swarm.gate:
                        await self._connect()
                else:
                    await self._connect()
                welcomed = True
                first = False
                await self._hold()
            except (OSError, TimeoutError, WebSocketException) as exc:
                retry_after = busy_retry_after(exc)
                if retry_after is not None:
                    self.busy += 1
                if not welcomed:
                    self.swarm.failures[_kind(self.phase, exc)] += 1
            if self.stopping():
                return
            if welcomed:
                attempt = 0
            else:
                self.retries += 1
            delay, attempt = reconnect_delay(
                attempt,
                retry_after,
                initial=_AGENT.backoff_initial,
                cap=_AGENT.backoff_max,
                rand=random.random,
            )
            await asyncio.sleep(delay)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.welcomed.clear()
        self.phase = "connect"
        ws = await connect(
            self.swarm.url,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            ping_interval=_LINK.ping_interval,
            ping_timeout=_LINK.ping_timeout,
            max_size=_LINK.max_message_size,
            open_timeout=_LINK.auth_timeout,
            compression="deflate" if self.swarm.compression else None,
        )
        self.ws = ws
        session = AgentSession(
            agent_id=self.agent_id,
            relay_id=self.swarm.relay_id,
            private_key=self.key,
            resume_after=0,
            auth_timeout=_LINK.auth_timeout,
            now=loop.time(),
            client="bench",
        )
        self.session = session
        self.phase = "auth"
        for text in session.data_to_send():
            await ws.send(text)
        async with asyncio.timeout(_LINK.auth_timeout):
            while not self.welcomed.is_set():
                await self._step(await ws.recv())

    async def _step(self, message: str | bytes) -> None:
        assert self.ws is not None
        text = message if isinstance(message, str) else message.decode()
        self.session.receive_message(text, asyncio.get_running_loop().time())
        for out in self.session.data_to_send():
            await self.ws.send(out)
        for event in self.session.events_received():
            if isinstance(event, Welcomed):
                self.welcomed_at = time.time()
                self.welcomed.set()
        close = self.session.close_requested
        if close is not None:
            await self.ws.close(close.code, close.reason)

    async def _hold(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            await self._step(message)

    def stopping(self) -> bool:
        return self.swarm.stopping

    def drop(self) -> None:
        if self.ws is not None and self.ws.transport is not None:
            self.ws.transport.abort()


class _Swarm:
    def __init__(self, url: str, relay_id: str, compression: bool) -> None:
        self.url = url
        self.relay_id = relay_id
        self.compression = compression
        self.stopping = False
        self.gate = asyncio.Semaphore(_HANDSHAKES)
        self.failures: collections.Counter[str] = collections.Counter()
        """Failed attempts by :func:`_kind`."""


def _kind(phase: str, exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"{phase}: HTTP {exc.response.status_code}"
    if isinstance(exc, ConnectionClosed):
        return f"{phase}: closed {exc.rcvd.code if exc.rcvd is not None else 'abnormally'}"
    return f"{phase}: {type(exc).__name__}"


def _say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def _all_welcomed(agents: list[_Agent], limit: float) -> int:
    """Wait (at most ``limit`` s) for every agent's welcome; returns how many are missing."""
    try:
        async with asyncio.timeout(limit):
            for agent in agents:
                await agent.welcomed.wait()
    except TimeoutError:
        pass
    return sum(1 for agent in agents if not agent.welcomed.is_set())


async def _main(url: str, relay_id: str, keys: Path, limit: float, compression: bool) -> None:
    swarm = _Swarm(url, relay_id, compression)
    agents = [
        _Agent(swarm, agent_id, Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key)))
        for agent_id, key in json.loads(keys.read_text(encoding="utf-8"))
    ]
    started = time.time()
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    left = await _all_welcomed(agents, limit)
    _say(
        event="ready",
        connected=len(agents) - left,
        failed=left,
        seconds=round(time.time() - started, 3),
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (line := (await reader.readline()).decode().strip()) not in ("quit", ""):
        if line == "storm":
            retries = sum(agent.retries for agent in agents)
            busy = sum(agent.busy for agent in agents)
            failures = collections.Counter(swarm.failures)
            cpu = own_cpu_seconds()
            dropped = time.time()
            for agent in agents:
                agent.welcomed.clear()
                agent.drop()
            left = await _all_welcomed(agents, limit)
            last = max((agent.welcomed_at for agent in agents), default=dropped)
            _say(
                event="reauthed",
                seconds=round(last - dropped, 3),
                left=left,
                retries=sum(agent.retries for agent in agents) - retries,
                busy=sum(agent.busy for agent in agents) - busy,
                failures=dict(swarm.failures - failures),
                cpu=round(own_cpu_seconds() - cpu, 3),
            )
    swarm.stopping = True
    for agent in agents:
        if agent.ws is not None:
            agent.drop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.swarm")
    parser.add_argument("--url", required=True)
    parser.add_argument("--relay-id", required=True)
    parser.add_argument("--keys", type=Path, required=True)
    parser.add_argument("--limit", type=float, default=120.0)
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="experiment: do not offer permessage-deflate (the agent does)",
    )
    args = parser.parse_args()
    asyncio.run(_main(args.url, args.relay_id, args.keys, args.limit, not args.no_compression))


if __name__ == "__main__":
    main()
