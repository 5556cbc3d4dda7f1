"""The agent's local HTTP API for apps on the same PC (DESIGN §Agent local API).

It listens on loopback only. Every request needs the local token as a bearer token, and the
``Host`` header must name the loopback interface: a web page the user visits cannot rebind its
own host name to 127.0.0.1 and read events through the user's browser. No CORS headers are
ever sent, so browsers keep cross-origin pages out as well.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shared.config import AgentConfig
from shared.crypto import constant_time_equal
from shared.errors import ApiError, RelayError, Unauthorized
from shared.events import format_time

from .inbox import Inbox
from .link import LinkStatus

__all__ = ["create_local_app", "LOOPBACK_HOSTS", "DEFAULT_LIMIT", "MAX_LIMIT"]

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

config_key = web.AppKey("config", AgentConfig)
inbox_key = web.AppKey("inbox", Inbox)
status_key = web.AppKey("link_status", LinkStatus)
token_key = web.AppKey("token", str)

routes = web.RouteTableDef()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal is ``{"error": {"code", "message"}}`` (DESIGN principle 6)."""
    try:
        return await handler(request)
    except RelayError as exc:
        response = _error(exc.http_status, exc.code, str(exc))
        if exc.http_status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return _error(exc.status, code, exc.reason)
    except Exception:
        log.exception("local_api.internal_error", extra={"path": request.path})
        return _error(500, "internal", "internal error")


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rpartition(":")[0] if ":" in host else host


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DNS-rebinding defence, then the bearer token (DESIGN §Agent local API)."""
    host = request.headers.get("Host", "")
    if _host_name(host).lower() not in LOOPBACK_HOSTS:
        raise ApiError(403, "bad_host", "the Host header must be localhost, 127.0.0.1 or [::1]")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    token = request.app[token_key]
    if scheme.lower() != "bearer" or not constant_time_equal(given.strip(), token):
        raise Unauthorized("missing or wrong local token (Authorization: Bearer <token>)")
    return await handler(request)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"bad_{name}", f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _cursor_param(request: web.Request) -> int | None:
    raw = request.query.get("after", "")
    if raw == "":
        return None
    if not raw.isdigit() or len(raw) > 19:
        raise ApiError(400, "bad_cursor", "after must be a cursor returned by this API")
    return int(raw)


def _wait_param(request: web.Request, max_wait: float) -> float:
    raw = request.query.get("wait", "")
    if raw == "":
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not math.isfinite(wait) or wait < 0:
        raise ApiError(400, "bad_wait", "wait must be a number of seconds, 0 or more")
    # Longer waits are clamped rather than refused: the app simply polls again.
    return min(wait, max_wait)


@routes.get("/v1/events")
async def get_events(request: web.Request) -> web.Response:
    after = _cursor_param(request)
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    wait = _wait_param(request, request.app[config_key].max_wait)
    inbox = request.app[inbox_key]
    if after is not None and after > inbox.last_cursor:
        # A cursor from the future (another inbox, a wiped one) would silently skip events.
        raise ApiError(
            400, "bad_cursor", f"cursor {after} is beyond the newest event ({inbox.last_cursor})"
        )
    events = await inbox.read(after, limit)
    if not events and wait > 0:
        await inbox.wait_beyond(after, wait)
        events = await inbox.read(after, limit)
    cursor = str(events[-1].cursor) if events else ("" if after is None else str(after))
    return web.json_response({"events": [e.to_json() for e in events], "cursor": cursor})


def _time(ts: float | None) -> str | None:
    return None if ts is None else format_time(ts)


@routes.get("/v1/health")
async def get_health(request: web.Request) -> web.Response:
    config = request.app[config_key]
    status = request.app[status_key]
    stats = await request.app[inbox_key].stats()
    body: dict[str, Any] = {
        "link": status.state.value,
        "connected_since": _time(status.connected_since),
        "last_event_at": _time(status.last_event_at),
        "last_error": status.last_error,
        "relay_url": config.relay_url,
        "agent_id": config.agent_id,
        "inbox": {
            "events": stats.events,
            "last_cursor": str(stats.last_cursor),
            "last_seq": stats.last_seq,
        },
    }
    return web.json_response(body)


async def _release_long_polls(app: web.Application) -> None:
    app[inbox_key].release_waiters()


def create_local_app(
    *, config: AgentConfig, inbox: Inbox, link_status: LinkStatus, token: str
) -> web.Application:
    """The local API application; the caller binds it to a loopback address."""
    app = web.Application(middlewares=[error_middleware, guard_middleware])
    app[config_key] = config
    app[inbox_key] = inbox
    app[status_key] = link_status
    app[token_key] = token
    app.add_routes(routes)
    app.on_shutdown.append(_release_long_polls)
    return app
