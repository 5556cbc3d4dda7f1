"""``GET /healthz`` (liveness) and ``GET /readyz`` (an event can be committed now, and the
relay is not draining; docs/operations.md, Readiness)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from shared.errors import StoreError

from .middleware import error_response
from .services import services_key

__all__ = ["routes"]

routes = web.RouteTableDef()

_READY_TIMEOUT = 5.0
"""Seconds the store may take to show it can commit: slower is not ready (a load balancer's
probe gives up about then, and a hung Redis would hold the probe for its socket timeout)."""


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    services = request.app[services_key]
    # The store first: a relay stopping because its store failed says so, not "draining".
    try:
        async with asyncio.timeout(_READY_TIMEOUT):
            await services.store.ping()
    except (StoreError, TimeoutError):
        return error_response(503, "store_unavailable", "the store cannot commit events now")
    if services.draining:
        return error_response(503, "draining", "relay is shutting down")
    return web.json_response({"status": "ok"})
