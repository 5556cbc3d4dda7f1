"""``POST /v1/enroll``: a one-time code and an agent public key → the agent's identity.

DESIGN §Link protocol, Auth: the agent registers only its Ed25519 public key; the code is spent
by the first successful use. Issue 6: a source that sends ``limits.enroll_max_failures`` bad
codes within ``limits.enroll_window`` is refused with 429 for ``limits.enroll_lockout`` seconds,
valid code or not.
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from shared import crypto
from shared.errors import ApiError

from .appkeys import config_key, relay_id_key, store_key
from .limits import RateLimited, limits_key, read_body

__all__ = ["routes", "read_json_object", "MAX_JSON_BODY"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_JSON_BODY = 64 * 1024
"""Largest JSON body of an API request (enrollment, admin), in bytes (413 beyond)."""


async def read_json_object(
    request: web.Request, *, limit: int = MAX_JSON_BODY
) -> dict[str, object]:
    """The request body (at most ``limit`` bytes) as a JSON object.

    Raises:
        ApiError: 400 ``bad_request`` for anything else; 413, 415 or 408 from
            :func:`~relay_server.limits.read_body`.
    """
    timeout = request.app[config_key].limits.body_timeout
    body = await read_body(request, limit=limit, timeout=timeout)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_request", "body must be a JSON object") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    try:
        # json.loads accepts "\ud800" escapes; a lone surrogate would only fail later, as a
        # 500, wherever the text is encoded (hashing a code, storing a name).
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise ApiError(400, "bad_request", "body has text that is not valid Unicode") from exc
    return data


def string_field(data: dict[str, object], name: str, *, required: bool = True) -> str:
    value = data.get(name, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, "bad_request", f"{name!r} must be a non-empty string")
    return value


@routes.post("/v1/enroll")
async def enroll(request: web.Request) -> web.Response:
    limits = request.app[limits_key]
    lockout = limits.enroll
    source = limits.source(request)
    if lockout is not None and (left := lockout.check(source)) is not None:
        raise RateLimited("too many failed enrollment codes; try again later", retry_after=left)
    data = await read_json_object(request)
    code = string_field(data, "code")
    public_key = string_field(data, "public_key")
    # Check the key before spending the code, so a bad key does not burn it.
    if not crypto.valid_public_key(public_key):
        raise ApiError(400, "bad_public_key", "public_key must be a base64url Ed25519 key")
    try:
        agent = await request.app[store_key].enroll_agent(
            code_hash=crypto.hash_secret(code), public_key=public_key, now=time.time()
        )
    except ApiError as exc:
        if exc.code == "invalid_code" and lockout is not None and lockout.failed(source):
            log.warning("enroll.locked_out", extra={"remote": source})
        raise
    if lockout is not None:
        lockout.succeeded(source)
    log.info("agent.enrolled", extra={"agent_id": agent.id, "account": agent.account_id})
    return web.json_response(
        {
            "agent_id": agent.id,
            "account_id": agent.account_id,
            "relay_id": request.app[relay_id_key],
        }
    )
