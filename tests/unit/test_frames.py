"""Frames codec: every frame type round-trips; malformed messages get the right close code."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest

from shared.errors import RemoteProtocolError
from shared.link import frames
from shared.link.frames import (
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

EVERY_FRAME: list[Frame] = [
    Hello(agent_id="agent-1", resume_after=7, client="agent/1.0"),
    Challenge(relay_id="relay-1", nonce="n0nce"),
    Auth(signature="c2lnbmF0dXJl"),
    Welcome(agent_id="agent-1", account_id="acct-1", resume_after=7, window=256),
    Event(seq=8, event={"id": "e1", "type": "sms", "params": {"x-unknown": ["a", 1]}}),
    Events(items=[Event(seq=9, event={"id": "e2"}), Event(seq=12, event={"id": "e3"})]),
    Ack(seq=8),
    Command(request_id="r1", ctox_type="sms", params={"to": "0123"}, idempotency_key="k"),
    CommandResult(
        request_id="r1",
        status=200,
        content_type="text/plain",
        body_b64="T0s=",
        headers={"x": "y"},
        error="",
    ),
    Status(items=[{"name": "messages_waiting", "value": 3}], snapshot=True),
    Heartbeat(head=8),
    GoAway(reason="shutting down"),
    Error(code="protocol_error", message="bad frame"),
]


def _message(**fields: Any) -> str:
    return json.dumps({"v": 1, **fields})


def _reject(text: str | bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        frames.decode(text)
    return info.value


@pytest.mark.parametrize("frame", EVERY_FRAME, ids=lambda f: f.type)
def test_every_frame_type_round_trips(frame: Frame) -> None:
    """encode then decode gives back an equal frame, tagged with v and type."""
    text = frames.encode(frame)
    data = json.loads(text)
    assert data["v"] == frames.LINK_VERSION
    assert data["type"] == frame.type
    assert frames.decode(text) == frame


def test_every_frame_type_is_covered_by_the_round_trip() -> None:
    """The round-trip list names each frame type of the Frame union once."""
    union_members = typing.get_args(frames.Frame)
    assert sorted(f.type for f in EVERY_FRAME) == sorted(cls.type for cls in union_members)


def test_decode_accepts_utf8_bytes() -> None:
    """A binary message holding UTF-8 JSON decodes like text."""
    assert frames.decode(frames.encode(Ack(seq=1)).encode()) == Ack(seq=1)


def test_optional_fields_take_their_defaults() -> None:
    """Fields with defaults may be left out by the sender."""
    assert frames.decode(_message(type="hello", agent_id="a")) == Hello(agent_id="a")
    assert frames.decode(_message(type="goaway")) == GoAway()


def test_unknown_fields_are_ignored() -> None:
    """A newer peer may add optional fields without breaking this version."""
    assert frames.decode(_message(type="ack", seq=3, extra={"new": True})) == Ack(seq=3)


def test_event_parameters_pass_through_untouched() -> None:
    """Unknown event params and odd values survive the codec (DESIGN principle 2)."""
    event = {"id": "e", "params": {"Über": "ünïcode", "n": None, "nested": [{"a": 1.5}]}}
    decoded = frames.decode(frames.encode(Event(seq=1, event=event)))
    assert isinstance(decoded, Event)
    assert decoded.event == event


@pytest.mark.parametrize("text", ["", "{", "not json", "{'v': 1}", b"\xff\xfe{}"])
def test_bad_json_is_a_protocol_error(text: str | bytes) -> None:
    """A message that is not JSON closes with protocol_error."""
    assert _reject(text).close_code == CloseCode.PROTOCOL_ERROR


def test_deeply_nested_json_is_a_protocol_error() -> None:
    """JSON nested past the parser's stack is refused, not a RecursionError."""
    assert _reject("[" * 200_000).close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("text", ["[]", "1", '"ack"', "null", "true"])
def test_non_object_is_a_protocol_error(text: str) -> None:
    """A JSON value that is not an object closes with protocol_error."""
    assert _reject(text).close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("version", [None, 0, 2, "1", True, 1.0, [1]])
def test_wrong_version_is_unsupported_version(version: object) -> None:
    """A missing or different v (including true and 1.0) closes with unsupported_version."""
    fields: dict[str, Any] = {"type": "ack", "seq": 1}
    if version is not None:
        fields["v"] = version
    error = _reject(json.dumps(fields))
    assert error.close_code == CloseCode.UNSUPPORTED_VERSION


def test_huge_version_value_gives_a_short_message() -> None:
    """The refusal quotes at most 200 characters of the peer's value."""
    error = _reject(json.dumps({"v": "x" * 10_000, "type": "ack", "seq": 1}))
    assert len(error.message) <= 200


@pytest.mark.parametrize("kind", ["resume", "ACK", "", None, 5, ["ack"]])
def test_unknown_type_is_unknown_frame(kind: object) -> None:
    """An unknown, missing or non-string type closes with unknown_frame."""
    fields: dict[str, Any] = {"seq": 1}
    if kind is not None:
        fields["type"] = kind
    assert _reject(_message(**fields)).close_code == CloseCode.UNKNOWN_FRAME


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "ack"},
        {"type": "hello"},
        {"type": "event", "seq": 1},
        {"type": "welcome", "agent_id": "a", "account_id": "b", "resume_after": 0},
        {"type": "command", "request_id": "r"},
    ],
    ids=lambda f: str(f["type"]),
)
def test_missing_required_field_is_a_protocol_error(fields: dict[str, Any]) -> None:
    """A frame without one of its required fields closes with protocol_error."""
    error = _reject(_message(**fields))
    assert error.close_code == CloseCode.PROTOCOL_ERROR
    assert "lacks field" in error.message


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "ack", "seq": True},
        {"type": "ack", "seq": 1.0},
        {"type": "ack", "seq": "1"},
        {"type": "ack", "seq": None},
        {"type": "hello", "agent_id": 1},
        {"type": "event", "seq": 1, "event": []},
        {"type": "status", "items": {}},
        {"type": "status", "items": [], "snapshot": 1},
        {"type": "command_result", "request_id": "r", "status": False},
        {"type": "command", "request_id": "r", "ctox_type": "sms", "params": "x"},
    ],
    ids=lambda f: f"{f['type']}-{sorted(f)}",
)
def test_wrong_field_type_is_a_protocol_error(fields: dict[str, Any]) -> None:
    """A field of the wrong JSON type (true is not an int, 1 is not a bool) is refused."""
    error = _reject(_message(**fields))
    assert error.close_code == CloseCode.PROTOCOL_ERROR
    assert "must be" in error.message


def test_fatal_close_codes_are_the_44xx_codes() -> None:
    """Only unauthorized and revoked stop the agent (docs/protocol.md, Close codes)."""
    assert frames.FATAL_CLOSE_CODES == {CloseCode.UNAUTHORIZED, CloseCode.REVOKED}
    assert all(4000 <= code <= 4999 for code in CloseCode)


# -- limits (docs/protocol.md, Frame limits) ---------------------------------------------------


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth - 1):
        value = [value]
    return [value] if depth else value


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"type": "ack", "seq": frames.MAX_INT}, False),
        ({"type": "ack", "seq": frames.MAX_INT + 1}, True),
        ({"type": "ack", "seq": 2**64}, True),
        ({"type": "ack", "seq": -1}, True),
        ({"type": "hello", "agent_id": "a", "resume_after": 2**64}, True),
        ({"type": "hello", "agent_id": "a" * frames.MAX_ID}, False),
        ({"type": "hello", "agent_id": "a" * (frames.MAX_ID + 1)}, True),
        ({"type": "hello", "agent_id": "a", "features": ["x"] * frames.MAX_FEATURES}, False),
        ({"type": "hello", "agent_id": "a", "features": ["x"] * (frames.MAX_FEATURES + 1)}, True),
        ({"type": "hello", "agent_id": "a", "subscription": {"k": _deep(frames.MAX_DEPTH - 1)}},
         False),
        ({"type": "hello", "agent_id": "a", "subscription": {"k": _deep(frames.MAX_DEPTH)}},
         True),
        ({"type": "command_result", "request_id": "r", "status": 0}, False),
        ({"type": "command_result", "request_id": "r", "status": 999}, False),
        ({"type": "command_result", "request_id": "r", "status": 1000}, True),
        ({"type": "command_result", "request_id": "r", "status": -1}, True),
        ({"type": "status", "items": [0] * frames.MAX_ITEMS}, False),
        ({"type": "status", "items": [0] * (frames.MAX_ITEMS + 1)}, True),
        ({"type": "event", "seq": 1, "event": {"n": 2**63}}, True),
        ({"type": "event", "seq": 1, "event": {"n": -(2**63)}}, False),
        ({"type": "error", "code": "x", "message": "m" * frames.MAX_REASON}, False),
        ({"type": "error", "code": "x", "message": "m" * (frames.MAX_REASON + 1)}, True),
    ],
    ids=lambda v: str(v)[:60] if isinstance(v, dict) else str(v),
)
def test_fields_are_bounded(fields: dict[str, Any], refused: bool) -> None:
    """Each limit of the table holds at its edge and refuses one past it, with 4000."""
    text = _message(**fields)
    if refused:
        assert _reject(text).close_code == CloseCode.PROTOCOL_ERROR
    else:
        frames.decode(text)


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "hello", "agent_id": "\ud800"},
        {"type": "event", "seq": 1, "event": {"params": {"k": "a\udfffb"}}},
        {"type": "event", "seq": 1, "event": {"\udc00": "v"}},
        {"type": "error", "code": "protocol_error", "message": "\ud800"},
    ],
    ids=["hello-agent_id", "event-param", "event-key", "error-message"],
)
def test_lone_surrogates_are_a_protocol_error(fields: dict[str, Any]) -> None:
    """JSON's \\ud800 escape names no Unicode character: refused, clearly, wherever it is."""
    error = _reject(_message(**fields))  # json.dumps escapes it: "\ud800" on the wire
    assert error.close_code == CloseCode.PROTOCOL_ERROR
    assert "lone surrogate" in error.message


def test_the_largest_event_fits() -> None:
    """An event as large as the default link.max_message_size (2 MiB), with many params,
    decodes: the per-field limits never bind before the message size does."""
    params = {f"param_{i:05d}": "v" * 80 for i in range(20_000)}
    body = "QUJD" * (400 * 1024 // 4)
    event = {"id": "e", "type": "t", "params": params, "request": {"body_b64": body}}
    text = frames.encode(Event(seq=frames.MAX_INT, event=event))
    assert len(text.encode()) >= 2 * 1024 * 1024
    assert frames.decode(text) == Event(seq=frames.MAX_INT, event=event)


def test_encoding_a_lone_surrogate_escapes_it() -> None:
    """A hostile value in an outgoing frame never makes encoding raise: the frame is UTF-8
    text, and the peer's decoder refuses the escaped surrogate as it would any."""
    text = frames.encode(Error(code="protocol_error", message="bad \ud800 value"))
    assert text.encode() and "\\ud800" in text
    item = frames.encode_event_item(1, {"k": "\udfff"})
    assert item.encode() and "\\udfff" in item
