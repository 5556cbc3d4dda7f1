"""Construction checks and DEBUG logging of the sessions (STYLE §2 rule 5)."""

from __future__ import annotations

import logging

import pytest

from shared import crypto
from shared.errors import LocalProtocolError
from shared.link import (
    TRANSITIONS,
    AgentSession,
    Command,
    CommandResult,
    LinkState,
    RelaySession,
)
from tests.helpers.linkpair import LinkPair

SESSION_LOGGER = "shared.link.session"


@pytest.mark.parametrize(
    ("relay_id", "nonce", "window"), [("", "n", 1), ("r", "", 1), ("r", "n", 0)]
)
def test_relay_session_rejects_bad_arguments(relay_id: str, nonce: str, window: int) -> None:
    """A relay session needs a relay id, a nonce and a window of at least 1."""
    with pytest.raises(LocalProtocolError):
        RelaySession(relay_id=relay_id, nonce=nonce, window=window, auth_timeout=1.0, now=0.0)


def test_agent_session_rejects_negative_resume_point() -> None:
    """A negative resume point is a bug in the caller."""
    with pytest.raises(LocalProtocolError):
        AgentSession(
            agent_id="a",
            relay_id="r",
            private_key=crypto.generate_private_key(),
            resume_after=-1,
            auth_timeout=1.0,
            now=0.0,
        )


def test_transitions_only_lead_forward() -> None:
    """Every transition stays in place or moves towards CLOSING, never back."""
    for (state, _), target in TRANSITIONS.items():
        assert target >= state
        assert target in (LinkState.AUTHENTICATING, LinkState.OPEN, LinkState.CLOSING)


def test_debug_logging_names_frames_but_never_payloads(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG the sessions log frame types, seqs, states and timers, never bodies or keys."""
    caplog.set_level(logging.DEBUG, logger=SESSION_LOGGER)
    pair = LinkPair(auth_timeout=5.0)
    assert pair.relay.debug and pair.agent.debug
    pair.handshake()
    pair.relay.offer(1, {"id": "e1", "params": {"body": "SECRET-EVENT-BODY"}})
    pair.pump()
    pair.agent.ack(1)
    pair.agent.send_command(
        Command(request_id="req-9", ctox_type="sms", params={"text": "SECRET-SMS"})
    )
    pair.pump()
    pair.relay.send_command_result(
        CommandResult(request_id="req-9", status=200, body_b64="U0VDUkVULVJFU1VMVA")
    )
    pair.relay.send_status([{"name": "SECRET-STATUS"}])
    pair.pump()
    pair.agent.receive_message("junk", pair.clock.now)
    pair.pump()

    text = "\n".join(record.getMessage() for record in caplog.records)
    for expected in (
        "> hello",
        "< hello",
        "> challenge",
        "> auth",
        "< welcome",
        "= OPEN",
        "> event seq=1",
        "< ack seq=1",
        "< command request_id=req-9",
        "> command_result request_id=req-9",
        "! frame is not valid JSON",
        "= CLOSED",
    ):
        assert expected in text
    signature = [t for t in pair.to_relay.written if '"auth"' in t][0]
    for secret in ("SECRET", "U0VDUkVU", "nonce-1", signature.split('"signature":"')[1][:20]):
        assert secret not in text
    assert all(record.levelno == logging.DEBUG for record in caplog.records)


def test_timer_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """A deadline firing is logged with the timer glyph."""
    caplog.set_level(logging.DEBUG, logger=SESSION_LOGGER)
    pair = LinkPair(auth_timeout=1.0)
    pair.relay.handle_timer(1.0)
    assert "- handshake deadline passed" in caplog.text


def test_quiet_logger_formats_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Above DEBUG the sessions emit no records at all."""
    caplog.set_level(logging.INFO, logger=SESSION_LOGGER)
    pair = LinkPair()
    assert not pair.relay.debug
    pair.handshake()
    assert caplog.records == []


def test_sessions_accept_a_bound_logger_adapter(caplog: pytest.LogCaptureFixture) -> None:
    """A per-connection LoggerAdapter works as the session logger."""
    caplog.set_level(logging.DEBUG, logger="test.link")
    adapter = logging.LoggerAdapter(logging.getLogger("test.link"), {"conn_id": "c1"})
    relay = RelaySession(
        relay_id="r", nonce="n", window=1, auth_timeout=1.0, now=0.0, logger=adapter
    )
    relay.close(1000, "bye")
    assert [r.name for r in caplog.records] == ["test.link"]
    assert getattr(caplog.records[0], "conn_id") == "c1"
