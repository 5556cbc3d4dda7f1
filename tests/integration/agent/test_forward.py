"""Forward targets (docs/delivery.md, Forward): X-on's original request re-issued to a local
URL, in order, retried until 2xx, with progress that survives an agent restart."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from relay_agent.delivery.base import PAGE_BYTES
from relay_agent.delivery.forward import forward_url
from relay_agent.inbox import Inbox
from shared.config import ForwardTarget
from shared.events import RawRequest
from tests.helpers.timing import MS

from .support import eventually, make_event
from .test_consumers import fill, serve_api


@dataclass
class Received:
    method: str
    raw_path: str
    content_type: str | None
    body: bytes
    headers: dict[str, str]
    status: int


@dataclass
class Target:
    """A local app's HTTP endpoint: records every request, answers ``script`` then 200."""

    script: list[int] = field(default_factory=list)
    port: int = 0
    requests: list[Received] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        status = self.script.pop(0) if self.script else 200
        self.requests.append(Received(
            request.method, request.raw_path, request.headers.get("Content-Type"),
            await request.read(), dict(request.headers), status,
        ))
        headers = {"Location": "http://127.0.0.1:1/elsewhere"} if 300 <= status < 400 else {}
        return web.Response(status=status, headers=headers)

    @property
    def delivered(self) -> list[str]:
        """Event ids the target acknowledged (2xx), in order."""
        return [r.headers["X-Xon-Event-Id"] for r in self.requests if 200 <= r.status < 300]


@asynccontextmanager
async def serve_target(target: Target) -> AsyncIterator[Target]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", target.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", target.port).start()
        target.port = runner.addresses[0][1]
        yield target
    finally:
        await runner.cleanup()


def forward_to(target: Target, **settings: Any) -> ForwardTarget:
    settings = {"start": "oldest", "retry_initial": 1 * MS, "retry_max": 5 * MS, **settings}
    return ForwardTarget(url=f"http://127.0.0.1:{target.port}/xon", name="crm", **settings)


async def forward_health(api: Any) -> dict[str, Any]:
    _, health = await api.get("/v1/health")
    [entry] = health["forward"]
    assert isinstance(entry, dict)
    return entry


async def test_target_failing_three_times_gets_every_event_once_in_order(tmp_path: Path) -> None:
    """500, 500, 500, then 200: every event arrives in order and is acknowledged once."""
    async with serve_target(Target(script=[500, 500, 500])) as target:
        async with serve_api(tmp_path, forward=[forward_to(target)]) as api:
            await fill(api.inbox, 1, 4)
            await eventually(lambda: len(target.delivered) == 4, what="4 events delivered")
            entry = await forward_health(api)
    assert target.delivered == ["ev-1", "ev-2", "ev-3", "ev-4"]
    assert [r.status for r in target.requests] == [500, 500, 500, 200, 200, 200, 200]
    assert [r.headers["X-Xon-Event-Id"] for r in target.requests[:4]] == ["ev-1"] * 4
    assert entry == {
        "name": "crm", "url": f"http://127.0.0.1:{target.port}/xon", "cursor": "4", "lag": 0,
        "delivered": 4, "failures": 0, "last_status": 200, "last_error": None,
        "last_delivered_at": entry["last_delivered_at"], "stale_skipped": 0, "pruned": 0,
    }


async def test_forwarded_request_is_the_original_with_event_headers(tmp_path: Path) -> None:
    """Method, path suffix, raw query and body are X-on's; id, time and cursor are added."""
    event = make_event(1)
    event["request"] = RawRequest(
        method="POST", path="/sms.received", query="a=%41+b&c=%E2%98%8E&a=2",
        content_type="application/x-www-form-urlencoded; charset=utf-8",
        body="message=caf%C3%A9+%26+%3Cok%3E".encode(),
    ).to_json()
    async with serve_target(Target()) as target:
        async with serve_api(tmp_path, forward=[forward_to(target)]) as api:
            await api.inbox.commit([(1, event)])
            await eventually(lambda: len(target.delivered) == 1, what="the event forwarded")
    [got] = target.requests
    assert got.method == "POST"
    assert got.raw_path == "/xon/sms.received?a=%41+b&c=%E2%98%8E&a=2"
    assert got.content_type == "application/x-www-form-urlencoded; charset=utf-8"
    assert got.body == b"message=caf%C3%A9+%26+%3Cok%3E"
    assert got.headers["X-Xon-Event-Id"] == "ev-1"
    assert got.headers["X-Xon-Received-At"] == event["received_at"]
    assert got.headers["X-Xon-Cursor"] == "1"
    assert "X-Xon-Stale" not in got.headers


def test_forward_url_joins_the_target_path_and_the_suffix() -> None:
    """The suffix goes after the target's path; no doubled or missing slash; query raw."""
    def url(base: str, path: str, query: str = "") -> str:
        request = RawRequest(method="GET", path=path, query=query, content_type="", body=b"")
        return str(forward_url(base, request))

    assert url("http://127.0.0.1:9/xon", "/sms") == "http://127.0.0.1:9/xon/sms"
    assert url("http://127.0.0.1:9/xon/", "/sms") == "http://127.0.0.1:9/xon/sms"
    assert url("http://127.0.0.1:9/xon/", "") == "http://127.0.0.1:9/xon/"
    assert url("http://127.0.0.1:9", "", "a=%2F") == "http://127.0.0.1:9/?a=%2F"


async def test_forward_progress_survives_an_agent_restart(tmp_path: Path) -> None:
    """After a restart the target gets only the events it has not acknowledged, including
    the ones that arrived while the agent was stopped."""
    async with serve_target(Target()) as target:
        async with serve_api(tmp_path, forward=[forward_to(target)]) as api:
            await fill(api.inbox, 1, 3)
            await eventually(lambda: len(target.delivered) == 3, what="3 events delivered")
        inbox = await Inbox.open(tmp_path / "inbox.db")
        await fill(inbox, 4, 5)  # committed while forwarding was stopped
        await inbox.close()
        async with serve_api(tmp_path, forward=[forward_to(target, start="latest")]) as api:
            await eventually(lambda: len(target.delivered) == 5, what="5 events delivered")
            assert (await forward_health(api))["cursor"] == "5"
    assert target.delivered == ["ev-1", "ev-2", "ev-3", "ev-4", "ev-5"]
    assert len(target.requests) == 5


async def test_new_target_starts_with_the_latest_event_by_default(tmp_path: Path) -> None:
    """start = "latest": a target added later gets new events, not the inbox's history."""
    inbox = await Inbox.open(tmp_path / "inbox.db")
    try:
        await fill(inbox, 1, 2)
        async with serve_target(Target()) as target:
            forward = [forward_to(target, start="latest")]
            async with serve_api(tmp_path, inbox=inbox, forward=forward):
                await eventually(lambda: _has_position(inbox), what="the target's start")
                await fill(inbox, 3, 3)
                await eventually(lambda: len(target.delivered) == 1, what="the new event")
        assert target.delivered == ["ev-3"]
    finally:
        await inbox.close()


async def _has_position(inbox: Inbox) -> bool:
    return await inbox.position("forward:crm") is not None


async def test_type_filter_forwards_only_matching_events(tmp_path: Path) -> None:
    """types = ["call.*"]: other events are passed over and the cursor still advances."""
    events = [(n, {**make_event(n), "type": "call.arriving" if n % 2 else "sms.received"})
              for n in range(1, 6)]
    async with serve_target(Target()) as target:
        async with serve_api(tmp_path, forward=[forward_to(target, types=["call.*"])]) as api:
            await api.inbox.commit(events)
            await eventually(lambda: len(target.delivered) == 3, what="the call events")

            async def at_end() -> bool:
                return bool((await forward_health(api))["cursor"] == "5")
            await eventually(at_end, what="the cursor past the last event")
    assert target.delivered == ["ev-1", "ev-3", "ev-5"]


async def test_health_shows_a_failing_target_and_its_backlog(tmp_path: Path) -> None:
    """A target answering 503 shows its status, error, failures and lag in /v1/health."""
    async with serve_target(Target(script=[503] * 10_000)) as target:
        forward = forward_to(target, retry_initial=5 * MS, retry_max=10 * MS)
        async with serve_api(tmp_path, forward=[forward]) as api:
            await fill(api.inbox, 1, 2)

            async def failing() -> bool:
                return bool((await forward_health(api))["failures"] >= 2)
            await eventually(failing, what="two failed attempts")
            entry = await forward_health(api)
    assert entry["last_status"] == 503
    assert entry["last_error"] == f"HTTP 503 from http://127.0.0.1:{target.port}/xon"
    assert (entry["cursor"], entry["lag"], entry["delivered"]) == ("0", 2, 0)
    assert {r.headers["X-Xon-Event-Id"] for r in target.requests} == {"ev-1"}


async def test_target_that_is_down_gets_the_event_once_it_listens(tmp_path: Path) -> None:
    """A refused connection is retried until the app starts; redirects are failures too."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = Target(script=[302], port=port)
    async with serve_api(tmp_path, forward=[forward_to(target)]) as api:
        await fill(api.inbox, 1, 1)

        async def refused() -> bool:
            entry = await forward_health(api)
            return bool(entry["failures"] >= 1 and entry["last_status"] is None)
        await eventually(refused, what="a refused connection")
        async with serve_target(target):
            await eventually(lambda: len(target.delivered) == 1, what="the event delivered")
    assert [r.status for r in target.requests] == [302, 200]


class _PageSizes(Inbox):
    """A real inbox that also records how many bytes of events each read handed out."""

    pages: list[int]

    async def read(self, after: int | None, limit: int, max_bytes: int | None = None) -> Any:
        page = await super().read(after, limit, max_bytes)
        self.pages.append(sum(len(json.dumps(item.event)) for item in page))
        return page


async def test_a_target_reads_large_events_a_bounded_page_at_a_time(tmp_path: Path) -> None:
    """Ten events of 1 MiB reach the target in order, read in pages of at most PAGE_BYTES plus
    one event, never all ten at once (docs/delivery.md, Response sizes)."""
    inbox = await _PageSizes.open(tmp_path / "inbox.db")
    inbox.pages = []
    big = base64.b64encode(b"x" * (768 * 1024)).decode()
    events = []
    for n in range(1, 11):
        event = make_event(n)
        event["request"]["body_b64"] = big
        events.append((n, event))
    try:
        async with serve_target(Target()) as target:
            async with serve_api(tmp_path, inbox=inbox, forward=[forward_to(target)]):
                await inbox.commit(events)
                await eventually(lambda: len(target.delivered) == 10, what="10 events delivered",
                                 limit=20_000 * MS)
    finally:
        await inbox.close()
    assert target.delivered == [f"ev-{n}" for n in range(1, 11)]
    one = len(json.dumps(events[0][1]))
    assert inbox.pages and max(inbox.pages) <= PAGE_BYTES + one
    assert max(inbox.pages) < 10 * one
