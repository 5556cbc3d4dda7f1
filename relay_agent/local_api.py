"""The agent's local HTTP API for apps on the same PC (DESIGN §Agent local API).

It listens on loopback only. :mod:`.security` guards every request (Host, Origin, the bearer
token, no CORS, bounded waiters); :mod:`.page` adds the status page at ``/``.

``POST /v1/ctox/{type}`` hands a command to :class:`~relay_agent.commands.Commands` and answers
with X-on's result as the relay relayed it; ``GET /v1/status`` reads the status items the link
stored in the inbox, so it answers at once whether or not the relay is reachable.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shared.config import AgentConfig
from shared.errors import ApiError, RelayError, RemoteProtocolError
from shared.events import format_time
from shared.link import frames

from . import consumers, page, security
from .commands import Commands
from .delivery import Delivery, delivery_key
from .inbox import Inbox
from .link import LinkState, LinkStatus
from .tokens import TokenSource

__all__ = ["create_local_app", "DEFAULT_LIMIT", "MAX_LIMIT"]

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

config_key = web.AppKey("config", AgentConfig)
inbox_key = web.AppKey("inbox", Inbox)
status_key = web.AppKey("link_status", LinkStatus)
commands_key = web.AppKey("commands", Commands)

_CTOX_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
"""Visible ASCII: the key travels in HTTP headers and is stored by the relay."""
_HEADER_VALUE = re.compile(r"[\x20-\x7e]{1,1000}")
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
_BODYLESS = frozenset({204, 304})

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
    budget = request.app[config_key].max_page_bytes
    events = await inbox.read(after, limit, budget)
    if not events and wait > 0:
        async with security.waiter_slot(request):
            await inbox.wait_beyond(after, wait)
        events = await inbox.read(after, limit, budget)
    cursor = str(events[-1].cursor) if events else ("" if after is None else str(after))
    stale = request.app[delivery_key].stale
    return web.json_response({"events": [stale.present(e) for e in events], "cursor": cursor})


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
        "inbox_error": status.inbox_error,
        "lost_through": status.lost_through,
        "relay_url": config.relay_url,
        "agent_id": config.agent_id,
        "inbox": {
            "events": stats.events,
            "last_cursor": str(stats.last_cursor),
            "last_seq": stats.last_seq,
            "withheld": stats.withheld,
            "withheld_reason": stats.withheld_reason,
        },
    }
    body.update(await request.app[delivery_key].report())  # forward, tcp, consumers
    return web.json_response(body)


@routes.get("/v1/status")
async def get_status(request: web.Request) -> web.Response:
    # DESIGN §Agent local API: answered from the local cache, even while offline.
    view = await request.app[inbox_key].read_status()
    return web.json_response({
        "link_up": request.app[status_key].state is LinkState.CONNECTED,
        "updated_at": _time(view.updated_at),
        "items": view.items,
    })


async def _command_params(request: web.Request) -> dict[str, Any]:
    """Params from a JSON object (values kept as given) or a form (strings; a repeated name
    gives a list of strings)."""
    if not request.body_exists:
        return {}
    if request.content_type == "application/json":
        try:
            data = json.loads(await request.read())
        except (ValueError, RecursionError):
            raise ApiError(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "bad_params", "a JSON body must be an object of parameters")
        return data
    if request.content_type in _FORM_TYPES:
        params: dict[str, Any] = {}
        for name, value in (await request.post()).items():
            if not isinstance(value, str):
                raise ApiError(400, "bad_params", f"parameter {name!r} is a file; send text")
            if name not in params:
                params[name] = value
            else:
                # A repeated name becomes a list, which the relay sends to X-on repeated again.
                previous = params[name]
                params[name] = [*previous, value] if isinstance(previous, list) else [
                    previous, value]
        return params
    raise ApiError(415, "unsupported_media_type",
                   "send params as application/json or application/x-www-form-urlencoded")


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "bad_idempotency_key",
                       "Idempotency-Key must be 1 to 255 visible ASCII characters")
    return key


def _result_response(result: frames.CommandResult, headers: dict[str, str]) -> web.Response:
    """X-on's answer unchanged: status, content type, body, Retry-After (DESIGN §Commands)."""
    try:
        body = base64.b64decode(result.body_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(502, "bad_relay_response", "the relay sent an undecodable body") from None
    if not 200 <= result.status <= 599:
        raise ApiError(502, "bad_relay_response", f"the relay sent status {result.status}")
    content_type = result.content_type
    if result.error and not body:
        # A refusal made by the relay normally carries its JSON error body; never answer blank.
        error = {"error": {"code": result.error, "message": "refused by the relay"}}
        body = json.dumps(error).encode()
        content_type = "application/json"
    retry_after = next(
        (str(v) for k, v in result.headers.items() if k.lower() == "retry-after"), None
    )
    if retry_after is not None and _HEADER_VALUE.fullmatch(retry_after):
        headers["Retry-After"] = retry_after
    if content_type and _HEADER_VALUE.fullmatch(content_type):
        headers["Content-Type"] = content_type
    if result.status in _BODYLESS:
        body = b""
    return web.Response(status=result.status, body=body, headers=headers)


@routes.post("/v1/ctox/{type}")
async def post_ctox(request: web.Request) -> web.Response:
    ctox_type = request.match_info["type"]
    if not _CTOX_TYPE.fullmatch(ctox_type):
        raise ApiError(400, "bad_ctox_type",
                       "the CTOX type is 1 to 64 letters, digits, '_', '.', ':' or '-'")
    key = _idempotency_key(request)
    params = await _command_params(request)
    commands = request.app[commands_key]
    command = commands.new_command(ctox_type, params, key)
    max_size = request.app[config_key].link.max_message_size
    text = frames.encode(command)
    try:
        frames.decode(text)  # what the relay will check (docs/protocol.md, Frame limits)
    except RemoteProtocolError as exc:
        # Sent anyway, it would close the link, and the resend close it again.
        raise ApiError(400, "bad_params", f"params outside the link's limits: {exc}") from None
    if len(text.encode()) > max_size:
        # An oversized frame would make the relay drop the link, and the resend drop it again.
        raise ApiError(413, "command_too_large",
                       f"the command exceeds the link's message limit of {max_size} bytes")
    # The app learns the key it may retry with, even the one made here for it.
    headers = {"X-Request-Id": command.request_id, "Idempotency-Key": command.idempotency_key}
    log.info("ctox.request", extra={"request_id": command.request_id, "ctox_type": ctox_type})
    try:
        result = await commands.call(command)
    except ApiError as exc:
        return web.json_response({"error": {"code": exc.code, "message": str(exc)}},
                                 status=exc.http_status, headers=headers)
    log.info("ctox.result", extra={"request_id": command.request_id, "status": result.status,
                                   "error": result.error or None})
    return _result_response(result, headers)


async def _release_long_polls(app: web.Application) -> None:
    app[inbox_key].release_waiters()


async def _stop_commands(app: web.Application) -> None:
    app[commands_key].close()


def create_local_app(
    *,
    config: AgentConfig,
    inbox: Inbox,
    link_status: LinkStatus,
    token: str | TokenSource,
    commands: Commands | None = None,
    delivery: Delivery | None = None,
) -> web.Application:
    """The local API application; the caller binds it to a loopback address.

    ``commands`` is the link's :class:`Commands`; without one, every CTOX request gets 503
    ``relay_unreachable``. ``token`` is a :class:`~relay_agent.tokens.TokenFile` to follow
    rotation, or a fixed token.
    """
    app = web.Application(middlewares=[error_middleware])
    security.install(app, token=token, max_waiters=config.max_waiters)
    app[config_key] = config
    app[inbox_key] = inbox
    app[status_key] = link_status
    app[commands_key] = commands if commands is not None else Commands()
    app.add_routes(routes)
    # Delivery modes (relay_agent/consumers.py, docs/delivery.md); without a started
    # Delivery, pull modes work and health lists the configured targets as not running.
    app[delivery_key] = delivery if delivery is not None else Delivery(config, inbox)
    app.add_routes(consumers.routes)
    page.install(app, config=config, inbox=inbox, link_status=link_status)
    app.on_shutdown.append(_release_long_polls)
    app.on_shutdown.append(_stop_commands)
    return app
