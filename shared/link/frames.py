"""Typed frames of the relay ⇄ agent link and their JSON codec.

WebSocket already frames messages, so a link "frame" is one JSON text message::

    {"v": 1, "type": "ack", "seq": 42}

``encode`` writes a frame; ``decode`` reads one and raises ``RemoteProtocolError`` (carrying the
close code the link must close with) for anything that is not a well-formed frame of a known type
and version. Unknown *fields* are ignored so that a newer peer may add optional data; unknown
*event parameters* are inside ``Event.event`` and pass through untouched (DESIGN principle 2).

Optional behaviour that an older peer would refuse is negotiated: the agent's ``hello`` lists
the ``features`` it understands (older relays ignore the field) and the relay uses one only when
it is listed. :data:`FEATURES` is every feature of this version; today only
:data:`FEATURE_EVENTS`, the ``events`` frame (issue 7: one WebSocket message per event made the
socket write a tenth of the relay's time).

Which side sends what (DESIGN §Link protocol):

========================  ==============  =================================================
frame                     direction       meaning
========================  ==============  =================================================
``hello``                 agent → relay   my agent id, and the last seq my inbox committed
``challenge``             relay → agent   relay identity and a fresh nonce to sign
``auth``                  agent → relay   Ed25519 signature over (relay id, agent id, nonce)
``welcome``               relay → agent   authenticated; where delivery resumes; the window
``event``                 relay → agent   one event with its sequence number
``events``                relay → agent   several events, oldest first (only if hello asked)
``ack``                   agent → relay   cumulative: every seq ≤ this one is committed
``command``               agent → relay   a CTOX command with its request id
``command_result``        relay → agent   X-on's answer to a command
``status``                relay → agent   status values (a snapshot on connect, then changes)
``goaway``                relay → agent   the relay is shutting down: reconnect elsewhere
``heartbeat``             relay → agent   the newest seq the agent should have by now
``error``                 either          why the sender is about to close the link
========================  ==============  =================================================
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, NewType

from ..errors import RemoteProtocolError

__all__ = [
    "LINK_VERSION",
    "SUBPROTOCOL",
    "FEATURE_EVENTS",
    "FEATURES",
    "MAX_EVENTS_ITEMS",
    "MAX_EVENTS_BYTES",
    "CloseCode",
    "FATAL_CLOSE_CODES",
    "AgentId",
    "AccountId",
    "EventId",
    "Seq",
    "Hello",
    "Challenge",
    "Auth",
    "Welcome",
    "Event",
    "Events",
    "Ack",
    "Command",
    "CommandResult",
    "Status",
    "GoAway",
    "Heartbeat",
    "Error",
    "Frame",
    "encode",
    "encode_event_item",
    "encode_events",
    "decode",
]

LINK_VERSION = 1
SUBPROTOCOL = "xon-relay.v1"

FEATURE_EVENTS = "events"
"""``hello`` feature: send me several events per message, in ``events`` frames."""
FEATURES: tuple[str, ...] = (FEATURE_EVENTS,)
"""Every optional feature this version of the link understands (the agent asks for all)."""
MAX_EVENTS_ITEMS = 1024
"""Most events one ``events`` frame may carry; a longer list is a malformed frame."""
MAX_EVENTS_BYTES = 64 * 1024
"""The relay closes an ``events`` frame before its UTF-8 encoding would pass this many bytes,
far below the default ``link.max_message_size`` (2 MiB) of either side; an event that alone is
larger travels in a frame of its own, as it would in an ``event`` frame."""

AgentId = NewType("AgentId", str)
AccountId = NewType("AccountId", str)
EventId = NewType("EventId", str)
Seq = NewType("Seq", int)


class CloseCode(IntEnum):
    """WebSocket close codes of the link, in the private-use range 4000–4999 (RFC 6455 §7.4.2).

    Codes 44xx mean "do not retry": the agent stops and tells its operator.
    """

    PROTOCOL_ERROR = 4000
    UNSUPPORTED_VERSION = 4001
    UNKNOWN_FRAME = 4002
    AUTH_TIMEOUT = 4008
    REPLACED = 4010
    INTERNAL_ERROR = 4011
    BEHIND_RETENTION = 4012
    """Retention dropped events past this link's position; the next ``welcome`` says which."""
    STALLED = 4013
    """Agent: heartbeats say events are waiting for us, yet none arrived (docs/protocol.md)."""
    UNAUTHORIZED = 4401
    REVOKED = 4403


FATAL_CLOSE_CODES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.REVOKED})


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """Agent → relay, first frame: who I am and where my inbox stands."""

    type: ClassVar[str] = "hello"
    agent_id: str
    resume_after: int = 0
    """Highest seq the agent's inbox has committed (0: nothing yet)."""
    client: str = ""
    """Free-form software version, for the relay's logs."""
    subscription: dict[str, Any] | None = None
    """Which events this agent wants (docs/protocol.md, Routing); left out: every event. The
    relay validates it with :meth:`shared.subscription.Subscription.from_wire`."""
    features: list[str] | None = None
    """Optional link features the agent understands (:data:`FEATURES`); left out: none. Older
    relays ignore the field, and a relay ignores names it does not know."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """Relay → agent: sign this nonce, bound to this relay's identity."""

    type: ClassVar[str] = "challenge"
    relay_id: str
    nonce: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """Agent → relay: base64 Ed25519 signature of ``crypto.auth_message(...)``."""

    type: ClassVar[str] = "auth"
    signature: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """Relay → agent: authenticated; events follow with seq > ``resume_after`` (or
    ``replay_after``, when set)."""

    type: ClassVar[str] = "welcome"
    agent_id: str
    account_id: str
    resume_after: int
    window: int
    trimmed_through: int = 0
    """Above ``resume_after`` when the relay's retention dropped the events after it up to this
    seq before the agent acked them: they are lost, delivery resumes after them (0: nothing
    was lost). Older agents ignore the field."""
    replay_after: int | None = None
    """Set when an operator asked the relay to send this account's events again (docs/
    operations.md, Replay): events follow with seq > ``replay_after``, below ``resume_after``
    too, once for this link; the agent's inbox drops the ones it still holds by event id.
    Left out: no replay, events follow ``resume_after`` as usual."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Relay → agent: one event object (DESIGN §Agent local API, without ``cursor``)."""

    type: ClassVar[str] = "event"
    seq: int
    event: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Events:
    """Relay → agent, only to an agent whose ``hello`` listed :data:`FEATURE_EVENTS`: several
    events in one message, each ``{"seq", "event"}`` on the wire. Decoding checks what it can
    alone: 1 to :data:`MAX_EVENTS_ITEMS` items, integer seqs strictly increasing, object
    events; the agent session checks the first seq against the ones before, as for ``event``."""

    type: ClassVar[str] = "events"
    items: list[Event]


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Agent → relay: every event with seq ≤ ``seq`` is committed in the agent's inbox."""

    type: ClassVar[str] = "ack"
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """Agent → relay: perform a CTOX call to X-on."""

    type: ClassVar[str] = "command"
    request_id: str
    ctox_type: str
    params: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """Relay → agent: X-on's answer (or the relay's refusal, with ``error`` set)."""

    type: ClassVar[str] = "command_result"
    request_id: str
    status: int
    content_type: str = ""
    body_b64: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """Relay → agent: status items; ``snapshot`` replaces everything the agent had."""

    type: ClassVar[str] = "status"
    items: list[Any]
    snapshot: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAway:
    """Relay → agent: this relay is going away; reconnect (possibly to another instance)."""

    type: ClassVar[str] = "goaway"
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """Relay → agent, every ``link.heartbeat_interval``: the agent should have every event for
    it up to ``head`` by now. An agent that has less, has acked all it has, and then receives
    nothing for ``link.stall_timeout`` closes with ``stalled`` and reconnects (issue 6:
    "connected but receiving nothing")."""

    type: ClassVar[str] = "heartbeat"
    head: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Either side: why the sender is closing the link."""

    type: ClassVar[str] = "error"
    code: str
    message: str = ""


Frame = (
    Hello
    | Challenge
    | Auth
    | Welcome
    | Event
    | Events
    | Ack
    | Command
    | CommandResult
    | Status
    | GoAway
    | Heartbeat
    | Error
)

_TYPES: dict[str, type[Any]] = {
    cls.type: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        Welcome,
        Event,
        Events,
        Ack,
        Command,
        CommandResult,
        Status,
        GoAway,
        Heartbeat,
        Error,
    )
}


def _field_checks(cls: type[Any]) -> list[tuple[str, type, bool]]:
    """(name, runtime type, required) for each field of a frame class.

    An optional field (``X | None``) is checked as ``X``: a JSON ``null`` is refused like any
    other wrong type, and leaving the field out is how a sender says "none".
    """
    hints = typing.get_type_hints(cls)
    checks = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint) or hint
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        checks.append((f.name, origin, required))
    return checks


_CHECKS = {name: _field_checks(cls) for name, cls in _TYPES.items()}

# One encoder for every frame: json.dumps() with non-default options builds a new one per call,
# a cost paid once per event on the relay's hot path (issue 7).
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_EVENTS_HEAD = f'{{"v":{LINK_VERSION},"type":"{Events.type}","items":['
_EVENTS_TAIL = "]}"


def encode(frame: Frame) -> str:
    """Encode a frame as one JSON text message."""
    if isinstance(frame, Events):
        return encode_events([encode_event_item(e.seq, e.event) for e in frame.items])
    data: dict[str, Any] = {"v": LINK_VERSION, "type": frame.type}
    for f in dataclasses.fields(frame):
        value = getattr(frame, f.name)
        if value is not None:  # an optional field that is unset stays off the wire
            data[f.name] = value
    return _dumps(data)


def encode_event_item(seq: int, event: dict[str, Any]) -> str:
    """One item of an ``events`` frame, encoded on its own so that the sender can count the
    frame's size as it fills it (:data:`MAX_EVENTS_BYTES`)."""
    return _dumps({"seq": seq, "event": event})


def encode_events(items: list[str]) -> str:
    """An ``events`` frame around items from :func:`encode_event_item`, in order: as long as
    ``encode_events([])`` plus the items and a comma between each two."""
    return _EVENTS_HEAD + ",".join(items) + _EVENTS_TAIL


def decode(text: str | bytes) -> Frame:
    """Decode one JSON text message into a frame.

    Raises:
        RemoteProtocolError: not JSON, not an object, unknown version or type, a missing field
            or a field of the wrong type. ``close_code`` says how to close the link.
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: a message of nothing but "[[[[…" nests deeper than the parser's
        # stack; it is the peer's fault like any other bad JSON.
        raise RemoteProtocolError("frame is not valid JSON") from exc
    if not isinstance(data, dict):
        raise RemoteProtocolError("frame is not a JSON object")
    version = data.get("v")
    # type() rather than isinstance: neither `true` nor `1.0` is version 1.
    if type(version) is not int or version != LINK_VERSION:
        raise RemoteProtocolError(
            f"unsupported link version {version!r}"[:200],
            close_code=CloseCode.UNSUPPORTED_VERSION,
        )
    kind = data.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RemoteProtocolError(
            f"unknown frame type {kind!r}"[:200], close_code=CloseCode.UNKNOWN_FRAME
        )
    kwargs: dict[str, Any] = {}
    for name, expected, required in _CHECKS[cls.type]:
        if name not in data:
            if required:
                raise RemoteProtocolError(f"{kind} frame lacks field {name!r}")
            continue
        value = data[name]
        # bool is an int subclass: a seq of `true` is a malformed frame, not seq 1.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise RemoteProtocolError(f"{kind} frame field {name!r} must be {expected.__name__}")
        kwargs[name] = value
    if cls is Events:
        kwargs["items"] = _event_items(kwargs["items"])
    frame: Frame = cls(**kwargs)
    return frame


def _event_items(raw: list[Any]) -> list[Event]:
    """The items of an ``events`` frame as :class:`Event` values (see :class:`Events`)."""
    if not 1 <= len(raw) <= MAX_EVENTS_ITEMS:
        raise RemoteProtocolError(f"events frame must carry 1 to {MAX_EVENTS_ITEMS} items")
    items = []
    last: int | None = None
    for item in raw:
        if not isinstance(item, dict):
            raise RemoteProtocolError("events frame items must be objects")
        seq, event = item.get("seq"), item.get("event")
        # type() rather than isinstance: a seq of `true` is malformed, not seq 1.
        if type(seq) is not int or not isinstance(event, dict):
            raise RemoteProtocolError("events frame items need an integer seq and an object event")
        # DESIGN §Link protocol, Events: in order; the frame alone can show a step back.
        if last is not None and seq <= last:
            raise RemoteProtocolError(f"events frame seq {seq} is not above {last}")
        items.append(Event(seq=seq, event=event))
        last = seq
    return items
