"""``GET /healthz`` (liveness) and ``GET /readyz`` (store reachable and not draining)."""

from __future__ import annotations

from aiohttp import web

from shared.errors import StoreError

from .middleware import error_response
from .services import services_key

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    services = request.app[services_key]
    if services.draining:
        return error_response(503, "draining", "relay is shutting down")
    try:
        await services.store.ping()
    except StoreError:
        return error_response(503, "store_unavailable", "store is not reachable")
    return web.json_response({"status": "ok"})
