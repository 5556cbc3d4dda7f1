"""``xon-sim demo``: the whole product on loopback, driven by the simulator.

Starts a relay and an agent as real processes, makes an account and enrolls the agent, sends
one event of every example type in every encoding, and reads them back through the agent's
local API as a local app would (DESIGN §Agent local API), printing each as it arrives.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .catalogue import EVENT_TYPES
from .encode import ENCODINGS
from .procs import Children, DemoFailed, run_command, script, wait_for_json
from .send import Planned, SendResult, plan, send_requests

__all__ = ["DemoOptions", "run_demo", "request_key"]

MARKER = ".xon-demo"
"""Marks a data dir the demo made, so that it only ever wipes its own leftovers."""
START_TIMEOUT = 20.0
ARRIVAL_TIMEOUT = 30.0
INTERVAL = 3.0
POLL_WAIT = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    data_dir: Path
    once: bool


@dataclass(slots=True, kw_only=True)
class _Env:
    ingress_url: str
    local_url: str
    token_file: Path
    token: str


def request_key(method: str, query: str, content_type: str, body: bytes) -> tuple[str, ...]:
    """What identifies a request on both ends: the raw request minus the ingress key."""
    return (method, query, content_type, base64.b64encode(body).decode())


def _planned_key(p: Planned) -> tuple[str, ...]:
    r = p.request
    return request_key(r.method, r.query, r.content_type, r.body)


def _event_key(event: dict[str, Any]) -> tuple[str, ...]:
    r = event.get("request") or {}
    return (
        str(r.get("method", "")),
        str(r.get("query", "")),
        str(r.get("content_type", "")),
        str(r.get("body_b64", "")),
    )


async def run_demo(opts: DemoOptions) -> int:
    """Run the demo; returns the exit status. Children are always stopped."""
    children = Children()
    try:
        env = await _start(opts.data_dir, children)
        return await _exercise(env, children, once=opts.once)
    finally:
        await children.stop_all()


def _prepare(data_dir: Path) -> None:
    if data_dir.exists() and any(data_dir.iterdir()) and not (data_dir / MARKER).exists():
        raise DemoFailed(f"{data_dir} is not empty and was not made by the demo: pick another")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MARKER).touch()
    for name in ("relay", "agent"):
        shutil.rmtree(data_dir / name, ignore_errors=True)
    for name in ("relay.log", "agent.log"):
        (data_dir / name).unlink(missing_ok=True)


async def _start(data_dir: Path, children: Children) -> _Env:
    data_dir = data_dir.resolve()
    _prepare(data_dir)
    relay_dir, agent_dir = data_dir / "relay", data_dir / "agent"
    server, agent = script("xon-relay-server"), script("xon-relay-agent")

    print(f"demo: data in {data_dir} (logs: relay.log, agent.log)")
    await children.start(
        "xon-relay-server",
        [server, "run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--data-dir", str(relay_dir)],
        data_dir / "relay.log",
    )
    admin = await wait_for_json(relay_dir / "admin.json", children, timeout=START_TIMEOUT)
    account = json.loads(
        await run_command([server, "account", "add", "demo", "--json", "--data-dir",
                           str(relay_dir)])
    )
    ingress_url = str(account["ingress_url"])
    public_url = str(admin.get("public_url") or ingress_url.split("/xon/")[0])
    print(f"demo: relay up at {public_url}, account demo ({account['id']})")

    added = json.loads(
        await run_command([server, "agent", "add", "demo", "--name", "demo-pc", "--json",
                           "--data-dir", str(relay_dir)])
    )
    await run_command([agent, "enroll", "--relay", public_url, "--code", str(added["code"]),
                       "--data-dir", str(agent_dir), "--listen", "127.0.0.1:0"])
    await children.start(
        "xon-relay-agent", [agent, "run", "--data-dir", str(agent_dir)], data_dir / "agent.log"
    )
    info = await wait_for_json(agent_dir / "agent.json", children, timeout=START_TIMEOUT)
    token_file = agent_dir / "local-token"
    local_url = str(info["local_url"]).rstrip("/")
    print(f"demo: agent {added['agent_id']} (demo-pc) enrolled; local API at {local_url}")
    return _Env(
        ingress_url=ingress_url,
        local_url=local_url,
        token_file=token_file,
        token=token_file.read_text(encoding="utf-8").strip(),
    )


async def _exercise(env: _Env, children: Children, *, once: bool) -> int:
    expected: dict[tuple[str, ...], Planned] = {}
    arrived: set[tuple[str, ...]] = set()
    changed = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        key = _event_key(event)
        encoding = expected[key].encoding if key in expected else "?"
        params = " ".join(f"{k}={v!r}" for k, v in (event.get("params") or {}).items())
        print(f"  received {event.get('type')} [{encoding}] {params}")
        arrived.add(key)
        changed.set()

    first = plan(EVENT_TYPES, ENCODINGS)
    expected.update((_planned_key(p), p) for p in first)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {env.token}"}) as http:
        reader = asyncio.create_task(_read_events(http, env.local_url, on_event))
        try:
            print(f"demo: sending {len(first)} events ({len(EVENT_TYPES)} types x "
                  f"{len(ENCODINGS)} encodings)")
            results = await send_requests(env.ingress_url, first, on_result=_print_sent)
            failed = [r for r in results if not r.ok]
            if failed:
                raise DemoFailed(f"the relay refused {len(failed)} of {len(results)} events "
                                 f"(first: {_describe(failed[0])})")
            await _await_all(set(expected), arrived, changed, children, reader)
            print(f"demo: all {len(first)} events arrived through the agent")
            if once:
                return 0
            _print_try_it(env)
            await _keep_sending(env, expected, children, reader)
            return 0  # pragma: no cover - _keep_sending runs until Ctrl-C
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _await_all(
    want: set[tuple[str, ...]],
    arrived: set[tuple[str, ...]],
    changed: asyncio.Event,
    children: Children,
    reader: asyncio.Task[None],
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ARRIVAL_TIMEOUT
    while not want <= arrived:
        children.check_alive()
        if reader.done():
            reader.result()
        if loop.time() >= deadline:
            raise DemoFailed(
                f"only {len(want & arrived)} of {len(want)} events arrived within "
                f"{ARRIVAL_TIMEOUT:g} s"
            )
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), 0.5)


async def _read_events(
    http: aiohttp.ClientSession, local_url: str, on_event: Callable[[dict[str, Any]], None]
) -> None:
    """A local app: long-poll the agent for events after our cursor, forever."""
    cursor: str | None = None
    while True:
        params: dict[str, str] = {"limit": "100", "wait": str(POLL_WAIT)}
        if cursor is not None:
            params["after"] = cursor
        try:
            async with http.get(
                f"{local_url}/v1/events",
                params=params,
                timeout=aiohttp.ClientTimeout(total=POLL_WAIT + 10),
            ) as resp:
                if resp.status != 200:
                    raise DemoFailed(
                        f"local API answered {resp.status}: {(await resp.text())[:200]}"
                    )
                page = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            print(f"demo: local API not reachable ({type(exc).__name__}); retrying")
            await asyncio.sleep(1.0)
            continue
        for event in page.get("events", []):
            on_event(event)
        cursor = str(page.get("cursor", cursor))


async def _keep_sending(
    env: _Env,
    expected: dict[tuple[str, ...], Planned],
    children: Children,
    reader: asyncio.Task[None],
) -> None:
    print("demo: sending one event every few seconds; Ctrl-C to stop")
    pairs = itertools.cycle(itertools.product(EVENT_TYPES, ENCODINGS))
    # Numbered per type, as plan() does: one call's events share its id.
    numbers = dict.fromkeys(EVENT_TYPES, 1000)
    while True:
        await asyncio.sleep(INTERVAL)
        children.check_alive()
        if reader.done():
            reader.result()
        event_type, encoding = next(pairs)
        numbers[event_type] += 1
        planned = plan([event_type], [encoding], start=numbers[event_type])
        expected.update((_planned_key(p), p) for p in planned)
        await send_requests(env.ingress_url, planned, on_result=_print_sent)


def _print_sent(result: SendResult) -> None:
    p = result.planned
    status = result.status if result.status is not None else "---"
    extra = f" {result.error}" if result.error else ""
    print(f"  sent     {p.event_type} [{p.encoding}] -> {status}{extra}")


def _describe(result: SendResult) -> str:
    p = result.planned
    return f"{p.event_type} [{p.encoding}]: {result.status or result.error}"


def _print_try_it(env: _Env) -> None:
    token = f'"Authorization: Bearer $(cat {shlex.quote(str(env.token_file))})"'
    url = shlex.quote
    print("\nTry it yourself (in another terminal):")
    print("  # read events as a local app (long-poll up to 30 s):")
    print(f"  curl -s -H {token} {url(env.local_url + '/v1/events?wait=30')}")
    print("  # send an SMS event as X-on would (form POST, type in the path):")
    print(f"  curl -s -X POST {url(env.ingress_url + '/sms.received')} "
          "--data-urlencode from=+447700900123 --data-urlencode 'message=Hi from curl'")
    print("  # or as JSON:")
    body = json.dumps({"type": "call.arriving", "id": "c-1", "caller": "+447700900123"})
    print(f"  curl -s -H 'Content-Type: application/json' -d {url(body)} "
          f"{url(env.ingress_url)}")
    print("  # the agent's link state and backlog:")
    print(f"  curl -s -H {token} {url(env.local_url + '/v1/health')}\n")
