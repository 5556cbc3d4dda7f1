"""The agent hub: which agents are connected, and the links that serve them.

Each WebSocket on ``/v1/agent`` is one :class:`~relay_server.agent_ws.AgentLink`. The hub knows
every open connection (so that shutdown reaches all of them) and, once a link authenticated, maps
its agent id to it: one link per agent, the newest wins (DESIGN §Link protocol). Ingress calls
:meth:`AgentHub.notify` after a commit so that the links of that account read the store again,
and :meth:`AgentHub.push_status` when a status item changed (DESIGN §Link protocol, Status).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from shared.config import LinkConfig

from .store.base import StatusItem, Store

if TYPE_CHECKING:
    from .agent_ws import AgentLink
    from .ctox import CtoxService

__all__ = ["AgentHub"]

log = logging.getLogger(__name__)


class AgentHub:
    """Registry of agent links.

    Args:
        store: where links read events and keep cursors.
        relay_id: this relay's identity, sent in every challenge.
        link: link protocol settings (window, auth timeout, ping, message size).
        close_timeout: seconds a closing link may take (error frame, close handshake) before
            its connection is dropped.
        ctox: performs the agents' CTOX commands; ``None`` refuses them (503).
    """

    def __init__(
        self,
        store: Store,
        *,
        relay_id: str,
        link: LinkConfig,
        close_timeout: float = 10.0,
        ctox: CtoxService | None = None,
    ) -> None:
        self.store = store
        self.ctox = ctox
        self.relay_id = relay_id
        self.link = link
        self.close_timeout = close_timeout
        self._conns: set[AgentLink] = set()
        self._agents: dict[str, AgentLink] = {}
        self._accounts: dict[str, set[AgentLink]] = {}
        self._since: dict[str, float] = {}
        self._shutting_down = False

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def notify(self, account_id: str) -> None:
        """New events of ``account_id`` are committed: wake the links that deliver them."""
        for link in self._accounts.get(account_id, ()):
            link.wake()

    def push_status(self, account_id: str, items: list[StatusItem]) -> None:
        """Status items of ``account_id`` changed: send them to its connected agents."""
        for link in self._accounts.get(account_id, ()):
            link.push_status(items)

    async def disconnect(self, agent_id: str, code: int, reason: str) -> bool:
        """Close every connection of ``agent_id`` now (e.g. revoked), handshaking ones too.

        Returns:
            True when at least one connection was closed, False when the agent was not connected.
        """
        # A link between hello and auth is not registered yet; it must not slip through
        # (DESIGN §Link protocol: "a revoked agent is disconnected at once").
        links = [link for link in self._conns if link.agent_id == agent_id]
        for link in links:
            await link.close(code, reason)
        return bool(links)

    def online(self) -> dict[str, float]:
        """Authenticated agents and the Unix time their current link authenticated."""
        return dict(self._since)

    async def shutdown(self, *, timeout: float = 10.0) -> None:
        """Tell every link to go away, close them with 1001 and wait (at most ``timeout``)."""
        self._shutting_down = True
        links = list(self._conns)
        if not links:
            return
        log.info("hub.shutdown", extra={"links": len(links)})
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(link.go_away("relay shutting down") for link in links))
                await asyncio.gather(*(link.wait_closed() for link in links))
        except TimeoutError:
            log.warning("hub.shutdown_timeout", extra={"links": len(self._conns)})

    # -- used by AgentLink ------------------------------------------------------------------------

    def attach(self, link: AgentLink) -> None:
        self._conns.add(link)

    async def register(self, link: AgentLink) -> None:
        """Make ``link`` the one link of its agent; a previous link is closed with REPLACED.

        The old link's sender is stopped before this returns, and ``link`` starts sending only
        after that, so no event goes out on both links at once.
        """
        agent_id, account_id = link.agent_id, link.account_id
        assert agent_id is not None and account_id is not None
        old = self._agents.get(agent_id)
        self._agents[agent_id] = link
        self._since[agent_id] = time.time()
        self._accounts.setdefault(account_id, set()).add(link)
        if old is not None and old is not link:
            self._drop(old)
            old.log.info("agent.replaced", extra={"by_conn_id": link.conn_id})
            await old.replace()

    def detach(self, link: AgentLink) -> None:
        """Forget ``link``; the registry entry goes only if ``link`` is still the registered one."""
        self._conns.discard(link)
        if link.agent_id is not None and self._agents.get(link.agent_id) is link:
            del self._agents[link.agent_id]
            del self._since[link.agent_id]
        self._drop(link)

    def _drop(self, link: AgentLink) -> None:
        if link.account_id is None:
            return
        peers = self._accounts.get(link.account_id)
        if peers is not None:
            peers.discard(link)
            if not peers:
                del self._accounts[link.account_id]
