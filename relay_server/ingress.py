"""X-on ingress: ``GET|POST /xon/{ingress_key}[/{event_type}]`` (DESIGN §Relay server endpoints).

The request is kept losslessly (DESIGN principle 2) and answered 2xx only after the store
committed it (principle 1); then the hub is told so connected agents get it at once. A status
event (``ServerConfig.status``) also updates the account's status cache, and a changed item is
pushed to the connected agents (DESIGN §Link protocol, Status). Abuse limits (issue 6):
per-account rate, body size, body deadline, identity encoding only (relay_server/limits.py);
what the body may turn into is bounded by ``LimitsConfig`` (README, Ingress limits): params,
names, values, nesting, charsets and the stored event's size; the account's stored bytes are
bounded by its quota (507 ``quota_exceeded``, docs/redis.md, Quotas). A path suffix that could climb
above a forward target's path is refused (docs/delivery.md, Forward).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time

from aiohttp import web

from shared import crypto
from shared.errors import ApiError, StoreError
from shared.events import RawRequest, XonEvent, check_event_size, format_time, parse_ingress

from .appkeys import config_key, hub_key, store_key
from .hub import AgentHub
from .limits import check_target, limits_key, read_body
from .status import status_item
from .store.base import QuotaExceeded, Store, StoredEvent

__all__ = ["routes", "new_event_id"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_PREFIX = "/xon/"


_id_clock = itertools.count()
# The random part needs uniqueness, not secrecy (ids are shown to agents and apps), so a PRNG
# seeded from os.urandom serves; drawing from os.urandom itself cost a system call per event.
_id_random = random.Random()
if hasattr(os, "register_at_fork"):  # a forked child must not repeat its parent's sequence
    os.register_at_fork(after_in_child=_id_random.seed)


def new_event_id(now: float) -> str:
    """``ev_`` + 12 hex digits of milliseconds + a 4-hex per-process counter + 12 random hex.

    Ids sort by time; within one millisecond the counter keeps them in arrival order (the
    random part alone would not), and the random part keeps instances from colliding.
    """
    count = next(_id_clock) & 0xFFFF
    return f"ev_{int(now * 1000):012x}{count:04x}{_id_random.getrandbits(48):012x}"


def _split_target(request: web.Request) -> tuple[str, str]:
    """``/xon/KEY/sms?a=%41`` → (``"/sms"``, ``"a=%41"``), byte-exact as sent.

    Read from the target's path and query (``rel_url``), never by offset into the request
    line: an absolute-form target (``POST http://host/xon/KEY/sms``, RFC 9112 §3.2.2) would
    otherwise put the ingress key into the event's path and type. The whole first segment
    after ``/xon/`` is the key, however it was spelled (``%4B…`` included).
    """
    url = request.rel_url
    _, slash, suffix = url.raw_path[len(_PREFIX) :].partition("/")
    return slash + suffix, url.raw_query_string


async def ingress(request: web.Request) -> web.Response:
    app = request.app
    store = app[store_key]
    key_hash = crypto.hash_secret(request.match_info["key"])
    account = await store.account_by_ingress_hash(key_hash)
    if account is None or not crypto.constant_time_equal(account.ingress_key_hash, key_hash):
        # Never say more: an unknown key and a revoked one look the same.
        raise ApiError(404, "unknown_ingress_key", "unknown ingress key")
    limits = app[limits_key]
    limits.check_account(account.id)
    path, query = _split_target(request)
    content_type = request.headers.get("Content-Type", "")
    check_target(path, query, content_type)
    config = app[config_key]
    body = await read_body(
        request, limit=config.max_body_size, timeout=config.limits.body_timeout
    )
    raw = RawRequest(
        method=request.method, path=path, query=query, content_type=content_type, body=body
    )
    parsed = parse_ingress(raw, limits.ingress, id_params=config.xon_id_params)
    now = time.time()
    event = XonEvent(
        id=new_event_id(now),
        account=account.id,
        type=parsed.type,
        received_at=format_time(now),
        params=parsed.params,
        request=raw,
    )
    check_event_size(event, limits.ingress.max_event_size)
    try:
        result = await store.append_event(
            event, xon_id=parsed.xon_id,
            max_bytes=config.quota.for_account(account.id, account.name),
        )
    except QuotaExceeded as exc:
        # 507 before the shared store fills: this tenant waits for retention, others go on.
        app[hub_key].metrics.events_over_quota.inc()
        log.info("ingress.over_quota", extra={"account": account.id, "used": exc.used,
                                              "bytes": exc.size, "quota": exc.limit})
        raise
    app[hub_key].metrics.event_appended(
        duplicate=result.duplicate,
        seconds=time.time() - now,
        xon_id_reused=result.xon_id_reused,
    )
    stored = result.stored
    if not result.duplicate:
        app[hub_key].notify(account.id)
        await _update_status(store, app[hub_key], stored, config.status.types)
    # DEBUG: at INFO a line per event cost ~5 % of relay CPU (docs/performance.md); the
    # xon_relay_events_stored metric counts them, and refusals still log at INFO. Checked
    # first so that the record's fields are not even gathered when DEBUG is off.
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "ingress.accepted",
            extra={
                "account": account.id,
                "event_id": stored.event.id,
                "seq": stored.seq,
                "type": parsed.type,
                "bytes": len(body),
                "duplicate": result.duplicate,
            },
        )
        if result.xon_id_reused:
            # docs/delivery.md, Duplicates: an id seen with another request is a new event.
            log.debug(
                "ingress.xon_id_reused",
                extra={"account": account.id, "event_id": stored.event.id, "seq": stored.seq},
            )
    return web.json_response({"id": stored.event.id, "duplicate": result.duplicate})


async def _update_status(
    store: Store, hub: AgentHub, stored: StoredEvent, types: dict[str, list[str]]
) -> None:
    item = status_item(stored, types)
    if item is None:
        return
    try:
        changed = await store.put_status(item)
    except StoreError as exc:
        # The event itself is committed and on its way; the cache catches up with the next
        # status event X-on sends (it orders them at intervals).
        log.warning("status.update_failed", extra={"account": item.account_id, "error": str(exc)})
        return
    if changed:
        hub.push_status(item.account_id, [item])


for _pattern in ("/xon/{key}", "/xon/{key}/{suffix:.*}"):
    routes.get(_pattern, allow_head=False)(ingress)
    routes.post(_pattern)(ingress)
