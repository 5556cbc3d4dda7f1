"""The relay's two aiohttp applications (STYLE §7: two listeners, two apps, shared services).

``server_options`` are the ``AppRunner`` settings of the public listener: the connection-level
half of the abuse defences of issue 6 (the request-level half is relay_server/limits.py).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from shared.config import ServerConfig
from shared.logs import redact

from . import admin, agent_ws, dashboard, enroll, health, ingress, probe
from .appkeys import config_key, hub_key, relay_id_key, store_key
from .limits import Limits, limits_key
from .metrics import count_ingress
from .middleware import error_middleware, source_limit_middleware
from .services import Services, services_key, track_requests

__all__ = [
    "create_public_app",
    "create_admin_app",
    "services_key",
    "server_options",
    "AccessLogger",
]

# Enrollment and other small JSON bodies fit well inside this; ingress reads its own body.
_MIN_CLIENT_MAX_SIZE = 64 * 1024
_LINGERING_TIME = 2.0
"""Seconds the rest of a refused body (413, 408, 415) is read and dropped, so the client sees
our answer rather than a reset; then the connection closes."""


def _install(app: web.Application, services: Services) -> None:
    app[services_key] = services
    app[config_key] = services.config
    app[store_key] = services.store
    app[hub_key] = services.hub
    app[relay_id_key] = services.relay_id


def create_public_app(services: Services) -> web.Application:
    """X-on ingress, agent WebSocket, enrollment, health (DESIGN §Relay server endpoints)."""
    app = web.Application(
        # track_requests: requests in flight are drained on shutdown (Services.drain).
        middlewares=[error_middleware, source_limit_middleware, track_requests],
        client_max_size=max(services.config.max_body_size + 1, _MIN_CLIENT_MAX_SIZE),
    )
    _install(app, services)
    app[limits_key] = Limits.build(services.config.limits)
    app.add_routes(ingress.routes)
    app.add_routes(enroll.routes)
    probe.install(app)
    app.add_routes(health.routes)
    app.router.add_get("/v1/agent", agent_ws.handle)
    app.on_response_prepare.append(count_ingress)
    return app


def create_admin_app(services: Services) -> web.Application:
    """Account and agent management behind the admin token."""
    app = web.Application(middlewares=[error_middleware, admin.admin_auth_middleware])
    _install(app, services)
    app.add_routes(admin.routes)
    dashboard.install(app)
    return app


class AccessLogger(AbstractAccessLogger):
    """One ``http.request`` record per request, with the ingress key masked (STYLE §6).

    aiohttp's own access log writes the request line, which holds the ingress key. Refusals
    are logged at INFO (an operator wants to see floods and guesses); the rest at DEBUG, like
    ``ingress.accepted``: per-event INFO lines cost ~5 % of relay CPU, and /metrics counts them.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        level = logging.INFO if response.status >= 400 else logging.DEBUG
        if not self.logger.isEnabledFor(level):
            return
        self.logger.log(
            level,
            "http.request",
            extra={
                "method": request.method,
                "path": redact(request.path),
                "status": response.status,
                "bytes": response.body_length,
                "duration": round(time, 6),
                "remote": request.remote,
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def server_options(config: ServerConfig) -> dict[str, Any]:
    """``web.AppRunner`` keyword arguments for the public listener.

    - ``keepalive_timeout``: aiohttp arms it when a connection opens and after each response,
      and closes the connection if no complete request head arrived by then, so it is the
      slow-header (slowloris) deadline as well as the idle keep-alive limit. It never fires
      while a handler runs, so agent WebSockets are unaffected.
    - ``auto_decompress=False``: a compressed body stays compressed (refused with 415 by
      ``limits.read_body``); the parser never inflates a bomb.
    - access log through :class:`AccessLogger`, never aiohttp's (which logs ingress keys).
    """
    return {
        "keepalive_timeout": config.limits.header_timeout,
        "lingering_time": _LINGERING_TIME,
        "auto_decompress": False,
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger("relay_server.access"),
    }
