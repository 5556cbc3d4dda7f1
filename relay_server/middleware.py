"""Error middleware: every refusal on our HTTP APIs is ``{"error": {"code", "message"}}``.

DESIGN principle 6 and STYLE §4: a ``RelayError`` answers with its own status and code; the
router's own 404/405/413 get the same JSON shape; anything else is a bug, answered as a bare 500
``internal`` and logged with its traceback, which never reaches the client.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from shared.errors import RelayError

__all__ = ["error_middleware", "error_response"]

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
        return error_response(exc.http_status, exc.code, str(exc))
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
