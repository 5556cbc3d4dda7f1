"""The agent honours a busy relay's ``Retry-After`` (docs/protocol.md, Reconnecting): it waits
``Retry-After`` plus jitter over ``[0, min(Retry-After, max(1 s, Retry-After / 10))]``
(``Retry-After`` at most half of ``backoff_max``) and does not grow its back-off; a refusal
without a usable ``Retry-After`` gets the ordinary back-off."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink, backoff_delay, busy_retry_after, reconnect_delay
from shared import crypto
from shared.config import AgentConfig, LinkConfig
from tests.helpers.timing import MS

from .support import eventually

INITIAL = 10 * MS
CAP = 100 * MS


def refusal(status: int, retry_after: str | None) -> InvalidStatus:
    headers = Headers() if retry_after is None else Headers({"Retry-After": retry_after})
    return InvalidStatus(Response(status, "refused", headers, b""))


def test_busy_retry_after_is_whole_seconds_of_a_503_or_429() -> None:
    """Only 503/429 with delay-seconds count; an HTTP-date, junk or another status do not."""
    assert busy_retry_after(refusal(503, "3")) == 3.0
    assert busy_retry_after(refusal(429, " 12 ")) == 12.0
    assert busy_retry_after(refusal(503, "0")) == 0.0
    for status, value in [
        (503, None),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT"),
        (503, "1.5"),
        (503, "-1"),
        (503, "soon"),
        (500, "3"),
        (404, "3"),
    ]:
        assert busy_retry_after(refusal(status, value)) is None, (status, value)
    assert busy_retry_after(OSError("connection refused")) is None


def test_reconnect_delay_after_busy_is_retry_after_plus_jitter_and_keeps_the_attempt() -> None:
    """Retry-After R: R + rand·J with J = min(R, max(1 s, R/10)) and R at most cap/2 (so the
    wait stays within cap), attempt unchanged; anything else: the back-off, one attempt more.
    The relay spreads the agents it refuses over whole seconds; J spreads them within one."""
    assert reconnect_delay(5, 4.0, initial=1.0, cap=30.0, rand=lambda: 0.5) == (4.5, 5)
    assert reconnect_delay(5, 4.0, initial=1.0, cap=30.0, rand=lambda: 0.0) == (4.0, 5)
    assert reconnect_delay(0, 20.0, initial=1.0, cap=30.0, rand=lambda: 0.0) == (15.0, 0)
    assert reconnect_delay(0, 30.0, initial=1.0, cap=60.0, rand=lambda: 0.5) == (31.5, 0)
    assert reconnect_delay(0, 0.5, initial=1.0, cap=30.0, rand=lambda: 0.5) == (0.75, 0)
    assert reconnect_delay(0, 0.0, initial=1.0, cap=30.0, rand=lambda: 0.5) == (0.0, 0)
    assert reconnect_delay(3, None, initial=1.0, cap=30.0, rand=lambda: 0.5) == (
        backoff_delay(3, initial=1.0, cap=30.0, rand=lambda: 0.5),
        4,
    )


@pytest.fixture
async def refusing() -> AsyncIterator[tuple[str, list[int]]]:
    """A tiny HTTP server refusing every ``/v1/agent`` upgrade from a script of answers
    (then 500); yields its base URL and the statuses answered so far."""
    script: list[tuple[int, str | None]] = [
        (503, "0"),
        (429, "0"),  # busy: no wait (R = 0), attempt stays 0
        (503, None),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT"),
        (503, "soon"),  # back-off grows
        (503, "1"),  # busy again: R = backoff_max / 2, attempt stays 3
    ]
    answered: list[int] = []

    async def handle(_: web.Request) -> web.Response:
        status, retry_after = script.pop(0) if script else (500, None)
        answered.append(status)
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        return web.json_response(
            {"error": {"code": "busy", "message": "busy"}}, status=status, headers=headers
        )

    app = web.Application()
    app.router.add_get("/v1/agent", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", answered
    finally:
        await runner.cleanup()


async def test_agent_waits_retry_after_without_growing_its_back_off(
    tmp_path: Path, refusing: tuple[str, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    """Against a server answering busy refusals and others, with rand pinned to 0.5: the
    reconnect delays and attempts follow the rule, one ``link.reconnecting`` per attempt."""
    caplog.set_level(logging.INFO, logger="relay_agent.link")
    url, answered = refusing
    inbox = await Inbox.open(tmp_path / "inbox.db")
    config = AgentConfig(
        relay_url=url,
        agent_id="ag_test",
        relay_id="rl_test",
        data_dir=tmp_path,
        backoff_initial=INITIAL,
        backoff_max=CAP,
        link=LinkConfig(auth_timeout=5000 * MS),
    )
    link = AgentLink(
        config, private_key=crypto.generate_private_key(), inbox=inbox, rand=lambda: 0.5
    )
    task = asyncio.create_task(link.run())
    try:
        await eventually(lambda: len(answered) >= 8, what="eight upgrade attempts")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await inbox.close()
    records = [r for r in caplog.records if r.getMessage() == "link.reconnecting"][:7]
    # The log rounds delays to the millisecond.
    assert [r.__dict__["delay"] for r in records] == pytest.approx(
        [0.0, 0.0, 0.5 * INITIAL, 1.0 * INITIAL, 2.0 * INITIAL, 0.75 * CAP, 4.0 * INITIAL],
        abs=1e-3,
    )
    assert [r.__dict__["attempt"] for r in records] == [0, 0, 1, 2, 3, 3, 4]
    assert "Retry-After 1 s" in records[5].__dict__["error"]
    assert "HTTP 500" in records[6].__dict__["error"]
