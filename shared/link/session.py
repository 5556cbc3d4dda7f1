"""The link protocol as a pure state machine: :class:`RelaySession` and :class:`AgentSession`.

Theory of operation
===================

A session is one WebSocket link seen from one side, with no I/O of its own (DESIGN principle 4,
"Sans-I/O core"). The I/O layer (the relay's ``agent_ws`` pump, the agent's ``link`` pump) feeds
it what happened and carries out what it asks for:

* inputs: ``receive_message(text, now)`` for each inbound text message,
  ``receive_closed(code, reason, now)`` when the transport ended, ``handle_timer(now)`` when
  ``next_deadline()`` has passed, and the application calls of each side (``offer``, ``ack``,
  ``send_command`` …);
* outputs, drained by the caller after every input: ``data_to_send()`` (encoded frames, in
  order), ``events_received()`` (typed :data:`LinkEvent` values) and ``close_requested`` (the
  :class:`Close` the transport must be closed with, once set).

Time only arrives as ``now`` (the caller's monotonic clock) and the nonce is passed in, so the
same inputs always give the same outputs and the tests need neither sockets nor sleeps.

States
------

Both sides walk the same :class:`LinkState` ladder; only the frames that move them differ::

    agent:  CONNECTING ──challenge──▶ AUTHENTICATING ──welcome──▶ OPEN ──error/goaway──▶ CLOSING
    relay:  CONNECTING ──hello──────▶ AUTHENTICATING ──auth─────▶ OPEN ──error─────────▶ CLOSING
                    any state ──close() or a peer fault──▶ CLOSING ──receive_closed()──▶ CLOSED

:data:`TRANSITIONS` lists every (state, frame type) pair that may arrive and the state it leads
to. A pair missing from the table is a protocol error. Frames are one-way (the table in
``frames``), so each side's dispatcher also refuses frames only its own side sends. The special
cases sit beside the table: a failed signature or a foreign relay identity leads to CLOSING
instead of OPEN, and ``auth`` cannot be handled before the relay's I/O layer has looked the
agent up (``agent_found()``, ``agent_refused()`` or ``close()``).

Errors
------

The split follows h11. A peer fault (bad JSON, an unknown frame, a frame out of place, an ack
for events never sent, an event seq going backwards …) never raises out of
``receive_message``: the session records it in ``error``, queues an ``error`` frame, sets
``close_requested`` to the fault's close code, moves to CLOSING and ignores further input.
Misuse by our own caller (an ``offer`` before the handshake, acking an event never received)
raises ``InvalidState`` or ``LocalProtocolError`` at once, because it is a bug to fix, not a
condition to handle.

Once a session is CLOSING, calls whose effect the protocol recovers anyway (``ack``,
``offer``, ``send_command_result``, ``send_status``, ``send_heartbeat``, ``agent_found``,
``close``, ``go_away``) are silently moot instead of raising: the race between a local
decision and the link ending is normal, unacked events are resent after the resume point and
command results are found again by request id (DESIGN §Link protocol). ``send_command`` still
raises, because its caller waits for an answer that will never come and must refuse at once
(DESIGN §Agent local API: "503 at once when the relay is unreachable").

Heartbeats
----------

WebSocket pings prove that the peer's network stack answers, not that events flow: a relay
whose sender for one link is stuck keeps answering pings forever (issue 6, "connected but
receiving nothing"). So the relay's I/O layer calls ``send_heartbeat(head)`` every
``link.heartbeat_interval`` with the newest seq this agent should have by now, and the agent
session reports each one as :class:`HeartbeatReceived`. Whether the agent is behind, and for
how long, is the agent I/O layer's judgement (it alone knows whether its own inbox is holding
acks back); the session only offers ``last_received`` and ``last_acked`` for it.

Batching events
---------------

One WebSocket message per event costs one encode, one frame and one socket write each (issue 7:
the write alone was 12 % of the relay's time). An agent whose ``hello`` lists
:data:`~shared.link.frames.FEATURE_EVENTS` (an :class:`AgentSession` built with that feature
in ``features``) gets them batched: ``offer`` encodes the event as an item and holds it, and
the next ``data_to_send()`` turns the run of items held into one ``events`` frame. Any other
frame queued meanwhile (status, a command result, a heartbeat, an error) closes the run first,
so frames still leave in the order of the calls. A run is also closed before it would pass
:data:`~shared.link.frames.MAX_EVENTS_BYTES` (UTF-8 bytes, counted as items are added) or
:data:`~shared.link.frames.MAX_EVENTS_ITEMS` items. An agent that did not ask (an older one,
which would refuse the frame as unknown) gets one ``event`` frame per event as before. The
window counts events, not frames, either way; the agent session turns an ``events`` frame into
one :class:`EventReceived` per item, after the same order check as for ``event`` frames.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, assert_never

from .. import crypto
from ..errors import InvalidState, LocalProtocolError, RemoteProtocolError
from ..subscription import Subscription
from . import frames
from .frames import (
    Ack,
    Auth,
    Challenge,
    CloseCode,
    Command,
    CommandResult,
    Error,
    Event,
    Events,
    Frame,
    GoAway,
    Heartbeat,
    Hello,
    Status,
    Welcome,
)
from .window import ReceiveWindow, SendWindow

__all__ = [
    "LinkState",
    "CONNECTING",
    "AUTHENTICATING",
    "OPEN",
    "CLOSING",
    "CLOSED",
    "TRANSITIONS",
    "Close",
    "HelloReceived",
    "Authenticated",
    "AuthFailed",
    "Welcomed",
    "EventReceived",
    "Acked",
    "CommandReceived",
    "CommandResultReceived",
    "StatusReceived",
    "GoingAway",
    "HeartbeatReceived",
    "PeerError",
    "Closed",
    "LinkEvent",
    "LinkSession",
    "RelaySession",
    "AgentSession",
]

log = logging.getLogger(__name__)


class LinkState(IntEnum):
    """Where a link stands. Ordered: every state after OPEN means the link is ending."""

    CONNECTING = 0
    AUTHENTICATING = 1
    OPEN = 2
    CLOSING = 3
    CLOSED = 4


CONNECTING = LinkState.CONNECTING
AUTHENTICATING = LinkState.AUTHENTICATING
OPEN = LinkState.OPEN
CLOSING = LinkState.CLOSING
CLOSED = LinkState.CLOSED


@dataclass(frozen=True, slots=True)
class Close:
    """The WebSocket close the I/O layer must perform."""

    code: int
    reason: str


# -- events for the I/O layer ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Relay: an agent introduced itself; answer with ``agent_found()``, ``agent_refused()``
    or ``close()``.

    ``subscription`` is the validated routing filter of the hello (docs/protocol.md, Routing),
    ``None`` when the agent sent none: send it every event.
    """

    agent_id: str
    resume_after: int
    client: str
    subscription: Subscription | None = None


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Relay: the agent proved its identity; the link is OPEN, deliver after ``resume_after``
    (after ``replay_after`` instead when it is set: an operator's replay, docs/operations.md)."""

    agent_id: str
    account_id: str
    resume_after: int
    replay_after: int | None = None


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """Either side: the handshake failed; the session already asked for a 4401 close."""

    agent_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Welcomed:
    """Agent: the relay accepted us; the link is OPEN."""

    account_id: str
    resume_after: int
    window: int
    trimmed_through: int = 0
    """Above ``resume_after`` when the relay's retention dropped the events after
    ``resume_after`` up to this seq before they were acked: tell the operator."""
    replay_after: int | None = None
    """Set when the relay replays the account's log from this seq (below ``resume_after``):
    the events that follow may already be in the inbox, which drops them by event id."""


@dataclass(frozen=True, slots=True)
class EventReceived:
    """Agent: one event; commit it to the inbox, then call ``ack(seq)``."""

    seq: int
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Acked:
    """Relay: the agent committed everything up to ``seq``; store it as the agent's cursor."""

    seq: int


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """Relay: the agent asks for a CTOX call; answer with ``send_command_result()``."""

    command: frames.Command


@dataclass(frozen=True, slots=True)
class CommandResultReceived:
    """Agent: X-on's answer to one of our commands."""

    result: frames.CommandResult


@dataclass(frozen=True, slots=True)
class StatusReceived:
    """Agent: status items; ``snapshot`` replaces every value held before."""

    items: list[Any]
    snapshot: bool


@dataclass(frozen=True, slots=True)
class GoingAway:
    """Agent: the relay is shutting down; reconnect with back-off."""

    reason: str


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """Agent: the relay says every event for us up to ``head`` should have arrived by now."""

    head: int


@dataclass(frozen=True, slots=True)
class PeerError:
    """Either side: the peer explained why it is closing the link."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Closed:
    """Either side: the transport ended (``code`` is None when it ended without a close frame)."""

    code: int | None
    reason: str


LinkEvent = (
    HelloReceived
    | Authenticated
    | AuthFailed
    | Welcomed
    | EventReceived
    | Acked
    | CommandReceived
    | CommandResultReceived
    | StatusReceived
    | GoingAway
    | HeartbeatReceived
    | PeerError
    | Closed
)


# -- the transition table --------------------------------------------------------------------

TRANSITIONS: Mapping[tuple[LinkState, type[Frame]], LinkState] = {
    # DESIGN §Link protocol, Auth: hello → challenge → auth → welcome, nothing else first.
    (CONNECTING, Hello): AUTHENTICATING,  # relay: the challenge went out
    (CONNECTING, Challenge): AUTHENTICATING,  # agent: the signature went out
    (AUTHENTICATING, Auth): OPEN,  # relay: special case, a bad signature leads to CLOSING
    (AUTHENTICATING, Welcome): OPEN,  # agent
    # DESIGN §Link protocol, Events/Commands/Status: only on an authenticated link.
    (OPEN, Event): OPEN,
    (OPEN, Events): OPEN,  # only to an agent whose hello asked (module docstring, Batching)
    (OPEN, Ack): OPEN,
    (OPEN, Command): OPEN,
    (OPEN, CommandResult): OPEN,
    (OPEN, Status): OPEN,
    (OPEN, Heartbeat): OPEN,  # issue 6: "connected but receiving nothing" (module docstring)
    # The peer announces its close ("error" either way, "goaway" from the relay on shutdown);
    # a relay may shut down, or fail, while a handshake is still under way.
    (CONNECTING, GoAway): CLOSING,
    (AUTHENTICATING, GoAway): CLOSING,
    (OPEN, GoAway): CLOSING,
    (CONNECTING, Error): CLOSING,
    (AUTHENTICATING, Error): CLOSING,
    (OPEN, Error): CLOSING,
}

# Close codes that need no error frame: RFC 6455 normal closure and going away.
_PLAIN_CLOSE_CODES = frozenset({1000, 1001})
# The error frame names a 4xxx code in lower case (docs/protocol.md, Close codes).
_NAME_BY_CODE = {int(code): code.name.lower() for code in CloseCode}
_CODE_BY_NAME = {name: code for code, name in _NAME_BY_CODE.items()}
# What an ``events`` frame adds around its items (the commas between them are counted apart).
_EVENTS_OVERHEAD = len(frames.encode_events([]))


def _close_reason(text: str) -> str:
    """Cut ``text`` to fit a close frame (RFC 6455 §5.5: 125 bytes, 2 of them the code); a
    lone surrogate (a peer's string) becomes "?" rather than raising."""
    return text.encode(errors="replace")[:123].decode(errors="ignore")


def _describe(frame: Frame) -> str:
    """Frame type and ids for DEBUG logs; never a payload (STYLE §2 rule 5)."""
    match frame:
        case Event(seq=seq) | Ack(seq=seq):
            return f"{frame.type} seq={seq}"
        case Events(items=items):
            return f"{frame.type} seq={items[0].seq}..{items[-1].seq} n={len(items)}"
        case Command(request_id=request_id) | CommandResult(request_id=request_id):
            return f"{frame.type} request_id={request_id}"
        case Heartbeat(head=head):
            return f"{frame.type} head={head}"
        case _:
            return frame.type


class LinkSession(ABC):
    """What both sides share: buffers, the handshake deadline, closing and failing.

    Args:
        auth_timeout: seconds, from ``now``, for the handshake to reach OPEN.
        now: the caller's clock at construction (``loop.time()`` in the pumps).
        logger: where DEBUG frame/state/timer lines go; defaults to this module's logger.
    """

    def __init__(
        self,
        *,
        auth_timeout: float,
        now: float,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.state: LinkState = CONNECTING
        self.error: RemoteProtocolError | None = None
        """The peer fault that failed the link, if one did."""
        self.close_requested: Close | None = None
        """Set once: the code and reason the I/O layer must close the transport with."""
        self.logger = logger if logger is not None else log
        self.debug = self.logger.isEnabledFor(logging.DEBUG)
        """Checked before every DEBUG line so that a quiet link formats nothing."""
        # DESIGN §Link protocol / docs/protocol.md: the handshake must finish within
        # link.auth_timeout. The only timer a session needs; cleared from OPEN on.
        self._deadline: float | None = now + auth_timeout
        self._events: list[LinkEvent] = []
        self._outgoing: list[str] = []

    # -- inputs from the I/O layer -----------------------------------------------------------

    def receive_message(self, text: str, now: float) -> None:
        """Feed one inbound WebSocket text message. Never raises for the peer's faults."""
        # Judge the deadline first, so a late welcome cannot win against a slow timer.
        self.handle_timer(now)
        if self.state >= CLOSING:
            # After a close decision the peer's frames change nothing (websockets: the
            # connection discards data once it starts closing).
            return
        before = self.state
        try:
            frame = frames.decode(text)
            if self.debug:
                self.logger.debug("< %s", _describe(frame))
            target = TRANSITIONS.get((before, type(frame)))
            if target is None:
                raise RemoteProtocolError(f"{frame.type} frame not allowed in state {before.name}")
            self._handle(frame)
        except RemoteProtocolError as exc:
            self._fail(exc)
            return
        except InvalidState:
            raise  # our caller's bug (see "Errors" above), not the peer's
        except Exception as exc:
            # Last resort (websockets does the same): whatever a peer's message set off, it
            # ends this link, never the task serving it. One line, without the message or
            # the exception's text, which may quote the peer.
            self._internal_error(exc)
            return
        # A handler that closed instead (the special cases beside TRANSITIONS) already moved.
        if self.state is before:
            self._set_state(target)

    def receive_closed(self, code: int | None, reason: str, now: float) -> None:
        """The transport ended, cleanly or not; emits :class:`Closed` once."""
        if self.state is CLOSED:
            return
        self._set_state(CLOSED)
        self._events.append(Closed(code, reason))

    def handle_timer(self, now: float) -> None:
        """Act on the handshake deadline if ``now`` reached it; harmless to call early."""
        if self._deadline is not None and now >= self._deadline:
            if self.debug:
                self.logger.debug("- handshake deadline passed")
            self.close(CloseCode.AUTH_TIMEOUT, "handshake timed out")

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must next be called, or None when no timer is armed."""
        return self._deadline

    # -- outputs for the I/O layer -----------------------------------------------------------

    def events_received(self) -> list[LinkEvent]:
        """Events since the last call, oldest first (drained)."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[str]:
        """Encoded frames to write, in order, since the last call (drained)."""
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    # -- local decisions ---------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Decide to close the link (e.g. unknown or revoked agent, shutdown).

        A 4xxx code first queues ``error {code, message}`` with the code's lower-case name
        (docs/protocol.md, Close codes); 1000 and 1001 need no explanation. Moot once closing.

        Raises:
            LocalProtocolError: ``code`` is neither 1000, 1001 nor a :class:`CloseCode`.
        """
        if code not in _PLAIN_CLOSE_CODES and code not in _NAME_BY_CODE:
            raise LocalProtocolError(f"close code {code} is not a link close code")
        if self.state >= CLOSING:
            return
        if code in _NAME_BY_CODE:
            # Cut to what the peer's decoder accepts (docs/protocol.md, Frame limits).
            self._send(Error(code=_NAME_BY_CODE[code], message=reason[: frames.MAX_REASON]))
        self.close_requested = Close(code, _close_reason(reason))
        self._set_state(CLOSING)

    # -- machinery for the subclasses --------------------------------------------------------

    @abstractmethod
    def _handle(self, frame: Frame) -> None:
        """Act on a frame that TRANSITIONS admits in the current state; raise for faults."""

    def _send(self, frame: Frame) -> None:
        if self.debug:
            self.logger.debug("> %s", _describe(frame))
        self._outgoing.append(frames.encode(frame))

    def _set_state(self, state: LinkState) -> None:
        if self.debug:
            self.logger.debug("= %s", state.name)
        self.state = state
        if state >= OPEN:
            self._deadline = None

    def _internal_error(self, exc: Exception) -> None:
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        place = (
            f"{where.tb_frame.f_code.co_filename}:{where.tb_lineno}" if where is not None else "?"
        )
        self.logger.error(
            "link.internal_error",
            extra={"error": type(exc).__name__, "where": place, "state": self.state.name},
        )
        self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _fail(self, exc: RemoteProtocolError) -> None:
        """Fail the link for a peer fault (websockets ``fail()``)."""
        if self.debug:
            self.logger.debug("! %s", exc)
        self.error = exc
        self.close(exc.close_code, exc.message)

    def _peer_closing(self, code: int, reason: str) -> None:
        """The peer announced its close: echo its code (RFC 6455 §5.5.1) without replying."""
        self.close_requested = Close(code, _close_reason(reason))

    def _peer_error(self, code: str, message: str) -> None:
        # An unknown code name still ends the link; 4000 is the honest generic answer.
        self._peer_closing(_CODE_BY_NAME.get(code, int(CloseCode.PROTOCOL_ERROR)), message)
        self._events.append(PeerError(code, message))

    def _app_call_allowed(self, action: str) -> bool:
        """True in OPEN, False once closing (see "Errors" above); raises before OPEN."""
        if self.state is OPEN:
            return True
        if self.state >= CLOSING:
            return False
        raise InvalidState(f"cannot {action} in state {self.state.name}")


class RelaySession(LinkSession):
    """The relay's end of one agent's link.

    Args:
        relay_id: this relay's identity, which the agent's signature is bound to.
        nonce: fresh per connection (``crypto.new_nonce()``), so a captured ``auth`` is useless
            on any other link (DESIGN §Link protocol, Auth).
        window: most unacked events in flight (``LinkConfig.window``).
        auth_timeout: seconds for the handshake (``LinkConfig.auth_timeout``).
        now: the caller's clock.
        logger: see :class:`LinkSession`.

    Raises:
        LocalProtocolError: empty ``relay_id`` or ``nonce``, or ``window`` below 1.
    """

    def __init__(
        self,
        *,
        relay_id: str,
        nonce: str,
        window: int,
        auth_timeout: float,
        now: float,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        if not relay_id or not nonce:
            raise LocalProtocolError("a relay session needs a relay id and a fresh nonce")
        super().__init__(auth_timeout=auth_timeout, now=now, logger=logger)
        self.relay_id = relay_id
        self.nonce = nonce
        self._window = SendWindow(size=window, start=0)
        self._agent_id = ""
        self._agent: tuple[str, str] | None = None  # (public key, account id) once looked up
        self._refused: tuple[str | None, bool] | None = None  # (public key, revoked), if refused
        self._trimmed_through = 0
        self._replay_after: int | None = None
        self._batching = False
        """The agent's hello asked for ``events`` frames (module docstring, Batching)."""
        # The run of encoded event items not yet framed, its first and last seq (for DEBUG
        # lines) and its size once framed, less the frame's own overhead: each item plus one
        # comma.
        self._items: list[str] = []
        self._items_seqs = (0, 0)
        self._items_bytes = 0

    @property
    def can_offer(self) -> bool:
        """True when ``offer`` would send: the link is OPEN and the window has room."""
        return self.state is OPEN and self._window.can_offer

    @property
    def last_offered(self) -> int:
        """Highest seq offered on this link; the agent's resume point before the first."""
        return self._window.last_offered

    @property
    def in_flight(self) -> int:
        """Events offered and not yet acked."""
        return self._window.in_flight

    def agent_found(
        self,
        public_key: str,
        account_id: str,
        *,
        trimmed_through: int = 0,
        replay_after: int | None = None,
    ) -> None:
        """Answer :class:`HelloReceived` for an enrolled, unrevoked agent.

        Args:
            public_key: the agent's registered Ed25519 public key (base64url).
            account_id: the account the agent belongs to.
            trimmed_through: the highest seq retention dropped from the account's log; when it
                is above the agent's resume point, the ``welcome`` says so (docs/protocol.md).
            replay_after: an operator's pending replay (docs/operations.md, Replay): deliver
                after this seq instead of the agent's resume point, which it must be below.

        Raises:
            InvalidState: not waiting for a lookup (before ``hello``, or a second answer).
            LocalProtocolError: ``replay_after`` is negative or not below the resume point.
        """
        if self.state >= CLOSING:
            return
        self._check_lookup("agent_found()")
        resume_after = self._window.last_offered
        if replay_after is not None and not 0 <= replay_after < resume_after:
            raise LocalProtocolError(
                f"replay_after {replay_after} must be 0 or more and below the agent's resume"
                f" point {resume_after}"
            )
        self._agent = (public_key, account_id)
        self._trimmed_through = trimmed_through
        self._replay_after = replay_after

    def agent_refused(self, public_key: str | None, *, revoked: bool) -> None:
        """Answer :class:`HelloReceived` for an agent that may not connect: unknown or pending
        (``public_key`` None) or revoked (its registered key).

        Nothing is sent yet: every agent that has not proved its key gets the same answer
        (docs/protocol.md, Handshake). The link waits for ``auth`` as for an enrolled agent,
        the signature is checked all the same (against a throwaway key when there is none),
        and the close is 4401 "authentication failed", except for a revoked agent whose
        signature verifies: only the key's holder learns it was revoked (4403).

        Raises:
            InvalidState: not waiting for a lookup (before ``hello``, or a second answer).
        """
        if self.state >= CLOSING:
            return
        self._check_lookup("agent_refused()")
        self._refused = (public_key, revoked)

    def _check_lookup(self, call: str) -> None:
        if self.state is not AUTHENTICATING or self._agent is not None or self._refused:
            raise InvalidState(f"{call} answers one hello; state {self.state.name}")

    def offer(self, seq: int, event: dict[str, Any]) -> bool:
        """Send one event unless the window is full.

        Returns:
            True when the event was queued; False when the window is full or the link is
            closing, in which case the I/O layer stops reading its log (DESIGN §Link protocol:
            "the relay stops reading its log while the window is full").

        Raises:
            InvalidState: the handshake has not finished.
            LocalProtocolError: ``seq`` is not above ``last_offered``.
        """
        if not self._app_call_allowed("offer an event"):
            return False
        if not self._window.offer(seq):
            return False
        if self._batching:
            self._hold(seq, event)
        else:
            self._send(Event(seq=seq, event=event))
        return True

    def data_to_send(self) -> list[str]:
        """Encoded frames to write, in order, since the last call (drained); the events
        offered since, to an agent that asked for batches, go out as ``events`` frames."""
        self._frame_items()
        return super().data_to_send()

    def send_command_result(self, result: frames.CommandResult) -> None:
        """Answer a :class:`CommandReceived` (InvalidState before OPEN, moot once closing)."""
        if self._app_call_allowed("send a command result"):
            self._send(result)

    def send_status(self, items: Sequence[Any], snapshot: bool = False) -> None:
        """Send status items; ``snapshot=True`` on connect (DESIGN §Link protocol, Status)."""
        if self._app_call_allowed("send status"):
            self._send(Status(items=list(items), snapshot=snapshot))

    def send_heartbeat(self, head: int) -> None:
        """Tell the agent the newest seq it should have by now (module docstring, Heartbeats).

        Raises:
            InvalidState: the handshake has not finished (moot once closing).
            LocalProtocolError: ``head`` is negative.
        """
        if head < 0:
            raise LocalProtocolError(f"heartbeat head must not be negative, not {head}")
        if self._app_call_allowed("send a heartbeat"):
            self._send(Heartbeat(head=head))

    def go_away(self, reason: str) -> None:
        """Shutting down: tell the agent to reconnect, then close with 1001 (DESIGN §Liveness)."""
        if self.state >= CLOSING:
            return
        self._send(GoAway(reason=reason))
        self.close(1001, reason)

    def _send(self, frame: Frame) -> None:
        # Events held so far were offered before this frame was queued: they go out first.
        self._frame_items()
        super()._send(frame)

    def _hold(self, seq: int, event: dict[str, Any]) -> None:
        """Add an event to the run of items the next ``events`` frame will carry."""
        item = frames.encode_event_item(seq, event)
        # Message limits count bytes; an ASCII string (the usual event) is as long as its
        # encoding, and isascii() is O(1) in CPython, so only other text is encoded to count.
        size = len(item) if item.isascii() else len(item.encode())
        if self._items and (
            _EVENTS_OVERHEAD + self._items_bytes + size > frames.MAX_EVENTS_BYTES
            or len(self._items) >= frames.MAX_EVENTS_ITEMS
        ):
            self._frame_items()
        self._items_seqs = (self._items_seqs[0] if self._items else seq, seq)
        self._items.append(item)
        self._items_bytes += size + 1

    def _frame_items(self) -> None:
        """Queue the run of held items as one ``events`` frame (nothing when there is none)."""
        if not self._items:
            return
        items, self._items, self._items_bytes = self._items, [], 0
        if self.debug:
            first, last = self._items_seqs
            self.logger.debug("> events seq=%d..%d n=%d", first, last, len(items))
        self._outgoing.append(frames.encode_events(items))

    def _handle(self, frame: Frame) -> None:
        match frame:
            case Hello():
                self._on_hello(frame)
            case Auth(signature=signature):
                self._on_auth(signature)
            case Ack(seq=seq):
                # DESIGN §Link protocol, Events: a cumulative ack frees the window and becomes
                # the agent's stored cursor; a stale one is harmless and ignored.
                if self._window.ack(seq):
                    self._events.append(Acked(seq))
            case Command(request_id=request_id, ctox_type=ctox_type):
                # DESIGN §Link protocol, Commands: the request id is the idempotency key.
                if not request_id or not ctox_type:
                    raise RemoteProtocolError("command frame needs a request_id and a ctox_type")
                self._events.append(CommandReceived(frame))
            case Error(code=code, message=message):
                self._peer_error(code, message)
            case (
                Challenge()
                | Welcome()
                | Event()
                | Events()
                | CommandResult()
                | Status()
                | GoAway()
                | Heartbeat()
            ):
                raise RemoteProtocolError(f"{frame.type} frame is sent by relays, not agents")
            case _:  # pragma: no cover - every frame type is listed above
                assert_never(frame)

    def _on_hello(self, hello: Hello) -> None:
        # decode() saw a non-empty agent_id, a resume_after in range and string features.
        subscription = None
        if hello.subscription is not None:
            # docs/protocol.md, Routing: a malformed filter is refused, never guessed at.
            try:
                subscription = Subscription.from_wire(hello.subscription)
            except ValueError as exc:
                raise RemoteProtocolError(f"hello: {exc}"[:200]) from exc
        features = hello.features or []
        # Module docstring, Batching: only an agent that asked understands the frame.
        self._batching = frames.FEATURE_EVENTS in features
        self._agent_id = hello.agent_id
        # DESIGN §Link protocol, Events: resume after what the agent's inbox committed.
        self._window = SendWindow(size=self._window.size, start=hello.resume_after)
        # Always challenge, known agent or not: the answer to a hello must not tell a stranger
        # which agent ids exist (docs/protocol.md, Handshake).
        self._send(Challenge(relay_id=self.relay_id, nonce=self.nonce))
        self._events.append(
            HelloReceived(hello.agent_id, hello.resume_after, hello.client, subscription)
        )

    def _on_auth(self, signature: str) -> None:
        if self._refused is not None:
            self._refuse(signature, *self._refused)
            return
        if self._agent is None:
            raise InvalidState(
                "auth arrived before agent_found(), agent_refused() or close() answered the hello"
            )
        public_key, account_id = self._agent
        # DESIGN §Link protocol, Auth: the signature covers this relay's id and this link's
        # nonce, so neither a replay nor a signature made for another relay passes.
        if not crypto.verify_auth(public_key, signature, self.relay_id, self._agent_id, self.nonce):
            self._events.append(AuthFailed(self._agent_id, "bad signature"))
            self.close(CloseCode.UNAUTHORIZED, "authentication failed")
            return
        resume_after = self._window.last_offered
        # docs/protocol.md, Retention: the explicit signal that events the agent never acked
        # are gone; seqs may skip, so delivery simply resumes after them.
        lost = self._trimmed_through if self._trimmed_through > resume_after else 0
        replay = self._replay_after
        if replay is not None:
            # docs/operations.md, Replay: this link sends the log again from the replay point.
            self._window = SendWindow(size=self._window.size, start=replay)
        self._send(
            Welcome(
                agent_id=self._agent_id,
                account_id=account_id,
                resume_after=resume_after,
                window=self._window.size,
                trimmed_through=lost,
                replay_after=replay,
            )
        )
        self._events.append(Authenticated(self._agent_id, account_id, resume_after, replay))


    def _refuse(self, signature: str, public_key: str | None, revoked: bool) -> None:
        """Close a refused agent's link after its ``auth`` (see :meth:`agent_refused`)."""
        # Verified in every case, so that an unknown agent costs the relay the same work, and
        # takes the same time, as a known one with a bad signature.
        valid = crypto.verify_auth(
            public_key or _throwaway_key(), signature, self.relay_id, self._agent_id, self.nonce
        )
        if revoked and public_key is not None and valid:
            self._events.append(AuthFailed(self._agent_id, "agent revoked"))
            self.close(CloseCode.REVOKED, "agent revoked")
            return
        if public_key is None:
            reason = "unknown or pending agent"
        else:
            reason = "agent revoked, bad signature" if revoked else "agent refused"
        self._events.append(AuthFailed(self._agent_id, reason))
        self.close(CloseCode.UNAUTHORIZED, "authentication failed")


def _check_event_id(event: dict[str, Any]) -> None:
    """The inbox keeps one copy per event id (docs/protocol.md, Replay): no id, no event."""
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise RemoteProtocolError("event without an id")


@functools.cache
def _throwaway_key() -> str:
    """A valid public key nobody holds the private half of: what a refused agent's signature
    is checked against when it has no key of its own."""
    return crypto.public_key_b64(crypto.generate_private_key())


class AgentSession(LinkSession):
    """The agent's end of its link to the relay; queues ``hello`` at construction.

    Args:
        agent_id: the id the relay gave at enrollment.
        relay_id: the relay identity recorded at enrollment; a challenge from any other relay is
            refused. Empty accepts any relay.
        private_key: the agent's Ed25519 key.
        resume_after: the highest seq the inbox committed (0: nothing yet).
        auth_timeout: seconds for the welcome to arrive.
        now: the caller's clock.
        client: free-form software version for the relay's logs.
        subscription: the routing filter sent in ``hello`` (docs/protocol.md, Routing), in its
            wire form (:meth:`Subscription.to_wire`); ``None`` asks for every event.
        features: the optional link features ``hello`` asks for, among those this version
            implements (:data:`~shared.link.frames.FEATURES`, what the agent's pump passes).
            Empty (the default): none, as an older agent; an ``events`` frame is then a
            protocol error.
        logger: see :class:`LinkSession`.

    Raises:
        LocalProtocolError: ``resume_after`` is negative, or ``features`` names one this
            version does not implement (the relay could send what we cannot read).
    """

    def __init__(
        self,
        *,
        agent_id: str,
        relay_id: str,
        private_key: crypto.SigningKey,
        resume_after: int,
        auth_timeout: float,
        now: float,
        client: str = "",
        subscription: dict[str, Any] | None = None,
        features: Sequence[str] = (),
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        unknown = sorted(set(features) - set(frames.FEATURES))
        if unknown:
            raise LocalProtocolError(f"link features not implemented: {', '.join(unknown)}")
        super().__init__(auth_timeout=auth_timeout, now=now, logger=logger)
        self.agent_id = agent_id
        self.relay_id = relay_id
        self._private_key = private_key
        self._window = ReceiveWindow(start=resume_after)
        self._batching = frames.FEATURE_EVENTS in features
        self._send(
            Hello(
                agent_id=agent_id,
                resume_after=resume_after,
                client=client,
                subscription=subscription,
                features=list(features) or None,
            )
        )

    @property
    def last_received(self) -> int:
        """Highest seq received on this link (the resume point before the first event)."""
        return self._window.highest

    @property
    def last_acked(self) -> int:
        """Highest seq acked on this link (the resume point before the first ack)."""
        return self._window.acked

    def ack(self, seq: int) -> None:
        """Tell the relay everything up to ``seq`` is committed in the inbox.

        Call it only after the commit (DESIGN principle 1: "an agent acks only after its own
        inbox committed"). A repeated or lower ack sends nothing; moot once closing.

        Raises:
            InvalidState: the handshake has not finished.
            LocalProtocolError: ``seq`` is above the highest seq received.
        """
        if self._app_call_allowed("ack") and self._window.ack(seq):
            self._send(Ack(seq=seq))

    def send_command(self, command: frames.Command) -> None:
        """Send a CTOX command; its result arrives as :class:`CommandResultReceived`.

        Raises:
            InvalidState: the link is not OPEN; the caller must refuse the command at once.
            LocalProtocolError: empty ``request_id`` or ``ctox_type``.
        """
        if self.state is not OPEN:
            raise InvalidState(f"cannot send a command in state {self.state.name}")
        if not command.request_id or not command.ctox_type:
            raise LocalProtocolError("a command needs a request_id and a ctox_type")
        self._send(command)

    def _handle(self, frame: Frame) -> None:
        match frame:
            case Challenge(relay_id=relay_id, nonce=nonce):
                self._on_challenge(relay_id, nonce)
            case Welcome():
                self._on_welcome(frame)
            case Event(seq=seq, event=event):
                # docs/protocol.md, Sequence numbers: in order, after the resume point, within
                # the window; and with the id the inbox keeps it by.
                _check_event_id(event)
                self._window.receive(seq)
                self._events.append(EventReceived(seq, event))
            case Events(items=items):
                if not self._batching:
                    raise RemoteProtocolError("events frame sent to an agent that did not ask")
                # As for single events, all checked before any of the frame's events is
                # reported; decode() already saw the items increase.
                room = self._window.room
                if room is not None and len(items) > room:
                    raise RemoteProtocolError("more events than the window allows")
                for item in items:
                    _check_event_id(item.event)
                for item in items:
                    self._window.receive(item.seq)
                    self._events.append(EventReceived(item.seq, item.event))
            case CommandResult():
                self._events.append(CommandResultReceived(frame))
            case Status(items=items, snapshot=snapshot):
                self._events.append(StatusReceived(items, snapshot))
            case Heartbeat(head=head):
                self._events.append(HeartbeatReceived(head))
            case GoAway(reason=reason):
                # DESIGN §Liveness: the relay is shutting down; it closes with 1001 next.
                self._peer_closing(1001, reason)
                self._events.append(GoingAway(reason))
            case Error(code=code, message=message):
                self._peer_error(code, message)
            case Hello() | Auth() | Ack() | Command():
                raise RemoteProtocolError(f"{frame.type} frame is sent by agents, not relays")
            case _:  # pragma: no cover - every frame type is listed above
                assert_never(frame)

    def _on_challenge(self, relay_id: str, nonce: str) -> None:
        # DESIGN §Link protocol, Auth / docs/protocol.md: refuse any relay but the enrolled one,
        # before signing anything for it.
        if self.relay_id and relay_id != self.relay_id:
            self._events.append(AuthFailed(self.agent_id, "unexpected relay identity"))
            self.close(CloseCode.UNAUTHORIZED, "unexpected relay identity")
            return
        # crypto.auth_message joins the parts with NUL, so a NUL inside one is malformed.
        if not nonce or "\x00" in nonce or "\x00" in relay_id:
            raise RemoteProtocolError("challenge needs a non-empty nonce and no NUL characters")
        signature = crypto.sign_auth(self._private_key, relay_id, self.agent_id, nonce)
        self._send(Auth(signature=signature))

    def _on_welcome(self, welcome: Welcome) -> None:
        # The relay must resume exactly where our hello said, or the seq check on the first
        # event would misjudge it (DESIGN §Link protocol, Events).
        if (
            welcome.agent_id != self.agent_id
            or welcome.resume_after != self._window.highest
            or welcome.window < 1
        ):
            raise RemoteProtocolError("welcome does not match this agent's hello")
        replay = welcome.replay_after
        if replay is not None:
            # docs/operations.md, Replay: honoured once, here, for this link only. Below the
            # resume point or it would skip events instead of sending them again.
            if not 0 <= replay < welcome.resume_after:
                raise RemoteProtocolError("welcome replay_after must be below resume_after")
            self._window.rewind(replay)
        self._window.size = welcome.window
        lost = welcome.trimmed_through if welcome.trimmed_through > welcome.resume_after else 0
        self._events.append(
            Welcomed(welcome.account_id, welcome.resume_after, welcome.window, lost, replay)
        )
