"""The fake X-on API (shared/sim/xon_api.py) on its own: answers, auth, faults, controls."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from shared.sim.xon_api import FakeXonApi, serve
from tests.helpers.relay_app import WAIT, eventually
from tests.helpers.timing import MS

KEY = "sim-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def api() -> AsyncIterator[FakeXonApi]:
    async with FakeXonApi(api_key=KEY) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_clicktocall_answers_202_with_a_call_id(
    api: FakeXonApi, http: aiohttp.ClientSession
) -> None:
    """POST /api/v1/clicktocall with destination and target → 202 {"status": "OK", "callId"}."""
    async with http.post(
        api.url + "/api/v1/clicktocall?via=q",
        data={"destination": "1", "target": "2"},
        headers=AUTH,
    ) as resp:
        assert resp.status == 202
        answer = await resp.json()
    assert answer["status"] == "OK" and answer["callId"].startswith("call-")
    (seen,) = api.requests
    assert seen.params == {"via": "q", "destination": "1", "target": "2"}
    assert (seen.query, seen.status, seen.authorization) == (
        {"via": "q"},
        202,
        AUTH["Authorization"],
    )


@pytest.mark.parametrize(
    ("path", "headers", "json_body", "status"),
    [
        ("/api/v1/sms", AUTH, {"to": "1", "message": "m"}, 202),
        ("/api/v1/sms", AUTH, {"to": "1"}, 400),
        ("/api/v1/recordedmessage", AUTH, {"destination": "1", "recording": "r"}, 202),
        ("/api/v1/conference", AUTH, {"participants": ["1", "2"]}, 202),
        ("/api/v1/statusorder", AUTH, {"event": "messages.waiting"}, 202),
        ("/api/v9/nothing", AUTH, {}, 404),
        ("/api/v1/sms", {}, {"to": "1", "message": "m"}, 401),
        ("/api/v1/sms", {"Authorization": "Bearer wrong"}, {"to": "1", "message": "m"}, 401),
    ],
)
async def test_endpoints_answer_like_xon(
    api: FakeXonApi,
    http: aiohttp.ClientSession,
    path: str,
    headers: dict[str, str],
    json_body: dict[str, object],
    status: int,
) -> None:
    """Each endpoint answers 202 with an id, 400 without its params, 401/404 as X-on would."""
    async with http.post(api.url + path, json=json_body, headers=headers) as resp:
        assert resp.status == status
        answer = await resp.json()
    assert answer["status"] == ("OK" if status == 202 else "ERROR")


async def test_faults_apply_to_the_next_n_requests(
    api: FakeXonApi, http: aiohttp.ClientSession
) -> None:
    """fail and rate_limit answer their status (with Retry-After) for count requests only."""
    api.rate_limit(9, count=1)
    api.fail(502, count=1)
    statuses = []
    for _ in range(3):
        async with http.post(
            api.url + "/api/v1/statusorder", data={"event": "e"}, headers=AUTH
        ) as resp:
            statuses.append((resp.status, resp.headers.get("Retry-After")))
    assert statuses == [(429, "9"), (502, None), (202, None)]


async def test_hold_waits_for_release(api: FakeXonApi, http: aiohttp.ClientSession) -> None:
    """A held request is answered only after release()."""
    api.hold(count=1)
    call = asyncio.create_task(
        http.post(api.url + "/api/v1/statusorder", data={"event": "e"}, headers=AUTH)
    )
    await api.wait_for_requests(1, timeout=WAIT)
    assert not call.done() and api.requests[0].status == 0
    api.release()
    async with await call as resp:
        assert resp.status == 202


async def test_control_endpoints_drive_a_standalone_server(http: aiohttp.ClientSession) -> None:
    """serve() runs the API; /_sim/faults and /_sim/requests control it over HTTP."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = asyncio.create_task(serve("127.0.0.1", port, KEY))
    url = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        try:
            async with http.get(url + "/_sim/requests", headers=AUTH) as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    try:
        await eventually(up)
        async with http.post(url + "/_sim/faults", json={"kind": "nope"}, headers=AUTH) as resp:
            assert resp.status == 400
        async with http.post(url + "/_sim/faults", json={"kind": "slow"}) as resp:
            assert resp.status == 401
        fault = {"kind": "fail", "status": 503, "count": 1, "retry_after": 2}
        async with http.post(url + "/_sim/faults", json=fault, headers=AUTH) as resp:
            assert resp.status == 201
        async with http.post(
            url + "/api/v1/sms", data={"to": "1", "message": "m"}, headers=AUTH
        ) as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (503, "2")
        async with http.delete(url + "/_sim/faults", headers=AUTH) as resp:
            assert (await resp.json()) == {"faults": 0}
        async with http.get(url + "/_sim/requests", headers=AUTH) as resp:
            (seen,) = (await resp.json())["requests"]
        assert (seen["path"], seen["params"], seen["status"]) == (
            "/api/v1/sms",
            {"to": "1", "message": "m"},
            503,
        )
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def test_slow_requests_end_when_the_server_closes(http: aiohttp.ClientSession) -> None:
    """A slowed request does not hold up close(): it ends at once."""
    api = FakeXonApi(api_key=KEY)
    await api.start()
    api.slow(3600.0)
    call = asyncio.create_task(
        http.post(api.url + "/api/v1/statusorder", data={"event": "e"}, headers=AUTH)
    )
    await api.wait_for_requests(1, timeout=WAIT)
    async with asyncio.timeout(5000 * MS):
        await api.close()
    await asyncio.gather(call, return_exceptions=True)
