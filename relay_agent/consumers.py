"""Pull-side delivery modes of the local API: named consumers and the SSE stream
(DESIGN §Agent local API; docs/delivery.md is the reference).

**Named consumers.** ``GET /v1/consumers/{name}/events`` hands out the events after the
consumer's stored cursor; ``POST /v1/consumers/{name}/ack`` moves that cursor. Until the app
acks, the same events are handed out again (DESIGN principle 1: "a local app's cursor moves
only when the app asks"). Each consumer has its own cursor in the inbox database, so consumers
are independent and survive restarts. When retention deleted events a consumer had not acked,
it gets 410 ``cursor_expired`` until it acks past the gap: never a silent skip.

**SSE.** ``GET /v1/stream`` is a ``text/event-stream``: one message per event, ``id`` = its
cursor, ``data`` = the event object. A client resumes with ``Last-Event-ID`` (browsers send it
on reconnect) or ``?after=``. An idle stream carries a comment line every ``sse_heartbeat``
seconds so that proxies keep it open and a dead peer is noticed. Memory per client is bounded
in bytes (docs/delivery.md, Response sizes): the stream reads one page of events at a time
(``max_page_bytes``), writes them one message at a time, and once its socket's buffer holds
more than ``stream_buffer`` bytes it waits for the client to read; a client that does not
within ``stream_write_timeout`` seconds is dropped (it can resume).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from typing import Any

from aiohttp import web

from shared.errors import ApiError

from . import security
from .delivery import CONSUMER_PREFIX, Delivery, delivery_key
from .inbox import CursorExpired, Inbox, InboxEvent

__all__ = ["routes", "MAX_CONSUMERS", "PAGE", "sse_message"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_CONSUMERS = 64
"""Named consumers one agent keeps; a new name beyond this gets 409 (delete unused ones)."""
PAGE = 100
"""Events read (and written) at a time on a stream."""
_DEFAULT_LIMIT = 100
_MAX_LIMIT = 1000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CURSOR = re.compile(r"[0-9]{1,19}")


# -- parameters ----------------------------------------------------------------------------------


def _consumer_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not _NAME.fullmatch(name):
        raise ApiError(400, "bad_consumer_name",
                       "a consumer name is 1 to 64 letters, digits, '_', '.' or '-'")
    return name


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "")
    if raw == "":
        return _DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_LIMIT:
        raise ApiError(400, "bad_limit", f"limit must be an integer from 1 to {_MAX_LIMIT}")
    return int(raw)


def _wait(request: web.Request, max_wait: float) -> float:
    raw = request.query.get("wait", "")
    try:
        wait = float(raw) if raw else 0.0
    except ValueError:
        wait = math.nan
    if not math.isfinite(wait) or wait < 0:
        raise ApiError(400, "bad_wait", "wait must be a number of seconds, 0 or more")
    return min(wait, max_wait)  # longer waits are clamped: the app simply polls again


def _cursor(value: Any, what: str, inbox: Inbox) -> int:
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if not _CURSOR.fullmatch(text):
        raise ApiError(400, "bad_cursor", f"{what} must be a cursor returned by this API")
    cursor = int(text)
    if cursor > inbox.last_cursor:
        # A cursor from the future (another inbox, a wiped one) would silently skip events.
        raise ApiError(400, "bad_cursor",
                       f"cursor {cursor} is beyond the newest event ({inbox.last_cursor})")
    return cursor


def _behind(name: str, cursor: int, oldest: int) -> ApiError:
    return ApiError(
        410, "cursor_expired",
        f"consumer {name!r} is behind retention: the events after cursor {cursor} up to "
        f"{oldest} were pruned before it acked them; ack cursor {oldest} to go on with the "
        "oldest event kept",
    )


# -- named consumers -----------------------------------------------------------------------------


async def _consumer_cursor(delivery: Delivery, name: str, *, create: bool) -> int | None:
    inbox = delivery.inbox
    cursor = await inbox.position(CONSUMER_PREFIX + name)
    if cursor is None and create:
        if len(await inbox.positions(CONSUMER_PREFIX)) >= MAX_CONSUMERS:
            raise ApiError(409, "too_many_consumers",
                           f"this agent keeps at most {MAX_CONSUMERS} named consumers; "
                           "DELETE /v1/consumers/{name} the ones no longer used")
        # A new consumer starts with the oldest event kept (the same as /v1/events without
        # a cursor), and exists from now on: retention past its start is reported (410).
        cursor = await inbox.init_position(CONSUMER_PREFIX + name, inbox.pruned_cursor)
        log.info("consumer.created", extra={"consumer": name, "cursor": cursor})
    return cursor


async def _read_for(delivery: Delivery, name: str, cursor: int, limit: int) -> list[InboxEvent]:
    try:
        return await delivery.inbox.read(cursor, limit, delivery.config.max_page_bytes)
    except CursorExpired as exc:
        raise _behind(name, cursor, exc.oldest) from None


@routes.get("/v1/consumers")
async def list_consumers(request: web.Request) -> web.Response:
    report = await request.app[delivery_key].report()
    return web.json_response({"consumers": report["consumers"]})


@routes.get("/v1/consumers/{name}/events")
async def get_consumer_events(request: web.Request) -> web.Response:
    name = _consumer_name(request)
    limit = _limit(request)
    delivery = request.app[delivery_key]
    wait = _wait(request, delivery.config.max_wait)
    cursor = await _consumer_cursor(delivery, name, create=True)
    assert cursor is not None
    events = await _read_for(delivery, name, cursor, limit)
    if not events and wait > 0:
        async with security.waiter_slot(request):
            await delivery.inbox.wait_beyond(cursor, wait)
        events = await _read_for(delivery, name, cursor, limit)
    return web.json_response({
        "consumer": name,
        "events": [delivery.stale.present(e) for e in events],
        # What to ack after handling these; the acked cursor itself when there are none.
        "cursor": str(events[-1].cursor if events else cursor),
    })


@routes.post("/v1/consumers/{name}/ack")
async def post_consumer_ack(request: web.Request) -> web.Response:
    name = _consumer_name(request)
    delivery = request.app[delivery_key]
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", 'send {"cursor": "<cursor>"} as JSON') from None
    if not isinstance(body, dict) or "cursor" not in body:
        raise ApiError(400, "bad_json", 'send {"cursor": "<cursor>"} as JSON')
    cursor = _cursor(body["cursor"], "cursor", delivery.inbox)
    await _consumer_cursor(delivery, name, create=True)
    # Cumulative, like the link's acks: a late, lower ack never moves the cursor back.
    stored = await delivery.inbox.advance_position(CONSUMER_PREFIX + name, cursor)
    return web.json_response({"consumer": name, "cursor": str(stored)})


@routes.delete("/v1/consumers/{name}")
async def delete_consumer(request: web.Request) -> web.Response:
    name = _consumer_name(request)
    if not await request.app[delivery_key].inbox.delete_position(CONSUMER_PREFIX + name):
        raise ApiError(404, "unknown_consumer", f"there is no consumer {name!r}")
    log.info("consumer.deleted", extra={"consumer": name})
    return web.Response(status=204)


# -- SSE -----------------------------------------------------------------------------------------


def sse_message(item: InboxEvent, body: dict[str, Any]) -> str:
    """One SSE message; JSON escapes every line break, so ``data`` is a single line."""
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return f"id: {item.cursor}\ndata: {data}\n\n"


def _stream_start(request: web.Request, inbox: Inbox) -> int | None:
    # Last-Event-ID wins: it is newer than the ?after= of the URL the client first opened.
    last_id = request.headers.get("Last-Event-ID")
    if last_id is not None and last_id.strip():
        return _cursor(last_id.strip(), "Last-Event-ID", inbox)
    after = request.query.get("after", "")
    return _cursor(after, "after", inbox) if after else None


@routes.get("/v1/stream")
async def get_stream(request: web.Request) -> web.StreamResponse:
    delivery = request.app[delivery_key]
    inbox = delivery.inbox
    after = _stream_start(request, inbox)
    # CursorExpired: a plain 410 before the stream opens.
    first = await inbox.read(after, PAGE, delivery.config.max_page_bytes)
    async with security.waiter_slot(request):
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # reverse proxies must not hold events back
        })
        await response.prepare(request)
        writer = _Writer(request, response)
        try:
            await _stream(writer, delivery, after, first)
        except (ConnectionError, TimeoutError):
            log.info("stream.dropped", extra={"path": request.path, "unsent": writer.unsent(),
                                              "peak_unsent": writer.peak})
            if request.transport is not None:
                # Not a graceful close: what the client left unread is dropped with it now.
                request.transport.abort()
    return response


class _Writer:
    """Writes a stream's messages within ``stream_buffer`` bytes of unsent data.

    The transport's high-water mark is set to the budget, so after a write that leaves more
    than that unsent, :meth:`write` waits (``stream_write_timeout`` at most) until the client
    has read it down to the low-water mark. A stream thus holds at most its budget plus one
    message, whatever its events weigh, and a client that stops reading is dropped instead of
    growing the agent's memory.
    """

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        config = request.app[delivery_key].config
        self._request = request
        self._response = response
        self._limit = config.stream_buffer
        self._timeout = config.stream_write_timeout
        self.peak = 0
        """Most bytes this stream may have had unsent at once (logged when it is dropped)."""
        if request.transport is not None:
            request.transport.set_write_buffer_limits(high=self._limit)

    def unsent(self) -> int:
        transport = self._request.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    async def write(self, text: str) -> None:
        data = text.encode()
        # What the buffer can hold at most during this write: what was left, plus this message.
        self.peak = max(self.peak, self.unsent() + len(data))
        async with asyncio.timeout(self._timeout):
            await self._response.write(data)
            transport = self._request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the stream's client went away")
            if transport.get_write_buffer_size() > self._limit:
                await self._request.writer.drain()


async def _stream(
    writer: _Writer, delivery: Delivery, after: int | None, batch: list[InboxEvent]
) -> None:
    inbox, stale = delivery.inbox, delivery.stale
    heartbeat = delivery.config.sse_heartbeat
    budget = delivery.config.max_page_bytes
    position = inbox.pruned_cursor if after is None else after
    await writer.write(": xon-relay-agent event stream\n\n")  # headers out at once
    while not inbox.released:
        if batch:
            for item in batch:
                position = item.cursor
                is_stale = stale.is_stale(item.event)
                if is_stale and stale.skip:
                    continue
                body = item.to_json()
                if is_stale:
                    body["stale"] = True
                # One message per write: the buffer budget is checked between events, never
                # after a whole page has been copied into the socket's buffer.
                await writer.write(sse_message(item, body))
        else:
            await inbox.wait_beyond(position, heartbeat)
            if inbox.last_cursor <= position and not inbox.released:
                await writer.write(": heartbeat\n\n")
        try:
            batch = await inbox.read(position, PAGE, budget)
        except CursorExpired as exc:
            # A client this far behind lost events to retention: say so, then end the stream
            # (reconnecting with the same Last-Event-ID gets the 410 again).
            error = {"code": "cursor_expired", "message": str(exc), "oldest": str(exc.oldest)}
            await writer.write(f"event: error\ndata: {json.dumps(error)}\n\n")
            return
