"""Admin API on the admin listener: accounts, agents, events (DESIGN §Relay server endpoints;
every route is listed in docs/operations.md).

Every request needs ``Authorization: Bearer <admin token>``, compared in constant time, except
the dashboard's own pages, which take its session cookie instead (relay_server/dashboard.py).
Secrets are shown once at creation or rotation (the ingress URL, the enrollment code) and
stored only as hashes; X-on API keys are never returned (only whether one is set) and never
logged. Event bodies are returned only by the event routes, to the token holder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from shared import crypto
from shared.errors import ApiError, Unauthorized
from shared.events import format_time, parse_time
from shared.link.frames import CloseCode

from .enroll import read_json_object, string_field
from .metrics import CONTENT_TYPE_LATEST, WithheldTally
from .services import Services, services_key
from .store import AccountRecord, AgentRecord
from .store.base import StoredEvent

__all__ = [
    "routes",
    "admin_auth_middleware",
    "AgentState",
    "agent_states",
    "DASHBOARD_PAGE",
    "DASHBOARD_LOGIN",
]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_MAX_NAME = 200
DEFAULT_OVERLAP = 24 * 3600.0
"""Seconds a rotated ingress key keeps working unless the request says otherwise."""
_MAX_OVERLAP = 30 * 24 * 3600.0
_MAX_PAGE = 1000
_CONCURRENCY = 32

DASHBOARD_PAGE = "/"
DASHBOARD_LOGIN = "/dashboard/login"
PUBLIC_PATHS = frozenset({DASHBOARD_PAGE, DASHBOARD_LOGIN})
"""Admin-listener paths without the bearer token: the dashboard page and its login check a
one-time code or a session cookie themselves (relay_server/dashboard.py)."""


@web.middleware
async def admin_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
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


XON_API_KEY_MAX = 4096
"""Longest X-on API key accepted, in characters."""


def xon_api_key_problem(key: str) -> str | None:
    """What is wrong with ``key`` as an X-on API key, or ``None``: empty (no key) or up to
    ``XON_API_KEY_MAX`` visible ASCII characters, since it travels in an HTTP header
    (docs/ctox.md, X-on API settings per account) where a line break would start a header
    of its own."""
    if len(key) > XON_API_KEY_MAX:
        return f"the X-on API key is longer than {XON_API_KEY_MAX} characters"
    if not all("!" <= char <= "~" for char in key):
        return "the X-on API key must be visible ASCII characters only (no spaces or line breaks)"
    return None


def _xon_api_key(data: dict[str, object]) -> str:
    """The ``xon_api_key`` field: empty when not given (no key)."""
    key = string_field(data, "xon_api_key", required=False)
    problem = xon_api_key_problem(key)
    if problem is not None:
        raise ApiError(400, "bad_request", problem)
    return key


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


@dataclass(frozen=True, slots=True)
class AgentState:
    """An agent as operators see it: its record, link and delivery position."""

    record: AgentRecord
    online_since: float | None
    """Unix time its link authenticated on this instance; ``None``: not connected here."""
    cursor: int
    backlog: int
    """Events of its account's log after its cursor."""
    withheld: WithheldTally | None = None
    """Events set aside for it on this instance (docs/delivery.md, Withheld events)."""

    @property
    def state(self) -> str:
        """``revoked``, ``pending`` (not enrolled yet), ``online`` or ``offline``."""
        if self.record.revoked:
            return "revoked"
        if self.record.public_key is None:
            return "pending"
        return "offline" if self.online_since is None else "online"

    def to_json(self) -> dict[str, Any]:
        agent = self.record
        return {
            "agent_id": agent.id,
            "account_id": agent.account_id,
            "name": agent.name,
            "state": self.state,
            "enrolled": agent.public_key is not None,
            "revoked": agent.revoked,
            "online": self.online_since is not None,
            "online_since": None if self.online_since is None else format_time(self.online_since),
            "last_seen": None if agent.last_seen is None else format_time(agent.last_seen),
            "cursor": self.cursor,
            "backlog": self.backlog,
            "withheld": 0 if self.withheld is None else self.withheld.count,
            "withheld_reason": None if self.withheld is None else self.withheld.last_reason,
        }


async def agent_states(services: Services, account_id: str | None = None) -> list[AgentState]:
    """Every agent (of one account, or all) with its link state, cursor and backlog.

    Online means connected to this instance (``AgentHub.online``); with several instances, ask
    each one's admin listener.
    """
    agents = await services.store.list_agents(account_id)
    online = services.hub.online()

    async def one(agent: AgentRecord) -> AgentState:
        cursor = await services.store.get_cursor(agent.id)
        backlog = 0
        if agent.public_key is not None and not agent.revoked:
            backlog = await services.store.count_after(agent.account_id, cursor)
        return AgentState(agent, online.get(agent.id), cursor, backlog, withheld.get(agent.id))

    withheld = services.hub.metrics.withheld
    states: list[AgentState] = []
    for start in range(0, len(agents), _CONCURRENCY):
        chunk = agents[start : start + _CONCURRENCY]
        states += await asyncio.gather(*(one(agent) for agent in chunk))
    return states


async def _agent(services: Services, agent_id: str) -> AgentState:
    agent = await services.store.get_agent(agent_id)
    if agent is None:
        raise ApiError(404, "unknown_agent", f"no agent {agent_id!r}")
    online = services.hub.online()
    cursor = await services.store.get_cursor(agent.id)
    backlog = await services.store.count_after(agent.account_id, cursor)
    withheld = services.hub.metrics.withheld.get(agent.id)
    return AgentState(agent, online.get(agent.id), cursor, backlog, withheld)


@routes.post("/v1/accounts")
async def create_account(request: web.Request) -> web.Response:
    services = request.app[services_key]
    data = await read_json_object(request)
    name = _name(data, "name")
    xon_api_url = _xon_api_url(data) or ""
    xon_api_key = _xon_api_key(data)
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
    services = request.app[services_key]
    account = await _account(services, request.match_info["account"])
    store = services.store
    previous = await store.previous_ingress_keys(account.id, now=time.time())
    agents = await store.list_agents(account.id)
    usage = await store.account_usage(account.id)
    return web.json_response(
        {
            **_account_json(account),
            "previous_ingress_keys_valid_until": [format_time(t) for t in previous],
            "agents": len(agents),
            "active_agents": sum(1 for agent in agents if not agent.revoked),
            "head_seq": await store.head_seq(account.id),
            # docs/redis.md, Quotas: what the log holds against the ceiling ingress enforces.
            "usage": {"events": usage.events, "bytes": usage.bytes,
                      "quota_bytes": services.config.quota.for_account(account.id, account.name)},
        }
    )


@routes.post("/v1/accounts/{account}/rotate-key")
async def rotate_ingress_key(request: web.Request) -> web.Response:
    """A new ingress key; the old one keeps working for ``overlap`` seconds (default 24 h,
    0: stops at once) so that X-on's configuration can be changed without losing events."""
    services = request.app[services_key]
    account = await _account(services, request.match_info["account"])
    data = await read_json_object(request)
    overlap = data.get("overlap", DEFAULT_OVERLAP)
    if (
        not isinstance(overlap, int | float)
        or isinstance(overlap, bool)
        or not 0 <= overlap <= _MAX_OVERLAP
    ):
        raise ApiError(400, "bad_request", f"'overlap' must be 0-{_MAX_OVERLAP:.0f} seconds")
    ingress_key = crypto.new_token(24)
    valid_until = time.time() + overlap
    rotated = await services.store.rotate_ingress_key(
        account.id, new_hash=crypto.hash_secret(ingress_key), old_valid_until=valid_until
    )
    if rotated is None:
        raise ApiError(404, "unknown_account", f"no account {account.id!r}")
    log.info("account.key_rotated", extra={"account": account.id, "overlap": overlap})
    return web.json_response(
        {
            "id": rotated.id,
            "name": rotated.name,
            "ingress_url": f"{services.config.base_url}/xon/{ingress_key}",
            "previous_key_valid_until": format_time(valid_until) if overlap else None,
        }
    )


@routes.delete("/v1/accounts/{account}")
async def delete_account(request: web.Request) -> web.Response:
    """Delete the account with its agents and its event log (docs/operations.md). Refused
    while it has agents that are not revoked, unless ``?force=true``: then they are revoked
    and disconnected first."""
    services = request.app[services_key]
    account = await _account(services, request.match_info["account"])
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    active = [a for a in await services.store.list_agents(account.id) if not a.revoked]
    if active and not force:
        raise ApiError(
            409,
            "agents_active",
            f"account {account.name!r} has {len(active)} agent(s) not revoked;"
            " revoke them or force the removal",
        )
    now = time.time()
    for agent in active:
        await services.store.revoke_agent(agent.id, now=now)
        await services.hub.disconnect(agent.id, CloseCode.REVOKED, "account removed")
    events = await services.store.head_seq(account.id)
    if not await services.store.delete_account(account.id):
        raise ApiError(404, "unknown_account", f"no account {account.id!r}")
    log.info("account.deleted", extra={"account": account.id, "revoked_agents": len(active)})
    return web.json_response(
        {
            "id": account.id,
            "name": account.name,
            "deleted": True,
            "revoked_agents": len(active),
            "had_events": events > 0,
        }
    )


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
    xon_api_key = _xon_api_key(data) if "xon_api_key" in data else None
    updated = await services.store.update_account(
        account.id, xon_api_url=xon_api_url, xon_api_key=xon_api_key
    )
    if updated is None:
        raise ApiError(404, "unknown_account", f"no account {account.id!r}")
    log.info("account.updated", extra={"account": account.id, "fields": sorted(data)})
    return web.json_response(_account_json(updated))


@routes.put("/v1/accounts/{account}/name")
async def rename_account(request: web.Request) -> web.Response:
    """Rename the account (names are unique; the id never changes)."""
    services = request.app[services_key]
    account = await _account(services, request.match_info["account"])
    data = await read_json_object(request)
    if set(data) != {"name"}:
        raise ApiError(400, "bad_request", "give name, nothing else")
    renamed = await services.store.rename_account(account.id, _name(data, "name"))
    if renamed is None:
        raise ApiError(404, "unknown_account", f"no account {account.id!r}")
    log.info("account.renamed", extra={"account": account.id})
    return web.json_response(_account_json(renamed))


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
    states = await agent_states(services, account_id)
    return web.json_response({"agents": [state.to_json() for state in states]})


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


_REPLAY_CLOSE = 1000
"""A normal close: the agent reconnects at once and its next link carries the replay."""


def _replay_point(data: dict[str, object]) -> tuple[str, int | float]:
    """``("since", unix time)`` or ``("after_seq", N)``: exactly one of the two."""
    if len(data) != 1 or not set(data) <= {"since", "after_seq"}:
        raise ApiError(400, "bad_request", "give either since (ISO 8601) or after_seq, only")
    if "after_seq" in data:
        after = data["after_seq"]
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= 2**62:
            raise ApiError(400, "bad_request", "'after_seq' must be an integer 0 or more")
        return "after_seq", after
    since = data["since"]
    try:
        if not isinstance(since, str):
            raise ValueError(since)
        return "since", parse_time(since)
    except ValueError as exc:
        raise ApiError(400, "bad_request", "'since' must be an ISO 8601 time") from exc


@routes.post("/v1/agents/{agent_id}/replay")
async def replay_agent(request: web.Request) -> web.Response:
    """Send the agent its account's events again, from a time or after a seq
    (docs/operations.md, Replay). The point is recorded in the store and the agent is
    disconnected with a normal close, so its next link (at once when it is online, else when
    it next connects) starts there; its inbox keeps one copy of each event."""
    services = request.app[services_key]
    store = services.store
    agent_id = request.match_info["agent_id"]
    data = await read_json_object(request)
    kind, value = _replay_point(data)
    agent = await store.get_agent(agent_id)
    if agent is None:
        raise ApiError(404, "unknown_agent", f"no agent {agent_id!r}")
    if agent.revoked:
        raise ApiError(409, "agent_revoked", f"agent {agent_id!r} is revoked")
    if kind == "since":
        # The newest event received before that time: the replay starts with the first event
        # at or after it.
        after = await store.retention_cut(agent.account_id, keep_events=None, keep_since=value)
    else:
        after = int(value)
    head = await store.head_seq(agent.account_id)
    await store.request_replay(agent_id, after)
    disconnected = await services.hub.disconnect(agent_id, _REPLAY_CLOSE, "replay")
    # Until the agent's next link starts the replay, the lowered cursor keeps the soft
    # retention limits off the events to resend (that link stores it again).
    if await store.get_cursor(agent_id) > after:
        await store.set_cursor(agent_id, after)
    events = await store.count_after(agent.account_id, after)
    log.info(
        "agent.replay_requested",
        extra={"agent_id": agent_id, "after_seq": after, "disconnected": disconnected},
    )
    return web.json_response(
        {
            "agent_id": agent_id,
            "account_id": agent.account_id,
            "after_seq": after,
            "through_seq": head,
            "events": events,
            "disconnected": disconnected,
        }
    )


@routes.get("/v1/agents/{agent_id}")
async def get_agent(request: web.Request) -> web.Response:
    state = await _agent(request.app[services_key], request.match_info["agent_id"])
    return web.json_response(state.to_json())


@routes.patch("/v1/agents/{agent_id}")
async def update_agent(request: web.Request) -> web.Response:
    """Rename an agent (its display name; the id never changes)."""
    services = request.app[services_key]
    agent_id = request.match_info["agent_id"]
    data = await read_json_object(request)
    if set(data) != {"name"}:
        raise ApiError(400, "bad_request", "give name, nothing else")
    if await services.store.rename_agent(agent_id, _name(data, "name")) is None:
        raise ApiError(404, "unknown_agent", f"no agent {agent_id!r}")
    log.info("agent.renamed", extra={"agent_id": agent_id})
    return web.json_response((await _agent(services, agent_id)).to_json())


# -- events --------------------------------------------------------------------------------------


def _event_summary(stored: StoredEvent, *, full: bool) -> dict[str, Any]:
    """An event's place and kind; its params and body only when ``full``."""
    event = stored.event
    summary: dict[str, Any] = {
        "id": event.id,
        "seq": stored.seq,
        "account_id": event.account,
        "type": event.type,
        "received_at": event.received_at,
        "bytes": len(event.request.body),
    }
    if full:
        summary["event"] = event.to_json()
    return summary


def _int_query(
    request: web.Request, name: str, default: int | None, *, low: int, high: int
) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, "bad_request", f"{name!r} must be an integer {low}-{high}")
    return value


@routes.get("/v1/events/{event_id}")
async def get_event(request: web.Request) -> web.Response:
    """One event by its relay id (``ev_…``), with its params and raw request."""
    services = request.app[services_key]
    account_id = None
    if "account" in request.query:
        account_id = (await _account(services, request.query["account"])).id
    event_id = request.match_info["event_id"]
    stored = await services.store.get_event(event_id, account_id=account_id)
    if stored is None:
        raise ApiError(404, "unknown_event", f"no event {event_id!r} in the log")
    return web.json_response(_event_summary(stored, full=True))


@routes.get("/v1/accounts/{account}/events")
async def list_events(request: web.Request) -> web.Response:
    """A page of the account's log.

    Newest first by default (``before``: a seq to page back from); oldest first with
    ``after`` (a seq) or ``since`` (ISO 8601 time), for exports. ``full=true`` adds each
    event object (params and raw request). ``next`` is the cursor of the following page
    (``before`` or ``after``), ``null`` at the end.
    """
    services = request.app[services_key]
    account = await _account(services, request.match_info["account"])
    store = services.store
    limit = _int_query(request, "limit", 50, low=1, high=_MAX_PAGE)
    assert limit is not None
    full = request.query.get("full", "").lower() in ("1", "true", "yes")
    after = _int_query(request, "after", None, low=0, high=2**62)
    if "since" in request.query:
        try:
            since = parse_time(request.query["since"])
        except ValueError as exc:
            raise ApiError(400, "bad_request", "'since' must be an ISO 8601 time") from exc
        cut = await store.retention_cut(account.id, keep_events=None, keep_since=since)
        after = max(after or 0, cut)
    if after is not None:
        events = await store.read_events(account.id, after=after, limit=limit)
        next_page = events[-1].seq if len(events) == limit else None
        order = "oldest_first"
    else:
        before = _int_query(request, "before", None, low=1, high=2**62)
        events = await store.recent_events(account.id, limit=limit, before=before)
        next_page = events[-1].seq if len(events) == limit else None
        order = "newest_first"
    remaining = None
    if after is not None:
        remaining = await store.count_after(account.id, events[-1].seq if events else after)
    return web.json_response(
        {
            "account_id": account.id,
            "order": order,
            "events": [_event_summary(stored, full=full) for stored in events],
            "next": next_page,
            "remaining": remaining,
        }
    )


# -- metrics -------------------------------------------------------------------------------------


@routes.get("/metrics")
async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the gauges are computed now from the hub and the store."""
    services = request.app[services_key]
    states = await agent_states(services)
    metrics = services.hub.metrics
    metrics.set_link_state(
        connected=len(services.hub.online()),
        backlogs=[(s.record.id, s.backlog) for s in states if s.state in ("online", "offline")],
    )
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
