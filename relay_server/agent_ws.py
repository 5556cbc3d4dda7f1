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
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import assert_never

from aiohttp import WSMsgType, web

from shared import crypto
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
    HelloReceived,
    LinkEvent,
    LinkState,
    PeerError,
    RelaySession,
    StatusReceived,
    Welcomed,
)
from shared.logs import bind

from .appkeys import config_key, hub_key
from .ctox import refusal
from .hub import AgentHub
from .store.base import StatusItem

__all__ = ["handle", "AgentLink"]

log = logging.getLogger(__name__)

GOING_AWAY = 1001
_RETRY_INITIAL = 0.05
_RETRY_MAX = 2.0
"""Back-off of a sender whose store read failed, in seconds."""
_MAX_REASON = 123  # RFC 6455 §5.5: a close frame's payload is 125 bytes, 2 of them the code


async def handle(request: web.Request) -> web.StreamResponse:
    """Serve one agent WebSocket until it closes."""
    hub = request.app[hub_key]
    config = request.app[config_key]
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        timeout=hub.close_timeout,
        heartbeat=config.link.ping_interval,
        max_msg_size=config.link.max_message_size,
        # Frames are small JSON: per-message deflate saves little and costs ~100 KB of zlib
        # state per connection (bench/scale: 130 KB -> 25 KB RSS per idle agent).
        compress=False,
    )
    try:
        await ws.prepare(request)
    except ConnectionResetError:
        # The agent gave up before the upgrade finished (common in a reconnect storm):
        # a normal disconnect, not a server error.
        log.debug("agent.upgrade_aborted", extra={"peer": request.remote})
        return ws
    link = AgentLink(hub, ws, request.transport, peer=request.remote or "")
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
    ) -> None:
        self.hub = hub
        self.ws = ws
        self._transport = transport
        self.conn_id = crypto.new_token(6)
        self.agent_id: str | None = None
        self.account_id: str | None = None
        self.epoch = 0
        """This link's epoch among the agent's links (AgentHub.register); 0 before."""
        self._told_through = 0
        """The retention hole this link's welcome already announced (docs/protocol.md)."""
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
        self._send_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
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
            self.session.send_status([item.to_json() for item in newer])
            self._wake.set()

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
        """Relay shutdown: ``goaway`` to an authenticated agent, then close 1001."""
        if self._closing:
            return
        self._closing = True
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
            self.hub.detach(self)
            try:
                await self._stop_commands()
                await self._stop_sender()
                if self._closer is not None:
                    await self._closer
                await self._release_claim()
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

    async def _pump(self) -> None:
        session = self.session
        while True:
            try:
                async with asyncio.timeout_at(session.next_deadline()):
                    msg = await self.ws.receive()
            except TimeoutError:
                session.handle_timer(self._loop.time())
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
            await self._flush()
            request = session.close_requested
            if request is not None and not self.ws.closed:
                self._report_failure()
                await self.close(request.code, request.reason)

    async def _handle(self, event: LinkEvent) -> bool:
        """Act on one session event; True when the link is over."""
        match event:
            case HelloReceived(agent_id=agent_id):
                await self._lookup(agent_id)
            case Authenticated(agent_id=agent_id, account_id=account_id, resume_after=resume):
                self.account_id = account_id
                await self._start(agent_id, account_id, resume)
            case Acked(seq=seq):
                self.hub.metrics.acks.inc()
                await self._save_cursor(seq)
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
            ):
                pass  # agent-side events: a RelaySession never emits them
            case _:
                assert_never(event)
        return False

    async def _start(self, agent_id: str, account_id: str, resume: int) -> None:
        """The handshake is done: take the agent over, send the status snapshot, then events."""
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
        # DESIGN §Link protocol, Events: the agent's inbox is authoritative.
        await self._save_cursor(resume)
        try:
            await self.hub.store.touch_agent(agent_id, now=time.time())
        except StoreError as exc:
            self.log.warning("agent.touch_failed", extra={"error": str(exc)})
        self.log.info(
            "agent.connected",
            extra={"account": account_id, "resume_after": resume, "epoch": self.epoch},
        )
        if self._may_send:
            self._sender = asyncio.create_task(self._send_events())
            self._wake.set()

    async def _save_cursor(self, seq: int) -> None:
        """Store the agent's cursor; skipped while the store is down (the next ack writes it,
        and a stale cursor only makes retention keep more)."""
        try:
            await self.hub.store.set_cursor(self.agent_id or "", seq)
        except StoreError as exc:
            self.log.warning("agent.cursor_not_saved", extra={"seq": seq, "error": str(exc)})

    async def _lookup(self, agent_id: str) -> None:
        """Answer the session's hello before the next message is fed (docs/protocol.md)."""
        self.agent_id = agent_id
        self.log = bind(log, conn_id=self.conn_id, agent_id=agent_id)
        try:
            agent = await self.hub.store.get_agent(agent_id)
            trimmed = 0 if agent is None else await self.hub.store.trimmed_through(agent.account_id)
        except StoreError as exc:
            self.log.warning("agent.store_unavailable", extra={"error": str(exc)})
            self.session.close(CloseCode.INTERNAL_ERROR, "relay store unavailable")
            return
        if agent is None or agent.public_key is None:
            self.log.warning("agent.auth_failed", extra={"reason": "unknown agent"})
            self.session.close(CloseCode.UNAUTHORIZED, "unknown agent")
        elif agent.revoked:
            self.log.warning("agent.auth_failed", extra={"reason": "agent revoked"})
            self.session.close(CloseCode.REVOKED, "agent revoked")
        else:
            if trimmed > self.session.last_offered:
                self.log.warning(
                    "agent.behind_retention",
                    extra={"resume_after": self.session.last_offered, "trimmed_through": trimmed},
                )
            self._told_through = trimmed
            self.session.agent_found(agent.public_key, agent.account_id, trimmed_through=trimmed)

    async def _send_snapshot(self, account_id: str) -> None:
        """The account's whole status before any event (DESIGN §Link protocol, Status)."""
        items = await self.hub.store.status_snapshot(account_id)
        self.session.send_status([item.to_json() for item in items], snapshot=True)
        self._newer_status(items)
        early, self._early_status = self._early_status or {}, None
        # A change pushed while the snapshot was being read may be missing from it.
        newer = self._newer_status(list(early.values()))
        if newer:
            self.session.send_status([item.to_json() for item in newer])

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
        session, store = self.session, self.hub.store
        assert self.account_id is not None
        while session.can_offer:
            # Reading no more than the free slots is the back-pressure (STYLE §2 rule 4).
            limit = self._free_slots()
            batch = await store.read_events(
                self.account_id, after=session.last_offered, limit=limit
            )
            if not batch:
                return
            if batch[0].seq > session.last_offered + 1 and await self._behind_retention():
                return
            for stored in batch:
                if not session.offer(stored.seq, stored.event.to_json()):
                    break
                self.hub.metrics.deliveries.inc()
            await self._flush()
            if len(batch) < limit:
                return

    async def _behind_retention(self) -> bool:
        """Seqs skipped: if retention dropped events this link never offered, close with
        BEHIND_RETENTION so that the next welcome tells the agent (docs/protocol.md)."""
        assert self.account_id is not None
        trimmed = await self.hub.store.trimmed_through(self.account_id)
        if trimmed <= max(self.session.last_offered, self._told_through):
            return False  # an ordinary gap (other accounts' seqs), or one the welcome named
        self.log.warning(
            "agent.behind_retention",
            extra={"last_offered": self.session.last_offered, "trimmed_through": trimmed},
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
