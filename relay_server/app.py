"""The relay's two aiohttp applications (STYLE §7: two listeners, two apps, shared services)."""

from __future__ import annotations

from aiohttp import web

from . import admin, agent_ws, enroll, health, ingress
from .appkeys import config_key, hub_key, relay_id_key, store_key
from .middleware import error_middleware
from .services import Services, services_key

__all__ = ["create_public_app", "create_admin_app", "services_key"]

# Enrollment and other small JSON bodies fit well inside this; ingress reads its own body.
_MIN_CLIENT_MAX_SIZE = 64 * 1024


def _install(app: web.Application, services: Services) -> None:
    app[services_key] = services
    app[config_key] = services.config
    app[store_key] = services.store
    app[hub_key] = services.hub
    app[relay_id_key] = services.relay_id


def create_public_app(services: Services) -> web.Application:
    """X-on ingress, agent WebSocket, enrollment, health (DESIGN §Relay server endpoints)."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=max(services.config.max_body_size + 1, _MIN_CLIENT_MAX_SIZE),
    )
    _install(app, services)
    app.add_routes(ingress.routes)
    app.add_routes(enroll.routes)
    app.add_routes(health.routes)
    app.router.add_get("/v1/agent", agent_ws.handle)
    return app


def create_admin_app(services: Services) -> web.Application:
    """Account and agent management behind the admin token."""
    app = web.Application(middlewares=[error_middleware, admin.admin_auth_middleware])
    _install(app, services)
    app.add_routes(admin.routes)
    return app
