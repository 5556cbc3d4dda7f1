"""Error middleware: every refusal on our HTTP APIs is ``{"error": {"code", "message"}}``.

DESIGN principle 6 and STYLE §4: a ``RelayError`` answers with its own status and code; the
router's own 404/405/413 get the same JSON shape; anything else is a bug, answered as a bare 500
``internal`` and logged with its traceback, which never reaches the client. A 429 carries
``Retry-After`` (issue 6). ``source_limit_middleware`` applies the per-source rate limit of the
public listener (relay_server/limits.py).
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from shared.errors import RelayError

from .limits import RateLimited, limits_key

__all__ = ["error_middleware", "error_response", "source_limit_middleware"]

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RelayError as exc:
        response = error_response(exc.http_status, exc.code, str(exc))
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        response = error_response(
            exc.status, _HTTP_CODES.get(exc.status, f"http_{exc.status}"), exc.reason
        )
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("http.internal_error", extra={"method": request.method})
        return error_response(500, "internal", "internal server error")


# Load balancer probes come from one address many times a second; they cost nothing.
_UNLIMITED = frozenset({"/healthz", "/readyz"})


@web.middleware
async def source_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 once a source address exceeds ``limits.source_rate`` (every route but health)."""
    if request.path not in _UNLIMITED:
        request.app[limits_key].check_source(request)
    return await handler(request)
