"""The agent hub: which agents are connected, and the links that serve them.

Each WebSocket on ``/v1/agent`` is one :class:`~relay_server.agent_ws.AgentLink`. The hub knows
every open connection (so that shutdown reaches all of them) and, once a link authenticated, maps
its agent id to it. Ingress calls :meth:`AgentHub.notify` after a commit so that the links of
that account read the store again, and :meth:`AgentHub.push_status` when a status item changed
(DESIGN §Link protocol, Status).

Several instances on one Redis (issue 5, docs/scaling.md) share this work through the
:mod:`~relay_server.bus`: ``notify``, ``push_status`` and ``disconnect`` also reach the other
instances, which act on their own links. Messages are only hints; two loops make every outcome
independent of them:

* the poll (``cluster.poll_interval``) re-reads each served account's log head and status and
  wakes the links that are behind, so a lost wake-up costs at most one interval;
* the re-check (``cluster.recheck_interval``) reads every connected agent's record and closes
  the links of revoked agents (4403) and links a newer one replaced elsewhere (4010).

The hub also times the links' ``heartbeat`` frames (docs/protocol.md, Heartbeat): one ticker
reads each served account's log head once per ``link.heartbeat_interval`` and a
:class:`HeartbeatRule` per link decides whether that link's agent gets a frame. An idle agent
that has everything gets none, so 10,000 idle links cost one head read per account per interval
instead of one store read and one frame per link (docs/performance.md, bench 3).

One link per agent, across instances (DESIGN §Link protocol: "the newest link wins"): see
:meth:`AgentHub.register` and docs/scaling.md for the exact rule.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared import crypto
from shared.config import ClusterConfig, LinkConfig
from shared.errors import StoreError
from shared.link.frames import CloseCode

from .bus import Bus, Notice
from .metrics import RelayMetrics
from .store.base import StatusItem, Store

if TYPE_CHECKING:
    from .agent_ws import AgentLink
    from .ctox import CtoxService

__all__ = ["AgentHub", "HeartbeatRule", "PassedOver"]

log = logging.getLogger(__name__)

_CONCURRENCY = 32
"""Store reads the poll and the heartbeat ticker run at once (one per served account)."""


@dataclass(frozen=True, slots=True)
class PassedOver:
    """A run of an agent's account log that its subscription did not match: no event with a
    seq in (``after``, ``through``] matches the subscription whose digest is ``digest``
    (:meth:`shared.subscription.Subscription.digest`).

    Events never change, so the fact outlives the link that learnt it: the agent's next link
    with the same subscription jumps over the run instead of reading and matching it again
    (docs/protocol.md, Routing). Pure; the hub keeps the latest one per agent.
    """

    digest: bytes
    after: int
    through: int

    def skip(self, digest: bytes, scan: int) -> int:
        """Where a scan at ``scan`` with subscription ``digest`` may go on from."""
        if digest == self.digest and self.after <= scan < self.through:
            return self.through
        return scan

    def joined(self, later: PassedOver) -> PassedOver:
        """``later`` extended by this run when the two touch (same subscription)."""
        if later.digest == self.digest and self.after <= later.after <= self.through:
            return PassedOver(self.digest, self.after, max(self.through, later.through))
        return later


class HeartbeatRule:
    """Whether one link's next heartbeat round sends a ``heartbeat`` frame, and its ``head``
    (docs/protocol.md, Heartbeat). Pure: the hub feeds it the account's log head and the
    link's positions once per ``link.heartbeat_interval``.

    ``head`` is what it always was: the log head of one round ago when the sender has still not
    scanned that far (it had a whole interval: it is stuck), else the last seq offered.

    The frame is skipped when nothing is in flight and ``head`` is the last seq offered, i.e.
    the agent acked everything up to it. That is safe: the agent starts a stall only on a
    heartbeat above the highest seq it received while it has acked all it received, so above
    its acked seq, and the relay's acked seq (everything offered, here) is never above the
    agent's own. A skipped frame could only have ended a stall, and a stall can only have
    begun with an earlier frame that was not skippable; so after such a frame the next one is
    sent whatever it says. Every frame that could start a stall still goes out in the same
    round as before: the agent detects a stuck sender within the same bounds (one to two
    intervals, plus ``link.stall_timeout``).
    """

    def __init__(self) -> None:
        self._previous: int | None = None
        """The account's log head read in the previous round (None before the first)."""
        self._ahead = False
        """The last frame sent was not skippable: the agent may be stalled on it."""

    def due(self, head: int, *, scanned: int, offered: int, in_flight: int) -> int | None:
        """One round: the ``head`` to send, or None to send nothing.

        Args:
            head: the account's log head, read this round.
            scanned: the link's ``scanned_through`` (offered or passed over up to here).
            offered: the last seq offered on the link (its resume point before the first).
            in_flight: events offered and not acked.
        """
        previous, self._previous = self._previous, head
        due = previous if previous is not None and previous > scanned else offered
        ahead = due > offered or in_flight > 0
        if not ahead and not self._ahead:
            return None
        self._ahead = ahead
        return due


class AgentHub:
    """Registry of agent links.

    Args:
        store: where links read events and keep cursors.
        relay_id: this relay's identity, sent in every challenge.
        link: link protocol settings (window, auth timeout, ping, message size).
        close_timeout: seconds a closing link may take (error frame, close handshake) before
            its connection is dropped.
        ctox: performs the agents' CTOX commands; ``None`` refuses them (503).
        bus: notifications to and from the other instances; ``None``: this relay runs alone.
        cluster: poll, re-check and handover settings.
    """

    def __init__(
        self,
        store: Store,
        *,
        relay_id: str,
        link: LinkConfig,
        close_timeout: float = 10.0,
        ctox: CtoxService | None = None,
        bus: Bus | None = None,
        cluster: ClusterConfig | None = None,
    ) -> None:
        self.store = store
        self.ctox = ctox
        self.relay_id = relay_id
        self.link = link
        self.close_timeout = close_timeout
        self.bus = bus if bus is not None else Bus(crypto.new_token(6))
        self.cluster = cluster if cluster is not None else ClusterConfig()
        self._conns: set[AgentLink] = set()
        self._agents: dict[str, AgentLink] = {}
        self._accounts: dict[str, set[AgentLink]] = {}
        self._since: dict[str, float] = {}
        self._shutting_down = False
        self._handovers: dict[tuple[str, int], asyncio.Event] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._jobs: set[asyncio.Task[None]] = set()
        self._poll_now = asyncio.Event()
        self._failing: set[str] = set()
        self._beats: dict[AgentLink, HeartbeatRule] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.heartbeat_rounds = 0
        """Heartbeat rounds finished since this hub began (tests wait on it)."""
        self.metrics = RelayMetrics()
        """Counters that ingress, the links and the admin listener update and expose."""
        self.passed_over: dict[str, PassedOver] = {}
        """Agent id → the latest run of its log its subscription did not match (one entry per
        agent that authenticated here with a subscription)."""

    @property
    def instance_id(self) -> str:
        """This relay process's id among the instances sharing the store."""
        return self.bus.instance_id

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def keepalive(self) -> float | None:
        """Seconds without a frame from an agent before the relay pings it (aiohttp's
        ``heartbeat``); ``None`` when ``link.ping_interval`` is none.

        Longer than the agent's ping interval: aiohttp restarts this timer whenever data
        arrives, so the agent's own pings keep the relay from pinging a live agent at all. A
        dead or black-holed agent is cut by the relay 1.5 × (``ping_interval`` +
        ``ping_timeout``) after its last frame (the pong wait is half the interval): 45 s with
        the defaults. The agent itself notices within ~30 s (DESIGN §Link protocol, Liveness).
        A ``ping_timeout`` of none counts as ``ping_interval`` here: the agent still pings.
        """
        ping = self.link.ping_interval
        if ping is None:
            return None
        timeout = self.link.ping_timeout
        return ping + (timeout if timeout is not None else ping)

    async def start(self) -> None:
        """Start the bus, the poll and the re-check (the real server; link tests may skip it)."""
        await self.bus.start(self._on_notice, self._poll_now.set)
        self._loops = [
            asyncio.create_task(self._poll_loop(), name="hub-poll"),
            asyncio.create_task(self._recheck_loop(), name="hub-recheck"),
        ]

    async def close(self) -> None:
        """Stop the background work (after :meth:`shutdown` closed the links)."""
        tasks = [*self._loops, *self._jobs]
        if self._ticker is not None:
            tasks.append(self._ticker)
            self._ticker = None
        self._loops = []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.bus.close()

    # -- called by ingress and admin ------------------------------------------------------------

    def notify(self, account_id: str) -> None:
        """New events of ``account_id`` are committed: wake the links that deliver them,
        here and on the other instances."""
        self._wake(account_id)
        self.bus.publish(Notice(kind="wake", subject=account_id))

    def push_status(self, account_id: str, items: list[StatusItem]) -> None:
        """Status items of ``account_id`` changed: send them to its connected agents, here and
        (re-read from the store) on the other instances."""
        for link in self._accounts.get(account_id, ()):
            link.push_status(items)
        self.bus.publish(Notice(kind="status", subject=account_id))

    async def disconnect(self, agent_id: str, code: int, reason: str) -> bool:
        """Close every connection of ``agent_id`` now (e.g. revoked), on every instance.

        Returns:
            True when this instance closed at least one connection.
        """
        self.bus.publish(Notice(kind="disconnect", subject=agent_id, code=code, reason=reason))
        return await self._disconnect_here(agent_id, code, reason)

    def online(self) -> dict[str, float]:
        """Agents authenticated on this instance and the Unix time their link authenticated."""
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

    async def register(self, link: AgentLink) -> bool:
        """Make ``link`` the one link of its agent, on every instance; False if it lost.

        The rule (docs/scaling.md, "One link per agent"):

        1. The store gives the link a new epoch, one above every earlier link of the agent,
           and records this instance as the holder (:meth:`Store.claim_link`). Higher epoch
           wins, wherever the links are.
        2. A previous link on this instance is stopped before this returns.
        3. When another instance held the agent and has not released it, this waits until
           that instance says it stopped sending (``released``), at most
           ``cluster.handover_timeout``: that instance is then dead or cut off, and if it lives
           its re-check stops the old link by itself within ``cluster.recheck_interval``.

        Only then may ``link`` send. Returns False when a newer link of the agent registered
        here meanwhile (``link`` must close with REPLACED).

        Raises:
            StoreError: the claim could not be stored (the link must close).
        """
        agent_id, account_id = link.agent_id, link.account_id
        assert agent_id is not None and account_id is not None
        claim = await self.store.claim_link(agent_id, owner=self.instance_id)
        link.epoch = claim.epoch
        old = self._agents.get(agent_id)
        if old is not None and old.epoch > link.epoch:
            return False
        self._agents[agent_id] = link
        self._since[agent_id] = time.time()
        self._accounts.setdefault(account_id, set()).add(link)
        if old is not None and old is not link:
            self._drop(old)
            old.log.info("agent.replaced", extra={"by_conn_id": link.conn_id})
            await old.replace()
        previous = claim.previous_owner
        if previous and previous != self.instance_id:
            await self._hand_over(agent_id, claim.epoch, previous)
        return True

    async def _hand_over(self, agent_id: str, epoch: int, previous: str) -> None:
        released = self._handovers[(agent_id, epoch)] = asyncio.Event()
        self.bus.publish(Notice(kind="claim", subject=agent_id, epoch=epoch, previous=previous))
        try:
            async with asyncio.timeout(self.cluster.handover_timeout):
                await released.wait()
        except TimeoutError:
            log.info(
                "agent.handover_timeout",
                extra={"agent_id": agent_id, "previous_instance": previous},
            )
        finally:
            del self._handovers[(agent_id, epoch)]

    def detach(self, link: AgentLink) -> None:
        """Forget ``link``; the registry entry goes only if ``link`` is still the registered one."""
        self._conns.discard(link)
        if link.agent_id is not None and self._agents.get(link.agent_id) is link:
            del self._agents[link.agent_id]
            del self._since[link.agent_id]
        self._drop(link)
        self.stop_heartbeats(link)

    def start_heartbeats(self, link: AgentLink) -> None:
        """Judge ``link`` in every heartbeat round from now on (none if
        ``link.heartbeat_interval`` is none); the ticker runs while any link is judged."""
        interval = self.link.heartbeat_interval
        if interval is None:
            return
        self._beats[link] = HeartbeatRule()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._heartbeat_loop(interval), name="hub-beats")

    def stop_heartbeats(self, link: AgentLink) -> None:
        """No more heartbeats for ``link``; the ticker stops with the last link."""
        self._beats.pop(link, None)
        if not self._beats and self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _drop(self, link: AgentLink) -> None:
        if link.account_id is None:
            return
        peers = self._accounts.get(link.account_id)
        if peers is not None:
            peers.discard(link)
            if not peers:
                del self._accounts[link.account_id]

    # -- notices from other instances -----------------------------------------------------------

    def _on_notice(self, notice: Notice) -> None:
        match notice.kind:
            case "wake":
                self._wake(notice.subject)
            case "status":
                self._spawn(self._refresh_status([notice.subject]))
            case "disconnect":
                self._spawn(self._disconnect_here(notice.subject, notice.code, notice.reason))
            case "claim":
                if notice.previous == self.instance_id:
                    self._spawn(self._release(notice))
            case "released":
                released = self._handovers.get((notice.subject, notice.epoch))
                if released is not None:
                    released.set()

    async def _release(self, claim: Notice) -> None:
        """Another instance took our agent over: stop our older link, then say so."""
        link = self._agents.get(claim.subject)
        if link is not None and link.epoch < claim.epoch:
            self._drop(link)
            link.log.info("agent.replaced", extra={"by_instance": claim.origin})
            await link.replace()
        # Answered even without a link here: ours ended before the claim arrived.
        self.bus.publish(
            Notice(
                kind="released", subject=claim.subject, epoch=claim.epoch, previous=claim.previous
            )
        )

    async def _disconnect_here(self, agent_id: str, code: int, reason: str) -> bool:
        # A link between hello and auth is not registered yet; it must not slip through
        # (DESIGN §Link protocol: "a revoked agent is disconnected at once").
        links = [link for link in self._conns if link.agent_id == agent_id]
        for link in links:
            await link.close(code, reason)
        return bool(links)

    def _wake(self, account_id: str) -> None:
        for link in self._accounts.get(account_id, ()):
            link.wake()

    def _spawn(self, job: Awaitable[object]) -> None:
        async def run() -> None:
            await job

        task = asyncio.create_task(run())
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    # -- the fallbacks: poll and re-check -------------------------------------------------------

    async def _poll_loop(self) -> None:
        """Wake links whose account's log moved past them and send status they miss."""
        while True:
            try:
                async with asyncio.timeout(self.cluster.poll_interval):
                    await self._poll_now.wait()
            except TimeoutError:
                pass
            self._poll_now.clear()
            accounts = list(self._accounts)
            await self._guarded("poll", self._poll(accounts))
            await self._guarded("status", self._refresh_status(accounts))

    async def _poll(self, accounts: list[str]) -> None:
        for start in range(0, len(accounts), _CONCURRENCY):
            chunk = accounts[start : start + _CONCURRENCY]
            heads = await asyncio.gather(*(self.store.head_seq(a) for a in chunk))
            for account_id, head in zip(chunk, heads, strict=True):
                for link in self._accounts.get(account_id, ()):
                    # scanned_through, not last_offered: a routed link has nothing to do
                    # when the newest events were not for it.
                    if head > link.scanned_through:
                        link.wake()

    async def _refresh_status(self, accounts: Iterable[str]) -> None:
        """Re-read status snapshots; each link sends the items newer than what it sent."""
        wanted = [a for a in accounts if a in self._accounts]
        for start in range(0, len(wanted), _CONCURRENCY):
            chunk = wanted[start : start + _CONCURRENCY]
            snapshots = await asyncio.gather(*(self.store.status_snapshot(a) for a in chunk))
            for account_id, items in zip(chunk, snapshots, strict=True):
                for link in self._accounts.get(account_id, ()):
                    link.push_status(items)

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.recheck_interval)
            await self._guarded("recheck", self._recheck())

    async def _recheck(self) -> None:
        """Close links of revoked agents and links a newer one replaced on another instance."""
        links = dict(self._agents)
        if not links:
            return
        checks = await self.store.check_links(list(links))
        for agent_id, link in links.items():
            check = checks.get(agent_id)
            if check is None or check.revoked:
                link.log.info("agent.revoked_elsewhere")
                self._spawn(link.close(CloseCode.REVOKED, "agent revoked"))
            elif check.epoch > link.epoch and self._agents.get(agent_id) is link:
                self._drop(link)
                link.log.info("agent.replaced", extra={"by_epoch": check.epoch})
                self._spawn(link.replace())

    # -- heartbeats -----------------------------------------------------------------------------

    async def _heartbeat_loop(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # Fixed steps, so that a slow round does not stretch the agents' detection bound.
            due = max(due + interval, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                await self._guarded("heartbeat", self._heartbeat_round())
            except Exception:
                # One round's bug must not end every link's heartbeats for good.
                log.exception("hub.heartbeat_failed")
            self.heartbeat_rounds += 1

    async def _heartbeat_round(self) -> None:
        """Read each judged account's log head once and let each of its links' rules decide.

        The head comes from the store, not from this instance's appends: with Redis, other
        instances append too. A failed read skips that account's links this round (their rules
        keep the older head, which only gives their senders more time) and is reported after
        the other accounts had theirs.
        """
        by_account: dict[str, list[AgentLink]] = {}
        for link in self._beats:
            if link.account_id is not None:
                by_account.setdefault(link.account_id, []).append(link)
        accounts = list(by_account)
        failure: StoreError | None = None
        for start in range(0, len(accounts), _CONCURRENCY):
            chunk = accounts[start : start + _CONCURRENCY]
            heads = await asyncio.gather(
                *(self.store.head_seq(a) for a in chunk), return_exceptions=True
            )
            for account_id, head in zip(chunk, heads, strict=True):
                if isinstance(head, StoreError):
                    failure = head
                    continue
                if isinstance(head, BaseException):
                    raise head
                for link in by_account[account_id]:
                    rule = self._beats.get(link)
                    if rule is None:
                        continue  # the link ended while the heads were read
                    due = rule.due(
                        head,
                        scanned=link.scanned_through,
                        offered=link.last_offered,
                        in_flight=link.session.in_flight,
                    )
                    if due is not None:
                        link.heartbeat(due)
        if failure is not None:
            raise failure

    async def _guarded(self, what: str, job: Awaitable[None]) -> None:
        """Run one pass; a store outage is logged once when it starts and once when it ends."""
        try:
            await job
        except StoreError as exc:
            if what not in self._failing:
                self._failing.add(what)
                log.warning("hub.store_unavailable", extra={"task": what, "error": str(exc)})
            return
        if what in self._failing:
            self._failing.discard(what)
            log.info("hub.store_recovered", extra={"task": what})
