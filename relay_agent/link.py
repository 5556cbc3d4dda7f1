"""The agent's outbound link to the relay: a reconnect loop around a thin pump (STYLE §7).

The protocol lives in :class:`shared.link.session.AgentSession`; this module only moves
messages between it and a ``websockets`` connection, commits delivered events to the inbox and
acks them afterwards (DESIGN principle 1), stores status items in the inbox's status table,
hands each open connection to :class:`~relay_agent.commands.Commands` (which sends CTOX commands
on it and gets their results back), and reconnects forever with exponential back-off and
full jitter (DESIGN §Link protocol, Liveness). The only way out is a refusal by the relay (close
4401/4403, or HTTP 401/403 on the upgrade), which :meth:`AgentLink.run` raises.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from shared.config import AgentConfig
from shared.crypto import Ed25519PrivateKey
from shared.errors import AuthError, ConfigError, Revoked, StoreError, Unauthorized
from shared.link import (
    FATAL_CLOSE_CODES,
    SUBPROTOCOL,
    AgentSession,
    AuthFailed,
    CloseCode,
    Closed,
    CommandResultReceived,
    EventReceived,
    GoingAway,
    PeerError,
    StatusReceived,
    Welcomed,
    frames,
)

from . import net
from .commands import Commands
from .inbox import Inbox

__all__ = ["AgentLink", "LinkState", "LinkStatus", "backoff_delay", "websocket_url", "CLIENT"]

log = logging.getLogger(__name__)

CLIENT = "xon-relay-agent/0.1.0"
_MAX_ATTEMPT = 32
"""Caps the exponent so ``2 ** attempt`` stays a small float; the delay is capped long before."""


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


@dataclass(slots=True)
class LinkStatus:
    """What the local API's health endpoint reports about the link (wall-clock times)."""

    state: LinkState = LinkState.DISCONNECTED
    connected_since: float | None = None
    last_event_at: float | None = None
    last_error: str | None = None
    lost_through: int = 0
    """Highest relay seq that relay retention dropped before this agent acked it (0: none)."""


def websocket_url(relay_url: str) -> str:
    """``https://relay.example/base`` → ``wss://relay.example/base/v1/agent``."""
    parts = urlsplit(relay_url)
    scheme = {"http": "ws", "https": "wss"}[parts.scheme]
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/v1/agent", "", ""))


def backoff_delay(attempt: int, *, initial: float, cap: float, rand: Callable[[], float]) -> float:
    """Full jitter: uniform in [0, min(cap, initial · 2^attempt)).

    Spreading the whole interval (not just a few seconds around it) keeps a fleet of agents
    from reconnecting in step after a relay restart.
    """
    ceiling: float = min(cap, initial * 2.0 ** min(attempt, _MAX_ATTEMPT))
    return rand() * ceiling


def _fatal(code: int | None, reason: str) -> AuthError | None:
    if code not in FATAL_CLOSE_CODES:
        return None
    message = f"relay closed the link with {code}: {reason or 'no reason given'}"
    return Revoked(message) if code == CloseCode.REVOKED else Unauthorized(message)


class _Connection:
    """One WebSocket and its session; writes the session's frames in order.

    The pump and :class:`Commands` both write on it, so draining ``data_to_send()`` and writing
    happen under one lock: two writers must not reorder frames (a lower ack after a higher
    one would be a protocol error).
    """

    def __init__(self, ws: ClientConnection, session: AgentSession) -> None:
        self.ws = ws
        self.session = session
        self._lock = asyncio.Lock()

    async def flush(self) -> None:
        async with self._lock:
            try:
                for text in self.session.data_to_send():
                    await self.ws.send(text)
            except ConnectionClosed:
                pass  # the reader sees the close too and reports it to the session

    async def send_command(self, command: frames.Command) -> None:
        # Raises InvalidState unless OPEN: Commands turns that into 503 relay_unreachable.
        self.session.send_command(command)
        await self.flush()


class AgentLink:
    """Keeps one link to the relay open and feeds delivered events to the inbox.

    Args:
        config: the agent's settings (relay URL, ids, back-off, ``link`` section).
        private_key: the key enrolled with the relay.
        inbox: where events are committed before they are acked, and status items kept.
        commands: CTOX commands waiting for a link; a fresh :class:`Commands` by default.
        rand: jitter source in [0, 1); tests pin it.
        clock: wall clock for the health report.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        private_key: Ed25519PrivateKey,
        inbox: Inbox,
        commands: Commands | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.url = websocket_url(config.relay_url)
        self.status = LinkStatus()
        self.commands = commands if commands is not None else Commands()
        self._key = private_key
        self._inbox = inbox
        self._rand = rand
        self._clock = clock

    async def run(self) -> NoReturn:
        """Connect, pump, reconnect; forever.

        Raises:
            Revoked: the relay closed the link with 4403.
            Unauthorized: close 4401, or HTTP 401/403 on the WebSocket upgrade.
        """
        attempt = 0
        while True:
            self.status.state = LinkState.CONNECTING
            if await self._connect_once():
                attempt = 0  # a link that got as far as welcome starts the back-off afresh
            self.status.state = LinkState.DISCONNECTED
            self.status.connected_since = None
            delay = backoff_delay(
                attempt, initial=self.config.backoff_initial, cap=self.config.backoff_max,
                rand=self._rand,
            )
            attempt += 1
            log.info(
                "link.reconnecting",
                extra={"delay": round(delay, 3), "attempt": attempt,
                       "error": self.status.last_error},
            )
            await asyncio.sleep(delay)

    async def _connect_once(self) -> bool:
        """One connection's life; True if the relay welcomed us. Raises on a fatal refusal."""
        link = self.config.link
        try:
            async with connect(
                self.url,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                ping_interval=link.ping_interval,
                ping_timeout=link.ping_timeout,
                # After a ping timeout websockets still waits close_timeout for a close frame
                # that a dead link never brings; keep it short so detection stays ~30 s.
                close_timeout=min(link.ping_timeout or 2.0, 2.0),
                max_size=link.max_message_size,
                open_timeout=link.auth_timeout,
                compression=None,  # small JSON frames: deflate costs more memory than it saves
                **net.websocket_kwargs(self.config),  # proxy and TLS trust (corporate networks)
            ) as ws:
                return await self._pump(ws)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise Unauthorized(f"relay refused the agent: HTTP {status}") from exc
            self.status.last_error = f"WebSocket upgrade refused: HTTP {status}"
        except (OSError, TimeoutError, WebSocketException, ConfigError) as exc:
            # ConfigError: e.g. a ca_file removed after start; retry rather than die.
            self.status.last_error = net.link_error(exc, self.config)[:300]
        return False

    async def _pump(self, ws: ClientConnection) -> bool:
        loop = asyncio.get_running_loop()
        session = AgentSession(
            agent_id=self.config.agent_id,
            relay_id=self.config.relay_id,
            private_key=self._key,
            resume_after=self._inbox.last_seq(),
            auth_timeout=self.config.link.auth_timeout,
            now=loop.time(),
            client=CLIENT,
            # docs/protocol.md, Routing: the relay sends only the events this asks for.
            subscription=self.config.subscription.to_wire(),
        )
        conn = _Connection(ws, session)
        # Bounded: when the inbox is slow, the reader stops and TCP pushes back on the relay.
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self.config.link.window)
        reader = asyncio.create_task(self._read(ws, queue))
        welcomed = False
        closed: tuple[int | None, str] | None = None
        try:
            await conn.flush()
            while closed is None and session.close_requested is None:
                try:
                    async with asyncio.timeout_at(session.next_deadline()):
                        messages = [await queue.get()]
                except TimeoutError:
                    session.handle_timer(loop.time())
                else:
                    while not queue.empty() and messages[-1] is not None:
                        messages.append(queue.get_nowait())
                    for text in messages:
                        if text is None:
                            reason = ws.close_reason or ""
                            session.receive_closed(ws.close_code, reason, loop.time())
                        else:
                            session.receive_message(text, loop.time())
                await conn.flush()
                welcomed, closed = await self._handle(conn, welcomed)
            if closed is None and session.close_requested is not None:
                close = session.close_requested
                await ws.close(close.code, close.reason)
                closed = (close.code, close.reason)
        finally:
            # From here on a new command is refused at once; waiting ones go out on the next link.
            self.commands.detach(conn)
            if welcomed:
                self.status.state = LinkState.DISCONNECTED
            reader.cancel()
        assert closed is not None
        code, reason = closed
        self.status.last_error = f"link closed ({code}): {reason or 'no reason given'}"
        fatal = _fatal(code, reason)
        if fatal is not None:
            raise fatal
        return welcomed

    async def _handle(
        self, conn: _Connection, welcomed: bool
    ) -> tuple[bool, tuple[int | None, str] | None]:
        """Act on the session's events; returns (welcomed, close code and reason if closed)."""
        session = conn.session
        batch: list[tuple[int, dict[str, Any]]] = []
        closed: tuple[int | None, str] | None = None
        for event in session.events_received():
            match event:
                case EventReceived(seq=seq, event=body):
                    batch.append((seq, body))
                case Welcomed(
                    account_id=account_id, resume_after=resume_after, trimmed_through=trimmed
                ):
                    welcomed = True
                    if trimmed > resume_after:
                        # DESIGN principle 1 was broken upstream (relay retention hard limit):
                        # say so loudly rather than let the gap pass silently.
                        self.status.lost_through = trimmed
                        log.warning(
                            "link.behind_retention",
                            extra={"resume_after": resume_after, "trimmed_through": trimmed},
                        )
                    self.status.state = LinkState.CONNECTED
                    self.status.connected_since = self._clock()
                    self.status.last_error = None
                    log.info(
                        "agent.connected",
                        extra={"agent_id": self.config.agent_id, "account_id": account_id,
                               "resume_after": resume_after},
                    )
                    await self.commands.attach(conn)
                case CommandResultReceived(result=result):
                    self.commands.deliver(result)
                case StatusReceived(items=items, snapshot=snapshot):
                    await self._store_status(session, items, snapshot)
                case GoingAway(reason=reason):
                    log.info("link.goaway", extra={"reason": reason})
                case AuthFailed(reason=reason):
                    log.warning("link.auth_failed", extra={"reason": reason})
                case PeerError(code=code, message=message):
                    # Not "code": the log formatters redact fields named like secrets (shared.logs).
                    log.warning("link.peer_error", extra={"error_code": code, "reason": message})
                case Closed(code=code, reason=reason):
                    closed = (code, reason)
                case _:
                    log.debug("link.event_ignored", extra={"kind": type(event).__name__})
        if batch:
            await self._commit(conn, batch)
        return welcomed, closed

    async def _store_status(self, session: AgentSession, items: list[Any], snapshot: bool) -> None:
        try:
            stored = await self._inbox.save_status(items, snapshot=snapshot)
        except StoreError as exc:
            # A lost change would leave a stale value; a new link starts with a fresh snapshot.
            log.error("status.store_failed", extra={"error": str(exc)})
            session.close(CloseCode.INTERNAL_ERROR, "agent inbox unavailable")
            return
        if stored < len(items):
            log.warning("status.items_refused", extra={"refused": len(items) - stored})
        log.debug("status.stored", extra={"items": stored, "snapshot": snapshot})

    async def _commit(self, conn: _Connection, batch: list[tuple[int, dict[str, Any]]]) -> None:
        session = conn.session
        if any(not isinstance(body.get("id"), str) or not body["id"] for _, body in batch):
            session.close(CloseCode.PROTOCOL_ERROR, "event without an id")
            return
        try:
            result = await self._inbox.commit(batch)
        except StoreError as exc:
            # Nothing is acked: the relay keeps the events and resends them after reconnect.
            log.error("inbox.commit_failed", extra={"error": str(exc)})
            session.close(CloseCode.INTERNAL_ERROR, "agent inbox unavailable")
            return
        self.status.last_event_at = self._clock()
        # DESIGN principle 1: ack only after the inbox commit.
        session.ack(max(seq for seq, _ in batch))
        await conn.flush()
        log.debug("inbox.committed", extra={"events": len(batch), "stored": result.stored,
                                             "last_seq": result.last_seq})

    @staticmethod
    async def _read(ws: ClientConnection, queue: asyncio.Queue[str | None]) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    message = message.decode("utf-8", "replace")
                await queue.put(message)
        except WebSocketException:
            pass  # the close code is on ws; the sentinel below reports it
        await queue.put(None)
