"""shared/events.py: the XonEvent model and its JSON form (DESIGN §Agent local API).

Ingress parsing (parse_ingress) is tested in its own module.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.events import RawRequest, XonEvent, format_time, parse_time

BODY = "from=%2B44&message=caf%C3%A9 ☎".encode() + b"\x00\xff"


def _event(**overrides: object) -> XonEvent:
    fields: dict[str, object] = {
        "id": "ev-1",
        "account": "acc-1",
        "type": "sms.received",
        "received_at": "2026-11-26T15:04:05.123Z",
        "params": {"from": "+44", "message": "café ☎"},
        "request": RawRequest(
            method="POST",
            path="/sms.received",
            query="x=%2F&y=",
            content_type="application/x-www-form-urlencoded; charset=utf-8",
            body=BODY,
        ),
    }
    fields.update(overrides)
    return XonEvent(**fields)  # type: ignore[arg-type]


def test_event_json_shape() -> None:
    """to_json gives the documented event object, with the body as base64."""
    data = _event().to_json()
    assert set(data) == {"id", "account", "type", "received_at", "params", "request"}
    assert set(data["request"]) == {"method", "path", "query", "content_type", "body_b64"}
    assert data["params"] == {"from": "+44", "message": "café ☎"}


def test_event_round_trip_through_json_text() -> None:
    """Event → JSON text → event is lossless, body bytes included (DESIGN principle 2)."""
    event = _event()
    again = XonEvent.from_json(json.loads(json.dumps(event.to_json())))
    assert again == event
    assert again.request.body == BODY


def test_empty_body_round_trip() -> None:
    """A GET with no body and no content type survives the round trip."""
    event = _event(
        request=RawRequest(method="GET", path="", query="a=1", content_type="", body=b"")
    )
    assert XonEvent.from_json(event.to_json()) == event
    assert event.to_json()["request"]["body_b64"] == ""


def test_unknown_fields_are_ignored_by_from_json() -> None:
    """The agent adds `cursor`; reading the object back ignores fields it does not know."""
    data = _event().to_json()
    data["cursor"] = "42"
    assert XonEvent.from_json(data) == _event()


def test_param_values_become_strings() -> None:
    """from_json keeps params as str → str."""
    data = _event().to_json()
    data["params"] = {"count": 3}
    assert XonEvent.from_json(data).params == {"count": "3"}


def test_to_json_does_not_share_params() -> None:
    """Mutating the JSON form does not change the (frozen) event."""
    event = _event()
    event.to_json()["params"]["from"] = "changed"
    assert event.params["from"] == "+44"


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("id"),
        lambda d: d.pop("request"),
        lambda d: d.__setitem__("params", ["a"]),
        lambda d: d.__setitem__("request", None),
        lambda d: d["request"].pop("method"),
        lambda d: d["request"].__setitem__("body_b64", "not base64!"),
        lambda d: d["request"].__setitem__("body_b64", 5),
    ],
)
def test_malformed_event_raises_value_error(breakage: object) -> None:
    """A malformed event object raises ValueError (never KeyError/TypeError)."""
    data = _event().to_json()
    breakage(data)  # type: ignore[operator]
    with pytest.raises(ValueError):
        XonEvent.from_json(data)


def test_format_time() -> None:
    """format_time writes ISO 8601 UTC with milliseconds and a Z."""
    assert format_time(0) == "1970-01-01T00:00:00.000Z"
    assert format_time(1_800_000_000.5) == "2027-01-15T08:00:00.500Z"


def _datetime_format(ts: float) -> str:
    """The reference spelling: what datetime makes of ``ts`` (format_time caches the second)."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@pytest.mark.parametrize(
    "ts",
    [
        0.0, -0.0004, -1.5, 1.9999995, 1.9999994999, 2.0000005, 59.9995, 86_399.9999996,
        1_795_727_825.9999995, 1_795_727_825.99999949, 4_102_444_799.9999999,
    ],
)
def test_format_time_rounds_like_datetime_at_the_edges(ts: float) -> None:
    """Microseconds round half to even, carrying into the next second, as datetime does."""
    assert format_time(ts) == _datetime_format(ts)


@given(st.lists(st.floats(min_value=-2e9, max_value=4e9), min_size=1, max_size=20))
def test_format_time_matches_datetime(stamps: list[float]) -> None:
    """Any sequence of times (the cached second changing or not) spells as datetime would."""
    for ts in stamps:
        assert format_time(ts) == _datetime_format(ts)


@pytest.mark.parametrize("ts", [0.0, 1.001, 1_764_169_445.123, 1_800_000_000.999])
def test_time_round_trip(ts: float) -> None:
    """parse_time(format_time(t)) is t to the millisecond."""
    assert parse_time(format_time(ts)) == pytest.approx(ts, abs=0.0011)


def test_parse_time_refuses_garbage() -> None:
    """parse_time raises ValueError on text that is not a time."""
    with pytest.raises(ValueError):
        parse_time("yesterday")
