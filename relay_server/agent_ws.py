"""``GET /v1/agent``: the relay end of the agent link, a thin pump around ``RelaySession``.

All protocol decisions live in ``shared/link/session.py`` (DESIGN principle 4). This module only
moves messages between the WebSocket and the session, answers the session's questions from the
store (who is this agent? where is its cursor?), and feeds it events from the account's log
while the window has room (STYLE §7). It also sends the account's status snapshot right after
the handshake, then status changes, and runs each CTOX command in its own task so that the pump
keeps reading while X-on answers (relay_server/ctox.py).

A store outage does not end a link (issue 5, docs/scaling.md): the sender retries its read with
back-off and resumes by itself, and a failed cursor write is skipped (the agent's inbox is
authoritative; the next ack writes it). Only a handshake that cannot read the store is refused
with 4011, which the agent retries with back-off.

Load shedding by queueing delay (docs/performance.md, reconnect storm): at most
``link.max_handshakes`` links per relay process may be between the upgrade and the end of their
handshake (authenticated and registered, or failed). An upgrade beyond that waits, first come
first served, for a slot to free; one that would get none within
``link.handshake_queue_timeout`` is answered 503 ``busy`` before any WebSocket work (at once
when the queue is already longer than the relay serves in that time), with a ``Retry-After``
that books it a place after the queue and after the agents refused before it, at the
relay's handshake rate (:class:`HandshakeGate`, :class:`RetrySchedule`), and the agent comes
back then (docs/protocol.md, Reconnecting). Admitting a whole storm at once would make every
handshake slower than the agents' open timeout, so none would finish; a relay that keeps up
refuses nobody. A waiter whose client left is skipped without a WebSocket upgrade.

Hostile upgrades (docs/protocol.md, Reconnecting): an upgrade that sends no ``hello`` within
``link.hello_timeout`` is closed, which frees its slot, and one source address may hold only
``link.handshake_share`` of the slots and queue places; beyond it the upgrade is refused 429
``busy`` at once, without a place in the retry schedule.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import assert_never

from aiohttp import WSMsgType, web

from shared import crypto
from shared.config import LinkConfig
from shared.errors import StoreError
from shared.link import frames
from shared.link.frames import SUBPROTOCOL, CloseCode
from shared.link.session import (
    Acked,
    Authenticated,
    AuthFailed,
    Close,
    Closed,
    CommandReceived,
    CommandResultReceived,
    EventReceived,
    GoingAway,
    HeartbeatReceived,
    HelloReceived,
    LinkEvent,
    LinkState,
    PeerError,
    RelaySession,
    StatusReceived,
    Welcomed,
)
from shared.logs import bind
from shared.subscription import Subscription

from .appkeys import config_key, hub_key
from .ctox import refusal
from .hub import AgentHub, PassedOver
from .limits import client_address
from .middleware import error_response
from .store.base import AgentRecord, StatusItem, StoredEvent
from .withhold import Withheld, stand_in, status_runs, withheld

__all__ = ["handle", "handshake_source", "AgentLink"]

log = logging.getLogger(__name__)

GOING_AWAY = 1001
_RETRY_INITIAL = 0.05
_RETRY_MAX = 2.0
"""Back-off of a sender whose store read failed, in seconds."""
_ROUTED_READ = 256
"""Events one read of a routed link asks for at least: few of them may match (protocol.md)."""
_SCAN_PER_WAKE = 4096
"""Events one wake-up of the sender scans at most before it yields to the event loop, so that a
long run of events not for a routed agent never holds the loop (docs/protocol.md, Routing)."""
_MAX_REASON = 123  # RFC 6455 §5.5: a close frame's payload is 125 bytes, 2 of them the code
_RETRY_AFTER_MIN = 1
_RETRY_AFTER_MAX = 30
"""Bounds of a busy upgrade's ``Retry-After``, in whole seconds."""
_RATE_HALF_LIFE = 60.0
"""Seconds in which the best handshake rate a relay showed counts half as much: it adapts to a
relay that got slower (more idle links), yet outlives a storm's teardown (HandshakeRate)."""
_HANDSHAKE_STATES = (LinkState.CONNECTING, LinkState.AUTHENTICATING)


class HandshakeGate:
    """Admission of one hub's link handshakes (module docstring, load shedding).

    At most ``limit`` slots are out at once (``None``: no limit). A request beyond it waits in
    a FIFO for up to ``queue_timeout`` seconds (``0``: not at all), unless the queue ahead of
    it is already more than the relay could finish in that time even at its best pace: then
    it is refused at once rather than held for nothing. A released slot passes straight to
    the oldest waiter whose client is still connected, so a newcomer never overtakes the
    queue; waiters whose client left are skipped. The queue needs no bound of its own: each
    waiter is an open connection that leaves within ``queue_timeout``.

    One source (``limits.client_address``) holds at most ``per_source`` slots and queue
    places together, so that one address cannot keep every other agent out; and a slot held
    by an upgrade that stays silent is freed by ``link.hello_timeout`` (:meth:`AgentLink._pump`).
    """

    def __init__(
        self, limit: int | None, queue_timeout: float, *, per_source: int | None = None
    ) -> None:
        self.limit = limit
        self.queue_timeout = queue_timeout
        self.per_source = per_source
        """Most slots and queue places one source holds at once; ``None``: no cap."""
        self._sources: dict[str, int] = {}
        """Source → slots plus queue places it holds (only sources holding some)."""
        self.running = 0
        """Slots out: handshakes between their upgrade and their end."""
        self.waiting = 0
        """Requests waiting for a slot (the queue may also hold ones that stopped waiting)."""
        self._queue: collections.deque[_Waiter] = collections.deque()
        self.rate = HandshakeRate()
        self._schedule = RetrySchedule()

    def source_full(self, source: str) -> bool:
        """Whether ``source`` already holds its share (``per_source``): one address must not
        take the slots from everybody else (docs/protocol.md, Reconnecting)."""
        return self.per_source is not None and self._sources.get(source, 0) >= self.per_source

    def _hold(self, source: str) -> None:
        self._sources[source] = self._sources.get(source, 0) + 1

    def _unhold(self, source: str) -> None:
        left = self._sources[source] - 1
        if left:
            self._sources[source] = left
        else:
            del self._sources[source]

    async def enter(self, request: web.Request, source: str = "") -> HandshakeSlot | None:
        """A slot for ``request`` from ``source``, or ``None``: none freed within
        ``queue_timeout``, or the client went away while it waited. The caller checks
        :meth:`source_full` first."""
        if self.limit is None or self.running < self.limit:
            # While slots are free nobody waits: a released slot goes to a waiter first.
            self.running += 1
            self._hold(source)
            return HandshakeSlot(self, source)
        if self.queue_timeout <= 0:
            return None
        rate = self.rate.per_second(time.monotonic())
        if rate and self.waiting >= 2 * rate * self.queue_timeout:
            # A storm: even at the best pace seen (at most twice the estimate) it would wait
            # the whole timeout and be refused anyway. The estimate alone refused too early:
            # a relay serving a queue it has only just been handed is often faster.
            return None
        waiter = _Waiter(request, source, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self.waiting += 1
        self._hold(source)
        try:
            await asyncio.wait((waiter.granted,), timeout=self.queue_timeout)
        except BaseException:
            # Cancelled (server shutdown) perhaps just after a slot was handed over.
            if waiter.granted.done():
                slot = waiter.granted.result()
                if slot is not None:
                    slot.release()
                else:
                    self._unhold(source)
            else:
                self._stop_waiting(waiter)
                self._unhold(source)
            raise
        if not waiter.granted.done():
            self._stop_waiting(waiter)
            self._unhold(source)
            return None
        granted = waiter.granted.result()
        if granted is None:
            self._unhold(source)
        return granted

    def _stop_waiting(self, waiter: _Waiter) -> None:
        # Left in the queue (removing from the middle is O(n)); leave() skips it.
        waiter.granted.cancel()
        self.waiting -= 1

    def leave(self, source: str) -> None:
        """A handshake of ``source`` ended: hand its slot to the next waiter still
        connected, if any."""
        self._unhold(source)
        self.rate.finished(time.monotonic(), busy=self.waiting > 0)
        while self._queue:
            waiter = self._queue.popleft()
            if waiter.granted.done():
                continue  # timed out or cancelled
            self.waiting -= 1
            if _client_gone(waiter.request):
                waiter.granted.set_result(None)
                continue
            waiter.granted.set_result(HandshakeSlot(self, waiter.source))
            return
        self.running -= 1

    def retry_after(self) -> int:
        """The ``Retry-After`` of a refusal now, booked in the :class:`RetrySchedule`."""
        now = time.monotonic()
        rate = self.rate.per_second(now)
        return self._schedule.book(now, self.waiting, rate or None, slots=self.limit or 1)


class HandshakeRate:
    """Handshakes a relay finishes per second when it is busy: the recent busy seconds'
    average (each second counting as much as all before it), but at least half of the best
    whole second seen, which counts half as much every ``_RATE_HALF_LIFE`` seconds since.

    A *busy* second is one in which a handshake finished while others waited for a slot: a
    quiet relay's few handshakes a second say nothing of what it can do. The best second
    alone overstates a storm's pace (the relay also closes the dropped links and answers the
    refused upgrades meanwhile), so agents booked at that pace come back too soon and are
    refused again; the average alone understates it in a storm's first seconds, when the
    relay mostly closes links, and would send the refused agents away for far longer than
    the relay then needs. Seconds (``time.monotonic``) are passed in.
    """

    def __init__(self) -> None:
        self._second = 0
        """The whole second being counted."""
        self._count = 0
        """Handshakes finished in it so far."""
        self._busy = False
        """Whether one of them finished while others waited."""
        self._recent = 0.0
        """The average of the busy seconds before it (0.0: none yet)."""
        self._best = 0.0
        self._best_at = 0.0

    def finished(self, now: float, *, busy: bool = True) -> None:
        """A handshake finished at ``now``; ``busy``: others were waiting for a slot."""
        second = math.floor(now)
        if second != self._second:
            ended = float(self._second + 1)
            if self._count >= self._decayed(self._best, self._best_at, ended):
                self._best, self._best_at = float(self._count), ended
            self._recent = self._with_counted()
            self._second, self._count, self._busy = second, 0, False
        self._count += 1
        self._busy = self._busy or busy

    def per_second(self, now: float) -> float:
        """The estimate at ``now``; 0.0 before a whole second with a finish has passed."""
        best = self._decayed(self._best, self._best_at, now)
        recent = self._recent
        if math.floor(now) != self._second:  # the second being counted is over: it counts
            best = max(best, self._decayed(self._count, self._second + 1.0, now))
            recent = self._with_counted()
        return max(recent, best / 2)

    def _with_counted(self) -> float:
        """The busy seconds' average once the second being counted is over."""
        if not self._busy:
            return self._recent
        return self._count if not self._recent else (self._recent + self._count) / 2

    @staticmethod
    def _decayed(rate: float, at: float, now: float) -> float:
        factor: float = 0.5 ** (max(0.0, now - at) / _RATE_HALF_LIFE)
        return rate * factor


class RetrySchedule:
    """The ``Retry-After`` of each busy refusal: a place after the upgrades waiting now and
    after the agents refused earlier, one place per handshake the relay finishes.

    Telling every agent refused in the same second the same wait would bring them all back
    in the same second, to be refused again; booking spreads a storm's refusals over the
    seconds the relay needs to serve them, so the agents come back about as fast as it
    handshakes. Places are booked up to ``_RETRY_AFTER_MAX`` ahead; beyond it refusals share
    the last second. Seconds (``time.monotonic``) are passed in.
    """

    def __init__(self) -> None:
        self._until = 0.0
        """When the last place booked comes due."""

    def book(self, now: float, waiting: int, rate: float | None, *, slots: int) -> int:
        """Book a place for one refusal; its ``Retry-After`` in whole seconds, in [1, 30].

        Args:
            waiting: upgrades in the queue now, which go first.
            rate: handshakes finished per second (:class:`HandshakeRate`); ``None``: not
                known yet, counted as one per slot per second.
            slots: ``link.max_handshakes``.

        An estimate errs short rather than long (it rounds the place's time up to a whole
        second, and the agent adds less than a second of jitter to a short wait): too short
        costs one more cheap refusal, too long leaves the relay idle while agents wait.
        """
        per_second = rate if rate is not None and rate > 0 else float(slots)
        start = max(self._until, now + waiting / per_second)
        self._until = min(start + 1 / per_second, now + _RETRY_AFTER_MAX)
        seconds = math.ceil(self._until - now)
        return min(_RETRY_AFTER_MAX, max(_RETRY_AFTER_MIN, seconds))


@dataclass(slots=True)
class _Waiter:
    request: web.Request
    source: str
    granted: asyncio.Future[HandshakeSlot | None]
    """A slot, ``None`` when skipped (client gone), cancelled when the waiter gave up."""


def handshake_source(address: str) -> str:
    """What shares one source's handshake allowance: the IPv4 address, or the /64 network of
    an IPv6 one (one host or LAN usually holds a whole /64, so single addresses are free)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport  # None once the connection is lost
    return transport is None or transport.is_closing()


_gates: weakref.WeakKeyDictionary[AgentHub, HandshakeGate] = weakref.WeakKeyDictionary()
"""One gate per hub, i.e. per relay process (tests run several in one)."""


def handshake_gate(hub: AgentHub) -> HandshakeGate:
    """The hub's gate, made from its ``link`` settings on first use."""
    gate = _gates.get(hub)
    if gate is None:
        link = hub.link
        per_source = None
        if link.max_handshakes is not None and link.handshake_share is not None:
            per_source = max(2, int(link.max_handshakes * link.handshake_share))
        gate = _gates[hub] = HandshakeGate(
            link.max_handshakes, link.handshake_queue_timeout, per_source=per_source
        )
    return gate


class HandshakeSlot:
    """One of the handshakes a hub runs at once (``link.max_handshakes``); released exactly
    once, which passes it on to the next waiter (:meth:`HandshakeGate.leave`)."""

    def __init__(self, gate: HandshakeGate, source: str) -> None:
        self._gate: HandshakeGate | None = gate
        self._source = source

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.leave(self._source)


async def handle(request: web.Request) -> web.StreamResponse:
    """Serve one agent WebSocket until it closes; 503 ``busy`` with ``Retry-After`` when no
    handshake slot frees in time (module docstring, load shedding)."""
    hub = request.app[hub_key]
    config = request.app[config_key]
    gate = handshake_gate(hub)
    source = handshake_source(client_address(request, config.limits.trusted_proxies))
    if gate.source_full(source):
        # Books no place in the retry schedule: one address's flood must not push back the
        # agents of others. Its slots free within link.hello_timeout at the latest.
        log.debug("agent.upgrade_source_busy", extra={"peer": request.remote, "source": source})
        response = error_response(
            429, "busy", "too many agent handshakes from this address; retry"
        )
        response.headers["Retry-After"] = str(max(1, math.ceil(config.link.hello_timeout)))
        return response
    slot = await gate.enter(request, source)
    if slot is None:
        response = error_response(503, "busy", "too many agent handshakes in progress; retry")
        if _client_gone(request):
            # Nobody reads the answer: it books no place in the retry schedule.
            log.debug("agent.upgrade_abandoned", extra={"peer": request.remote})
            return response
        retry_after = gate.retry_after()
        log.debug("agent.upgrade_busy", extra={"peer": request.remote, "retry_after": retry_after})
        response.headers["Retry-After"] = str(retry_after)
        return response
    try:
        return await _serve(request, hub, config.link, slot)
    finally:
        slot.release()


async def _serve(
    request: web.Request, hub: AgentHub, link_config: LinkConfig, slot: HandshakeSlot
) -> web.StreamResponse:
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        timeout=hub.close_timeout,
        heartbeat=hub.keepalive,
        max_msg_size=link_config.max_message_size,
        # Frames are small JSON: per-message deflate saves little and costs ~100 KB of zlib
        # state per connection (bench/scale: 130 KB -> 25 KB RSS per idle agent).
        compress=False,
    )
    try:
        await ws.prepare(request)
    except ConnectionResetError:
        # The agent gave up before the upgrade finished (common in a reconnect storm):
        # a normal disconnect, not a server error. Not the unprepared ``ws``: aiohttp would
        # log its write_eof() failing with a traceback. 499 (as nginx logs a client that
        # closed first) goes nowhere but the access log.
        log.debug("agent.upgrade_aborted", extra={"peer": request.remote})
        return web.Response(status=499)
    link = AgentLink(hub, ws, request.transport, peer=request.remote or "", slot=slot)
    await link.run()
    return ws


class AgentLink:
    """One agent connection: the session, its WebSocket, and the task that offers events."""

    def __init__(
        self,
        hub: AgentHub,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        *,
        peer: str,
        slot: HandshakeSlot | None = None,
    ) -> None:
        self.hub = hub
        self._slot = slot
        """Released when the handshake ends (authenticated and started, or failed)."""
        self.ws = ws
        self._transport = transport
        self.conn_id = crypto.new_token(6)
        self.agent_id: str | None = None
        self.account_id: str | None = None
        self.epoch = 0
        """This link's epoch among the agent's links (AgentHub.register); 0 before."""
        self._told_through = 0
        """The retention hole this link's welcome already announced (docs/protocol.md)."""
        self._subscription: Subscription | None = None
        """The routing filter of the agent's hello, for the life of this link; None: all."""
        self._digest = b""
        """Its :meth:`~shared.subscription.Subscription.digest` (empty without one)."""
        self._scan = 0
        """Scan position: every event up to here was offered or passed over on this link."""
        self._cursor_before = 0
        """The agent's cursor stored before this handshake (docs/protocol.md, Retention)."""
        self._passed_through = 0
        """Events up to here are trimmed and were not owed to the agent (below its old cursor)."""
        self._saved = -1
        """The cursor this link last stored; a lower one is never stored after it."""
        self._replay: int | None = None
        """An operator's replay point this link read from the store and has not settled
        (docs/operations.md, Replay)."""
        self._replay_until = 0
        """The agent's resume point: the replay is done once the cursor reaches it."""
        self._cursor_lock = asyncio.Lock()
        self.log = bind(log, conn_id=self.conn_id, peer=peer)
        self._loop = asyncio.get_running_loop()
        self.session = RelaySession(
            relay_id=hub.relay_id,
            nonce=crypto.new_nonce(),
            window=hub.link.window,
            auth_timeout=hub.link.auth_timeout,
            now=self._loop.time(),
            logger=self.log,
        )
        self._hello_by = self._loop.time() + hub.link.hello_timeout
        """An upgrade silent until then is closed and frees its slot (link.hello_timeout)."""
        self._send_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._may_send = True
        self._closing = False
        self._done = asyncio.Event()
        self._commands: set[asyncio.Task[None]] = set()
        # Status pushes that arrive between registration and the snapshot, newest per item;
        # None once the snapshot went out (DESIGN §Link protocol, Status: snapshot first).
        self._early_status: dict[str, StatusItem] | None = {}
        self._status_seqs: dict[str, int] = {}
        """Item key -> seq of the value sent on this link: each value goes out once."""

    @property
    def last_offered(self) -> int:
        """Highest seq offered on this link (the agent's resume point before the first)."""
        return self.session.last_offered

    @property
    def scanned_through(self) -> int:
        """Highest seq this link offered or passed over (its subscription did not match):
        the log is caught up when its head is not above this."""
        return max(self._scan, self.session.last_offered)

    # -- called by the hub ----------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def push_status(self, items: list[StatusItem]) -> None:
        """Queue status items newer than what this link sent; the sender writes them (never
        blocks ingress). The same change may arrive from ingress, the bus and the poll."""
        if self._early_status is not None:
            for item in items:
                known = self._early_status.get(item.key)
                if known is None or item.seq > known.seq:
                    self._early_status[item.key] = item
            return
        newer = self._newer_status(items)
        if newer:
            self._send_status(newer)
            self._wake.set()

    def _send_status(self, items: list[StatusItem], *, snapshot: bool = False) -> None:
        """Status in frames the link can carry: a snapshot too large for one frame goes out
        as a snapshot frame and change frames after it (docs/ctox.md, Status items)."""
        limit = self.hub.link.max_message_size
        runs, dropped = status_runs([item.to_json() for item in items], limit)
        if dropped:
            self.log.warning("agent.status_withheld", extra={"items": dropped})
        for n, run in enumerate(runs):
            if run or (snapshot and n == 0):
                self.session.send_status(run, snapshot=snapshot and n == 0)

    def _newer_status(self, items: list[StatusItem]) -> list[StatusItem]:
        newer = [item for item in items if item.seq > self._status_seqs.get(item.key, 0)]
        for item in newer:
            self._status_seqs[item.key] = item.seq
        return newer

    async def close(self, code: int, reason: str) -> None:
        """Close the link with ``code`` (an ``error`` frame goes first for 4xxx codes).

        No event is sent once this starts; the close handshake is bounded by
        ``hub.close_timeout``, after which the connection is dropped.
        """
        if self._closing:
            return
        self._closing = True
        await self._stop_sender()
        self.session.close(code, reason)
        await self._close_transport(code, reason)

    async def replace(self) -> None:
        """A newer link of this agent won: stop sending now, finish closing in the background.

        The old peer is often a dead half-open link, so the new link must not wait for its
        close handshake (DESIGN §Link protocol, Liveness).
        """
        await self._stop_sender()
        self._closer = asyncio.create_task(
            self.close(CloseCode.REPLACED, "replaced by a newer connection")
        )

    async def go_away(self, reason: str) -> None:
        """Relay shutdown: let running commands answer, then ``goaway`` to an authenticated
        agent and close 1001 (the caller bounds the wait: ``shutdown_grace``)."""
        if self._closing:
            return
        self._closing = True
        if self._commands:
            # Issue 6, graceful shutdown: a command X-on is already handling is answered on
            # this link. One that arrives meanwhile is re-sent by the agent on its next link
            # and found again by its request id (DESIGN §Link protocol, Commands).
            await asyncio.wait(list(self._commands))
        await self._stop_sender()
        # DESIGN §Link protocol, Liveness: "tells agents to go elsewhere and closes cleanly".
        if self.session.state is LinkState.OPEN:
            self.session.go_away(reason)
        else:
            self.session.close(GOING_AWAY, reason)
        await self._close_transport(GOING_AWAY, reason)

    async def _close_transport(self, code: int, reason: str) -> None:
        message = reason.encode()[:_MAX_REASON].decode(errors="ignore").encode()
        try:
            async with asyncio.timeout(self.hub.close_timeout):
                await self._flush()
                await self.ws.close(code=code, message=message)
        except TimeoutError:
            self.log.warning("agent.close_timeout", extra={"close_code": code})
            if self._transport is not None:
                self._transport.abort()

    async def wait_closed(self) -> None:
        await self._done.wait()

    # -- the pump -------------------------------------------------------------------------------

    async def run(self) -> None:
        self.hub.attach(self)
        try:
            if self.ws.ws_protocol != SUBPROTOCOL:
                self.log.warning("agent.protocol_error", extra={"reason": "no subprotocol"})
                await self.close(CloseCode.PROTOCOL_ERROR, f"subprotocol {SUBPROTOCOL} required")
            elif self.hub.shutting_down:
                await self.go_away("relay shutting down")
            await self._pump()
        except StoreError as exc:
            self.log.error("agent.store_error", extra={"error": str(exc)})
            await self.close(CloseCode.INTERNAL_ERROR, "relay store unavailable")
        finally:
            # Bookkeeping first: the server may cancel this handler while it cleans up.
            if self._slot is not None:
                self._slot.release()
            self.hub.detach(self)
            try:
                await self._stop_commands()
                await self._stop_sender()
                await self._stop_heartbeat()
                if self._closer is not None:
                    await self._closer
                await self._release_claim()
                await self._settle_replay(self._saved)
            finally:
                self.log.info("agent.disconnected", extra={"close_code": self.ws.close_code})
                self._done.set()

    async def _release_claim(self) -> None:
        """Our sender has stopped: a newer link of the agent need not wait for us."""
        if self.agent_id is None or not self.epoch:
            return
        try:
            await self.hub.store.release_link(self.agent_id, epoch=self.epoch)
        except StoreError as exc:
            # The next link of this agent waits out cluster.handover_timeout instead.
            self.log.warning("agent.release_failed", extra={"error": str(exc)})

    async def _settle_replay(self, cursor: int) -> None:
        """The agent's cursor reached ``cursor``: the replay this link read is done (back at
        the agent's resume point), or the link ended and the store is told how far the agent
        got, so that the next link goes on from there (docs/operations.md, Replay). Without
        progress there is nothing to write: the point is still recorded."""
        replay = self._replay
        if replay is None or self.agent_id is None:
            return
        rest = None if cursor >= self._replay_until else max(replay, cursor)
        if rest == replay:
            return
        try:
            await self.hub.store.settle_replay(self.agent_id, replay, rest)
        except StoreError as exc:
            # The point stays as it was: the next link sends a little again, never less.
            self.log.warning("agent.replay_not_settled", extra={"error": str(exc)})
            return
        self._replay = None
        if rest is None:
            self.log.info("agent.replay_done", extra={"replay_after": replay})
        else:
            self.log.info("agent.replay_pending", extra={"replay_after": rest})

    async def _pump(self) -> None:
        session = self.session
        while True:
            deadline = session.next_deadline()
            if session.state is LinkState.CONNECTING:
                deadline = min(deadline or math.inf, self._hello_by)
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await self.ws.receive()
            except TimeoutError:
                now = self._loop.time()
                if session.state is LinkState.CONNECTING and now >= self._hello_by:
                    # docs/protocol.md, Reconnecting: a silent upgrade must not hold a slot.
                    self.log.warning("agent.hello_timeout")
                    session.close(CloseCode.AUTH_TIMEOUT, "no hello in time")
                else:
                    session.handle_timer(now)
            else:
                if msg.type is WSMsgType.TEXT:
                    session.receive_message(msg.data, self._loop.time())
                elif msg.type is WSMsgType.BINARY:
                    self.log.warning("agent.protocol_error", extra={"reason": "binary message"})
                    session.close(CloseCode.PROTOCOL_ERROR, "binary messages are not allowed")
                else:
                    session.receive_closed(self.ws.close_code, "", self._loop.time())
            for event in session.events_received():
                if await self._handle(event):
                    return
            if self._slot is not None and session.state not in _HANDSHAKE_STATES:
                # Authenticated (and _start done: claim, snapshot, cursor) or failing.
                self._slot.release()
            await self._flush()
            request = session.close_requested
            if request is not None and not self.ws.closed:
                self._report_failure()
                await self.close(request.code, request.reason)

    async def _handle(self, event: LinkEvent) -> bool:
        """Act on one session event; True when the link is over."""
        match event:
            case HelloReceived(agent_id=agent_id, subscription=subscription):
                self._subscription = subscription
                if subscription is not None and not subscription.is_everything:
                    self._digest = subscription.digest()
                await self._lookup(agent_id)
            case Authenticated(
                agent_id=agent_id, account_id=account_id, resume_after=resume, replay_after=replay
            ):
                self.account_id = account_id
                await self._start(agent_id, account_id, resume, replay)
            case Acked(seq=seq):
                self.hub.metrics.acks.inc()
                await self._save_cursor(self._acked_cursor(seq))
                self._wake.set()
            case CommandReceived(command=command):
                self._start_command(command)
            case AuthFailed(reason=reason):
                self.log.warning("agent.auth_failed", extra={"reason": reason})
            case PeerError(code=code, message=message):
                self.log.info("agent.peer_error", extra={"error": code, "reason": message})
            case Closed():
                return True
            case (
                Welcomed()
                | EventReceived()
                | CommandResultReceived()
                | StatusReceived()
                | GoingAway()
                | HeartbeatReceived()
            ):
                pass  # agent-side events: a RelaySession never emits them
            case _:
                assert_never(event)
        return False

    async def _start(self, agent_id: str, account_id: str, resume: int, replay: int | None) -> None:
        """The handshake is done: take the agent over, send the status snapshot, then events
        (from the operator's replay point when there is one)."""
        self._scan = resume if replay is None else replay
        try:
            current = await self.hub.register(self)
            if current:
                await self._send_snapshot(account_id)
        except StoreError as exc:
            self.log.warning("agent.store_unavailable", extra={"error": str(exc)})
            self.session.close(CloseCode.INTERNAL_ERROR, "relay store unavailable")
            return
        if not current:
            self.session.close(CloseCode.REPLACED, "replaced by a newer connection")
            return
        if replay is not None:
            # docs/operations.md, Replay: the cursor follows the replay, so the backlog shows
            # what is left of it and the soft retention limits keep those events meanwhile.
            await self._save_cursor(replay, reset=True)
        else:
            # DESIGN §Link protocol, Events: the agent's inbox is authoritative. Raised only
            # over events that retention already dropped below the old cursor, so that a
            # routed agent reconnecting before its next ack is not told of a hole of events
            # never for it.
            await self._save_cursor(max(resume, self._passed_through), reset=True)
        try:
            await self.hub.store.touch_agent(agent_id, now=time.time())
        except StoreError as exc:
            self.log.warning("agent.touch_failed", extra={"error": str(exc)})
        self.log.info(
            "agent.connected",
            extra={"account": account_id, "resume_after": resume, "epoch": self.epoch},
        )
        if replay is not None:
            self.log.info("agent.replay", extra={"replay_after": replay, "resume_after": resume})
        if self._may_send:
            self._sender = asyncio.create_task(self._send_events())
            self._wake.set()
            self.hub.start_heartbeats(self)

    async def _save_cursor(self, seq: int, *, reset: bool = False) -> None:
        """Store the agent's cursor; skipped while the store is down (the next ack writes it,
        and a stale cursor only makes retention keep more).

        After the handshake's ``reset`` the cursor only moves up: the pump (acks) and the
        sender (passed-over events) both store it, and a late write must not undo a newer one.
        """
        async with self._cursor_lock:
            if not reset and seq <= self._saved:
                return
            if self._replay is not None and seq >= self._replay_until:
                # The agent has the whole replay again: settled before the cursor is stored,
                # so a cursor at the resume point never shows a replay still pending.
                await self._settle_replay(seq)
            try:
                await self.hub.store.set_cursor(self.agent_id or "", seq)
            except StoreError as exc:
                self.log.warning("agent.cursor_not_saved", extra={"seq": seq, "error": str(exc)})
                return
            self._saved = seq

    def _acked_cursor(self, seq: int) -> int:
        """The cursor an ack of ``seq`` allows (docs/protocol.md, Routing): with nothing in
        flight, the events passed over after the last offered one are not for the agent
        either, so the cursor may reach the scan position; never beyond it."""
        return self._scan if self.session.in_flight == 0 else seq

    async def _lookup(self, agent_id: str) -> None:
        """Answer the session's hello before the next message is fed (docs/protocol.md)."""
        self.agent_id = agent_id
        self.log = bind(log, conn_id=self.conn_id, agent_id=agent_id)
        try:
            agent, cursor, trimmed = await self._read_agent(agent_id)
        except StoreError as exc:
            self.log.warning("agent.store_unavailable", extra={"error": str(exc)})
            self.session.close(CloseCode.INTERNAL_ERROR, "relay store unavailable")
            return
        if agent is None or agent.public_key is None or agent.revoked:
            # docs/protocol.md, Handshake: unknown, pending and revoked agents look alike
            # until a valid signature; the session logs the verdict after auth (AuthFailed).
            self.session.agent_refused(
                agent.public_key if agent is not None else None,
                revoked=agent is not None and agent.revoked,
            )
        else:
            # docs/protocol.md, Retention: events up to the old cursor were committed by the
            # agent or passed over (routing); trimming them lost nothing the agent is owed.
            resume = self.session.last_offered
            self._cursor_before = cursor
            self._passed_through = min(cursor, trimmed)
            hole = trimmed if trimmed > max(resume, cursor) else 0
            if hole:
                self.log.warning(
                    "agent.behind_retention",
                    extra={"resume_after": resume, "cursor": cursor, "trimmed_through": trimmed},
                )
            self._told_through = trimmed
            self._replay_until = resume
            replay = self._replay
            if replay is not None and replay >= resume:
                # The agent never had the events after its resume point: ordinary delivery
                # sends them, no replay needed.
                self.log.info(
                    "agent.replay_moot", extra={"replay_after": replay, "resume_after": resume}
                )
                await self._settle_replay(resume)
                replay = self._replay = None
            self.session.agent_found(
                agent.public_key, agent.account_id, trimmed_through=hole, replay_after=replay
            )

    async def _read_agent(self, agent_id: str) -> tuple[AgentRecord | None, int, int]:
        """The agent's record, its stored cursor and its account's retention point (0 for an
        agent that will be refused); reads its pending replay point into ``self._replay``.

        Two rounds of concurrent reads rather than four in a row: in a reconnect storm each
        handshake's reads queue on the store (docs/performance.md).

        Raises:
            StoreError: a read failed.
        """
        store = self.hub.store
        agent, cursor, replay = await asyncio.gather(
            store.get_agent(agent_id), store.get_cursor(agent_id), store.pending_replay(agent_id)
        )
        if agent is None or agent.public_key is None or agent.revoked:
            return agent, cursor, 0  # refused: the retention point is not needed
        trimmed = await store.trimmed_through(agent.account_id)
        self._replay = replay
        return agent, cursor, trimmed

    async def _send_snapshot(self, account_id: str) -> None:
        """The account's whole status before any event (DESIGN §Link protocol, Status)."""
        items = await self.hub.store.status_snapshot(account_id)
        self._send_status(items, snapshot=True)
        self._newer_status(items)
        early, self._early_status = self._early_status or {}, None
        # A change pushed while the snapshot was being read may be missing from it.
        newer = self._newer_status(list(early.values()))
        if newer:
            self._send_status(newer)

    # -- commands -------------------------------------------------------------------------------

    def _start_command(self, command: frames.Command) -> None:
        ctox = self.hub.ctox
        if ctox is None:
            # A hub built without CTOX egress (link-only tests, tools) cannot send commands.
            self.session.send_command_result(
                refusal(
                    501,
                    "not_implemented",
                    "this relay sends no commands",
                    request_id=command.request_id,
                )
            )
        elif len(self._commands) >= ctox.config.max_per_link:
            self.session.send_command_result(
                refusal(
                    429,
                    "rate_limited",
                    "too many commands pending on this link",
                    request_id=command.request_id,
                    retry_after=1,
                )
            )
        else:
            task = asyncio.create_task(self._run_command(command))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    async def _run_command(self, command: frames.Command) -> None:
        assert self.hub.ctox is not None and self.account_id is not None
        started = self._loop.time()
        result = await self.hub.ctox.execute(self.account_id, command)
        self.hub.metrics.command_finished(
            self.account_id, command, result, self._loop.time() - started
        )
        self.session.send_command_result(result)
        await self._flush()

    async def _stop_commands(self) -> None:
        """Stop waiting for results nobody can receive; X-on calls run on (ctox.py)."""
        tasks = list(self._commands)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _report_failure(self) -> None:
        """WARNING for a link the peer broke (STYLE §6); the error names no secret."""
        error = self.session.error
        if error is not None:
            self.log.warning(
                "agent.protocol_error", extra={"close_code": error.close_code, "reason": str(error)}
            )
        elif self.session.close_requested == Close(CloseCode.AUTH_TIMEOUT, "handshake timed out"):
            self.log.warning("agent.auth_timeout")

    # -- heartbeats -----------------------------------------------------------------------------

    def heartbeat(self, head: int) -> None:
        """Tell the agent the newest seq it should have by now (docs/protocol.md, Heartbeat);
        the hub's ticker decides when (:class:`~relay_server.hub.HeartbeatRule`)."""
        if not self._may_send:
            return
        self.session.send_heartbeat(head)
        # Written by a task of its own: the ticker serves every link and must not wait for a
        # peer that stopped reading, nor rely on this link's sender, which may be the stuck
        # part. One write at a time; a frame queued meanwhile goes out with the next flush.
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        try:
            await self._flush()
        except Exception:
            self.log.exception("agent.heartbeat_failed")

    async def _stop_heartbeat(self) -> None:
        self.hub.stop_heartbeats(self)
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    # -- the sender -----------------------------------------------------------------------------

    async def _send_events(self) -> None:
        """Offer the account's log while the window has room; sleep until an ack, a commit or
        the hub's poll. A failed store read is retried with back-off: the link stays up."""
        delay = _RETRY_INITIAL
        failing = False
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._flush()  # status changes queued by push_status()
                try:
                    await self._offer_available()
                except StoreError as exc:
                    if not failing:
                        self.log.warning("agent.store_retry", extra={"error": str(exc)})
                    failing = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
                    self._wake.set()
                    continue
                if failing:
                    self.log.info("agent.store_recovered")
                failing, delay = False, _RETRY_INITIAL
        except Exception:
            self.log.exception("agent.sender_failed")
            await self.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _offer_available(self) -> None:
        """Offer the log after the scan position while the window has room; at most
        ``_SCAN_PER_WAKE`` events per call, then wake again after yielding."""
        session, store = self.session, self.hub.store
        assert self.account_id is not None
        scanned = 0
        while session.can_offer:
            self._skip_passed_over()
            limit = self._read_limit()
            batch = await store.read_events(self.account_id, after=self._scan, limit=limit)
            if batch and batch[0].seq > self._scan + 1 and await self._behind_retention():
                return
            offered = self._offer_batch(batch)
            self._remember_passed_over()
            await self._flush()
            if not offered and not session.in_flight:
                # docs/protocol.md, Routing: an idle routed agent shows no lag and does not
                # hold back the soft retention limits for events it will never receive.
                await self._save_cursor(self._scan)
            if len(batch) < limit:
                return
            scanned += len(batch)
            if scanned >= _SCAN_PER_WAKE:
                self._wake.set()
                await asyncio.sleep(0)
                return

    def _offer_batch(self, batch: list[StoredEvent]) -> int:
        """Offer the events of ``batch`` the agent subscribed to; returns how many.

        The scan position moves past each event offered or passed over, and stops before a
        matching one the window refused (it is read again after the next ack).
        """
        offered = 0
        limit = self.hub.link.max_message_size
        for stored in batch:
            if self._wants(stored):
                why = withheld(stored.event, limit)
                event = stored.event.to_json() if why is None else stand_in(stored.event, why)
                if not self.session.offer(stored.seq, event):
                    break
                offered += 1
                self.hub.metrics.deliveries.inc()
                if why is not None:
                    self._withheld(stored, why)
            self._scan = stored.seq
        return offered

    def _withheld(self, stored: StoredEvent, why: Withheld) -> None:
        """docs/delivery.md, Withheld events: counted and logged, never a reason to close."""
        assert self.agent_id is not None
        self.hub.metrics.event_withheld(self.agent_id, why.reason)
        self.log.warning(
            "agent.event_withheld",
            extra={
                "seq": stored.seq,
                "event_id": stored.event.id,
                "reason": why.reason,
                "bytes": why.bytes,
            },
        )

    def _skip_passed_over(self) -> None:
        """Jump over a run of the log an earlier link with this subscription found no match
        in: a reconnect does not read and match it again (docs/protocol.md, Routing)."""
        known = self.hub.passed_over.get(self.agent_id or "") if self._digest else None
        if known is not None:
            self._scan = known.skip(self._digest, self._scan)

    def _remember_passed_over(self) -> None:
        """Everything after the last event offered up to the scan position was passed over."""
        after = self.session.last_offered
        if not self._digest or self._scan <= after or self.agent_id is None:
            return
        run = PassedOver(self._digest, after, self._scan)
        known = self.hub.passed_over.get(self.agent_id)
        self.hub.passed_over[self.agent_id] = run if known is None else known.joined(run)

    def _wants(self, stored: StoredEvent) -> bool:
        if self._subscription is None:
            return True
        event = stored.event
        # Matching reads only these two fields of the event object; building the whole
        # object (base64 of the body) for every passed-over event would be waste.
        return self._subscription.matches({"type": event.type, "params": event.params})

    def _read_limit(self) -> int:
        """Reading no more than the free slots is the back-pressure (STYLE §2 rule 4); a
        routed link reads more, as most of a batch may be passed over."""
        free = self._free_slots()
        return free if self._subscription is None else max(free, _ROUTED_READ)

    async def _behind_retention(self) -> bool:
        """Seqs skipped: if retention dropped events this link never offered, close with
        BEHIND_RETENTION so that the next welcome tells the agent (docs/protocol.md)."""
        assert self.account_id is not None
        trimmed = await self.hub.store.trimmed_through(self.account_id)
        if trimmed <= max(self._scan, self._told_through, self._cursor_before):
            # An ordinary gap (other accounts' seqs), one the welcome named, or events below
            # the agent's old cursor, which it committed or was not owed (docs/protocol.md).
            return False
        self.log.warning(
            "agent.behind_retention",
            extra={"scanned_through": self._scan, "trimmed_through": trimmed},
        )
        if self._closer is None:  # closing from its own task would cancel itself midway
            self._closer = asyncio.create_task(
                self.close(CloseCode.BEHIND_RETENTION, "events were dropped by retention")
            )
        return True

    def _free_slots(self) -> int:
        return self.hub.link.window - self.session.in_flight

    async def _stop_sender(self) -> None:
        """No event goes out on this link once this returns (nor after a later handshake)."""
        self._may_send = False
        task, self._sender = self._sender, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])

    async def _flush(self) -> None:
        async with self._send_lock:
            for text in self.session.data_to_send():
                if self.ws.closed:
                    return
                try:
                    await self.ws.send_str(text)
                except ConnectionResetError:
                    # The transport is gone; the pump's next receive reports the close.
                    self.log.debug("agent.write_failed")
                    return
