"""Shared services of one relay process, built once and injected into both aiohttp apps.

STYLE §7: the public and admin listeners are two ``web.Application``s; what they share (config,
store, relay identity, CTOX egress, agent hub with its bus to the other instances, retention)
is built here, inside an ``AsyncExitStack`` that tears it down in reverse order (drain the
links, stop retention, the hub's background work and the bus, CTOX egress, then the store).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

from shared import crypto
from shared.config import ServerConfig

from .bus import open_bus
from .ctox import CtoxService
from .hub import AgentHub
from .retention import running_retention
from .store import Store, open_store

__all__ = ["Services", "open_services", "services_key"]

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

    async def drain(self) -> None:
        """Fail readiness, then tell every agent to go elsewhere and close its link (once)."""
        self.draining = True
        if self._drained:
            return
        self._drained = True
        await self.hub.shutdown()


services_key = web.AppKey("services", Services)


@asynccontextmanager
async def open_services(config: ServerConfig, *, admin_token: str) -> AsyncIterator[Services]:
    """Open the store, build CTOX egress and the hub; on exit drain the hub, let running X-on
    calls finish, then close the store.

    Raises:
        StoreError: the store cannot be opened.
    """
    async with AsyncExitStack() as stack:
        cluster = config.cluster
        store = await open_store(
            config.store_url,
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
