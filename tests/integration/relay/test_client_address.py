"""The client behind a proxy (docs/deployment.md, The client behind a proxy).

A real aiohttp server answers the address ``client_address`` finds, and a real client sends the
``X-Forwarded-For`` lines a proxy chain (or a spoofing client) would; then the public relay
shows the consequence: a client that puts its own line ahead of the proxy's is still locked
out, and the office behind the same proxy is not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from relay_server.limits import Limits, client_address, limits_key
from shared import crypto
from shared.config import LimitsConfig
from tests.helpers.clock import FakeClock
from tests.helpers.public_relay import relay_config, serve_public

Ask = Callable[[list[str], list[str]], Awaitable[str]]


@pytest.fixture
async def ask() -> AsyncIterator[Ask]:
    """``ask(trusted, lines)``: the address the server finds for a request from 127.0.0.1
    carrying these ``X-Forwarded-For`` lines, each sent as a header line of its own."""
    trusted: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        # The lines arrive separately: the rule must join them, not read the first.
        seen = len(request.headers.getall("X-Forwarded-For", []))
        return web.json_response({"client": client_address(request, trusted), "lines": seen})

    app = web.Application()
    app.router.add_get("/", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async with aiohttp.ClientSession() as http:

        async def call(trust: list[str], lines: list[str]) -> str:
            trusted[:] = trust
            headers = CIMultiDict(("X-Forwarded-For", line) for line in lines)
            async with http.get(f"http://127.0.0.1:{port}/", headers=headers) as resp:
                body = await resp.json()
            assert body["lines"] == len(lines)
            return str(body["client"])

        yield call
    await runner.cleanup()


async def test_one_line_from_a_trusted_range(ask: Ask) -> None:
    """The proxy's line names the client; a range (not only an exact address) is trusted."""
    assert await ask(["127.0.0.0/8"], ["198.51.100.4"]) == "198.51.100.4"
    assert await ask(["127.0.0.0/8"], []) == "127.0.0.1"  # no header: the proxy itself


async def test_several_lines_are_one_list_walked_from_the_right(ask: Ask) -> None:
    """Two proxies (one in 10.0.0.0/8) each append; the lines join in order and the first hop
    outside the trusted ranges, from the right, is the client."""
    trust = ["127.0.0.1", "10.0.0.0/8"]
    assert await ask(trust, ["203.0.113.9", "10.1.2.3"]) == "203.0.113.9"
    assert await ask(trust, ["203.0.113.9, 10.1.2.3", "10.9.9.9"]) == "203.0.113.9"
    # Every hop trusted (the office sits in a trusted range itself): the left-most one.
    assert await ask(trust, ["10.0.0.5", "10.1.2.3"]) == "10.0.0.5"


async def test_spoofed_left_most_entries_are_ignored(ask: Ask) -> None:
    """A client that sends its own lines ahead of the proxy's (a fresh address each time, or
    one of a trusted range) is still keyed by the address the proxy appended."""
    trust = ["127.0.0.0/8", "10.0.0.0/8"]
    assert await ask(trust, ["192.0.2.77", "198.51.100.4"]) == "198.51.100.4"
    assert await ask(trust, ["10.0.0.1, 192.0.2.78", "198.51.100.4"]) == "198.51.100.4"
    assert await ask(trust, ["not-an-address", "198.51.100.4"]) == "198.51.100.4"
    # A garbled hop right of the client stops the walk at the trusted hop next to it.
    assert await ask(trust, ["198.51.100.4, garbage", "10.1.2.3"]) == "10.1.2.3"


async def test_untrusted_peer_is_keyed_by_its_own_address(ask: Ask) -> None:
    """A peer outside the trusted ranges names whatever it likes: the header is ignored."""
    assert await ask(["10.0.0.0/8"], ["198.51.100.4"]) == "127.0.0.1"
    assert await ask([], ["198.51.100.4", "203.0.113.9"]) == "127.0.0.1"


async def test_a_spoofing_stranger_is_locked_out_and_the_office_is_not(tmp_path: Path) -> None:
    """Behind one trusted proxy (127.0.0.0/8), a stranger who guesses enrollment codes while
    prepending a fresh address to each request is locked out after 5; the office, another
    client of the same proxy, still enrolls with its valid code."""
    limits = LimitsConfig(enroll_max_failures=5, trusted_proxies=["127.0.0.0/8"])
    async with serve_public(relay_config(tmp_path, limits=limits)) as relay:
        relay.app[limits_key].enroll = Limits.build(limits, clock=FakeClock(1000.0)).enroll
        agent_id, good = await relay.new_code()

        async with aiohttp.ClientSession() as http:

            async def enroll(code: str, lines: list[str]) -> tuple[int, str]:
                key = crypto.public_key_b64(crypto.generate_private_key())
                headers = CIMultiDict(("X-Forwarded-For", line) for line in lines)
                async with http.post(relay.base + "/v1/enroll", headers=headers,
                                     json={"code": code, "public_key": key}) as resp:
                    body = await resp.json()
                    return resp.status, body["error"]["code"] if "error" in body else "ok"

            for n in range(5):
                spoof = [f"192.0.2.{n}", "198.51.100.66"]  # own line first, then the proxy's
                assert await enroll(f"guess-{n}", spoof) == (400, "invalid_code")
            assert await enroll("guess-5", ["192.0.2.99", "198.51.100.66"]) == (
                429, "rate_limited")
            assert await enroll(good, ["203.0.113.10"]) == (200, "ok")
