"""``POST /v1/enroll``: a one-time code and an agent public key → the agent's identity.

DESIGN §Link protocol, Auth: the agent registers only its Ed25519 public key; the code is spent
by the first successful use.
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from shared import crypto
from shared.errors import ApiError

from .appkeys import relay_id_key, store_key

__all__ = ["routes", "read_json_object"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


async def read_json_object(request: web.Request) -> dict[str, object]:
    """The request body as a JSON object.

    Raises:
        ApiError: 400 ``bad_request`` for anything else.
    """
    try:
        data = json.loads(await request.read())
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_request", "body must be a JSON object") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    return data


def string_field(data: dict[str, object], name: str, *, required: bool = True) -> str:
    value = data.get(name, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, "bad_request", f"{name!r} must be a non-empty string")
    return value


@routes.post("/v1/enroll")
async def enroll(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    code = string_field(data, "code")
    public_key = string_field(data, "public_key")
    # Check the key before spending the code, so a bad key does not burn it.
    if not crypto.valid_public_key(public_key):
        raise ApiError(400, "bad_public_key", "public_key must be a base64url Ed25519 key")
    agent = await request.app[store_key].enroll_agent(
        code_hash=crypto.hash_secret(code), public_key=public_key, now=time.time()
    )
    log.info("agent.enrolled", extra={"agent_id": agent.id, "account": agent.account_id})
    return web.json_response(
        {
            "agent_id": agent.id,
            "account_id": agent.account_id,
            "relay_id": request.app[relay_id_key],
        }
    )
