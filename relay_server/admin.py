"""Admin API on the admin listener: accounts and agents (DESIGN §Relay server endpoints).

Every request needs ``Authorization: Bearer <admin token>``, compared in constant time. Secrets
are shown once at creation (the ingress URL, the enrollment code) and stored only as hashes;
X-on API keys are never returned (only whether one is set) and never logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from shared import crypto
from shared.errors import ApiError, Unauthorized
from shared.events import format_time
from shared.link.frames import CloseCode

from .enroll import read_json_object, string_field
from .services import Services, services_key
from .store import AccountRecord, AgentRecord

__all__ = ["routes", "admin_auth_middleware"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_MAX_NAME = 200


@web.middleware
async def admin_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[services_key].admin_token
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not crypto.constant_time_equal(given.strip(), token):
        raise Unauthorized("missing or wrong admin token")
    return await handler(request)


def _name(data: dict[str, object], field: str, *, default: str | None = None) -> str:
    if default is not None and field not in data:
        return default
    value = string_field(data, field).strip()
    if not value or len(value) > _MAX_NAME or not value.isprintable():
        raise ApiError(400, "bad_request", f"{field!r} must be 1-{_MAX_NAME} printable characters")
    return value


def _xon_api_url(data: dict[str, object]) -> str | None:
    """The ``xon_api_url`` field if given: empty (no X-on API) or an http(s) URL with a host."""
    if "xon_api_url" not in data:
        return None
    value = string_field(data, "xon_api_url", required=False).strip()
    if value:
        try:
            url = URL(value)
        except ValueError:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host or url.query_string:
            raise ApiError(
                400, "bad_request", "'xon_api_url' must be an http(s) URL without a query"
            )
    return value


def _account_json(account: AccountRecord) -> dict[str, Any]:
    return {
        "id": account.id,
        "name": account.name,
        "created_at": format_time(account.created_at),
        "xon_api_url": account.xon_api_url,
        "xon_api_key_set": bool(account.xon_api_key),
    }


async def _account(services: Services, id_or_name: str) -> AccountRecord:
    account = await services.store.get_account(id_or_name)
    if account is None:
        raise ApiError(404, "unknown_account", f"no account {id_or_name!r}")
    return account


async def _agent_json(services: Services, agent: AgentRecord, online: set[str]) -> dict[str, Any]:
    return {
        "agent_id": agent.id,
        "account_id": agent.account_id,
        "name": agent.name,
        "enrolled": agent.public_key is not None,
        "revoked": agent.revoked,
        "online": agent.id in online,
        "last_seen": None if agent.last_seen is None else format_time(agent.last_seen),
        "cursor": await services.store.get_cursor(agent.id),
    }


@routes.post("/v1/accounts")
async def create_account(request: web.Request) -> web.Response:
    services = request.app[services_key]
    data = await read_json_object(request)
    name = _name(data, "name")
    xon_api_url = _xon_api_url(data) or ""
    xon_api_key = string_field(data, "xon_api_key", required=False)
    ingress_key = crypto.new_token(24)  # 192 bits (DESIGN: ≥128)
    account = await services.store.create_account(
        name=name,
        ingress_key_hash=crypto.hash_secret(ingress_key),
        xon_api_url=xon_api_url,
        xon_api_key=xon_api_key,
    )
    log.info("account.created", extra={"account": account.id, "account_name": account.name})
    return web.json_response(
        {
            "id": account.id,
            "name": account.name,
            "ingress_url": f"{services.config.base_url}/xon/{ingress_key}",
        },
        status=201,
    )


@routes.get("/v1/accounts")
async def list_accounts(request: web.Request) -> web.Response:
    accounts = await request.app[services_key].store.list_accounts()
    return web.json_response({"accounts": [_account_json(a) for a in accounts]})


@routes.get("/v1/accounts/{account}")
async def get_account(request: web.Request) -> web.Response:
    account = await _account(request.app[services_key], request.match_info["account"])
    return web.json_response(_account_json(account))


@routes.patch("/v1/accounts/{account}")
async def update_account(request: web.Request) -> web.Response:
    """Change the account's X-on API URL and/or key; fields left out stay as they are."""
    services = request.app[services_key]
    account = await _account(services, request.match_info["account"])
    data = await read_json_object(request)
    unknown = set(data) - {"xon_api_url", "xon_api_key"}
    if unknown or not data:
        raise ApiError(400, "bad_request", "give xon_api_url and/or xon_api_key, nothing else")
    xon_api_url = _xon_api_url(data)
    xon_api_key = (
        string_field(data, "xon_api_key", required=False) if "xon_api_key" in data else None
    )
    updated = await services.store.update_account(
        account.id, xon_api_url=xon_api_url, xon_api_key=xon_api_key
    )
    if updated is None:
        raise ApiError(404, "unknown_account", f"no account {account.id!r}")
    log.info("account.updated", extra={"account": account.id, "fields": sorted(data)})
    return web.json_response(_account_json(updated))


@routes.post("/v1/accounts/{account}/agents")
async def create_agent(request: web.Request) -> web.Response:
    services = request.app[services_key]
    account = await _account(services, request.match_info["account"])
    data = await read_json_object(request)
    name = _name(data, "name", default="agent")
    code = crypto.new_token(16)
    expires_at = time.time() + services.config.enrollment_ttl
    agent = await services.store.create_agent(
        account_id=account.id,
        name=name,
        code_hash=crypto.hash_secret(code),
        code_expires_at=expires_at,
    )
    log.info("agent.created", extra={"agent_id": agent.id, "account": account.id})
    return web.json_response(
        {
            "agent_id": agent.id,
            "account_id": account.id,
            "name": agent.name,
            "code": code,
            "expires_at": format_time(expires_at),
        },
        status=201,
    )


@routes.get("/v1/agents")
async def list_agents(request: web.Request) -> web.Response:
    services = request.app[services_key]
    account_id = None
    if "account" in request.query:
        account_id = (await _account(services, request.query["account"])).id
    agents = await services.store.list_agents(account_id)
    online = set(services.hub.online())
    return web.json_response(
        {"agents": [await _agent_json(services, agent, online) for agent in agents]}
    )


@routes.post("/v1/agents/{agent_id}/revoke")
async def revoke_agent(request: web.Request) -> web.Response:
    services = request.app[services_key]
    agent_id = request.match_info["agent_id"]
    agent = await services.store.revoke_agent(agent_id, now=time.time())
    if agent is None:
        raise ApiError(404, "unknown_agent", f"no agent {agent_id!r}")
    # DESIGN §Link protocol: a revoked agent is disconnected at once.
    disconnected = await services.hub.disconnect(agent_id, CloseCode.REVOKED, "agent revoked")
    log.info("agent.revoked", extra={"agent_id": agent_id, "disconnected": disconnected})
    return web.json_response({"agent_id": agent_id, "revoked": True, "disconnected": disconnected})
