"""Hypothesis strategies for link frames, HTTP bodies and query parameters.

Frames come three ways: random text, random JSON objects shaped like frames (known and unknown
types and versions, known field names with values of any JSON type), and valid frames mutated
at the byte level (flips, cuts, insertions, duplicated spans).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from shared.link import frames

FRAME_TYPES = [
    "hello", "challenge", "auth", "welcome", "event", "events", "ack", "command",
    "command_result", "status", "goaway", "error",
]
FIELDS = [
    "agent_id", "resume_after", "client", "relay_id", "nonce", "signature", "account_id",
    "window", "seq", "event", "request_id", "ctox_type", "params", "status", "body", "items",
    "snapshot", "reason", "code", "message", "headers", "idempotency_key", "features",
]

_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)
"""Any JSON value (NaN and infinities too: Python's json writes them, peers may send them)."""


@st.composite
def frame_objects(draw: st.DrawFn) -> str:
    """A JSON object that looks like a frame, right or wrong in any field."""
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        obj["v"] = draw(st.sampled_from([1, 1, 1, 2, 0, "1", None]) | json_values)
    if draw(st.integers(0, 9)):
        obj["type"] = draw(st.sampled_from(FRAME_TYPES) | st.text(max_size=12))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        obj[name] = draw(json_values)
    return json.dumps(obj)


def _valid_frames() -> list[str]:
    event = {"id": "ev-1", "account": "a", "type": "sms", "received_at": "t", "params": {},
             "request": {"method": "GET", "path": "", "query": "", "content_type": "",
                         "body_b64": ""}}
    samples: list[frames.Frame] = [
        frames.Hello(agent_id="agent-1", resume_after=3, client="fuzz"),
        frames.Hello(agent_id="agent-1", client="fuzz", features=list(frames.FEATURES)),
        frames.Ack(seq=1),
        frames.Event(seq=1, event=event),
        frames.Events(items=[frames.Event(seq=1, event=event), frames.Event(seq=2, event={})]),
        frames.GoAway(reason="bye"),
        frames.Error(code="protocol_error", message="x"),
    ]
    texts = [frames.encode(f) for f in samples]
    texts.append('{"v":1,"type":"auth","signature":"AAAA"}')
    texts.append('{"v":1,"type":"command","request_id":"r1","ctox_type":"sms.send",'
                 '"params":{"to":"1"}}')
    texts.append('{"v":1,"type":"welcome","agent_id":"agent-1","account_id":"a",'
                 '"resume_after":0,"window":4}')
    texts.append('{"v":1,"type":"challenge","relay_id":"relay-test","nonce":"n"}')
    return texts


VALID_FRAMES = _valid_frames()


@st.composite
def mutated_frames(draw: st.DrawFn) -> str:
    """A valid frame with a few byte-level mutations, decoded back leniently to text."""
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)).encode())
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        match draw(st.integers(0, 3)):
            case 0:
                data[pos] ^= 1 << draw(st.integers(0, 7))
            case 1:
                del data[pos:]
            case 2:
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            case _:
                end = draw(st.integers(pos, len(data)))
                data[pos:pos] = data[pos:end]
    return data.decode("utf-8", errors="replace")


messages = st.text(max_size=200) | frame_objects() | mutated_frames()
"""One inbound link message (text)."""

CONTENT_TYPES = [
    "", "application/json", "application/x-www-form-urlencoded", "text/xml", "application/xml",
    "application/soap+xml; charset=utf-8", "text/plain", "multipart/form-data; boundary=x",
    "application/json; charset=latin-1", "text/xml; charset=utf-16", "application/octet-stream",
]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Random bytes, JSON of any shape, form-ish and XML-ish text."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=600))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    if kind == 2:
        pairs = draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=12)), max_size=5))
        return "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", errors="replace")
    tags = draw(st.lists(st.from_regex(r"[A-Za-z:_][\w:.-]{0,8}", fullmatch=True), max_size=4))
    text = draw(st.text(max_size=20))
    inner = "".join(f"<{t}>{text}</{t}>" for t in tags)
    envelope = draw(st.sampled_from(["{}", "<soap:Envelope><soap:Body>{}</soap:Body>",
                                     "<?xml version='1.0'?><r>{}</r>", "<!DOCTYPE x [{}]>"]))
    return envelope.replace("{}", inner).encode()


params = st.text(max_size=20) | st.sampled_from(
    ["0", "-1", "1e309", "nan", "inf", "99999999999999999999", "1.5", " 3", "", "%00", "0x10"]
)
"""Values for after/limit/wait and friends."""
