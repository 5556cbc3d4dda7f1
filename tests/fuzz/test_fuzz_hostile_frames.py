"""Hostile frames: every field of every frame type given a value outside its type or range.

docs/protocol.md, Frame limits: a seq of 2**64, a lone surrogate, an oversized string or list,
nesting past the depth limit, in any field of any frame, on either side, before or after the
handshake, is a peer fault. It never raises out of ``receive_message``; the session ends
CLOSING with ``close_requested`` set, and what it still sends encodes to UTF-8 and decodes
again within the limits (the error frame cannot carry the hostile value back as something
the peer would refuse).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from shared.link import CloseCode, LinkState, frames
from tests.helpers.linkpair import AGENT_ID, LinkPair

from .support import FUZZ, measured

_EVENT = {"id": "ev-9", "type": "sms", "params": {"to": "0123"}}
# A well-formed frame of every type, in a state and direction where it could be accepted.
_VALID: dict[str, dict[str, Any]] = {
    "hello": {"agent_id": AGENT_ID, "resume_after": 0, "client": "c", "features": ["events"],
              "subscription": {"types": ["sms"]}},
    "challenge": {"relay_id": "relay-test", "nonce": "n"},
    "auth": {"signature": "AAAA"},
    "welcome": {"agent_id": AGENT_ID, "account_id": "acct-1", "resume_after": 0, "window": 4,
                "trimmed_through": 0, "replay_after": 0},
    "event": {"seq": 50, "event": _EVENT},
    "events": {"items": [{"seq": 50, "event": _EVENT}]},
    "ack": {"seq": 1},
    "command": {"request_id": "r1", "ctox_type": "sms", "params": {"to": "1"},
                "idempotency_key": "k"},
    "command_result": {"request_id": "r1", "status": 200, "content_type": "text/plain",
                       "body_b64": "", "headers": {"a": "b"}, "error": ""},
    "status": {"items": [{"name": "n", "value": 1}], "snapshot": False},
    "goaway": {"reason": "r"},
    "heartbeat": {"head": 1},
    "error": {"code": "protocol_error", "message": "m"},
}
_INT_FIELDS = {"resume_after", "window", "trimmed_through", "replay_after", "seq", "head",
               "status"}
_BOOL_FIELDS = {"snapshot"}
_OBJECT_FIELDS = {"subscription", "event", "params", "headers"}
_LIST_FIELDS = {"features", "items"}
_SHORT = {"agent_id": frames.MAX_ID, "relay_id": frames.MAX_ID, "nonce": frames.MAX_ID,
          "signature": frames.MAX_ID, "account_id": frames.MAX_ID,
          "request_id": frames.MAX_ID, "ctox_type": frames.MAX_ID,
          "idempotency_key": frames.MAX_ID, "code": frames.MAX_ID, "client": frames.MAX_LABEL,
          "content_type": frames.MAX_LABEL, "message": frames.MAX_REASON,
          "reason": frames.MAX_REASON, "error": frames.MAX_REASON}
"""String fields and their longest value; ``body_b64`` is bounded by the message size."""

_BAD_INTS: list[Any] = [2**63, 2**64, 10**30, -1, -(2**64), 1.0, 1.5, True, "1", None, [1]]
_SURROGATES = ["\ud800", "a\udfffb", "\udc00\ud800"]


def _deep(depth: int) -> Any:
    value: Any = "x"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


_TOO_DEEP = _deep(frames.MAX_DEPTH + 1)
_VERY_DEEP = "@@very-deep@@"
"""Stands for JSON nested 5000 levels deep (past Python's recursion limit, so json.dumps
cannot write it): ``_message`` puts the text in its place."""
_VERY_DEEP_TEXT = "[" * 2500 + '{"k":' * 2500 + "0" + "}" * 2500 + "]" * 2500
_LONG_LIST = [0] * (frames.MAX_ITEMS + 1)
_MANY_KEYS = {f"k{i}": 0 for i in range(frames.MAX_ITEMS + 1)}


def _hostile_values(name: str) -> list[Any]:
    """Values that break the type or range of field ``name``, each alone enough to refuse."""
    nested = [{"k": s} for s in _SURROGATES] + [{s: 1} for s in _SURROGATES]
    if name in _INT_FIELDS:
        return [*_BAD_INTS, 1000] if name == "status" else _BAD_INTS
    if name in _BOOL_FIELDS:
        return [1, 0, "true", None, *_SURROGATES]
    if name in _OBJECT_FIELDS:
        return [None, [], "x", 1, *nested, {"k": _TOO_DEEP}, _TOO_DEEP, _VERY_DEEP, _MANY_KEYS,
                {"k": 2**64}, {"k": [1, -(2**63) - 1]}]
    if name == "features":
        return [None, "events", [1], [None], ["x" * (frames.MAX_ID + 1)], *[[s] for s in
                _SURROGATES], ["events"] * (frames.MAX_FEATURES + 1)]
    if name == "items":
        return [None, {}, "x", [_TOO_DEEP], _LONG_LIST, [{"seq": 1, "event": {"k": s}}
                                                        for s in _SURROGATES]]
    longest = _SHORT.get(name, frames.MAX_TEXT)
    too_long = ["x" * (longest + 1)] if longest < frames.MAX_TEXT else []
    return [None, 1, [], {}, *_SURROGATES, *too_long]


_CASES = [
    (kind, name, index)
    for kind, fields in _VALID.items()
    for name in fields
    for index in range(len(_hostile_values(name)))
]
# Beyond the named fields: the version, the type, and an unknown field nested past the
# parser's stack (ignored fields are parsed too).
_FRAME_CASES = [
    {"v": 2**64}, {"v": "\ud800"}, {"type": "\ud800"}, {"type": "x" * 100_000},
    {"extra": _VERY_DEEP}, {"extra": "\ud800"},
]
_CODES = {int(code) for code in CloseCode}


def _message(kind: str, changes: dict[str, Any], *, escaped: bool) -> str:
    # escaped: surrogates travel as \ud800 escapes, as a peer's bytes would carry them;
    # otherwise raw in the str (no WebSocket library hands those over, but the API takes str).
    text = json.dumps({"v": 1, "type": kind, **_VALID[kind], **changes}, ensure_ascii=escaped)
    return text.replace(json.dumps(_VERY_DEEP), _VERY_DEEP_TEXT)


def _assert_refused(side: str, handshake: bool, text: str) -> None:
    pair = LinkPair()
    if handshake:
        pair.handshake()
    # else: both CONNECTING, the agent's hello queued and not yet delivered
    session = pair.relay if side == "relay" else pair.agent
    before = session.state
    session.receive_message(text, pair.clock.advance(0.001))  # must not raise
    assert session.state is LinkState.CLOSING, (before, session.close_requested)
    close = session.close_requested
    assert close is not None and close.code in _CODES
    assert close.code != CloseCode.INTERNAL_ERROR, "a peer fault, not a surprise"
    for sent in session.data_to_send():
        sent.encode()  # UTF-8, always
        frames.decode(sent)  # and within the limits the peer applies
    session.events_received()


def test_every_field_out_of_range_closes_the_link() -> None:
    """Each hostile value in each field of each frame type, on both sides, before and after
    the handshake: refused as a peer fault with a link close code, nothing raised."""
    with measured("hostile fields") as counter:

        @FUZZ
        @given(
            case=st.sampled_from(_CASES),
            side=st.sampled_from(["relay", "agent"]),
            handshake=st.booleans(),
            escaped=st.booleans(),
        )
        def run(case: tuple[str, str, int], side: str, handshake: bool, escaped: bool) -> None:
            counter.examples += 1
            kind, name, index = case
            value = _hostile_values(name)[index]
            _assert_refused(side, handshake, _message(kind, {name: value}, escaped=escaped))

        run()


def test_hostile_version_type_and_unknown_fields_close_the_link() -> None:
    """The same for the envelope: version, type, and unknown fields that are not JSON text
    or nest past the parser's stack."""
    with measured("hostile envelope") as counter:

        @FUZZ
        @given(
            kind=st.sampled_from(sorted(_VALID)),
            changes=st.sampled_from(_FRAME_CASES),
            side=st.sampled_from(["relay", "agent"]),
            handshake=st.booleans(),
            escaped=st.booleans(),
        )
        def run(
            kind: str, changes: dict[str, Any], side: str, handshake: bool, escaped: bool
        ) -> None:
            counter.examples += 1
            _assert_refused(side, handshake, _message(kind, changes, escaped=escaped))

        run()


def test_every_case_is_refused_on_its_own() -> None:
    """Not left to sampling: each (frame type, field, value) once, on the side that would
    accept the frame, after the handshake where it belongs there."""
    agent_sends = {"hello", "auth", "ack", "command", "error"}
    before = {"hello", "challenge"}
    for kind, name, index in _CASES:
        value = _hostile_values(name)[index]
        side = "relay" if kind in agent_sends else "agent"
        _assert_refused(side, kind not in before, _message(kind, {name: value}, escaped=True))
