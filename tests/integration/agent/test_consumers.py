"""Named consumers (DESIGN §Agent local API; docs/delivery.md): the agent keeps each consumer's
cursor, hands unacked events out again, and never skips past retention silently."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from relay_agent import consumers
from relay_agent.delivery import Delivery
from relay_agent.inbox import Inbox
from relay_agent.link import LinkStatus
from relay_agent.local_api import create_local_app
from shared.config import AgentConfig
from tests.helpers.timing import MS

from .support import TOKEN, LocalApi, make_event


@asynccontextmanager
async def serve_api(
    tmp_path: Path, *, inbox: Inbox | None = None, start: bool = True, **settings: Any
) -> AsyncIterator[LocalApi]:
    """The local API with a :class:`Delivery` built from ``settings`` (AgentConfig fields),
    on a real socket; its inbox is ``tmp_path/inbox.db`` unless one is given (and kept open)."""
    own = inbox is None
    box = inbox if inbox is not None else await Inbox.open(tmp_path / "inbox.db")
    config = AgentConfig(relay_url="https://relay.example", agent_id="agent-1",
                         data_dir=tmp_path, max_wait=5000 * MS, **settings)
    delivery = Delivery(config, box)
    status = LinkStatus()
    app = create_local_app(config=config, inbox=box, link_status=status, token=TOKEN,
                           delivery=delivery)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        if start:
            await delivery.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            yield LocalApi(f"http://127.0.0.1:{port}", http, box, status,
                           {"Authorization": f"Bearer {TOKEN}"})
    finally:
        await delivery.close()
        await runner.cleanup()
        if own:
            await box.close()


async def fill(inbox: Inbox, first: int, last: int) -> None:
    await inbox.commit([(n, make_event(n)) for n in range(first, last + 1)])


async def post(api: LocalApi, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with api.http.post(api.url + path, json=body, headers=api.headers) as response:
        return response.status, await response.json()


def ids(body: dict[str, Any]) -> list[str]:
    return [event["id"] for event in body["events"]]


async def test_unacked_events_are_handed_out_again(tmp_path: Path) -> None:
    """Without an ack the consumer gets the same events; after it, the next ones."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 5)
        status, first = await api.get("/v1/consumers/crm/events?limit=3")
        assert status == 200
        assert ids(first) == ["ev-1", "ev-2", "ev-3"]
        assert first["consumer"] == "crm"
        _, again = await api.get("/v1/consumers/crm/events?limit=3")
        assert ids(again) == ids(first)
        status, acked = await post(api, "/v1/consumers/crm/ack", {"cursor": first["cursor"]})
        assert (status, acked) == (200, {"consumer": "crm", "cursor": first["cursor"]})
        _, rest = await api.get("/v1/consumers/crm/events")
        assert ids(rest) == ["ev-4", "ev-5"]


async def test_two_consumers_are_independent(tmp_path: Path) -> None:
    """One consumer's acks do not move another's cursor."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 4)
        _, a = await api.get("/v1/consumers/a/events")
        await post(api, "/v1/consumers/a/ack", {"cursor": a["cursor"]})
        _, a_after = await api.get("/v1/consumers/a/events")
        _, b = await api.get("/v1/consumers/b/events?limit=2")
        assert ids(a_after) == []
        assert a_after["cursor"] == a["cursor"]
        assert ids(b) == ["ev-1", "ev-2"]
        await post(api, "/v1/consumers/b/ack", {"cursor": int(b["cursor"])})
        _, b_after = await api.get("/v1/consumers/b/events")
        assert ids(b_after) == ["ev-3", "ev-4"]


async def test_consumer_cursor_survives_an_agent_restart(tmp_path: Path) -> None:
    """The cursor lives in the inbox database: a new agent process continues after it."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 3)
        _, body = await api.get("/v1/consumers/crm/events?limit=2")
        await post(api, "/v1/consumers/crm/ack", {"cursor": body["cursor"]})
    async with serve_api(tmp_path) as api:
        _, body = await api.get("/v1/consumers/crm/events")
        assert ids(body) == ["ev-3"]


async def test_consumer_long_poll_returns_when_an_event_arrives(tmp_path: Path) -> None:
    """wait=S holds an empty answer until the next commit."""
    async with serve_api(tmp_path) as api:
        poll = asyncio.create_task(api.get("/v1/consumers/crm/events?wait=5"))
        for _ in range(50):  # let the poll reach its wait: the consumer exists from then on
            if await api.inbox.position("consumer:crm") is not None:
                break
            await asyncio.sleep(10 * MS)
        await fill(api.inbox, 1, 1)
        status, body = await asyncio.wait_for(poll, 5000 * MS)
        assert status == 200
        assert ids(body) == ["ev-1"]


async def test_consumer_behind_retention_gets_410_until_it_acks_past_the_gap(
    tmp_path: Path,
) -> None:
    """Events pruned before a consumer acked them are reported, never skipped silently."""
    inbox = await Inbox.open(tmp_path / "inbox.db", max_events=3)
    try:
        async with serve_api(tmp_path, inbox=inbox) as api:
            await fill(inbox, 1, 1)
            await api.get("/v1/consumers/slow/events")  # the consumer starts at cursor 0
            await fill(inbox, 2, 6)  # retention keeps 4..6: 1..3 are gone
            status, body = await api.get("/v1/consumers/slow/events")
            assert status == 410
            assert body["error"]["code"] == "cursor_expired"
            assert "ack cursor 3" in body["error"]["message"]
            status, _ = await post(api, "/v1/consumers/slow/ack", {"cursor": "3"})
            assert status == 200
            _, body = await api.get("/v1/consumers/slow/events")
            assert ids(body) == ["ev-4", "ev-5", "ev-6"]
    finally:
        await inbox.close()


async def test_a_late_lower_ack_does_not_move_the_cursor_back(tmp_path: Path) -> None:
    """Acks are cumulative: the answer names the cursor actually stored."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 3)
        await post(api, "/v1/consumers/crm/ack", {"cursor": "3"})
        status, body = await post(api, "/v1/consumers/crm/ack", {"cursor": "1"})
        assert (status, body["cursor"]) == (200, "3")


async def test_bad_acks_are_refused(tmp_path: Path) -> None:
    """A cursor from the future, a malformed cursor or body, or a bad name gets 400."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 2)
        for body, code in [({"cursor": "9"}, "bad_cursor"), ({"cursor": "x"}, "bad_cursor"),
                           ({"cursor": True}, "bad_cursor"), ({"cursor": -1}, "bad_cursor"),
                           ({}, "bad_json"), ([], "bad_json")]:
            status, answer = await post(api, "/v1/consumers/crm/ack", body)
            assert (status, answer["error"]["code"]) == (400, code), body
        async with api.http.post(api.url + "/v1/consumers/crm/ack", data=b"{",
                                 headers=api.headers) as response:
            assert response.status == 400
        status, answer = await api.get("/v1/consumers/bad%20name/events")
        assert (status, answer["error"]["code"]) == (400, "bad_consumer_name")
        status, answer = await api.get("/v1/consumers/crm/events?limit=0")
        assert (status, answer["error"]["code"]) == (400, "bad_limit")
        status, answer = await api.get("/v1/consumers/crm/events?wait=nan")
        assert (status, answer["error"]["code"]) == (400, "bad_wait")


async def test_consumers_are_listed_with_their_lag_in_health(tmp_path: Path) -> None:
    """/v1/consumers and /v1/health show each consumer's cursor and how far behind it is."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 5)
        await post(api, "/v1/consumers/crm/ack", {"cursor": "2"})
        await api.get("/v1/consumers/fresh/events")
        expected = [{"name": "crm", "cursor": "2", "lag": 3},
                    {"name": "fresh", "cursor": "0", "lag": 5}]
        _, listed = await api.get("/v1/consumers")
        assert listed == {"consumers": expected}
        _, health = await api.get("/v1/health")
        assert health["consumers"] == expected


async def test_deleted_consumer_starts_over(tmp_path: Path) -> None:
    """DELETE forgets a consumer; an unknown one answers 404."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 2)
        await post(api, "/v1/consumers/crm/ack", {"cursor": "2"})
        async with api.http.delete(api.url + "/v1/consumers/crm",
                                   headers=api.headers) as response:
            assert response.status == 204
        _, body = await api.get("/v1/consumers/crm/events")
        assert ids(body) == ["ev-1", "ev-2"]
        async with api.http.delete(api.url + "/v1/consumers/nobody",
                                   headers=api.headers) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "unknown_consumer"


async def test_consumer_count_is_bounded(tmp_path: Path) -> None:
    """Beyond MAX_CONSUMERS names a new consumer gets 409; existing ones keep working."""
    async with serve_api(tmp_path) as api:
        for n in range(consumers.MAX_CONSUMERS):
            await api.inbox.init_position(f"consumer:c{n}", 0)
        status, body = await api.get("/v1/consumers/one-more/events")
        assert (status, body["error"]["code"]) == (409, "too_many_consumers")
        status, _ = await api.get("/v1/consumers/c0/events")
        assert status == 200


async def test_consumer_endpoints_need_the_token(tmp_path: Path) -> None:
    """Consumers sit behind the same guard as every other endpoint."""
    async with serve_api(tmp_path) as api:
        async with api.http.get(api.url + "/v1/consumers/crm/events") as response:
            assert response.status == 401
        async with api.http.post(api.url + "/v1/consumers/crm/ack",
                                 json={"cursor": "0"}) as response:
            assert response.status == 401
        assert await api.inbox.position("consumer:crm") is None
