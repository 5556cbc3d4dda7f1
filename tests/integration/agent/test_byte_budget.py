"""Byte budgets of the local API (docs/delivery.md, Response sizes): pages of large events end
early rather than growing, and an SSE client that never reads is dropped with the agent's
unsent bytes bounded by ``stream_buffer``, while other clients go on being served.

Real sockets on 127.0.0.1 and a real inbox file; the client that never reads is a raw socket
with a small receive buffer, so the kernel cannot hide the agent's buffering behind its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from relay_agent.inbox import Inbox
from tests.helpers.timing import MS

from .support import TOKEN, eventually, make_event
from .test_consumers import serve_api
from .test_sse import Stream

BLOB = 200_000
"""Bytes of one large event's param: 100 of them make the 20 MB page a count alone allowed."""


def large_event(n: int, size: int = BLOB) -> dict[str, Any]:
    event = make_event(n)
    event["params"] = {"n": str(n), "blob": "x" * size}
    return event


async def fill_large(inbox: Inbox, first: int, last: int, size: int = BLOB) -> None:
    await inbox.commit([(n, large_event(n, size)) for n in range(first, last + 1)])


def event_bytes(event: dict[str, Any]) -> int:
    return len(json.dumps(event, separators=(",", ":")).encode())


async def test_pages_end_at_the_byte_budget_and_always_carry_one_event(tmp_path: Path) -> None:
    """With a 500 kB budget, ``limit=100`` of 200 kB events answers 2 at a time, the next page
    goes on from there, an event larger than the budget comes alone, and named consumers are
    bounded the same way; ``limit`` still caps a page of small events."""
    async with serve_api(tmp_path, max_page_bytes=500_000) as api:
        await fill_large(api.inbox, 1, 5)
        await fill_large(api.inbox, 6, 6, size=1_200_000)  # larger than the whole budget
        await api.inbox.commit([(n, make_event(n)) for n in range(7, 12)])

        pages: list[list[str]] = []
        cursor = ""
        for _ in range(10):
            query = f"/v1/events?limit=100&after={cursor}" if cursor else "/v1/events?limit=100"
            status, body = await api.get(query)
            assert status == 200
            if not body["events"]:
                break
            pages.append([e["id"] for e in body["events"]])
            assert sum(event_bytes(e) for e in body["events"]) <= 500_000 or len(pages[-1]) == 1
            cursor = body["cursor"]
        assert pages == [["ev-1", "ev-2"], ["ev-3", "ev-4"], ["ev-5"], ["ev-6"],
                         ["ev-7", "ev-8", "ev-9", "ev-10", "ev-11"]]

        status, body = await api.get("/v1/consumers/app/events?limit=100")
        assert status == 200 and [e["id"] for e in body["events"]] == ["ev-1", "ev-2"]
        status, body = await api.get("/v1/events?limit=2&after=6")
        assert [e["id"] for e in body["events"]] == ["ev-7", "ev-8"]


async def test_a_stream_client_that_never_reads_is_dropped_within_its_buffer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """80 events of 200 kB (16 MB) to a client that never reads: the agent's unsent bytes for
    it never pass ``stream_buffer`` plus one message, it is dropped after
    ``stream_write_timeout``, and meanwhile another stream and a long-poll get every event."""
    caplog.set_level(logging.INFO, logger="relay_agent.consumers")
    buffer = 64 * 1024
    async with serve_api(tmp_path, stream_buffer=buffer, stream_write_timeout=500 * MS,
                         max_page_bytes=1024 * 1024) as api:
        host = api.url.removeprefix("http://")
        port = int(host.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET /v1/stream HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        await writer.drain()

        async with api.http.get(api.url + "/v1/stream", headers=api.headers,
                                read_bufsize=1 << 21) as response:
            await fill_large(api.inbox, 1, 80)
            got = await Stream(response).events(80)
        assert [data["id"] for _, data in got] == [f"ev-{n}" for n in range(1, 81)]

        await eventually(lambda: any(r.msg == "stream.dropped" for r in caplog.records),
                         what="the stalled stream to be dropped")
        (dropped,) = [r for r in caplog.records if r.msg == "stream.dropped"]
        largest = max(event_bytes(large_event(n)) for n in range(1, 81)) + 100  # SSE framing
        assert 0 < getattr(dropped, "peak_unsent") <= buffer + largest

        # The agent keeps serving: a long-poll after the drop gets the newest event.
        status, body = await api.get("/v1/events?after=79")
        assert status == 200 and [e["id"] for e in body["events"]] == ["ev-80"]

        # The dropped client's connection is closed (aborted: its unsent bytes are freed).
        ended = False
        for _ in range(10_000):
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 5000 * MS)
            except ConnectionResetError:
                ended = True
                break
            if not chunk:
                ended = True
                break
        assert ended
        writer.close()
