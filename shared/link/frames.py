"""Typed frames of the relay ⇄ agent link and their JSON codec.

WebSocket already frames messages, so a link "frame" is one JSON text message::

    {"v": 1, "type": "ack", "seq": 42}

``encode`` writes a frame; ``decode`` reads one and raises ``RemoteProtocolError`` (carrying the
close code the link must close with) for anything that is not a well-formed frame of a known type
and version. Unknown *fields* are ignored so that a newer peer may add optional data; unknown
*event parameters* are inside ``Event.event`` and pass through untouched (DESIGN principle 2).

Every field has a type and a range, checked while the message is parsed (docs/protocol.md,
Frame limits): seqs, sizes and windows are integers in 0…2**63−1, strings have a bounded length
and hold Unicode scalar values only (a ``\\ud800`` escape is a peer fault), lists and objects have
a bounded length, and the free-form values (event objects, command params, subscriptions,
status items, headers) a bounded depth. The frames are ``msgspec`` structs and the limits their
``Meta`` constraints, so the validating decoder in C does the checking in the same pass as the
parsing; ``decode`` only turns its refusals into ``RemoteProtocolError``.

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

import json
import re
from enum import IntEnum
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, NewType, TypeAlias, Union

import msgspec
import msgspec.structs
from msgspec import UNSET, Meta, Struct, UnsetType

from ..errors import RemoteProtocolError

__all__ = [
    "LINK_VERSION",
    "SUBPROTOCOL",
    "FEATURE_EVENTS",
    "FEATURES",
    "MAX_EVENTS_ITEMS",
    "MAX_EVENTS_BYTES",
    "MAX_INT",
    "MAX_ID",
    "MAX_LABEL",
    "MAX_REASON",
    "MAX_TEXT",
    "MAX_ITEMS",
    "MAX_DEPTH",
    "MAX_FEATURES",
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

# -- limits (docs/protocol.md, Frame limits) ---------------------------------------------------

MAX_INT = 2**63 - 1
"""Largest seq, size, window or head: what a signed 64-bit column (SQLite, Redis) can hold."""
MAX_ID = 256
"""Longest identifier: agent, account, relay and request ids, nonces, signatures, CTOX types,
idempotency keys, error codes, feature names."""
MAX_LABEL = 1024
"""Longest short free text: ``client``, ``content_type``."""
MAX_REASON = 4096
"""Longest explanation: ``error.message``, ``goaway.reason``, ``command_result.error``."""
MAX_TEXT = 16 * 1024 * 1024
"""Longest string inside a free-form value, and ``body_b64``: far above any message the link
carries (``link.max_message_size``, 2 MiB by default), which is the bound that binds."""
MAX_ITEMS = 65536
"""Most entries of one list or object inside a free-form value, and most status items."""
MAX_DEPTH = 8
"""Most levels of nested lists and objects in a free-form value, the field's own one included
(an event object with ``params`` holding a string is 2 levels)."""
MAX_FEATURES = 32
"""Most names in ``hello.features``."""

AgentId = NewType("AgentId", str)
AccountId = NewType("AccountId", str)
EventId = NewType("EventId", str)
Seq = NewType("Seq", int)

_U63 = Annotated[int, Meta(ge=0, le=MAX_INT)]
# Any three-digit code or less, not only 100..599: the agent's local API answers 502 for a
# status it cannot pass on, where refusing the frame would drop the link and the resent
# command would get the same answer on the next one (docs/protocol.md, Frame limits).
_HttpStatus = Annotated[int, Meta(ge=0, le=999)]
_Id = Annotated[str, Meta(max_length=MAX_ID)]
_Label = Annotated[str, Meta(max_length=MAX_LABEL)]
_Reason = Annotated[str, Meta(max_length=MAX_REASON)]
_Text = Annotated[str, Meta(max_length=MAX_TEXT)]
_Int64 = Annotated[int, Meta(ge=-(2**63), le=MAX_INT)]


def _nested(depth: int) -> Any:
    """The type of a JSON value holding at most ``depth`` levels of lists and objects.

    msgspec has no depth limit of its own (past Python's recursion limit it raises
    RecursionError), so the bound is spelled out as a type, one level at a time.
    """
    value: Any = Union[_Text, _Int64, float, bool, None]
    for _ in range(depth):
        value = Union[
            Annotated[dict[_Text, value], Meta(max_length=MAX_ITEMS)],
            Annotated[list[value], Meta(max_length=MAX_ITEMS)],
            _Text,
            _Int64,
            float,
            bool,
            None,
        ]
    return value


# The Maybe* fields default to None, yet the decoder refuses a JSON null in them like any
# other wrong type: leaving the field out is how a sender says "none". So their runtime type
# has no None in it, which only the type checker is told about.
if TYPE_CHECKING:
    JsonObject: TypeAlias = dict[str, Any]
    JsonList: TypeAlias = list[Any]
    _MaybeObject: TypeAlias = dict[str, Any] | None
    _MaybeFeatures: TypeAlias = list[str] | None
    _MaybeSeq: TypeAlias = int | None
else:
    _JsonValue = _nested(MAX_DEPTH - 1)
    JsonObject = Annotated[dict[_Text, _JsonValue], Meta(max_length=MAX_ITEMS)]
    JsonList = Annotated[list[_JsonValue], Meta(max_length=MAX_ITEMS)]
    _MaybeObject = JsonObject
    _MaybeFeatures = Annotated[list[_Id], Meta(max_length=MAX_FEATURES)]
    _MaybeSeq = _U63


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


FATAL_CLOSE_CODES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.REVOKED})


class _Frame(Struct, frozen=True, kw_only=True, tag_field="type", repr_omit_defaults=True):
    """What every frame shares: ``type``, the tag naming the frame, and ``v``, the link
    version, which ``decode`` requires and checks and ``encode`` writes itself (always
    :data:`LINK_VERSION`); it is unset on every frame that code holds."""

    type: ClassVar[str]
    v: Annotated[int, Meta(ge=LINK_VERSION, le=LINK_VERSION)] | UnsetType = UNSET


class Hello(_Frame, tag="hello", frozen=True, kw_only=True):
    """Agent → relay, first frame: who I am and where my inbox stands."""

    type: ClassVar[str] = "hello"
    agent_id: Annotated[str, Meta(min_length=1, max_length=MAX_ID)]
    resume_after: _U63 = 0
    """Highest seq the agent's inbox has committed (0: nothing yet)."""
    client: _Label = ""
    """Free-form software version, for the relay's logs."""
    subscription: _MaybeObject = None
    """Which events this agent wants (docs/protocol.md, Routing); left out: every event. The
    relay validates it with :meth:`shared.subscription.Subscription.from_wire`."""
    features: _MaybeFeatures = None
    """Optional link features the agent understands (:data:`FEATURES`); left out: none. Older
    relays ignore the field, and a relay ignores names it does not know."""


class Challenge(_Frame, tag="challenge", frozen=True, kw_only=True):
    """Relay → agent: sign this nonce, bound to this relay's identity."""

    type: ClassVar[str] = "challenge"
    relay_id: _Id
    nonce: _Id


class Auth(_Frame, tag="auth", frozen=True, kw_only=True):
    """Agent → relay: base64 Ed25519 signature of ``crypto.auth_message(...)``."""

    type: ClassVar[str] = "auth"
    signature: _Id


class Welcome(_Frame, tag="welcome", frozen=True, kw_only=True):
    """Relay → agent: authenticated; events follow with seq > ``resume_after`` (or
    ``replay_after``, when set)."""

    type: ClassVar[str] = "welcome"
    agent_id: _Id
    account_id: _Id
    resume_after: _U63
    window: _U63
    trimmed_through: _U63 = 0
    """Above ``resume_after`` when the relay's retention dropped the events after it up to this
    seq before the agent acked them: they are lost, delivery resumes after them (0: nothing
    was lost). Older agents ignore the field."""
    replay_after: _MaybeSeq = None
    """Set when an operator asked the relay to send this account's events again (docs/
    operations.md, Replay): events follow with seq > ``replay_after``, below ``resume_after``
    too, once for this link; the agent's inbox drops the ones it still holds by event id.
    Left out: no replay, events follow ``resume_after`` as usual."""


class Event(_Frame, tag="event", frozen=True, kw_only=True):
    """Relay → agent: one event object (DESIGN §Agent local API, without ``cursor``)."""

    type: ClassVar[str] = "event"
    seq: _U63
    event: JsonObject


class Events(_Frame, tag="events", frozen=True, kw_only=True):
    """Relay → agent, only to an agent whose ``hello`` listed :data:`FEATURE_EVENTS`: several
    events in one message, each ``{"seq", "event"}`` on the wire. Decoding checks what it can
    alone: 1 to :data:`MAX_EVENTS_ITEMS` items, seqs strictly increasing, object events; the
    agent session checks the first seq against the ones before, as for ``event``."""

    type: ClassVar[str] = "events"
    items: Annotated[list[Event], Meta(min_length=1, max_length=MAX_EVENTS_ITEMS)]


class Ack(_Frame, tag="ack", frozen=True, kw_only=True):
    """Agent → relay: every event with seq ≤ ``seq`` is committed in the agent's inbox."""

    type: ClassVar[str] = "ack"
    seq: _U63


class Command(_Frame, tag="command", frozen=True, kw_only=True):
    """Agent → relay: perform a CTOX call to X-on."""

    type: ClassVar[str] = "command"
    request_id: _Id
    ctox_type: _Id
    params: JsonObject = msgspec.field(default_factory=dict)
    idempotency_key: _Id = ""


class CommandResult(_Frame, tag="command_result", frozen=True, kw_only=True):
    """Relay → agent: X-on's answer (or the relay's refusal, with ``error`` set)."""

    type: ClassVar[str] = "command_result"
    request_id: _Id
    status: _HttpStatus
    content_type: _Label = ""
    body_b64: _Text = ""
    headers: JsonObject = msgspec.field(default_factory=dict)
    error: _Reason = ""


class Status(_Frame, tag="status", frozen=True, kw_only=True):
    """Relay → agent: status items; ``snapshot`` replaces everything the agent had."""

    type: ClassVar[str] = "status"
    items: JsonList
    snapshot: bool = False


class GoAway(_Frame, tag="goaway", frozen=True, kw_only=True):
    """Relay → agent: this relay is going away; reconnect (possibly to another instance)."""

    type: ClassVar[str] = "goaway"
    reason: _Reason = ""


class Heartbeat(_Frame, tag="heartbeat", frozen=True, kw_only=True):
    """Relay → agent, every ``link.heartbeat_interval``: the agent should have every event for
    it up to ``head`` by now. An agent that has less, has acked all it has, and then receives
    nothing for ``link.stall_timeout`` closes with ``stalled`` and reconnects (issue 6:
    "connected but receiving nothing")."""

    type: ClassVar[str] = "heartbeat"
    head: _U63


class Error(_Frame, tag="error", frozen=True, kw_only=True):
    """Either side: why the sender is closing the link."""

    type: ClassVar[str] = "error"
    code: _Id
    message: _Reason = ""


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
# Which fields each frame writes, in order; ``v`` and ``type`` lead every frame instead.
_FIELDS = {
    name: tuple(f for f in cls.__struct_fields__ if f != "v") for name, cls in _TYPES.items()
}
_decoder = msgspec.json.Decoder(Frame)

# One encoder for every frame: json.dumps() with non-default options builds a new one per call,
# a cost paid once per event on the relay's hot path (docs/performance.md). The standard
# library's writer rather than msgspec's: it returns the str the WebSocket layer takes, and a
# value that is not Unicode text (a lone surrogate) comes out escaped instead of raising (see
# ``_utf8_safe``).
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_EVENTS_HEAD = f'{{"v":{LINK_VERSION},"type":"{Events.type}","items":['
_EVENTS_TAIL = "]}"


def _utf8_safe(text: str) -> str:
    """``text`` unchanged when it encodes to UTF-8, which is every frame built from decoded
    input; else the same JSON with the lone surrogates ``\\uXXXX``-escaped, so that writing a
    frame never raises on a hostile value (an error echoing a peer's string, say). The peer's
    decoder refuses such a value (docs/protocol.md, Frame limits), which is its business."""
    if text.isascii():  # O(1) in CPython: the usual frame
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


_SURROGATE = re.compile("[\\ud800-\\udfff]")


def encode(frame: Frame) -> str:
    """Encode a frame as one JSON text message (always encodable to UTF-8)."""
    if isinstance(frame, Events):
        return encode_events([encode_event_item(e.seq, e.event) for e in frame.items])
    data: dict[str, Any] = {"v": LINK_VERSION, "type": frame.type}
    for name in _FIELDS[frame.type]:
        value = getattr(frame, name)
        if value is not None:  # an optional field that is unset stays off the wire
            data[name] = value
    return _utf8_safe(_dumps(data))


def encode_event_item(seq: int, event: dict[str, Any]) -> str:
    """One item of an ``events`` frame, encoded on its own so that the sender can count the
    frame's size as it fills it (:data:`MAX_EVENTS_BYTES`)."""
    return _utf8_safe(_dumps({"seq": seq, "event": event}))


def encode_events(items: list[str]) -> str:
    """An ``events`` frame around items from :func:`encode_event_item`, in order: as long as
    ``encode_events([])`` plus the items and a comma between each two."""
    return _EVENTS_HEAD + ",".join(items) + _EVENTS_TAIL


def decode(text: str | bytes) -> Frame:
    """Decode one JSON text message into a frame, within the limits of every field.

    Raises:
        RemoteProtocolError: not JSON (or a string that is not Unicode text), not an object,
            unknown version or type, a missing field, a field of the wrong type or out of its
            range (docs/protocol.md, Frame limits). ``close_code`` says how to close the link.
    """
    try:
        frame: Frame = _decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise _refusal(text, str(exc)) from None
    except (msgspec.DecodeError, ValueError, RecursionError):
        # ValueError: bytes that are not UTF-8, or text with a lone surrogate in it.
        # RecursionError: "[[[[…" nested deeper than the parser's stack, even in a field
        # that would be ignored. Both are the peer's fault like any other bad JSON.
        raise _not_json(text) from None
    if frame.v is UNSET:
        raise RemoteProtocolError(
            "unsupported link version None", close_code=CloseCode.UNSUPPORTED_VERSION
        )
    # Checked, so forgotten: a decoded frame equals the one its sender built.
    msgspec.structs.force_setattr(frame, "v", UNSET)
    if isinstance(frame, Events):
        _check_items(frame.items)
    return frame


def _not_json(text: str | bytes) -> RemoteProtocolError:
    """The error for a message msgspec could not parse: bad JSON, or JSON whose strings are
    not all Unicode text (a ``\\ud800`` escape), which the standard library's parser, asked
    only now, accepts."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return RemoteProtocolError("frame is not valid JSON")
    return RemoteProtocolError("frame holds a string that is not Unicode text (a lone surrogate)")


_MISSING = re.compile(r"Object missing required field `(\w+)`(?: - at `\$(.*)`)?")
_WRONG = re.compile(r"Expected (.+?)(?:, got `(\w+)`)? - at `\$\.?(.*)`")


def _refusal(text: str | bytes, detail: str) -> RemoteProtocolError:
    """The error for a message the typed decoder refused.

    Only here, on the way out, is the message parsed again without types, to tell a wrong
    version or type (their own close codes) from a wrong field; it is valid JSON by now, or
    the first pass would have said so (and the second does).
    """
    try:
        data = msgspec.json.decode(text)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return _not_json(text)
    if not isinstance(data, dict):
        return RemoteProtocolError("frame is not a JSON object")
    version = data.get("v")
    # type() rather than isinstance: neither `true` nor `1.0` is version 1.
    if type(version) is not int or version != LINK_VERSION:
        return RemoteProtocolError(
            f"unsupported link version {version!r}"[:200],
            close_code=CloseCode.UNSUPPORTED_VERSION,
        )
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in _TYPES:
        return RemoteProtocolError(
            f"unknown frame type {kind!r}"[:200], close_code=CloseCode.UNKNOWN_FRAME
        )
    if match := _MISSING.fullmatch(detail):
        name, where = match.groups()
        place = f" at {where}" if where else ""
        return RemoteProtocolError(f"{kind} frame lacks field {name!r}{place}"[:200])
    if match := _WRONG.fullmatch(detail):
        expected, got, where = match.groups()
        expected = expected.replace("`", "")
        also = f", not {got}" if got else ""
        return RemoteProtocolError(f"{kind} frame field {where!r} must be {expected}{also}"[:200])
    return RemoteProtocolError(f"{kind} frame: {detail}"[:200])


def _check_items(items: list[Event]) -> None:
    """What the types cannot say about an ``events`` frame (see :class:`Events`)."""
    last = -1
    for item in items:
        # docs/protocol.md, Batched events: in order; the frame alone can show a step back.
        if item.seq <= last:
            raise RemoteProtocolError(f"events frame seq {item.seq} is not above {last}")
        last = item.seq
