"""Withheld events (docs/delivery.md): which events the link cannot carry, the stand-in sent
in their place, and status runs that each fit one frame."""

from __future__ import annotations

import json
from typing import Any

from relay_server.withhold import FRAME_OVERHEAD, Withheld, stand_in, status_runs, withheld
from shared.events import RawRequest, XonEvent

LIMIT = 64 * 1024


def event(*, params: Any = None, body: bytes = b"", path: str = "/a.b") -> XonEvent:
    return XonEvent(
        id="ev-1", account="acc-1", type="a.b", received_at="2026-12-08T01:00:00.000Z",
        params=params or {}, request=RawRequest(
            method="POST", path=path, query="x=1", content_type="text/plain", body=body
        ),
    )


def test_ordinary_events_pass_without_being_encoded() -> None:
    """Small ASCII events, and non-ASCII ones that encode, are deliverable."""
    assert withheld(event(params={"n": "1"}), LIMIT) is None
    assert withheld(event(params={"name": "Zoë 🙂"}), LIMIT) is None


def test_an_event_whose_frame_would_pass_the_limit_is_too_large() -> None:
    """The size counts the base64 body; an event just under the limit still passes."""
    why = withheld(event(body=b"x" * LIMIT), LIMIT)
    assert why is not None and why.reason == "too_large" and why.bytes > LIMIT
    fits = withheld(event(body=b"x" * ((LIMIT - 2 * FRAME_OVERHEAD) * 3 // 4 - 300)), LIMIT)
    assert fits is None


def test_a_lone_surrogate_is_not_encodable_wherever_it_is() -> None:
    """In a param value, a param name or the path."""
    for bad in (event(params={"n": "\ud800"}), event(params={"\udfff": "1"}),
                event(path="/a\ud800")):
        why = withheld(bad, LIMIT)
        assert why is not None and why.reason == "not_encodable"


def test_a_param_that_is_not_a_string_is_measured_by_encoding() -> None:
    """Data an older version stored with other JSON types is judged by its real size."""
    why = withheld(event(params={"list": ["x" * 100] * 1000}), LIMIT)
    assert why is not None and why.reason == "too_large"
    assert withheld(event(params={"list": ["x"]}), LIMIT) is None


def test_the_stand_in_keeps_identity_and_drops_the_payload() -> None:
    """Same id, account, type, received_at; no params, no query, no body; why it is there;
    and it always encodes."""
    original = event(params={"n": "\ud800"}, body=b"x" * 10, path="/a\ud800")
    why = Withheld("not_encodable", 123)
    sent = stand_in(original, why)
    assert sent["id"] == "ev-1" and sent["type"] == "a.b" and sent["account"] == "acc-1"
    assert sent["received_at"] == original.received_at
    assert sent["params"] == {} and sent["request"]["body_b64"] == ""
    assert sent["request"]["query"] == "" and sent["request"]["method"] == "POST"
    assert sent["withheld"] == {"reason": "not_encodable", "bytes": 123}
    json.dumps(sent, ensure_ascii=False).encode("utf-8")
    assert withheld(XonEvent.from_json({k: v for k, v in sent.items() if k != "withheld"}),
                    LIMIT) is None


def test_status_runs_each_fit_one_frame_and_keep_the_order() -> None:
    """Items are cut into runs under the limit; one too large alone, or not encodable, is
    left out; nothing at all is still one (empty) run."""
    items = [{"key": str(n), "v": "x" * 20_000} for n in range(8)]
    runs, dropped = status_runs(items, LIMIT)
    assert dropped == 0 and len(runs) == 3
    assert [item for run in runs for item in run] == items
    for run in runs:
        assert len(json.dumps(run).encode()) <= LIMIT - FRAME_OVERHEAD
    huge = {"key": "h", "v": "x" * LIMIT}
    bad = {"key": "b", "v": "\ud800"}
    runs, dropped = status_runs([huge, items[0], bad], LIMIT)
    assert (runs, dropped) == ([[items[0]]], 2)
    assert status_runs([], LIMIT) == ([[]], 0)
