"""Shared services of one relay process, built once and injected into both aiohttp apps.

STYLE §7: the public and admin listeners are two ``web.Application``s; what they share (config,
store, relay identity, CTOX egress, agent hub with its bus to the other instances, retention)
is built here, inside an ``AsyncExitStack`` that tears it down in reverse order (drain the
links, stop retention, the hub's background work and the bus, CTOX egress, then the store).

Graceful shutdown (issue 6; DESIGN §Relay server endpoints, ``/readyz``: "not draining"):
:meth:`Services.drain` fails readiness first, waits for the HTTP requests in flight
(:func:`track_requests` counts them) within ``shutdown_grace``, then lets each agent link
answer its running commands and sends it away. It returns as soon as all that is done, so an
idle relay stops at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from shared import crypto
from shared.config import ServerConfig

from .bus import open_bus
from .ctox import CtoxService
from .hub import AgentHub
from .retention import running_retention
from .store import Store, open_store

__all__ = ["Services", "open_services", "services_key", "track_requests"]

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class Services:
    config: ServerConfig
    store: Store
    relay_id: str
    hub: AgentHub
    ctox: CtoxService
    admin_token: str
    """Bearer token of the admin API (DESIGN §Relay server endpoints: admin token)."""
    draining: bool = False
    """Set at shutdown so /readyz fails before the listeners stop."""
    _drained: bool = field(default=False, init=False, repr=False)
    _in_flight: int = field(default=0, init=False, repr=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    @property
    def requests_in_flight(self) -> int:
        """HTTP requests being handled now, agent WebSockets excepted (:func:`track_requests`)."""
        return self._in_flight

    async def drain(self) -> None:
        """Fail readiness, let the requests in flight finish (at most ``shutdown_grace``), then
        tell every agent to go elsewhere and close its link (once)."""
        self.draining = True
        if self._drained:
            return
        self._drained = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        log.info("server.draining", extra={"requests": self._in_flight})
        try:
            async with asyncio.timeout_at(deadline):
                while self._in_flight:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            log.warning("server.drain_timeout", extra={"requests": self._in_flight})
        # Running commands get what is left of the grace; closing each link then has its own
        # bound (hub.close_timeout), so a dead agent cannot hold the shutdown.
        remaining = max(deadline - loop.time(), 0.0)
        await self.hub.shutdown(timeout=remaining + self.hub.close_timeout)

    def _request_started(self) -> None:
        self._in_flight += 1

    def _request_ended(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()


services_key = web.AppKey("services", Services)


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the request while it runs, so that :meth:`Services.drain` can wait for it.

    An ingress request that got this far is answered, and its event committed, before the
    relay stops (issue 6: 0 lost). Agent WebSockets live until shutdown sends them away, so
    they are not counted.
    """
    if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await handler(request)
    services = request.app[services_key]
    services._request_started()
    try:
        return await handler(request)
    finally:
        services._request_ended()


@asynccontextmanager
async def open_services(
    config: ServerConfig, *, admin_token: str, store: Store | None = None
) -> AsyncIterator[Services]:
    """Open the store, build CTOX egress and the hub; on exit drain the hub, let running X-on
    calls finish, then close the store.

    Args:
        store: an open store to use (and close) instead of opening ``config.store_url``; tests
            pass one built with a fault seam.

    Raises:
        StoreError: the store cannot be opened.
    """
    async with AsyncExitStack() as stack:
        cluster = config.cluster
        if store is None:
            store = await open_store(
                config.store_url,
                exclusive=True,  # one relay process per SQLite file (docs/scaling.md)
                wait_replicas=cluster.redis_wait_replicas,
                wait_aof=cluster.redis_wait_aof,
                wait_timeout=cluster.redis_wait_timeout,
            )
        stack.push_async_callback(store.close)
        relay_id = await store.relay_id()
        ctox = CtoxService(store, config.ctox)
        stack.push_async_callback(ctox.close)
        hub = AgentHub(
            store,
            relay_id=relay_id,
            link=config.link,
            ctox=ctox,
            bus=open_bus(store, crypto.new_token(6)),
            cluster=cluster,
        )
        await hub.start()
        stack.push_async_callback(hub.close)
        await stack.enter_async_context(running_retention(store, config.retention))
        services = Services(
            config=config,
            store=store,
            relay_id=relay_id,
            hub=hub,
            ctox=ctox,
            admin_token=admin_token,
        )
        stack.push_async_callback(services.drain)
        yield services
