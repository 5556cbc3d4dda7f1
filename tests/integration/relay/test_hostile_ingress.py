"""Hostile ingress (README, Ingress limits): bodies built to amplify, exotic charsets, invalid
text, absolute-form targets and paths that could climb, sent to the real public app.

Each test then checks what matters most: another tenant is still served at once (``/healthz``
and a second account's ingress answer, and its event is stored).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.config import LimitsConfig
from shared.events import XonEvent
from shared.link import EventReceived
from shared.logs import JsonFormatter, TextFormatter
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public
from tests.helpers.relay_app import Agent
from tests.helpers.timing import MS

from .test_abuse_ingress import error_code, read_response

WAIT = 5000 * MS
FORM = "application/x-www-form-urlencoded"


@dataclass
class Tenants:
    relay: PublicRelay
    other_id: str
    other_key: str
    http: aiohttp.ClientSession

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, Any]:
        """POST to the attacked account's ingress; (status, JSON answer)."""
        url = self.relay.base + self.relay.ingress_path + path
        async with asyncio.timeout(WAIT):
            async with self.http.post(url, data=body, headers={"Content-Type": content_type}) as r:
                return r.status, await r.json()

    async def send_raw(self, request: bytes) -> tuple[int, bytes]:
        """One request written byte for byte on a fresh socket; (status, body)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.relay.port)
        try:
            writer.write(request)
            status, _, body = await read_response(reader)
        finally:
            writer.close()
        return status, body

    async def stored(self) -> list[XonEvent]:
        events = await self.relay.services.store.read_events(
            self.relay.account_id, after=0, limit=1000
        )
        return [s.event for s in events]

    async def others_served(self) -> None:
        """Health answers and the other account's ingress stores its event, within WAIT."""
        base = self.relay.base
        async with asyncio.timeout(WAIT):
            async with self.http.get(base + "/healthz") as r:
                assert r.status == 200
            async with self.http.post(
                f"{base}/xon/{self.other_key}/sms.received", data={"text": "still here"}
            ) as r:
                assert r.status == 200, await r.text()
                event_id = (await r.json())["id"]
        stored = await self.relay.services.store.read_events(self.other_id, after=0, limit=1000)
        assert event_id in [s.event.id for s in stored]


@pytest.fixture
async def tenants(tmp_path: Path) -> AsyncIterator[Tenants]:
    config = relay_config(tmp_path, limits=LimitsConfig(source_rate=None, account_rate=None))
    async with serve_public(config) as relay:
        other_id, other_key = await relay.add_account("other")
        async with aiohttp.ClientSession() as http:
            yield Tenants(relay, other_id, other_key, http)


def _zeros(count: int) -> bytes:
    return json.dumps({"k" * 200: [0] * count}).encode()


@pytest.mark.parametrize("count", [13_000, 83_000], ids=["40KB", "250KB"])
async def test_amplifying_json_is_413_and_others_are_served(tenants: Tenants, count: int) -> None:
    """{"<200-char key>": [0, … zeros]} is refused with 413 (it was a ~4 MB event at 40 KB):
    the params budget or max_params, whichever it passes first; nothing is stored and the
    other tenant is served."""
    status, answer = await tenants.post("/sms", _zeros(count), "application/json")
    assert status == 413
    code = answer["error"]["code"]
    assert code == ("params_too_large" if count < 20_000 else "too_many_params")
    assert await tenants.stored() == []
    await tenants.others_served()


@pytest.mark.parametrize(
    ("content_type", "body", "code"),
    [
        (FORM, b"a=1&" * 1001, "too_many_params"),
        ("application/json", b'{"a":' * 40 + b"1" + b"}" * 40, "nesting_too_deep"),
        ("application/json", b"[" * 200_000, "nesting_too_deep"),
        ("text/xml", b"<a>" * 40 + b"x" + b"</a>" * 40, "nesting_too_deep"),
        (FORM, b"k" * 600 + b"=1", "param_too_large"),
        (FORM, b"k=" + b"v" * 70_000, "param_too_large"),
    ],
    ids=["params", "json-depth", "json-very-deep", "xml-depth", "name", "value"],
)
async def test_bodies_past_a_limit_are_413(
    tenants: Tenants, content_type: str, body: bytes, code: str
) -> None:
    """Too many params, too deep, too long a name or value: 413 with its code."""
    status, answer = await tenants.post("/sms", body, content_type)
    assert status == 413
    assert answer["error"]["code"] == code
    assert await tenants.stored() == []
    await tenants.others_served()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (f"{FORM}; charset=punycode", b"a=" + b"\xe9" * 200_000),
        (f"{FORM}; charset=unicode_escape", b"a=\\ud800"),
        (f"{FORM}; charset=raw_unicode_escape", b"a=\\ud800"),
        (f"{FORM}; charset=idna", b"a=" + b"x." * 1000),
        ("application/json; charset=punycode", b'{"a": 1}'),
        ("text/xml", b'<?xml version="1.0" encoding="punycode"?><a>x</a>'),
        ("text/xml", b'<?xml version="1.0" encoding="unicode_escape"?><a>\\ud800</a>'),
    ],
    ids=["punycode", "unicode_escape", "raw_unicode_escape", "idna", "json", "xml-punycode",
         "xml-unicode_escape"],
)
async def test_exotic_charsets_are_415(tenants: Tenants, content_type: str, body: bytes) -> None:
    """A charset outside the allow-list is 415 unsupported_charset, never decoded."""
    status, answer = await tenants.post("/sms", body, content_type)
    assert status == 415
    assert answer["error"]["code"] == "unsupported_charset"
    await tenants.others_served()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/xml", b'<?xml version="1.0" encoding="utf-16-be"?><a>x</a>'),
        (FORM, b"name=%FF%FE"),
        (FORM, b"name=\xff\xfe"),
        ("application/json", b'{"a": "\xed\xa0\x80"}'),
    ],
    ids=["xml-utf16be", "form-escapes", "form-bytes", "json-raw-surrogate"],
)
async def test_invalid_text_is_400(tenants: Tenants, content_type: str, body: bytes) -> None:
    """Text that is not valid in its charset is 400 bad_body: never a 5xx, nothing stored."""
    status, answer = await tenants.post("/sms", body, content_type)
    assert (status, answer["error"]["code"]) == (400, "bad_body")
    assert await tenants.stored() == []
    await tenants.others_served()


async def test_lone_surrogate_escape_is_stored_and_reaches_an_agent(tenants: Tenants) -> None:
    """JSON with "\\ud800" is accepted: the body is kept byte for byte, the params carry
    U+FFFD, and the event crosses the link to a connected agent."""
    relay = tenants.relay
    agent_id, key = await relay.add_agent()
    agent = await Agent(relay, agent_id, key).connect()
    try:
        await agent.welcome()
        body = b'{"text": "cut \\ud83d", "id": "m1"}'
        status, _ = await tenants.post("/sms.received", body, "application/json")
        assert status == 200
        [event] = await tenants.stored()
        assert event.request.body == body
        assert event.params["text"] == "cut \ufffd"
        [received] = [e for e in await agent.read_until(EventReceived)
                      if isinstance(e, EventReceived)]
        assert received.event["params"]["text"] == "cut \ufffd"
    finally:
        await agent.close()
    await tenants.others_served()


async def test_content_type_with_undecodable_bytes_is_400(tenants: Tenants) -> None:
    """A Content-Type holding a byte that is not UTF-8 is 400 bad_content_type (it would be
    a lone surrogate in the event)."""
    path = tenants.relay.ingress_path
    status, body = await tenants.send_raw(
        f"POST {path}/sms HTTP/1.1\r\nHost: relay\r\nContent-Length: 3\r\n".encode()
        + b"Content-Type: text/plain; x=\xff\r\n\r\na=1"
    )
    assert (status, error_code(body)) == (400, "bad_content_type")
    assert await tenants.stored() == []
    await tenants.others_served()


@pytest.mark.parametrize(
    "suffix",
    ["/b/..%2f..%2fadmin", "/b/../../admin", "/%2e%2e/admin", "/b/%2E%2E/admin", "/a%5c..%5cb",
     "/a\\..\\b", "/..;/admin", "/x%2Fy", "/./x", "/b/.."],
)
async def test_paths_that_could_climb_are_400(tenants: Tenants, suffix: str) -> None:
    """A suffix with a dot segment, a backslash, or an encoded dot, slash or backslash is
    400 bad_path (it could climb above a forward target's path), sent byte for byte."""
    path = tenants.relay.ingress_path
    status, body = await tenants.send_raw(
        f"GET {path}{suffix}?a=1 HTTP/1.1\r\nHost: relay\r\n\r\n".encode()
    )
    assert (status, error_code(body)) == (400, "bad_path")
    assert await tenants.stored() == []
    await tenants.others_served()


async def test_event_over_max_event_size_is_413(tmp_path: Path) -> None:
    """A body whose event would pass limits.max_event_size is 413 event_too_large."""
    limits = LimitsConfig(max_event_size=8 * 1024)
    async with serve_public(relay_config(tmp_path, limits=limits)) as relay:
        other_id, other_key = await relay.add_account("other")
        async with aiohttp.ClientSession() as http:
            tenants = Tenants(relay, other_id, other_key, http)
            status, answer = await tenants.post("/sms", b"\x00" * 7000, "application/octet-stream")
            assert (status, answer["error"]["code"]) == (413, "event_too_large")
            status, _ = await tenants.post("/sms", b"\x00" * 5000, "application/octet-stream")
            assert status == 200
            await tenants.others_served()


@pytest.mark.parametrize(
    ("target", "path", "query", "event_type"),
    [
        ("http://relay.example/xon/{key}/sms.received?from=%2B44", "/sms.received",
         "from=%2B44", "sms.received"),
        ("HTTPS://relay.example:443/xon/{key}?type=call.ended", "", "type=call.ended",
         "call.ended"),
        ("http://user@relay.example/xon/{key}/a/b", "/a/b", "", "a/b"),
    ],
)
async def test_absolute_form_target_is_read_by_its_path(
    tenants: Tenants, caplog: pytest.LogCaptureFixture, target: str, path: str, query: str,
    event_type: str,
) -> None:
    """``POST http://host/xon/KEY/x HTTP/1.1`` is read by its path: the event's type, path
    and params, and every log line, hold no trace of the ingress key."""
    key = tenants.relay.ingress_key
    caplog.set_level(logging.DEBUG)
    status, _ = await tenants.send_raw(
        f"POST {target.format(key=key)} HTTP/1.1\r\nHost: relay.example\r\n"
        f"Content-Type: {FORM}\r\nContent-Length: 6\r\n\r\ntext=x".encode()
    )
    assert status == 200
    [event] = await tenants.stored()
    assert (event.type, event.request.path, event.request.query) == (event_type, path, query)
    assert key not in json.dumps(event.to_json())
    for formatter in (TextFormatter(), JsonFormatter()):
        for record in caplog.records:
            assert key not in formatter.format(record)
    await tenants.others_served()
