"""Local delivery modes besides polling (DESIGN §Agent local API; docs/delivery.md).

:class:`Delivery` owns the agent's stale policy and its push targets (``[[forward]]`` and
``[[tcp]]``): one task per target, one shared HTTP client session for every forward target.
Pull modes (``/v1/events``, named consumers, ``/v1/stream``) live in the local API and ask
:attr:`Delivery.stale` how to present an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from shared.config import AgentConfig
from shared.errors import StoreError

from ..inbox import Inbox
from .base import PushTarget, Sleep, StalePolicy, TargetStatus, retry_delay
from .forward import Forwarder
from .tcp import TcpSender

__all__ = [
    "Delivery",
    "delivery_key",
    "StalePolicy",
    "PushTarget",
    "TargetStatus",
    "Forwarder",
    "TcpSender",
    "CONSUMER_PREFIX",
]

log = logging.getLogger(__name__)

CONSUMER_PREFIX = "consumer:"
"""Named consumers' positions in the inbox: ``consumer:NAME``."""


class Delivery:
    """The agent's push targets and stale policy.

    Args:
        config: ``ttl``, ``stale``, ``forward`` and ``tcp`` are read.
        inbox: the agent's inbox.
        sleep: waits between retries (tests inject their own).
        clock: wall clock, for staleness and reports.
    """

    def __init__(
        self,
        config: AgentConfig,
        inbox: Inbox,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.inbox = inbox
        self.stale = StalePolicy(config.ttl, config.stale, clock=clock)
        self.forwarders = [
            Forwarder(target, inbox=inbox, stale=self.stale, sleep=sleep)
            for target in config.forward
        ]
        self.tcp = [
            TcpSender(target, inbox=inbox, stale=self.stale, sleep=sleep) for target in config.tcp
        ]
        self._sleep = sleep
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def targets(self) -> list[PushTarget]:
        return [*self.forwarders, *self.tcp]

    async def start(self) -> None:
        """Start one task per target."""
        if self.forwarders:
            # trust_env=False: an HTTP(S)_PROXY variable must not send loopback traffic away.
            self._http = aiohttp.ClientSession(trust_env=False)
            for forwarder in self.forwarders:
                forwarder.http = self._http
        self._tasks = [
            asyncio.create_task(self._supervise(target), name=f"{target.kind}:{target.key}")
            for target in self.targets
        ]
        for target in self.targets:
            log.info("delivery.started", extra={"kind": target.kind, "target": target.key})

    async def close(self) -> None:
        """Stop every target; each stores its position as it stops (see PushTarget)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for target in self.targets:
            await target.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def report(self) -> dict[str, Any]:
        """``forward``, ``tcp`` and ``consumers`` for ``/v1/health``."""
        last = self.inbox.last_cursor
        consumers = await self.inbox.positions(CONSUMER_PREFIX)
        return {
            "forward": [f.report() for f in self.forwarders],
            "tcp": [t.report() for t in self.tcp],
            "consumers": [
                {"name": name, "cursor": str(cursor), "lag": max(0, last - cursor)}
                for name, cursor in consumers.items()
            ],
        }

    async def _supervise(self, target: PushTarget) -> None:
        """Keep one target's loop alive: a failing inbox or a bug must not end delivery."""
        attempt = 0
        while True:
            try:
                await target.run()
                return  # the inbox was released: shutting down
            except StoreError as exc:
                target.status.last_error = str(exc)
                target.log.error("delivery.store_failed", extra={"error": str(exc)})
            except Exception:
                target.status.last_error = "internal error"
                target.log.exception("delivery.failed")
            delay = retry_delay(attempt, initial=1.0, cap=60.0)
            attempt += 1
            await target.close()
            await self._sleep(delay)


delivery_key = web.AppKey("delivery", Delivery)
"""The local API app's :class:`Delivery` (stale policy for pull modes, reports for health)."""
