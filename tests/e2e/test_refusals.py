"""End to end: bad input gets a clear 4xx and the relay keeps serving (DESIGN principle 6)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from shared.sim import plan, send_requests

from .conftest import Account, MakeAgent, Relay

pytestmark = pytest.mark.slow

JSON = "application/json"
XML = "text/xml; charset=utf-8"
BOMB = (
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
    b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><x>&b;</x>'
)


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, content_type: str
) -> tuple[int, Any]:
    async with http.post(url, data=body, headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json(content_type=None)


BAD_BODIES = [
    (b"{not json", JSON, 400, "bad_body"),
    (b"[1, 2]", JSON, 400, "bad_body"),
    (b"<a><b></a>", XML, 400, "bad_body"),
    (BOMB, XML, 400, "bad_body"),
    (b"from=%FF%FE", "application/x-www-form-urlencoded", 400, "bad_body"),
    (b"x" * (256 * 1024 + 1), JSON, 413, "body_too_large"),
]


async def test_bad_ingress_bodies_are_refused_and_relay_keeps_serving(
    account: Account, make_agent: MakeAgent, http: aiohttp.ClientSession
) -> None:
    """Malformed or oversized bodies get their 4xx and error code; later events still flow."""
    agent = await make_agent(account)
    for body, content_type, status, code in BAD_BODIES:
        got_status, answer = await _post(http, account.ingress_url, body, content_type)
        assert (got_status, answer["error"]["code"]) == (status, code), body[:40]

    results = await send_requests(account.ingress_url, plan(["sms.received"], ["json"]))
    assert results[0].ok
    events = await agent.collect(1)
    assert [e["id"] for e in events] == [results[0].event_id]


async def test_unknown_ingress_key_is_404(
    relay: Relay, account: Account, http: aiohttp.ClientSession
) -> None:
    """A wrong key in the ingress URL answers 404 unknown_ingress_key, for GET and POST."""
    wrong = f"{relay.public_url}/xon/{'A' * 43}"
    async with http.get(wrong + "/sms.received?from=1") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_ingress_key"
    status, answer = await _post(http, wrong, b'{"type": "x"}', JSON)
    assert (status, answer["error"]["code"]) == (404, "unknown_ingress_key")
    async with http.get(relay.public_url + "/healthz") as resp:
        assert resp.status == 200


async def test_local_api_refusals(account: Account, make_agent: MakeAgent) -> None:
    """The local API refuses a missing/wrong token, a foreign Host and bad parameters."""
    agent = await make_agent(account)
    cases: list[tuple[dict[str, str], dict[str, str], int, str]] = [
        ({}, {"Authorization": ""}, 401, "unauthorized"),
        ({}, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ({}, {"Host": "evil.example:80"}, 403, "bad_host"),
        ({"after": "abc"}, {}, 400, "bad_cursor"),
        ({"after": "999999"}, {}, 400, "bad_cursor"),
        ({"limit": "0"}, {}, 400, "bad_limit"),
        ({"wait": "-1"}, {}, 400, "bad_wait"),
    ]
    for params, headers, status, code in cases:
        got, body = await agent.get("/v1/events", params=params, headers=headers)
        assert (got, body["error"]["code"]) == (status, code), (params, headers)
    got, body = await agent.get("/v1/events")
    assert got == 200
    assert body["events"] == []
