"""Peer faults in every state fail the link cleanly: error frame, close code, no exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.link import (
    AUTHENTICATING,
    CLOSING,
    CONNECTING,
    OPEN,
    CloseCode,
    Error,
    EventReceived,
    LinkSession,
    LinkState,
    decode,
)
from tests.helpers.linkpair import AGENT_ID, RELAY_ID, LinkPair

PROTOCOL = CloseCode.PROTOCOL_ERROR


def m(**fields: Any) -> str:
    return json.dumps({"v": 1, **fields})


WELCOME = {"type": "welcome", "agent_id": AGENT_ID, "account_id": "acct-1", "resume_after": 0}

RELAY_CASES: list[tuple[LinkState, str, int]] = [
    (CONNECTING, "not json", PROTOCOL),
    (CONNECTING, '{"v": 2, "type": "hello", "agent_id": "a"}', CloseCode.UNSUPPORTED_VERSION),
    (CONNECTING, m(type="resume", seq=1), CloseCode.UNKNOWN_FRAME),
    (CONNECTING, m(type="auth", signature="x"), PROTOCOL),
    (CONNECTING, m(type="ack", seq=0), PROTOCOL),
    (CONNECTING, m(type="challenge", relay_id="r", nonce="n"), PROTOCOL),
    (CONNECTING, m(type="goaway"), PROTOCOL),
    (CONNECTING, m(type="hello", agent_id=""), PROTOCOL),
    (CONNECTING, m(type="hello", agent_id="a", resume_after=-1), PROTOCOL),
    (AUTHENTICATING, m(type="hello", agent_id=AGENT_ID), PROTOCOL),
    (AUTHENTICATING, m(type="ack", seq=0), PROTOCOL),
    (AUTHENTICATING, m(**WELCOME, window=1), PROTOCOL),
    (AUTHENTICATING, m(type="command", request_id="r", ctox_type="sms"), PROTOCOL),
    (AUTHENTICATING, m(type="auth", signature=1), PROTOCOL),
    (OPEN, m(type="ack", seq=1), PROTOCOL),
    (OPEN, m(type="command", request_id="", ctox_type="sms"), PROTOCOL),
    (OPEN, m(type="command", request_id="r", ctox_type=""), PROTOCOL),
    (OPEN, m(type="event", seq=1, event={}), PROTOCOL),
    (OPEN, m(type="status", items=[]), PROTOCOL),
    (OPEN, m(type="command_result", request_id="r", status=200), PROTOCOL),
    (OPEN, m(type="auth", signature="x"), PROTOCOL),
    (OPEN, m(type="hello", agent_id=AGENT_ID), PROTOCOL),
    (OPEN, "[]", PROTOCOL),
]

AGENT_CASES: list[tuple[LinkState, str, int]] = [
    (CONNECTING, "{", PROTOCOL),
    (CONNECTING, '{"type": "challenge"}', CloseCode.UNSUPPORTED_VERSION),
    (CONNECTING, m(**WELCOME, window=1), PROTOCOL),
    (CONNECTING, m(type="event", seq=1, event={}), PROTOCOL),
    (CONNECTING, m(type="challenge", relay_id=RELAY_ID, nonce=""), PROTOCOL),
    (CONNECTING, m(type="challenge", relay_id=RELAY_ID, nonce="a\u0000b"), PROTOCOL),
    (CONNECTING, m(type="hello", agent_id="a"), PROTOCOL),
    (AUTHENTICATING, m(type="challenge", relay_id=RELAY_ID, nonce="n"), PROTOCOL),
    (AUTHENTICATING, m(**{**WELCOME, "agent_id": "someone-else"}, window=1), PROTOCOL),
    (AUTHENTICATING, m(**{**WELCOME, "resume_after": 1}, window=1), PROTOCOL),
    (AUTHENTICATING, m(**WELCOME, window=0), PROTOCOL),
    (AUTHENTICATING, m(type="auth", signature="x"), PROTOCOL),
    (AUTHENTICATING, m(type="status", items=[]), PROTOCOL),
    (OPEN, m(type="event", seq=0, event={}), PROTOCOL),
    (OPEN, m(**WELCOME, window=1), PROTOCOL),
    (OPEN, m(type="ack", seq=0), PROTOCOL),
    (OPEN, m(type="command", request_id="r", ctox_type="sms"), PROTOCOL),
    (OPEN, m(type="event", seq="1", event={}), PROTOCOL),
    (OPEN, m(type="bogus"), CloseCode.UNKNOWN_FRAME),
]


def _pair_with(side: str, state: LinkState) -> tuple[LinkPair, LinkSession]:
    """A pair whose relay or agent has just reached ``state``, its output drained."""
    pair = LinkPair()
    session: LinkSession = pair.relay if side == "relay" else pair.agent
    pair.run_until(lambda: session.state is state)
    session.data_to_send()
    session.events_received()
    return pair, session


def _assert_failed(session: LinkSession, code: int) -> None:
    assert session.state is CLOSING
    assert session.error is not None
    assert session.error.close_code == code
    assert session.close_requested is not None
    assert session.close_requested.code == code
    assert [decode(text) for text in session.data_to_send()] == [
        Error(code=CloseCode(code).name.lower(), message=session.error.message)
    ]
    assert session.events_received() == []
    assert session.next_deadline() is None


@pytest.mark.parametrize(("state", "text", "code"), RELAY_CASES)
def test_bad_frame_fails_the_relay(state: LinkState, text: str, code: int) -> None:
    """A malformed or misplaced frame closes the relay's link with the right code."""
    _, relay = _pair_with("relay", state)
    relay.receive_message(text, 0.0)
    _assert_failed(relay, code)


@pytest.mark.parametrize(("state", "text", "code"), AGENT_CASES)
def test_bad_frame_fails_the_agent(state: LinkState, text: str, code: int) -> None:
    """A malformed or misplaced frame closes the agent's link with the right code."""
    _, agent = _pair_with("agent", state)
    agent.receive_message(text, 0.0)
    _assert_failed(agent, code)


def test_challenge_with_nul_in_relay_id_fails_an_agent_without_expected_id() -> None:
    """A relay id that cannot be signed is a protocol error even when any relay is accepted."""
    pair = LinkPair(expected_relay_id="")
    pair.agent.data_to_send()
    pair.agent.receive_message(m(type="challenge", relay_id="r\u0000x", nonce="n"), 0.0)
    _assert_failed(pair.agent, PROTOCOL)


def test_input_after_a_fault_is_ignored() -> None:
    """Once failed, even valid frames produce no events, frames or state change."""
    pair = LinkPair()
    pair.handshake()
    pair.agent.receive_message("garbage", 0.0)
    pair.agent.data_to_send()
    pair.agent.receive_message(m(type="event", seq=1, event={}), 0.0)
    pair.agent.receive_message(m(type="goaway"), 0.0)
    assert pair.agent.events_received() == []
    assert pair.agent.data_to_send() == []
    assert pair.agent.error is not None and pair.agent.error.message == "frame is not valid JSON"


def test_fault_reaches_the_peer_as_peer_error() -> None:
    """The failing side's error frame arrives before the close, and both sides end CLOSED."""
    pair = LinkPair()
    pair.handshake()
    pair.to_agent.inject(m(type="event", seq=0, event={}))
    pair.pump()
    assert pair.agent.error is not None
    assert pair.closed is not None and pair.closed.code == PROTOCOL
    assert pair.relay.state.name == pair.agent.state.name == "CLOSED"


OPS = st.lists(
    st.sampled_from(
        [
            "offer",
            "ack",
            "step",
            "pump",
            "advance",
            "drop_to_agent",
            "drop_to_relay",
            "dup_to_agent",
            "dup_to_relay",
            "swap_to_agent",
            "swap_to_relay",
        ]
    ),
    max_size=40,
)
LOG = [(seq, {"id": f"ev-{seq}"}) for seq in (1, 2, 4, 8, 9, 12, 20, 21)]


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(ops=OPS)
def test_faulty_link_never_raises_and_never_misorders(ops: list[str]) -> None:
    """Under any mix of drops, duplicates, reorders and delays the sessions never raise,
    the agent only ever sees increasing seqs with the right bodies, and the window holds."""
    pair = LinkPair(window=3, auth_timeout=5.0)
    for op in ops:
        wire = pair.to_agent if op.endswith("to_agent") else pair.to_relay
        if op == "offer" and pair.relay.state is OPEN:
            pair.offer_from(LOG)
        elif op == "ack":
            seqs = [e.seq for e in pair.agent_events if isinstance(e, EventReceived)]
            if seqs:
                pair.agent.ack(seqs[-1])
        elif op == "step":
            pair.step()
        elif op == "pump":
            pair.pump()
        elif op == "advance":
            pair.clock.advance(3.0)
        elif op.startswith("drop"):
            wire.drop += 1
        elif op.startswith("dup"):
            wire.duplicate += 1
        elif op.startswith("swap") and len(wire.in_flight) >= 2:
            wire.swap()
        assert pair.relay.in_flight <= 3
    pair.pump()

    received = [e for e in pair.agent_events if isinstance(e, EventReceived)]
    assert [e.seq for e in received] == sorted({e.seq for e in received})
    assert all(e.event == dict(LOG)[e.seq] for e in received)
    if pair.closed is not None:
        assert pair.closed.code in {1000, 1001, *CloseCode}


def test_an_unexpected_exception_closes_the_link_with_internal_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The last-resort guard: whatever a message sets off inside the session ends the link
    with 4011 and one ERROR line naming the exception, never its text nor the payload."""
    pair = LinkPair()
    pair.handshake()

    def broken(frame: object) -> None:
        raise KeyError("secret-payload-value")

    monkeypatch.setattr(pair.relay, "_handle", broken)
    with caplog.at_level("DEBUG", logger="shared.link.session"):
        pair.relay.receive_message(m(type="ack", seq=1), 1.0)
    assert pair.relay.state is CLOSING
    assert pair.relay.close_requested is not None
    assert pair.relay.close_requested.code == CloseCode.INTERNAL_ERROR
    assert decode(pair.relay.data_to_send()[-1]) == Error(
        code="internal_error", message="internal error"
    )
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["link.internal_error"]
    assert getattr(errors[0], "error") == "KeyError"
    assert "secret-payload-value" not in caplog.text and errors[0].exc_info is None


def test_a_close_reason_with_a_lone_surrogate_does_not_raise() -> None:
    """A reason quoting a peer's string (a surrogate in it) still closes the link."""
    pair = LinkPair()
    pair.handshake()
    pair.relay.close(CloseCode.PROTOCOL_ERROR, "bad value \ud800")
    assert pair.relay.close_requested is not None
    pair.relay.close_requested.reason.encode()
    assert all(text.encode() for text in pair.relay.data_to_send())
