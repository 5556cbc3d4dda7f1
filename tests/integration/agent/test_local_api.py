"""The agent's local API (DESIGN §Agent local API) on a real 127.0.0.1 socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay_agent.inbox import Inbox
from relay_agent.link import LinkState, LinkStatus
from relay_agent.local_api import create_local_app
from shared.config import AgentConfig
from tests.helpers.timing import MS

from .support import LocalApi, make_event


async def _fill(api: LocalApi, count: int) -> None:
    await api.inbox.commit([(n, make_event(n)) for n in range(1, count + 1)])


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic local-test-token"},
     {"Authorization": "Bearer"}],
    ids=["missing", "wrong", "other-scheme", "empty"],
)
async def test_requests_without_the_token_get_401(
    local_api: LocalApi, headers: dict[str, str]
) -> None:
    """Every request needs the local bearer token; otherwise 401 with a JSON error."""
    async with local_api.http.get(local_api.url + "/v1/events", headers=headers) as response:
        assert response.status == 401
        body = await response.json()
        assert body["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.2", "", "[::2]"])
async def test_foreign_host_header_gets_403(local_api: LocalApi, host: str) -> None:
    """DNS-rebinding defence: a Host that is not a loopback name is refused."""
    status, body = await local_api.get("/v1/health", headers={"Host": host})
    assert status == 403
    assert body["error"]["code"] == "bad_host"


async def test_events_come_in_order_each_once_by_cursor(local_api: LocalApi) -> None:
    """Paging with the returned cursor yields every event once, oldest first."""
    await _fill(local_api, 7)
    seen: list[str] = []
    cursor = ""
    for _ in range(10):
        status, body = await local_api.get(f"/v1/events?after={cursor}&limit=3")
        assert status == 200
        if not body["events"]:
            assert body["cursor"] == cursor
            break
        seen += [e["id"] for e in body["events"]]
        assert body["cursor"] == body["events"][-1]["cursor"]
        cursor = body["cursor"]
    assert seen == [f"ev-{n}" for n in range(1, 8)]


async def test_event_objects_carry_a_cursor_and_the_raw_request(local_api: LocalApi) -> None:
    """Each event is the relay's event object plus an opaque string cursor."""
    await _fill(local_api, 1)
    _, body = await local_api.get("/v1/events")
    event = body["events"][0]
    assert event == {**make_event(1), "cursor": event["cursor"]}
    assert isinstance(event["cursor"], str)


async def test_limit_defaults_to_100_and_caps_the_page(local_api: LocalApi) -> None:
    """Without a limit at most 100 events come back; limit=N returns N."""
    await _fill(local_api, 105)
    _, body = await local_api.get("/v1/events")
    assert len(body["events"]) == 100
    _, body = await local_api.get("/v1/events?limit=1000")
    assert len(body["events"]) == 105
    _, body = await local_api.get("/v1/events?limit=2")
    assert [e["id"] for e in body["events"]] == ["ev-1", "ev-2"]


async def test_empty_inbox_answers_with_no_events(local_api: LocalApi) -> None:
    """Nothing to read, no wait: an empty list and an empty cursor."""
    status, body = await local_api.get("/v1/events")
    assert (status, body) == (200, {"events": [], "cursor": ""})


async def test_long_poll_returns_as_soon_as_an_event_lands(local_api: LocalApi) -> None:
    """wait=S holds the request until a commit, then answers with the new event."""
    await _fill(local_api, 1)
    _, body = await local_api.get("/v1/events")
    cursor = body["cursor"]
    poll = asyncio.create_task(local_api.get(f"/v1/events?after={cursor}&wait=5"))
    await asyncio.sleep(20 * MS)
    assert not poll.done()
    await local_api.inbox.commit([(2, make_event(2))])
    status, body = await asyncio.wait_for(poll, 2000 * MS)
    assert status == 200
    assert [e["id"] for e in body["events"]] == ["ev-2"]


async def test_long_poll_times_out_with_the_given_cursor(local_api: LocalApi) -> None:
    """When nothing arrives within wait, the answer is empty and keeps the cursor."""
    await _fill(local_api, 1)
    _, body = await local_api.get("/v1/events")
    cursor = body["cursor"]
    status, body = await local_api.get(f"/v1/events?after={cursor}&wait={20 * MS}")
    assert (status, body) == (200, {"events": [], "cursor": cursor})


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("after=abc", "bad_cursor"),
        ("after=-1", "bad_cursor"),
        ("after=99", "bad_cursor"),
        ("after=99999999999999999999999", "bad_cursor"),
        ("limit=0", "bad_limit"),
        ("limit=1001", "bad_limit"),
        ("limit=ten", "bad_limit"),
        ("wait=-1", "bad_wait"),
        ("wait=nan", "bad_wait"),
        ("wait=inf", "bad_wait"),
        ("wait=soon", "bad_wait"),
    ],
)
async def test_bad_parameters_get_400(local_api: LocalApi, query: str, code: str) -> None:
    """Malformed or out-of-range parameters are clear 400s, never a 500."""
    await _fill(local_api, 2)
    status, body = await local_api.get(f"/v1/events?{query}")
    assert status == 400
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_cursor_behind_retention_gets_410(tmp_path: Path) -> None:
    """A reader who fell behind retention learns it (410 cursor_expired), never a silent skip."""
    box = await Inbox.open(tmp_path / "box.db", max_events=2)
    config = AgentConfig(relay_url="https://relay.example", data_dir=tmp_path)
    app = create_local_app(config=config, inbox=box, link_status=LinkStatus(), token="t")
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/events"
    try:
        await box.commit([(n, make_event(n)) for n in range(1, 6)])
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as http:
            async with http.get(url, params={"after": "1"}) as response:
                assert response.status == 410
                error = (await response.json())["error"]
            async with http.get(url, params={"after": str(box.pruned_cursor)}) as response:
                ids = [e["id"] for e in (await response.json())["events"]]
        assert error["code"] == "cursor_expired"
        assert f"oldest available cursor is {box.pruned_cursor}" in error["message"]
        assert ids == ["ev-4", "ev-5"]
    finally:
        await runner.cleanup()
        await box.close()


async def test_health_reports_link_and_inbox(local_api: LocalApi) -> None:
    """GET /v1/health: link state, relay, agent id and the inbox counters."""
    await _fill(local_api, 3)
    local_api.status.state = LinkState.CONNECTED
    local_api.status.connected_since = 1_700_000_000.0
    status, body = await local_api.get("/v1/health")
    assert status == 200
    assert body["link"] == "connected"
    assert body["connected_since"] == "2023-11-14T22:13:20.000Z"
    assert body["last_event_at"] is None
    assert body["relay_url"] == "https://relay.example"
    assert body["agent_id"] == "agent-1"
    assert body["inbox"]["events"] == 3 and body["inbox"]["last_seq"] == 3
    assert body["inbox"]["last_cursor"] == (await local_api.inbox.read(None, 10))[-1].to_json()[
        "cursor"
    ]


async def test_unknown_paths_and_methods_get_json_errors(local_api: LocalApi) -> None:
    """404 and 405 use the same JSON error shape."""
    status, body = await local_api.get("/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    async with local_api.http.post(local_api.url + "/v1/events",
                                   headers=local_api.headers) as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
