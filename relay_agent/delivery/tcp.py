"""TCP lines: one line per event to a local socket, for Winsock-style clients
(docs/delivery.md, TCP lines, is the reference for the format).

The agent connects to the app (``[[tcp]] address = "127.0.0.1:5000"``) and, per event, writes::

    <type> <params>\\r\\n

``<type>`` is the event type percent-encoded (RFC 3986 unreserved characters stay as they are,
so ``sms.received`` is unchanged); ``<params>`` is ``application/x-www-form-urlencoded`` UTF-8
(space as ``+``), starting with the agent's own ``_id`` (event id), ``_cursor``,
``_received_at`` and, for a stale event, ``_stale=1`` (``_withheld=REASON`` for a stand-in),
then the event's params in their order.
The line is plain ASCII and holds no raw space, CR or LF other than the one separator and the
terminator.

The app answers each line with one line, ``OK`` or ``ACK <cursor>`` (the ``_cursor`` of the
line just sent; case-insensitive, LF or CRLF, surrounding spaces ignored). Only then does the
next line go out. Anything else, silence for ``timeout`` seconds, or a closed connection makes
the agent drop the connection, reconnect with back-off and send the same event again: the app
sees each event at least once and can drop a repeat by ``_id``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

from shared.config import TcpTarget, parse_hostport
from shared.errors import UpstreamError, UpstreamTimeout

from ..inbox import Inbox, InboxEvent
from .base import PushTarget, Sleep, StalePolicy

__all__ = ["TcpSender", "format_line", "is_ack", "MAX_ACK_LINE"]

MAX_ACK_LINE = 1024
"""Longest ack line accepted, in bytes; a longer one is a protocol error of the app."""


def format_line(event: Mapping[str, Any], cursor: int, *, stale: bool) -> bytes:
    """The line for one event, CRLF included."""
    fields: list[tuple[str, str]] = [
        ("_id", str(event.get("id", ""))),
        ("_cursor", str(cursor)),
        ("_received_at", str(event.get("received_at", ""))),
    ]
    if stale:
        fields.append(("_stale", "1"))
    withheld = event.get("withheld")
    if isinstance(withheld, Mapping):  # docs/delivery.md, Withheld events
        fields.append(("_withheld", str(withheld.get("reason", ""))))
    params = event.get("params")
    if isinstance(params, Mapping):
        fields += [(str(name), str(value)) for name, value in params.items()]
    event_type = quote(str(event.get("type", "")), safe="")
    return f"{event_type} {urlencode(fields)}\r\n".encode("ascii")


def is_ack(line: bytes, cursor: int) -> bool:
    """Whether ``line`` acknowledges the event sent with ``_cursor=cursor``."""
    words = line.decode("ascii", "replace").split()
    if len(words) == 1:
        return words[0].upper() == "OK"
    return len(words) == 2 and words[0].upper() == "ACK" and words[1] == str(cursor)


class TcpSender(PushTarget):
    """One ``[[tcp]]`` target: a connection kept open between events, reopened on failure."""

    kind: ClassVar[str] = "tcp"

    def __init__(
        self, target: TcpTarget, *, inbox: Inbox, stale: StalePolicy,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            key=target.key, types=target.types, start=target.start,
            retry_initial=target.retry_initial, retry_max=target.retry_max,
            inbox=inbox, stale=stale, sleep=sleep,
        )
        self.target = target
        self._host, self._port = parse_hostport(target.address, what="tcp address")
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.status.connected = False

    def report(self) -> dict[str, Any]:
        return {**super().report(), "address": self.target.address,
                "connected": self.status.connected}

    async def close(self) -> None:
        await self._disconnect()

    async def deliver(self, item: InboxEvent, stale: bool) -> None:
        line = format_line(item.event, item.cursor, stale=stale)
        reader, writer = await self._connect()
        try:
            async with asyncio.timeout(self.target.timeout):
                writer.write(line)
                await writer.drain()
                reply = await reader.readline()
        except TimeoutError as exc:
            await self._disconnect()
            raise UpstreamTimeout(
                f"no ack from {self.target.address} within {self.target.timeout:g} s"
            ) from exc
        except (OSError, ValueError) as exc:  # ValueError: an ack line over MAX_ACK_LINE
            await self._disconnect()
            raise UpstreamError(f"{self.target.address}: {type(exc).__name__}: {exc}") from exc
        if not reply.endswith(b"\n"):
            await self._disconnect()
            raise UpstreamError(f"{self.target.address} closed the connection before the ack")
        if not is_ack(reply, item.cursor):
            await self._disconnect()
            # The reply is the app's, not an event body: a short prefix helps whoever debugs it.
            raise UpstreamError(f"{self.target.address} answered {reply[:40]!r}, not an ack")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is not None:
            return self._streams
        try:
            async with asyncio.timeout(self.target.timeout):
                self._streams = await asyncio.open_connection(
                    self._host, self._port, limit=MAX_ACK_LINE
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.target.address}: {exc}") from exc
        self.status.connected = True
        self.log.info("tcp.connected", extra={"address": self.target.address})
        return self._streams

    async def _disconnect(self) -> None:
        streams, self._streams = self._streams, None
        if streams is None:
            return
        self.status.connected = False
        writer = streams[1]
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # already reset by the app: closed either way
        self.log.info("tcp.disconnected", extra={"address": self.target.address})
