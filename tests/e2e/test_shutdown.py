"""Graceful shutdown of the relay (issue 6): SIGTERM on a real ``xon-relay-server run``.

The relay fails readiness first, lets the ingress requests in flight finish (and commits their
events), tells agents to go away, and exits 0, at once when nothing is in flight. Nothing that
got a 2xx is lost: every such event reaches the agent after the relay is started again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from shared.sim import SendResult, plan, send_requests

from .conftest import (
    DELIVERY_LIMIT,
    EXIT_LIMIT,
    Account,
    Agent,
    MakeAgent,
    Procs,
    Relay,
    event_key,
    planned_key,
    wait_exit,
    wait_until,
)

pytestmark = pytest.mark.slow

BURST = 300
SIGTERM_AFTER = 50
SLOW_BODY = b"from=07700900001&to=02071234567&text=sent-across-the-shutdown"


async def readyz(url: str) -> int | None:
    """/readyz status on a fresh connection; None when the relay does not answer."""
    with contextlib.suppress(aiohttp.ClientError):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as h:
            async with h.get(url + "/readyz") as response:
                return response.status
    return None


async def start_slow_ingress(ingress_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An ingress POST whose head and first body byte are sent; the rest waits."""
    parts = urlsplit(ingress_url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = (
        f"POST {parts.path}/sms.received HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(SLOW_BODY)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + SLOW_BODY[:1])
    await writer.drain()
    return reader, writer


async def finish_slow_ingress(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    writer.write(SLOW_BODY[1:])
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), EXIT_LIMIT)
    writer.close()
    return int(status_line.split()[1])


async def burst_then_sigterm(account: Account, relay: Relay) -> tuple[asyncio.Task[Any], float]:
    """Start BURST ingress requests (8 in flight); SIGTERM the relay once SIGTERM_AFTER got a
    2xx. Returns the sender task (still running) and the loop time of the signal."""
    planned = plan(["sms.received", "call.ended"], ["json", "form", "xml"], BURST)
    ok = 0
    reached = asyncio.Event()

    def on_result(result: SendResult) -> None:
        nonlocal ok
        ok += result.ok
        if ok >= SIGTERM_AFTER:
            reached.set()

    sender = asyncio.create_task(
        send_requests(account.ingress_url, planned, concurrency=8, on_result=on_result)
    )
    await asyncio.wait_for(reached.wait(), DELIVERY_LIMIT)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    return sender, asyncio.get_running_loop().time()


async def test_sigterm_drains_in_flight_ingress_and_loses_no_acknowledged_event(
    relay: Relay, account: Account, make_agent: MakeAgent, procs: Procs
) -> None:
    """SIGTERM mid-burst with a request in flight: /readyz answers 503 while that request
    finishes with a 2xx, the relay exits 0, and after a restart the agent has every event
    that got a 2xx."""
    agent = await make_agent(account)
    slow = await start_slow_ingress(account.ingress_url)
    try:
        sender, signalled = await burst_then_sigterm(account, relay)

        async def draining() -> bool:
            # A probe the relay's loop takes before it handles the signal still gets 200;
            # the slow request in flight keeps the relay from exiting, so it must come to 503.
            return await readyz(relay.public_url) == 503

        await wait_until(draining, "/readyz to answer 503 while draining", procs=procs)
        assert await finish_slow_ingress(*slow) in (200, 201, 202)
    finally:
        slow[1].close()  # on a failure above: no socket left for a later test to trip over
    assert relay.proc is not None
    assert await wait_exit(relay.proc, procs) == 0
    stopped = asyncio.get_running_loop().time()
    results: list[SendResult] = await sender
    acked = [r for r in results if r.ok]

    await relay.start()
    want = {planned_key(r.planned) for r in acked}
    slow_key = ("POST", "/sms.received", "", "application/x-www-form-urlencoded",
                base64.b64encode(SLOW_BODY).decode())
    events = await collect_keys(agent, want | {slow_key}, procs)
    ids = [e["id"] for e in events]
    print(f"\nSIGTERM mid-burst: {len(acked)}/{BURST} got a 2xx (+1 slow request in flight), "
          f"exit 0 {stopped - signalled:.3f} s after the signal; delivered after restart: "
          f"lost 0, duplicated {len(ids) - len(set(ids))}")
    assert len(ids) == len(set(ids))


async def test_idle_relay_exits_at_once_on_sigterm_and_sends_agents_away(
    relay: Relay, account: Account, make_agent: MakeAgent, procs: Procs
) -> None:
    """With nothing in flight the relay does not wait out its grace period: it tells the
    connected agent to go away and exits 0 well before shutdown_grace (60 s here)."""
    (relay.data_dir / "config.toml").write_text("shutdown_grace = 60.0\n")
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(relay.proc, procs) == 0
    await relay.start()
    agent = await make_agent(account)

    started = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(relay.proc, procs) == 0  # bounded by EXIT_LIMIT, well below 60 s
    took = time.monotonic() - started
    await wait_until(lambda: "link.goaway" in procs.tail(50), "the agent to log the goaway",
                     procs=procs)
    print(f"\nidle SIGTERM: exit 0 after {took:.3f} s (shutdown_grace 60 s), agent sent away")
    assert agent.proc is not None and agent.proc.poll() is None


async def collect_keys(agent: Agent, want: set[Any], procs: Procs) -> list[dict[str, Any]]:
    """Read the agent's inbox until every wanted request key is there; return all events."""
    seen: list[dict[str, Any]] = []

    async def all_there() -> bool:
        seen[:] = await agent.read_all()
        return want <= {event_key(e) for e in seen}

    await wait_until(all_there, "every 2xx'd event at the agent", procs=procs,
                     limit=DELIVERY_LIMIT)
    return seen
