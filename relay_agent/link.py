"""The agent's outbound link to the relay: a reconnect loop around a thin pump (STYLE §7).

The protocol lives in :class:`shared.link.session.AgentSession`; this module only moves
messages between it and a ``websockets`` connection, commits delivered events to the inbox and
acks them afterwards (DESIGN principle 1), stores status items in the inbox's status table,
hands each open connection to :class:`~relay_agent.commands.Commands` (which sends CTOX commands
on it and gets their results back), and reconnects forever with exponential back-off and
full jitter (DESIGN §Link protocol, Liveness); an upgrade refused as busy (503 or 429 with
``Retry-After``) is retried after ``Retry-After`` plus jitter without growing the back-off
(:func:`reconnect_delay`). The only way out is a refusal by the relay (close 4401/4403, or
HTTP 401/403 on the upgrade), which :meth:`AgentLink.run` raises.

Two faults of issue 6 are handled here rather than by ending the link:

* **Inbox write failures** (disk full, database read-only): events the inbox could not commit
  stay in memory, bounded by the relay's window since nothing is acked; the commit is retried
  with back-off, health reports the error, and the link stays up. Once the disk recovers, the
  events are committed and acked: nothing is lost (DESIGN principle 1).
* **Connected but receiving nothing**: the relay's ``heartbeat`` frames name the newest seq we
  should have. :class:`StallWatch` closes the link (4013 ``stalled``) and reconnects when we
  have less, have acked all we have (so our own inbox is not what holds delivery back), and
  nothing arrives for ``link.stall_timeout``.

Test hook: with ``XON_TESTS_CRASH_AT=before_commit[:N]`` or ``before_ack[:N]`` in the
environment, the process exits at once (``os._exit``, like ``kill -9``) at that point once N
events (default 1) reached it, so the crash tests of issue 6 can hit the exact spot.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
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
from shared.crypto import SigningKey
from shared.errors import AuthError, ConfigError, Revoked, StoreError, Unauthorized
from shared.link import (
    FATAL_CLOSE_CODES,
    FEATURES,
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
from shared.link.session import HeartbeatReceived

from . import net
from .commands import Commands
from .inbox import Inbox

__all__ = [
    "AgentLink",
    "LinkState",
    "LinkStatus",
    "StallWatch",
    "backoff_delay",
    "busy_retry_after",
    "reconnect_delay",
    "websocket_url",
    "CLIENT",
    "CRASH_ENV",
    "CRASH_EXIT_CODE",
]

log = logging.getLogger(__name__)

CLIENT = "xon-relay-agent/0.1.0"
_MAX_ATTEMPT = 32
"""Caps the exponent so ``2 ** attempt`` stays a small float; the delay is capped long before."""
_BUSY_STATUSES = (429, 503)
"""Upgrade refusals whose ``Retry-After`` the agent honours (the relay sheds load with 503)."""
_BUSY_JITTER = 1.0
"""Seconds of jitter at least after a busy refusal: Retry-After is whole seconds
(:func:`reconnect_delay`)."""
CRASH_ENV = "XON_TESTS_CRASH_AT"
"""Test hook (module docstring): ``before_commit[:N]`` or ``before_ack[:N]``."""
CRASH_EXIT_CODE = 70


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
    inbox_error: str | None = None
    """Why the inbox cannot store what the relay sent (disk full, read-only); None when it can.
    While set, nothing is acked and the commit is retried (module docstring)."""


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


def busy_retry_after(exc: BaseException) -> float | None:
    """The ``Retry-After`` of an upgrade the relay refused as busy (503 or 429), in seconds.

    ``None`` for any other failure, and for a refusal without the header or whose value is not
    whole seconds (an HTTP-date, junk): those get the ordinary back-off.
    """
    if not isinstance(exc, InvalidStatus) or exc.response.status_code not in _BUSY_STATUSES:
        return None
    value = exc.response.headers.get("Retry-After", "").strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return float(value)


def reconnect_delay(
    attempt: int, retry_after: float | None, *, initial: float, cap: float,
    rand: Callable[[], float],
) -> tuple[float, int]:
    """The wait before the next connection attempt, and the back-off attempt after it.

    A busy refusal (``retry_after``, from :func:`busy_retry_after`) means "come back shortly"
    (docs/protocol.md, Reconnecting): ``Retry-After`` plus jitter over ``[0, J]`` with
    ``J = min(Retry-After, max(1 s, Retry-After / 10))``, and the attempt stays, so the
    back-off does not grow while the relay sheds a storm. The relay already spreads the
    agents it refuses over the seconds it needs (each gets its own ``Retry-After``), so the
    jitter only spreads them within their second; jitter as wide as ``Retry-After`` would
    bring those told "12 s" back over 12 more seconds while the relay idles. The wait stays
    within ``cap`` by taking a ``Retry-After`` above ``cap / 2`` as ``cap / 2``.
    Anything else waits :func:`backoff_delay` and counts one more attempt.
    """
    if retry_after is not None:
        base = min(retry_after, cap / 2)
        return base + rand() * min(base, max(_BUSY_JITTER, base / 10)), attempt
    return backoff_delay(attempt, initial=initial, cap=cap, rand=rand), attempt + 1


class StallWatch:
    """Judges heartbeats (issue 6, "connected but receiving nothing"; docs/protocol.md).

    The agent is *stalled* from the first heartbeat whose ``head`` is above the highest seq
    received while everything received is acked: the relay has events for us and nothing of
    ours holds them back (a window full of unacked events would). Any event, or a heartbeat
    that is not ahead, ends it. Stalled for ``timeout`` seconds: the link must be closed.

    Args:
        timeout: ``link.stall_timeout``; ``None`` never judges a link stalled.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.since: float | None = None
        """When the current stall began (the caller's clock), or None."""

    def heartbeat(self, head: int, *, received: int, acked: int, now: float) -> None:
        if self.timeout is not None and head > received and acked >= received:
            if self.since is None:
                self.since = now
        else:
            self.since = None

    def progressed(self) -> None:
        """An event arrived."""
        self.since = None

    def deadline(self) -> float | None:
        if self.since is None or self.timeout is None:
            return None
        return self.since + self.timeout


def _earliest(*times: float | None) -> float | None:
    armed = [t for t in times if t is not None]
    return min(armed) if armed else None


class _CrashHook:
    """The ``XON_TESTS_CRASH_AT`` test hook (module docstring); inert when unset."""

    def __init__(self, spec: str) -> None:
        point, _, count = spec.partition(":")
        self.point = point
        self.count = int(count) if count.isdigit() else 1

    def reached(self, point: str, events: int) -> None:
        if point == self.point and events >= self.count:
            log.warning("link.test_crash", extra={"point": point, "events": events})
            os._exit(CRASH_EXIT_CODE)


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

    def __init__(
        self, ws: ClientConnection, session: AgentSession, *, stall: StallWatch, retry: float
    ) -> None:
        self.ws = ws
        self.session = session
        self.stall = stall
        self.pending: list[tuple[int, dict[str, Any]]] = []
        """Events received and not yet committed, oldest first (at most the relay's window:
        the session refuses more)."""
        self.status: dict[str, Any] = {}
        """Status items (by key) received and not yet stored; ``status_snapshot`` when they
        replace everything stored."""
        self.status_snapshot = False
        self.retry_at: float | None = None
        """When to retry a failed inbox write (the loop's clock), or None."""
        self.retry_delay = retry
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
        private_key: SigningKey,
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
        # The only environment read below the CLI: a test hook, inert unless set.
        self._crash = _CrashHook(os.environ.get(CRASH_ENV, ""))
        self._received = 0
        """Events received by this process (for the crash hook)."""
        self._committed = 0
        """Events committed by this process (for the crash hook)."""

    async def run(self) -> NoReturn:
        """Connect, pump, reconnect; forever.

        Raises:
            Revoked: the relay closed the link with 4403.
            Unauthorized: close 4401, or HTTP 401/403 on the WebSocket upgrade.
        """
        attempt = 0
        while True:
            self.status.state = LinkState.CONNECTING
            welcomed, retry_after = await self._connect_once()
            if welcomed:
                attempt = 0  # a link that got as far as welcome starts the back-off afresh
            self.status.state = LinkState.DISCONNECTED
            self.status.connected_since = None
            delay, attempt = reconnect_delay(
                attempt, retry_after, initial=self.config.backoff_initial,
                cap=self.config.backoff_max, rand=self._rand,
            )
            log.info(
                "link.reconnecting",
                extra={"delay": round(delay, 3), "attempt": attempt,
                       "error": self.status.last_error},
            )
            await asyncio.sleep(delay)

    async def _connect_once(self) -> tuple[bool, float | None]:
        """One connection's life: whether the relay welcomed us, and the ``Retry-After`` of a
        busy refusal (:func:`busy_retry_after`). Raises on a fatal refusal."""
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
                **await net.websocket_kwargs(self.config),  # proxy tunnel and TLS trust
            ) as ws:
                return await self._pump(ws), None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise Unauthorized(f"relay refused the agent: HTTP {status}") from exc
            retry_after = busy_retry_after(exc)
            self.status.last_error = f"WebSocket upgrade refused: HTTP {status}" + (
                "" if retry_after is None else f" (busy, Retry-After {retry_after:g} s)"
            )
            return False, retry_after
        except (OSError, TimeoutError, WebSocketException, ConfigError) as exc:
            # ConfigError: e.g. a ca_file removed after start; retry rather than die.
            self.status.last_error = net.link_error(exc, self.config)[:300]
        return False, None

    async def _pump(self, ws: ClientConnection) -> bool:
        loop = asyncio.get_running_loop()
        link = self.config.link
        session = AgentSession(
            agent_id=self.config.agent_id,
            relay_id=self.config.relay_id,
            private_key=self._key,
            resume_after=self._inbox.last_seq(),
            auth_timeout=link.auth_timeout,
            now=loop.time(),
            client=CLIENT,
            # docs/protocol.md, Routing: the relay sends only the events this asks for.
            subscription=self.config.subscription.to_wire(),
            # Batched events: what arrives together is committed together and acked once.
            features=FEATURES,
        )
        conn = _Connection(
            ws, session, stall=StallWatch(link.stall_timeout), retry=self.config.backoff_initial
        )
        # Bounded: when the inbox is slow, the reader stops and TCP pushes back on the relay.
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=link.window)
        reader = asyncio.create_task(self._read(ws, queue))
        welcomed = False
        closed: tuple[int | None, str] | None = None
        try:
            await conn.flush()
            while closed is None and session.close_requested is None:
                deadline = _earliest(session.next_deadline(), conn.stall.deadline(), conn.retry_at)
                try:
                    async with asyncio.timeout_at(deadline):
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
                self._check_stall(conn, loop.time())
            if closed is None and session.close_requested is not None:
                close = session.close_requested
                await conn.flush()  # the error frame that explains a 4xxx close
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

    @staticmethod
    def _check_stall(conn: _Connection, now: float) -> None:
        deadline = conn.stall.deadline()
        session = conn.session
        if deadline is None or now < deadline or session.close_requested is not None:
            return
        # Issue 6: pings prove the relay's network stack is alive, not that our events flow.
        log.warning("link.stalled", extra={"last_received": session.last_received,
                                           "timeout": conn.stall.timeout})
        session.close(CloseCode.STALLED, "heartbeats announce events that never arrive")

    async def _handle(
        self, conn: _Connection, welcomed: bool
    ) -> tuple[bool, tuple[int | None, str] | None]:
        """Act on the session's events; returns (welcomed, close code and reason if closed)."""
        session = conn.session
        closed: tuple[int | None, str] | None = None
        head: int | None = None
        for event in session.events_received():
            match event:
                case EventReceived(seq=seq, event=body):
                    # The session judged the id and the window (docs/protocol.md).
                    conn.pending.append((seq, body))
                    conn.stall.progressed()
                    self._received += 1
                case HeartbeatReceived(head=beat):
                    head = beat  # judged after this batch is committed
                case Welcomed(
                    account_id=account_id, resume_after=resume_after,
                    trimmed_through=trimmed, replay_after=replay,
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
                    self.status.last_error = self.status.inbox_error
                    log.info(
                        "agent.connected",
                        extra={"agent_id": self.config.agent_id, "account_id": account_id,
                               "resume_after": resume_after},
                    )
                    if replay is not None:
                        # docs/operations.md, Replay: the events after ``replay`` come again;
                        # the inbox keeps the ones it holds once (by id) and acks them all.
                        log.info("link.replay", extra={"replay_after": replay,
                                                       "resume_after": resume_after})
                    await self.commands.attach(conn)
                case CommandResultReceived(result=result):
                    self.commands.deliver(result)
                case StatusReceived(items=items, snapshot=snapshot):
                    _merge_status(conn, items, snapshot)
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
        now = asyncio.get_running_loop().time()
        # Committing is right even while closing: the relay need not send those again.
        if conn.retry_at is None or now >= conn.retry_at:
            await self._write_inbox(conn)
        if head is not None:
            conn.stall.heartbeat(
                head, received=session.last_received, acked=session.last_acked, now=now
            )
        return welcomed, closed

    async def _write_inbox(self, conn: _Connection) -> None:
        """Store pending status items, then commit pending events and ack them.

        A failure keeps both pending, acks nothing and schedules a retry with back-off: the
        link stays up and the relay keeps the events (issue 6, disk full or read-only).
        """
        session = conn.session
        stored_status = False
        batch: list[tuple[int, dict[str, Any]]] = []
        try:
            if conn.status or conn.status_snapshot:
                items, snapshot = list(conn.status.values()), conn.status_snapshot
                stored = await self._inbox.save_status(items, snapshot=snapshot)
                conn.status, conn.status_snapshot = {}, False
                stored_status = True
                log.debug("status.stored", extra={"items": stored, "snapshot": snapshot})
            if conn.pending:
                batch = conn.pending
                self._crash.reached("before_commit", self._received)
                result = await self._inbox.commit(batch)
        except StoreError as exc:
            self._inbox_failed(conn, exc)
            return
        if stored_status or batch:
            self._inbox_ok(conn)
        if not batch:
            return
        conn.pending = []
        self._committed += len(batch)
        self.status.last_event_at = self._clock()
        self._crash.reached("before_ack", self._committed)
        # DESIGN principle 1: ack only after the inbox commit.
        session.ack(max(seq for seq, _ in batch))
        await conn.flush()
        log.debug("inbox.committed", extra={"events": len(batch), "stored": result.stored,
                                             "last_seq": result.last_seq})

    def _inbox_failed(self, conn: _Connection, exc: StoreError) -> None:
        if self.status.inbox_error is None:
            log.error("inbox.write_failed", extra={"error": str(exc), "events": len(conn.pending)})
        self.status.inbox_error = str(exc)[:300]
        self.status.last_error = f"inbox cannot store events, not acking: {exc}"[:300]
        conn.retry_at = asyncio.get_running_loop().time() + conn.retry_delay
        conn.retry_delay = min(conn.retry_delay * 2, self.config.backoff_max)

    def _inbox_ok(self, conn: _Connection) -> None:
        conn.retry_at = None
        conn.retry_delay = self.config.backoff_initial
        if self.status.inbox_error is not None:
            log.info("inbox.recovered")
            self.status.inbox_error = None
            self.status.last_error = None

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


def _merge_status(conn: _Connection, items: list[Any], snapshot: bool) -> None:
    """Queue status items for storage, newest per key; a snapshot drops what it replaces."""
    if snapshot:
        conn.status, conn.status_snapshot = {}, True
    refused = 0
    for item in items:
        # The inbox stores only items with a non-empty string key (inbox._status_rows).
        if isinstance(item, dict) and isinstance(item.get("key"), str) and item["key"]:
            if not _older(item, conn.status.get(item["key"])):
                conn.status[item["key"]] = item
        else:
            refused += 1
    if refused:
        log.warning("status.items_refused", extra={"refused": refused})


def _older(item: dict[str, Any], known: Any) -> bool:
    """True when ``item`` has a lower relay seq than ``known`` (a late frame from another
    relay instance must not roll a value back; the inbox applies the same rule)."""
    if not isinstance(known, dict):
        return False
    new, old = item.get("seq"), known.get("seq")
    if isinstance(new, bool) or isinstance(old, bool):
        return False
    return isinstance(new, int) and isinstance(old, int) and new < old
