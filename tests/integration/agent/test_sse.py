"""``GET /v1/stream`` (DESIGN §Agent local API; docs/delivery.md, SSE): events with their cursor
as id, resumable with Last-Event-ID, and a comment heartbeat while idle."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.timing import MS

from .support import LocalApi, eventually
from .test_consumers import fill, serve_api

LIMIT = 5000 * MS


class Stream:
    """Reads an SSE response one block (lines up to a blank line) at a time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def block(self) -> list[str]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), LIMIT)
            assert raw, "the stream ended"
            line = raw.decode().rstrip("\n")
            if line == "":
                if lines:
                    return lines
                continue
            lines.append(line)

    async def event(self) -> tuple[str, dict[str, Any]]:
        """The next event's id and data, skipping comment blocks."""
        for _ in range(100):
            lines = await self.block()
            if all(line.startswith(":") for line in lines):
                continue
            fields = dict(line.split(": ", 1) for line in lines)
            return fields["id"], json.loads(fields["data"])
        raise AssertionError("no event within 100 blocks")

    async def events(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        return [await self.event() for _ in range(count)]


async def open_stream(api: LocalApi, query: str = "", **headers: str) -> aiohttp.ClientResponse:
    return await api.http.get(api.url + "/v1/stream" + query,
                              headers={**api.headers, **headers})


async def test_stream_sends_each_event_with_its_cursor_as_id(tmp_path: Path) -> None:
    """Events already stored, then events committed later, arrive in order."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 2)
        async with await open_stream(api) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            assert response.headers["Cache-Control"] == "no-store"
            stream = Stream(response)
            first = await stream.events(2)
            await fill(api.inbox, 3, 4)
            later = await stream.events(2)
    got = first + later
    assert [event_id for event_id, _ in got] == ["1", "2", "3", "4"]
    assert [data["id"] for _, data in got] == ["ev-1", "ev-2", "ev-3", "ev-4"]
    assert all(data["cursor"] == event_id for event_id, data in got)


async def test_stream_resumes_after_last_event_id(tmp_path: Path) -> None:
    """A reconnect with Last-Event-ID continues right after that event."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 3)
        async with await open_stream(api) as response:
            last_id, _ = (await Stream(response).events(2))[-1]
        await fill(api.inbox, 4, 5)
        async with await open_stream(api, **{"Last-Event-ID": last_id}) as response:
            resumed = await Stream(response).events(3)
    assert [data["id"] for _, data in resumed] == ["ev-3", "ev-4", "ev-5"]


async def test_last_event_id_wins_over_after(tmp_path: Path) -> None:
    """?after= starts a stream; a browser's Last-Event-ID on reconnect takes precedence."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 4)
        async with await open_stream(api, "?after=2") as response:
            assert [i for i, _ in await Stream(response).events(2)] == ["3", "4"]
        async with await open_stream(api, "?after=1", **{"Last-Event-ID": "3"}) as response:
            assert [i for i, _ in await Stream(response).events(1)] == ["4"]


async def test_idle_stream_carries_comment_heartbeats(tmp_path: Path) -> None:
    """With nothing to send, a comment line goes out every sse_heartbeat seconds."""
    async with serve_api(tmp_path, sse_heartbeat=20 * MS) as api:
        async with await open_stream(api) as response:
            stream = Stream(response)
            blocks = [await stream.block() for _ in range(3)]
            await fill(api.inbox, 1, 1)
            event_id, data = await stream.event()
    assert blocks[0][0].startswith(":")  # the opening comment
    assert blocks[1] == [": heartbeat"]
    assert blocks[2] == [": heartbeat"]
    assert (event_id, data["id"]) == ("1", "ev-1")


async def test_bad_or_future_stream_cursors_get_400(tmp_path: Path) -> None:
    """A Last-Event-ID or after that this inbox never issued is refused before streaming."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 1)
        for query, headers in [("", {"Last-Event-ID": "abc"}), ("?after=7", {}),
                               ("", {"Last-Event-ID": "99"})]:
            async with await open_stream(api, query, **headers) as response:
                assert response.status == 400
                assert (await response.json())["error"]["code"] == "bad_cursor"


async def test_stream_behind_retention_gets_410(tmp_path: Path) -> None:
    """Resuming from a pruned cursor is refused with 410, not silently moved forward."""
    async with serve_api(tmp_path) as api:
        await fill(api.inbox, 1, 3)
        api.inbox.max_events = 1
        await api.inbox.prune()
        async with await open_stream(api, **{"Last-Event-ID": "1"}) as response:
            assert response.status == 410
            assert (await response.json())["error"]["code"] == "cursor_expired"


async def test_open_stream_ends_when_the_agent_stops(tmp_path: Path) -> None:
    """Shutdown (which releases the inbox's waiters) ends a waiting stream cleanly."""
    async with serve_api(tmp_path, sse_heartbeat=5000 * MS) as api:
        async with await open_stream(api) as response:
            await Stream(response).block()
            api.inbox.release_waiters()  # what the local API's on_shutdown does
            rest = await asyncio.wait_for(response.content.read(), LIMIT)
    assert b"data:" not in rest


async def test_a_vanished_client_is_noticed_and_frees_its_slot(tmp_path: Path) -> None:
    """The heartbeat write fails once the client is gone, which ends the stream and frees
    the token's waiting slot for a new stream."""
    async with serve_api(tmp_path, sse_heartbeat=10 * MS, max_waiters=1) as api:
        async with await open_stream(api) as response:
            await Stream(response).block()
        statuses: list[int] = []

        async def reopened() -> bool:
            async with await open_stream(api) as again:
                statuses.append(again.status)
                return again.status == 200
        await eventually(reopened, what="a second stream accepted")
    assert set(statuses) <= {429, 200}, statuses
