"""shared/sim: the example catalogue, the request builder, the sender and the CLI."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.sim import (
    CATALOGUE,
    ENCODINGS,
    EVENT_TYPES,
    Encoding,
    SendResult,
    build_request,
    example_params,
    plan,
    send_requests,
)
from shared.sim.cli import main
from shared.sim.demo import DemoOptions, run_demo
from shared.sim.encode import SOAP_NS
from shared.sim.procs import DemoFailed
from tests.helpers.timing import MS

PARAMS = {"from": "+447700900001", "message": 'a&b=c+d <e> "f" café ☎', "empty": ""}


# -- catalogue ---------------------------------------------------------------------------------


def test_catalogue_examples_have_the_documented_params() -> None:
    """Every example type produces exactly its documented params, unique per number."""
    assert set(EVENT_TYPES) == {"sms.received", "call.arriving", "call.ended", "messages.waiting"}
    for spec in CATALOGUE.values():
        assert tuple(example_params(spec.type, 1)) == spec.params
        assert example_params(spec.type, 1) != example_params(spec.type, 2)
    assert CATALOGUE["messages.waiting"].status
    assert not CATALOGUE["sms.received"].status


# -- build_request -----------------------------------------------------------------------------


def test_query_encoding() -> None:
    """query: GET, type as path suffix, params in the query string, no body."""
    req = build_request("sms.received", PARAMS, "query")
    assert (req.method, req.path_suffix, req.content_type, req.body) == (
        "GET",
        "/sms.received",
        "",
        b"",
    )
    assert dict(parse_qsl(req.query, keep_blank_values=True)) == PARAMS


def test_form_encoding() -> None:
    """form: POST x-www-form-urlencoded, type as path suffix."""
    req = build_request("call.ended", PARAMS, "form")
    assert (req.method, req.path_suffix, req.query) == ("POST", "/call.ended", "")
    assert req.content_type == "application/x-www-form-urlencoded"
    assert dict(parse_qsl(req.body.decode(), keep_blank_values=True)) == PARAMS


def test_json_encoding() -> None:
    """json: POST a flat JSON object with a type member, UTF-8 unescaped."""
    req = build_request("call.arriving", PARAMS, "json")
    assert (req.method, req.path_suffix, req.content_type) == ("POST", "", "application/json")
    assert json.loads(req.body) == {"type": "call.arriving", **PARAMS}
    assert "café".encode() in req.body


def test_envelope_encoding() -> None:
    """envelope: {"event": {"id", "createdAt", "type", ...params}}."""
    req = build_request(
        "sms.received", PARAMS, "envelope", event_id="x-1", created_at="2026-11-26T15:00:00.000Z"
    )
    assert json.loads(req.body) == {
        "event": {
            "id": "x-1",
            "createdAt": "2026-11-26T15:00:00.000Z",
            "type": "sms.received",
            **PARAMS,
        }
    }
    bare = build_request("sms.received", PARAMS, "envelope")
    assert json.loads(bare.body) == {"event": {"type": "sms.received", **PARAMS}}


def test_xml_encoding() -> None:
    """xml: a SOAP 1.1 envelope whose leaf elements are EventType and the params."""
    req = build_request("messages.waiting", PARAMS, "xml")
    assert (req.method, req.path_suffix) == ("POST", "")
    assert req.content_type == "text/xml; charset=utf-8"
    root = ET.fromstring(req.body)
    assert root.tag == f"{{{SOAP_NS}}}Envelope"
    leaves = {el.tag.split("}")[-1]: el.text or "" for el in root.iter() if len(el) == 0}
    assert leaves == {"EventType": "messages.waiting", **PARAMS}


@pytest.mark.parametrize(
    ("encoding", "name"),
    [
        ("json", "type"),
        ("envelope", "id"),
        ("envelope", "createdAt"),
        ("xml", "EventType"),
        ("xml", "1bad"),
        ("xml", "a b"),
        ("xml", "xmlthing"),
    ],
)
def test_reserved_or_unusable_param_names_are_refused(encoding: Encoding, name: str) -> None:
    """A param the encoding cannot carry faithfully raises ValueError instead of being lost."""
    with pytest.raises(ValueError, match="param name"):
        build_request("x", {name: "v"}, encoding)


def test_unknown_encoding_is_refused() -> None:
    """An encoding name outside ENCODINGS raises ValueError."""
    with pytest.raises(ValueError, match="unknown encoding"):
        build_request("x", {}, "yaml")  # type: ignore[arg-type]


def test_unknown_types_are_built_too() -> None:
    """Types outside the example catalogue encode fine (the relay passes them through)."""
    req = build_request("voicemail.left", {"mailbox": "200"}, "query")
    assert req.path_suffix == "/voicemail.left"


# -- plan --------------------------------------------------------------------------------------


def test_plan_defaults_to_one_of_each_pair() -> None:
    """By default plan() covers every (type, encoding) pair once, with unique bodies."""
    planned = plan(EVENT_TYPES, ENCODINGS)
    assert len(planned) == len(EVENT_TYPES) * len(ENCODINGS)
    pairs = {(p.event_type, p.encoding) for p in planned}
    assert len(pairs) == len(planned)
    keys = {(p.request.query, p.request.body) for p in planned}
    assert len(keys) == len(planned)


def test_plan_count_cycles_and_numbers() -> None:
    """--count cycles over the pairs and numbers events from `start`."""
    planned = plan(["sms.received"], ["json", "query"], 5, start=10)
    assert [p.encoding for p in planned] == ["json", "query", "json", "query", "json"]
    assert [p.n for p in planned] == [10, 11, 12, 13, 14]
    assert planned[0].params["messageId"] == "sms-000010"


def test_plan_shares_item_ids_as_a_platform_would() -> None:
    """One call's arriving and ended events carry one call id, status events repeat their
    mailbox's id, and still no two requests are alike (none is a repeat: docs/delivery.md)."""
    planned = plan(EVENT_TYPES, ENCODINGS, 40)
    by_type: dict[str, list[dict[str, str]]] = {}
    for p in planned:
        if p.encoding != "envelope":
            by_type.setdefault(p.event_type, []).append(p.params)
    arriving = {p["id"] for p in by_type["call.arriving"]}
    ended = {p["id"] for p in by_type["call.ended"]}
    assert arriving & ended
    mailbox_ids = [p["id"] for p in by_type["messages.waiting"]]
    assert len(set(mailbox_ids)) < len(mailbox_ids)
    keys = {(p.request.path_suffix, p.request.query, p.request.body) for p in planned}
    assert len(keys) == len(planned)


def test_an_envelope_carries_the_item_id_beside_its_own() -> None:
    """In an envelope the item id travels as ``itemId``: ``id`` is X-on's event id."""
    (planned,) = plan(["call.ended"], ["envelope"], start=5)
    event = json.loads(planned.request.body)["event"]
    assert event["itemId"] == "call-000005" and event["id"] != "call-000005"
    assert planned.params["itemId"] == "call-000005" and "id" not in planned.params


# -- sending over real sockets -----------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: str
    content_type: str
    body: bytes


@pytest.fixture
async def ingress() -> AsyncIterator[tuple[str, list[Seen]]]:
    """A stand-in ingress on 127.0.0.1 that records each raw request and answers like a relay.

    Answers 202 with {"id": "ev-N"}; a body containing "refuse" gets 400 bad_body.
    """
    seen: list[Seen] = []

    async def handle(request: web.Request) -> web.Response:
        path, _, query = request.raw_path.partition("?")
        body = await request.read()
        seen.append(
            Seen(request.method, path, query, request.headers.get("Content-Type", ""), body)
        )
        if b"refuse" in body:
            return web.json_response({"error": {"code": "bad_body", "message": "no"}}, status=400)
        return web.json_response({"id": f"ev-{len(seen)}"}, status=202)

    app = web.Application()
    app.router.add_route("*", "/xon/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/xon/k3y", seen
    finally:
        await server.close()


async def test_sender_puts_requests_on_the_wire_byte_exact(
    ingress: tuple[str, list[Seen]],
) -> None:
    """Method, path suffix, raw query, content type and body arrive exactly as built."""
    url, seen = ingress
    planned = plan(EVENT_TYPES, ENCODINGS)
    results = await send_requests(url, planned)
    assert [r.status for r in results] == [202] * len(planned)
    assert [r.event_id for r in results] == [f"ev-{i + 1}" for i in range(len(planned))]
    for p, s in zip(planned, seen, strict=True):
        assert s.method == p.request.method
        assert s.path == "/xon/k3y" + p.request.path_suffix
        assert s.query == p.request.query
        assert s.content_type == p.request.content_type
        assert s.body == p.request.body


async def test_sender_reports_refusals_and_results_in_order(
    ingress: tuple[str, list[Seen]],
) -> None:
    """A 4xx is a failed result with its error code; results keep plan order under concurrency."""
    url, seen = ingress
    planned = plan(["sms.received"], ["json"], 6)
    bad = planned[2].request
    planned[2] = type(planned[2])(
        n=planned[2].n,
        event_type="sms.received",
        encoding="json",
        params={},
        request=type(bad)(
            method="POST",
            path_suffix="",
            query="",
            content_type=bad.content_type,
            body=b'{"refuse": 1}',
        ),
    )
    calls: list[SendResult] = []
    results = await send_requests(url, planned, concurrency=3, rate=1000.0, on_result=calls.append)
    assert [r.planned.n for r in results] == [p.n for p in planned]
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert (results[2].status, results[2].error) == (400, "bad_body")
    assert len(calls) == 6
    assert len(seen) == 6


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_sender_does_not_retry_a_connection_failure() -> None:
    """No listener: each request fails once with no status (X-on does not retry either)."""
    url = f"http://127.0.0.1:{_closed_port()}/xon/k"
    results = await send_requests(url, plan(["call.ended"], ["form"], 2), timeout=5000 * MS)
    assert [r.status for r in results] == [None, None]
    assert all(r.error and not r.ok for r in results)


async def test_sender_rejects_bad_limits() -> None:
    """concurrency < 1 or a non-positive rate is a ValueError."""
    with pytest.raises(ValueError):
        await send_requests("http://127.0.0.1:1/xon/k", [], concurrency=0)
    with pytest.raises(ValueError):
        await send_requests("http://127.0.0.1:1/xon/k", [], rate=0)


# -- CLI ---------------------------------------------------------------------------------------


async def _run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "xon-sim"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30_000 * MS)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_send_json_summary(ingress: tuple[str, list[Seen]]) -> None:
    """`xon-sim send --all-types --encoding all --json` prints one summary object."""
    url, seen = ingress
    rc, out, _ = await _run_cli(
        "send", "--url", url, "--all-types", "--encoding", "all", "--concurrency", "4", "--json"
    )
    total = len(EVENT_TYPES) * len(ENCODINGS)
    assert rc == 0
    summary = json.loads(out)
    assert summary["sent"] == summary["ok"] == total
    assert summary["failed"] == 0
    assert sorted(summary["ids"]) == sorted(f"ev-{i + 1}" for i in range(total))
    assert len(seen) == total


async def test_cli_send_prints_one_line_per_request(ingress: tuple[str, list[Seen]]) -> None:
    """Without --json, one status line per request; --count and --type are honoured."""
    url, seen = ingress
    rc, out, _ = await _run_cli(
        "send",
        "--url",
        url,
        "--type",
        "call.ended",
        "--encoding",
        "xml",
        "--count",
        "3",
        "--rate",
        "500",
    )
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("202 call.ended xml") for line in lines)
    assert [s.content_type for s in seen] == ["text/xml; charset=utf-8"] * 3


def test_cli_send_exits_non_zero_on_failure(capsys: pytest.CaptureFixture[str]) -> None:
    """Any failed request makes the exit status 1, and the summary counts it."""
    rc = main(
        [
            "send",
            "--url",
            f"http://127.0.0.1:{_closed_port()}/xon/k",
            "--type",
            "sms.received",
            "--encoding",
            "query",
            "--json",
        ]
    )
    assert rc == 1
    assert json.loads(capsys.readouterr().out) == {"sent": 1, "ok": 0, "failed": 1, "ids": []}


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown types, encodings and counts are usage errors (exit 2)."""
    for argv in (
        ["send", "--url", "u", "--type", "nope"],
        ["send", "--url", "u", "--encoding", "yaml"],
        ["send", "--url", "u", "--count", "0"],
        ["send", "--url", "u", "--type", "sms.received", "--all-types"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_cli_catalogue_lists_every_type(capsys: pytest.CaptureFixture[str]) -> None:
    """`xon-sim catalogue` prints one line per example type."""
    assert main(["catalogue"]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in EVENT_TYPES)


async def test_demo_refuses_a_foreign_data_dir(tmp_path: Path) -> None:
    """The demo never wipes a non-empty directory it did not make."""
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DemoFailed, match="not made by the demo"):
        await run_demo(DemoOptions(data_dir=tmp_path, once=True))
    assert (tmp_path / "precious.txt").read_text() == "keep me"
