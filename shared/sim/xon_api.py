"""A fake X-on API for demos and tests: records every CTOX call and answers like X-on.

X-on's documented conventions (issue "CTOX commands through the relay"): params in the query, a
form or a JSON body; ``Authorization: Bearer <key>``; click-to-call is ``POST
/api/v1/clicktocall`` with ``destination`` and ``target`` → 202 ``{"status": "OK", "callId":
…}``; 429 and 503 carry ``Retry-After``. The other endpoints mirror the relay's default CTOX
catalogue (relay_server/ctox.py).

Faults, for testing every failure path against a real HTTP server: :meth:`FakeXonApi.slow`
(answer after a delay), :meth:`FakeXonApi.hold` (answer only when released),
:meth:`FakeXonApi.fail` (5xx) and :meth:`FakeXonApi.rate_limit` (429 + ``Retry-After``), each
for the next N requests or for all of them. A standalone process (:func:`serve`) takes the same
faults over HTTP: ``POST /_sim/faults`` with ``{"kind": "slow"|"hold"|"fail"|"rate_limit",
"count", "seconds", "status", "retry_after"}``, ``DELETE /_sim/faults`` (clear and release),
``GET /_sim/requests`` (what was recorded). The ``/_sim`` endpoints need the same bearer key.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import crypto

__all__ = ["RecordedRequest", "Fault", "FakeXonApi", "ENDPOINTS", "serve"]

log = logging.getLogger(__name__)

ENDPOINTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # path → (id field of the 202 answer, required params)
    "/api/v1/clicktocall": ("callId", ("destination", "target")),
    "/api/v1/sms": ("messageId", ("to", "message")),
    "/api/v1/recordedmessage": ("messageId", ("destination", "recording")),
    "/api/v1/conference": ("conferenceId", ("participants",)),
    "/api/v1/statusorder": ("orderId", ("event",)),
}

_FAULT_KINDS = ("slow", "hold", "fail", "rate_limit")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedRequest:
    """One request as the fake X-on API received it."""

    method: str
    path: str
    query: dict[str, str]
    authorization: str
    content_type: str
    body: bytes
    params: dict[str, Any]
    """Query params, then form or JSON body params (a repeated form name gives a list)."""
    status: int = 0
    """What the fake answered (0 while it has not answered yet)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "authorization": self.authorization,
            "content_type": self.content_type,
            "body_b64": base64.b64encode(self.body).decode("ascii"),
            "params": self.params,
            "status": self.status,
        }


@dataclass(slots=True, kw_only=True)
class Fault:
    """A fault applied to the next ``count`` requests (``None``: every request)."""

    kind: str
    count: int | None = None
    seconds: float = 0.0
    status: int = 503
    retry_after: int | None = None


@dataclass(slots=True)
class _Book:
    requests: list[RecordedRequest] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class FakeXonApi:
    """The fake API as an aiohttp server on ``host:port`` (port 0: any free port).

    Use ``async with FakeXonApi(api_key="k") as api:``; ``api.url`` is its base URL and
    ``api.requests`` what it received, oldest first.
    """

    def __init__(self, *, api_key: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.faults: list[Fault] = []
        self._book = _Book()
        self._ids = itertools.count(1)
        self._released = asyncio.Event()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._book.requests)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> FakeXonApi:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        """Stop serving; held and slowed requests end at once."""
        self._closing.set()
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- fault controls ----------------------------------------------------------------------

    def slow(self, seconds: float, *, count: int | None = None) -> None:
        """Answer normally, but only after ``seconds``."""
        self.faults.append(Fault(kind="slow", count=count, seconds=seconds))

    def hold(self, *, count: int | None = None) -> None:
        """Do not answer until :meth:`release` (or close)."""
        self._released.clear()
        self.faults.append(Fault(kind="hold", count=count))

    def release(self) -> None:
        """Let every held request answer."""
        self._released.set()

    def fail(
        self, status: int = 503, *, count: int | None = None, retry_after: int | None = None
    ) -> None:
        """Answer ``status`` (5xx) with an X-on style error body."""
        self.faults.append(Fault(kind="fail", count=count, status=status, retry_after=retry_after))

    def rate_limit(self, retry_after: int = 30, *, count: int | None = None) -> None:
        """Answer 429 with ``Retry-After``."""
        self.faults.append(
            Fault(kind="rate_limit", count=count, status=429, retry_after=retry_after)
        )

    def clear_faults(self) -> None:
        self.faults.clear()
        self._released.set()

    async def wait_for_requests(self, count: int, *, timeout: float) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests arrived (``TimeoutError`` after ``timeout``)."""
        async with asyncio.timeout(timeout):
            async with self._book.changed:
                await self._book.changed.wait_for(lambda: len(self._book.requests) >= count)
        return self.requests

    # -- serving -----------------------------------------------------------------------------

    def _next_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        if fault.count is not None:
            fault.count -= 1
            if fault.count <= 0:
                self.faults.pop(0)
        return fault

    async def _parse(self, request: web.Request) -> RecordedRequest:
        body = await request.read()
        params: dict[str, Any] = dict(request.query)
        mime = request.content_type
        if body and mime == "application/x-www-form-urlencoded":
            for name, value in urllib.parse.parse_qsl(body.decode(), keep_blank_values=True):
                if name in params and name not in request.query:
                    old = params[name]
                    params[name] = [*old, value] if isinstance(old, list) else [old, value]
                else:
                    params[name] = value
        elif body and mime == "application/json":
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict):
                params.update(data)
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            authorization=request.headers.get("Authorization", ""),
            content_type=request.headers.get("Content-Type", ""),
            body=body,
            params=params,
        )
        return recorded

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._parse(request)
        authorized = crypto.constant_time_equal(recorded.authorization, f"Bearer {self.api_key}")
        if request.path.startswith("/_sim/"):
            if not authorized:
                return _error(401, "missing or wrong API key")
            return self._control(request, recorded)
        async with self._book.changed:
            index = len(self._book.requests)
            self._book.requests.append(recorded)
            self._book.changed.notify_all()
        response = await self._answer(request, recorded, authorized)
        async with self._book.changed:
            self._book.requests[index] = _with_status(recorded, response.status)
        return response

    async def _answer(
        self, request: web.Request, recorded: RecordedRequest, authorized: bool
    ) -> web.Response:
        if not authorized:
            return _error(401, "missing or wrong API key")
        fault = self._next_fault()
        if fault is not None:
            answered = await self._apply(fault)
            if answered is not None:
                return answered
        endpoint = ENDPOINTS.get(request.path)
        if endpoint is None:
            return _error(404, f"no API endpoint {request.path}")
        if request.method != "POST":
            return _error(405, "use POST")
        id_field, required = endpoint
        missing = [name for name in required if recorded.params.get(name) in (None, "")]
        if missing:
            return _error(400, f"missing {', '.join(missing)}")
        prefix = id_field.removesuffix("Id")
        return web.json_response(
            {"status": "OK", id_field: f"{prefix}-{next(self._ids):06d}"}, status=202
        )

    async def _apply(self, fault: Fault) -> web.Response | None:
        match fault.kind:
            case "slow":
                # Ends early when the server closes, so a test never waits for it.
                try:
                    await asyncio.wait_for(self._closing.wait(), fault.seconds)
                except TimeoutError:
                    pass
            case "hold":
                await self._released.wait()
            case "fail" | "rate_limit":
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                message = "rate limit exceeded" if fault.kind == "rate_limit" else "unavailable"
                return _error(fault.status, message, headers=headers)
        return None

    def _control(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        if request.path == "/_sim/requests" and request.method == "GET":
            return web.json_response({"requests": [r.to_json() for r in self._book.requests]})
        if request.path == "/_sim/faults" and request.method == "DELETE":
            self.clear_faults()
            return web.json_response({"faults": 0})
        if request.path == "/_sim/faults" and request.method == "POST":
            spec = recorded.params
            kind = spec.get("kind")
            try:
                count = None if spec.get("count") is None else int(spec["count"])
                seconds = float(spec.get("seconds", 0))
                status = int(spec.get("status", 503))
                retry_after = None if spec.get("retry_after") is None else int(spec["retry_after"])
            except (TypeError, ValueError):
                return _error(400, "count, seconds, status and retry_after must be numbers")
            match kind:
                case "slow":
                    self.slow(seconds, count=count)
                case "hold":
                    self.hold(count=count)
                case "fail":
                    self.fail(status, count=count, retry_after=retry_after)
                case "rate_limit":
                    self.rate_limit(30 if retry_after is None else retry_after, count=count)
                case _:
                    return _error(400, f"kind must be one of {', '.join(_FAULT_KINDS)}")
            return web.json_response({"faults": len(self.faults)}, status=201)
        return _error(404, f"no simulator endpoint {request.method} {request.path}")


def _with_status(recorded: RecordedRequest, status: int) -> RecordedRequest:
    return RecordedRequest(
        method=recorded.method,
        path=recorded.path,
        query=recorded.query,
        authorization=recorded.authorization,
        content_type=recorded.content_type,
        body=recorded.body,
        params=recorded.params,
        status=status,
    )


def _error(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"status": "ERROR", "message": message}, status=status, headers=headers
    )


async def serve(host: str, port: int, api_key: str) -> None:
    """Run the fake X-on API until cancelled (for ``xon-sim``); logs its URL at start."""
    api = FakeXonApi(api_key=api_key, host=host, port=port)
    await api.start()
    log.info("xon_api.started", extra={"url": api.url})
    try:
        await asyncio.Event().wait()
    finally:
        await api.close()
