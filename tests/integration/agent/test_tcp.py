"""TCP-line targets (docs/delivery.md, TCP lines): one line per event, the next only after the
app's ack, reconnecting when the app restarts, with durable progress."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import pytest

from relay_agent.delivery.tcp import format_line, is_ack
from relay_agent.inbox import Inbox
from shared.config import TcpTarget
from tests.helpers.timing import MS

from .support import eventually, make_event
from .test_consumers import fill, serve_api

Reply = Callable[[int, dict[str, str]], bytes | None]
"""(line number, fields) → the reply line, or None to crash without answering."""


def ok(n: int, fields: dict[str, str]) -> bytes | None:
    return b"OK\r\n"


def parse(line: bytes) -> tuple[str, dict[str, str]]:
    head, _, params = line.decode("ascii").rstrip("\r\n").partition(" ")
    return unquote(head), dict(parse_qsl(params, keep_blank_values=True))


@dataclass
class LineApp:
    """A Winsock-style app: reads lines, answers each as ``reply`` says."""

    reply: Reply = ok
    port: int = 0
    lines: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    crashed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while line := await reader.readline():
                event_type, fields = parse(line)
                self.lines.append((event_type, fields))
                answer = self.reply(len(self.lines), fields)
                if answer is None:
                    assert self.server is not None
                    self.server.close()  # the app dies: its port closes too
                    self.crashed.set()
                    return
                if answer.upper().startswith((b"OK", b"ACK")):
                    self.acked.append(fields["_id"])
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def serve_app(app: LineApp) -> AsyncIterator[LineApp]:
    app.server = await asyncio.start_server(app.handle, "127.0.0.1", app.port)
    app.port = app.server.sockets[0].getsockname()[1]
    try:
        yield app
    finally:
        app.server.close()
        for writer in app.writers:  # a stopped app drops its connections too
            writer.close()
        await app.server.wait_closed()


def tcp_to(app: LineApp, **settings: Any) -> TcpTarget:
    settings = {"start": "oldest", "retry_initial": 1 * MS, "retry_max": 10 * MS,
                "timeout": 5000 * MS, **settings}
    return TcpTarget(address=f"127.0.0.1:{app.port}", name="pbx", **settings)


def test_line_format_is_type_then_form_encoded_params() -> None:
    """Type, one space, _id/_cursor/_received_at then the params, form-encoded, CRLF."""
    event = {"id": "ev 1", "type": "sms.received", "received_at": "2026-01-02T03:04:05.678Z",
             "params": {"from": "+44 7700", "message": "a&b=c\r\nnext ☎", "empty": ""}}
    assert format_line(event, 42, stale=False) == (
        b"sms.received _id=ev+1&_cursor=42&_received_at=2026-01-02T03%3A04%3A05.678Z"
        b"&from=%2B44+7700&message=a%26b%3Dc%0D%0Anext+%E2%98%8E&empty=\r\n"
    )
    stale = format_line({**event, "type": "odd type/1", "params": {}}, 7, stale=True)
    assert stale == (b"odd%20type%2F1 _id=ev+1&_cursor=7"
                     b"&_received_at=2026-01-02T03%3A04%3A05.678Z&_stale=1\r\n")


@pytest.mark.parametrize(
    ("line", "acks"),
    [(b"OK\r\n", True), (b"ok\n", True), (b"  OK  \r\n", True), (b"ACK 7\r\n", True),
     (b"ack 7\n", True), (b"ACK 8\r\n", False), (b"ACK\r\n", False), (b"ERR busy\r\n", False),
     (b"OK 7\r\n", False), (b"\r\n", False), (b"NOPE\r\n", False)],
)
def test_ack_lines(line: bytes, acks: bool) -> None:
    """OK, or ACK with the cursor just sent, acknowledges; anything else does not."""
    assert is_ack(line, 7) is acks


async def test_app_restarting_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """The app dies before acking the 4th line and comes back: every event is acked once,
    in order, and the unacked one is simply sent again."""
    first = LineApp(reply=lambda n, fields: None if n == 4 else b"OK\r\n")
    async with serve_app(first):
        async with serve_api(tmp_path, tcp=[tcp_to(first)]) as api:
            await fill(api.inbox, 1, 6)
            await asyncio.wait_for(first.crashed.wait(), 5000 * MS)
            second = LineApp(port=first.port)
            async with serve_app(second):
                await eventually(lambda: len(second.acked) == 3, what="the rest acked")
                _, health = await api.get("/v1/health")
    assert first.acked + second.acked == [f"ev-{n}" for n in range(1, 7)]
    assert [fields["_id"] for _, fields in first.lines] == ["ev-1", "ev-2", "ev-3", "ev-4"]
    assert [fields["_cursor"] for _, fields in second.lines] == ["4", "5", "6"]
    [entry] = health["tcp"]
    assert (entry["name"], entry["cursor"], entry["lag"], entry["connected"]) == (
        "pbx", "6", 0, True)


async def test_lines_carry_the_event(tmp_path: Path) -> None:
    """The app can read the type, the params and the agent's _id/_cursor/_received_at."""
    app = LineApp(reply=lambda n, fields: f"ACK {fields['_cursor']}\r\n".encode())
    async with serve_app(app), serve_api(tmp_path, tcp=[tcp_to(app)]) as api:
        await fill(api.inbox, 1, 2)
        await eventually(lambda: len(app.acked) == 2, what="2 events acked")
    event = make_event(2)
    assert app.lines[1] == ("sms.received", {
        "_id": "ev-2", "_cursor": "2", "_received_at": event["received_at"], "n": "2"})


async def test_a_wrong_ack_makes_the_agent_reconnect_and_resend(tmp_path: Path) -> None:
    """An answer that is not an ack for this line means "not taken": the line comes again."""
    app = LineApp(reply=lambda n, fields: b"ERR busy\r\n" if n == 1 else b"OK\r\n")
    async with serve_app(app), serve_api(tmp_path, tcp=[tcp_to(app)]) as api:
        await fill(api.inbox, 1, 2)
        await eventually(lambda: len(app.acked) == 2, what="2 events acked")
    assert [fields["_id"] for _, fields in app.lines] == ["ev-1", "ev-1", "ev-2"]
    assert app.acked == ["ev-1", "ev-2"]


async def test_app_restarting_between_events_gets_the_next_one(tmp_path: Path) -> None:
    """A connection the app closed while idle is noticed on the next line and reopened."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        first = LineApp(port=probe.getsockname()[1])
    async with serve_api(tmp_path, tcp=[tcp_to(first)]) as api:
        async with serve_app(first):
            await fill(api.inbox, 1, 1)
            await eventually(lambda: len(first.acked) == 1, what="the first event")
        second = LineApp(port=first.port)
        async with serve_app(second):
            await fill(api.inbox, 2, 2)
            await eventually(lambda: len(second.acked) == 1, what="the second event")
    assert first.acked + second.acked == ["ev-1", "ev-2"]


async def test_tcp_progress_survives_an_agent_restart(tmp_path: Path) -> None:
    """A restarted agent goes on after the last acked line, with events that came meanwhile."""
    app = LineApp()
    async with serve_app(app):
        async with serve_api(tmp_path, tcp=[tcp_to(app)]) as api:
            await fill(api.inbox, 1, 1)
            await eventually(lambda: len(app.acked) == 1, what="the first event")
        inbox = await Inbox.open(tmp_path / "inbox.db")
        await fill(inbox, 2, 3)  # committed while the agent was stopped
        await inbox.close()
        async with serve_api(tmp_path, tcp=[tcp_to(app, start="latest")]) as api:
            await eventually(lambda: len(app.acked) == 3, what="the events of the pause")
            await fill(api.inbox, 4, 4)
            await eventually(lambda: len(app.acked) == 4, what="the fourth event")
    assert app.acked == ["ev-1", "ev-2", "ev-3", "ev-4"]
    assert len(app.lines) == 4
