"""Relay CPU per connect of a routed agent with an expensive subscription over a large log.

``python -m bench.subscan [--events 20000] [--connects 4] [--params 16] [--values 64]``

One process: a relay (real SQLite store, the ``/v1/agent`` route on 127.0.0.1) whose account
log holds ``--events`` events that pass the subscription's type list but miss its last
parameter, and one agent (the real ``AgentSession`` over websockets) that reconnects
``--connects`` times with ``resume_after = 0`` (it never received anything), each time until
the relay's link has scanned to the log head. Prints, per connect, the process CPU seconds
(relay and agent; the agent's share is a welcome and a status frame), the wall time, and the
longest the event loop went without running a 1 ms ticker meanwhile (what every other link and
ingress request on the relay would have waited at worst). The first connect scans the whole
log; later ones show what a reconnect costs.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from aiohttp import web
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from relay_server import agent_ws
from relay_server.appkeys import config_key, hub_key, relay_id_key, store_key
from relay_server.hub import AgentHub
from relay_server.store import open_store
from shared import crypto
from shared.config import LinkConfig, ServerConfig
from shared.events import RawRequest, XonEvent, format_time
from shared.link.frames import SUBPROTOCOL
from shared.link.session import AgentSession, Welcomed


def _subscription(params: int, values: int) -> dict[str, object]:
    types = [f"never.{i}" for i in range(255)] + ["sms.received"]
    wanted = {f"p{i}": [f"v{j}" for j in range(values)] for i in range(params)}
    return {"types": types, "params": wanted}


def _event(account: str, params: int, values: int, n: int) -> XonEvent:
    # Every parameter but the last has the last accepted value; the last one is missing.
    fields = {f"p{i}": f"v{values - 1}" for i in range(params - 1)}
    return XonEvent(
        id=f"ev-{n}",
        account=account,
        type="sms.received",
        received_at=format_time(time.time()),
        params=fields,
        request=RawRequest(method="GET", path="/sms.received", query="", content_type="", body=b""),
    )


async def _run(data: Path, events: int, connects: int, params: int, values: int) -> None:
    store = await open_store(f"sqlite:///{data / 'relay.db'}", exclusive=True)
    link = LinkConfig(max_message_size=16 * 1024 * 1024, heartbeat_interval=None)
    config = ServerConfig(data_dir=data, link=link)
    relay_id = await store.relay_id()
    hub = AgentHub(store, relay_id=relay_id, link=link)
    app = web.Application()
    app[config_key], app[store_key], app[hub_key], app[relay_id_key] = (
        config,
        store,
        hub,
        relay_id,
    )
    app.router.add_get("/v1/agent", agent_ws.handle)
    account = await store.create_account(name="acme", ingress_key_hash=crypto.hash_secret("k"))
    for start in range(0, events, 500):
        batch = range(start, min(events, start + 500))
        await asyncio.gather(
            *(
                store.append_event(_event(account.id, params, values, n), xon_id=None)
                for n in batch
            )
        )
    head = await store.head_seq(account.id)
    code = crypto.new_token()
    await store.create_agent(
        account_id=account.id,
        name="pc",
        code_hash=crypto.hash_secret(code),
        code_expires_at=time.time() + 3600,
    )
    key = crypto.generate_private_key()
    agent = await store.enroll_agent(
        code_hash=crypto.hash_secret(code), public_key=crypto.public_key_b64(key), now=time.time()
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/agent"
    subscription = _subscription(params, values)
    print(f"log: {events} events, head {head}; subscription: 256 types, {params} x {values}")
    stall = 0.0

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall, last = max(stall, now - last), now

    ticking = asyncio.create_task(ticker())
    try:
        for n in range(connects):
            stall = 0.0
            cpu, wall = time.process_time(), time.perf_counter()
            ws = await connect(url, subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=None)
            session = AgentSession(
                agent_id=agent.id,
                relay_id=relay_id,
                private_key=key,
                resume_after=0,
                auth_timeout=30.0,
                now=asyncio.get_running_loop().time(),
                client="bench",
                subscription=subscription,  # the wire form, unchecked by the agent
            )
            welcomed = False
            while not welcomed:
                for text in session.data_to_send():
                    await ws.send(text)
                message = await ws.recv()
                assert isinstance(message, str)
                session.receive_message(message, asyncio.get_running_loop().time())
                welcomed = any(isinstance(e, Welcomed) for e in session.events_received())
            for text in session.data_to_send():
                await ws.send(text)
            for _ in range(600_000):
                links = [x for x in hub._conns if x.agent_id == agent.id]
                if links and links[0].scanned_through >= head:
                    break
                await asyncio.sleep(0.001)
            else:
                raise SystemExit("the relay never scanned to the head")
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(
                f"connect {n + 1}: relay+agent CPU {cpu:.3f} s, wall {wall:.3f} s,"
                f" longest loop stall {stall * 1000:.0f} ms"
            )
            await ws.close()
            for _ in range(10_000):
                if not hub._conns:
                    break
                await asyncio.sleep(0.001)
    finally:
        ticking.cancel()
        await hub.shutdown()
        await runner.cleanup()
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.subscan", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--connects", type=int, default=4)
    parser.add_argument("--params", type=int, default=16)
    parser.add_argument("--values", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        asyncio.run(_run(Path(data), args.events, args.connects, args.params, args.values))


if __name__ == "__main__":
    main()
