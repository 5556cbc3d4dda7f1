"""relay_agent/problems.py: the link's last error in words for the person at the PC."""

from __future__ import annotations

import pytest

from relay_agent.problems import describe

RELAY = "https://relay.example.com"


@pytest.mark.parametrize(("last_error", "cause", "action"), [
    ("ConnectionRefusedError: [Errno 111] Connect call failed ('203.0.113.9', 443)",
     "relay.example.com) is not accepting connections", "retrying"),
    ("gaierror: [Errno -2] Name or service not known", "cannot find the relay's address",
     "doctor"),
    ("TimeoutError: timed out during opening handshake", "did not answer in time", "firewall"),
    ("the TLS certificate presented for relay.example.com is not trusted (self-signed)",
     "could not be verified", "IT staff"),
    ("the proxy http://proxy:3128 requires authentication (HTTP 407): put the user",
     "company proxy", "IT staff"),
    ("WebSocket upgrade refused: HTTP 503 (busy, Retry-After 4 s)", "busy", "nothing to do"),
    ("WebSocket upgrade refused: HTTP 404", "HTTP 404", "doctor"),
    ("link closed (1001): relay shutting down", "restarting", "retrying"),
    ("link closed (4010): replaced by a newer connection", "Another copy", "one PC only"),
    ("link closed (4403): agent revoked", "refused this agent", "enroll --force"),
    ("ConnectionClosedError: no close frame received or sent", "was cut", "retrying"),
    ("inbox cannot store events, not acking: database or disk is full", "cannot save",
     "disk space"),
    ("SomethingNew: [Errno 999] whatever", "cannot reach the relay", "doctor"),
])
def test_each_failure_has_a_cause_and_an_action(last_error: str, cause: str, action: str) -> None:
    """Known failures get their own sentence; the technical text never shows through."""
    problem = describe(last_error, relay_url=RELAY)
    assert problem is not None
    assert cause in problem.cause and action in problem.action
    for leak in ("Errno", "Error:", "gaierror", "ConnectionClosed"):
        assert leak not in problem.text()


def test_no_error_no_problem() -> None:
    """Nothing recorded: nothing to say."""
    assert describe(None, relay_url=RELAY) is None
    assert describe("", relay_url=RELAY) is None
