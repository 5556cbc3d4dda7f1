"""X-on ingress over real HTTP (DESIGN §Relay server endpoints, principles 1, 2 and 6)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from relay_server.services import Services
from relay_server.store.sqlite import SqliteStore
from shared.events import XonEvent
from tests.helpers.timing import MS

from .conftest import MAX_BODY, Account, create_account

Client = TestClient[web.Request, web.Application]
WAIT = 5000 * MS


async def stored(services: Services, account: Account) -> list[XonEvent]:
    return [e.event for e in await services.store.read_events(account.id, after=0, limit=1000)]


async def raw_http(client: Client, request: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as given on a fresh connection; return (status, body)."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def assert_error(resp: ClientResponse, status: int, code: str) -> None:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["code"] == code


async def test_get_query_is_stored_byte_exact(
    public: Client, services: Services, account: Account
) -> None:
    """A GET's path suffix and raw query (odd escapes included) are stored as sent."""
    query = "From=%2B44%20123&text=caf%C3%A9+ok&bad=%zz&raw=%FF&dup=1&dup=2&semi=a;b"
    request = (
        f"GET {account.path}/call.started?{query} HTTP/1.1\r\n"
        "Host: relay.test\r\nConnection: close\r\n\r\n"
    ).encode()
    status, body = await raw_http(public, request)
    assert status == 200, body
    [event] = await stored(services, account)
    assert json.loads(body) == {"id": event.id, "duplicate": False}
    assert event.request.method == "GET"
    assert event.request.path == "/call.started"
    assert event.request.query == query
    assert event.request.body == b"" and event.request.content_type == ""
    assert event.type == "call.started"
    assert event.account == account.id
    assert event.params["From"] == "+44 123"
    assert event.params["text"] == "café ok"
    assert event.params["dup"] == "1"


async def test_binary_body_is_stored_byte_exact(
    public: Client, services: Services, account: Account
) -> None:
    """A body of an unknown type is kept byte for byte, params come from the query."""
    body = bytes(range(256))
    resp = await public.post(
        account.path + "?type=blob&n=1",
        data=body,
        headers={"Content-Type": "application/octet-stream; x=1"},
    )
    assert resp.status == 200
    [event] = await stored(services, account)
    assert event.request.body == body
    assert event.request.content_type == "application/octet-stream; x=1"
    assert event.request.path == ""
    assert event.type == "blob"
    assert event.params == {"type": "blob", "n": "1"}


async def test_every_encoding_is_parsed(
    public: Client, services: Services, account: Account
) -> None:
    """Form, JSON envelope and SOAP bodies give params and types."""
    form = await public.post(
        account.path, data={"type": "sms.received", "from": "+44"}
    )  # aiohttp sends application/x-www-form-urlencoded
    envelope = await public.post(
        account.path,
        json={"event": {"id": "x-1", "type": "call.ended", "createdAt": "t", "data": {"d": 3}}},
    )
    soap = await public.post(
        account.path + "/voicemail",
        data=(
            b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
            b"<Msg><Box>12</Box></Msg></s:Body></s:Envelope>"
        ),
        headers={"Content-Type": "text/xml; charset=utf-8"},
    )
    assert [form.status, envelope.status, soap.status] == [200, 200, 200]
    first, second, third = await stored(services, account)
    assert (first.type, first.params) == ("sms.received", {"type": "sms.received", "from": "+44"})
    assert second.type == "call.ended" and second.params["data.d"] == "3"
    assert (third.type, third.params) == ("voicemail", {"Box": "12"})


async def test_duplicate_xon_id_is_stored_once(
    public: Client, services: Services, account: Account
) -> None:
    """X-on's retry with the same id answers 200 with the first event's id, duplicate=true."""
    payload = {"event": {"id": "evt-1", "type": "sms.received"}}
    first = await (await public.post(account.path, json=payload)).json()
    second = await (await public.post(account.path, json=payload)).json()
    assert first["duplicate"] is False
    assert second == {"id": first["id"], "duplicate": True}
    assert len(await stored(services, account)) == 1


async def test_identical_requests_without_id_are_two_events(
    public: Client, services: Services, account: Account
) -> None:
    """Dedup is by X-on's id only: two identical requests without one are two events."""
    for _ in range(2):
        assert (await public.get(account.path + "/ring?from=1")).status == 200
    events = await stored(services, account)
    assert len(events) == 2 and events[0].id != events[1].id
    assert events[0].id < events[1].id  # ids sort by time


async def test_unknown_ingress_key_is_404(public: Client, services: Services) -> None:
    """An unknown key answers 404 unknown_ingress_key and stores nothing."""
    await assert_error(await public.get("/xon/not-a-key/x?a=1"), 404, "unknown_ingress_key")
    await assert_error(await public.post("/xon/not-a-key", data=b"x"), 404, "unknown_ingress_key")


async def test_keys_do_not_cross_accounts(
    public: Client, admin: Client, services: Services, account: Account
) -> None:
    """Each key posts to its own account only."""
    other = await create_account(admin, "other")
    assert (await public.get(other.path + "/x")).status == 200
    assert await stored(services, account) == []
    assert [e.type for e in await stored(services, other)] == ["x"]


async def test_body_too_large_with_content_length(
    public: Client, services: Services, account: Account
) -> None:
    """A declared Content-Length over the limit is a 413; the server keeps serving."""
    resp = await public.post(account.path, data=b"x" * (MAX_BODY + 1))
    await assert_error(resp, 413, "body_too_large")
    assert (await public.post(account.path, data=b"x" * MAX_BODY)).status == 200
    assert len(await stored(services, account)) == 1


async def test_body_too_large_when_chunked(
    public: Client, services: Services, account: Account
) -> None:
    """A chunked body (no Content-Length) is cut at the limit with a 413."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 512 + 2):
            yield b"y" * 512

    resp = await public.post(account.path, data=chunks())
    await assert_error(resp, 413, "body_too_large")
    assert (await public.get(account.path + "/after")).status == 200
    assert [e.type for e in await stored(services, account)] == ["after"]


async def test_chunked_body_within_limit_is_accepted(
    public: Client, services: Services, account: Account
) -> None:
    """A chunked body under the limit is read whole."""

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(4):
            yield bytes([i]) * 100

    assert (await public.post(account.path, data=chunks())).status == 200
    [event] = await stored(services, account)
    assert event.request.body == b"".join(bytes([i]) * 100 for i in range(4))


async def test_bad_bodies_are_400_and_server_keeps_serving(
    public: Client, services: Services, account: Account
) -> None:
    """Undecodable bodies get 400 bad_body JSON errors, never a 500."""
    cases = [
        ("application/json", b"{nope"),
        ("application/json", b"[1]"),
        ("text/xml", b"<a>"),
        ("application/xml", b'<!DOCTYPE a [<!ENTITY b "c">]><a>&b;</a>'),
        ("application/x-www-form-urlencoded", b"a=%FF"),
    ]
    for content_type, body in cases:
        resp = await public.post(account.path, data=body, headers={"Content-Type": content_type})
        await assert_error(resp, 400, "bad_body")
    assert (await public.get(account.path + "/ok")).status == 200
    assert [e.type for e in await stored(services, account)] == ["ok"]


async def test_router_errors_are_json(public: Client, account: Account) -> None:
    """Unknown paths (404) and methods (405) answer the JSON error shape."""
    await assert_error(await public.get("/nowhere"), 404, "not_found")
    resp = await public.put(account.path)
    await assert_error(resp, 405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]


async def test_store_failure_is_503(public: Client, services: Services, account: Account) -> None:
    """When the store cannot commit, ingress answers 503 store_unavailable, never 2xx."""
    await services.store.close()
    await assert_error(await public.get(account.path + "/x"), 503, "store_unavailable")
    await assert_error(await public.get("/readyz"), 503, "store_unavailable")


async def test_concurrent_posts_share_commits(
    public: Client, services: Services, account: Account
) -> None:
    """Group commit: many concurrent ingress requests are committed in fewer transactions."""
    store = services.store
    assert isinstance(store, SqliteStore)
    before = store.commit_count
    count = 50
    responses = await asyncio.gather(
        *(public.get(f"{account.path}/burst?n={n}") for n in range(count))
    )
    assert [r.status for r in responses] == [200] * count
    commits = store.commit_count - before
    assert 1 <= commits < count
    assert len(await stored(services, account)) == count


async def test_health_and_readiness(public: Client, services: Services) -> None:
    """/healthz is always ok; /readyz fails once the relay drains."""
    assert await (await public.get("/healthz")).json() == {"status": "ok"}
    assert (await public.get("/readyz")).status == 200
    await services.drain()
    await assert_error(await public.get("/readyz"), 503, "draining")
    assert (await public.get("/healthz")).status == 200
