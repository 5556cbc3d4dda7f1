"""Heartbeat frames (issue 6: "connected but receiving nothing"; docs/protocol.md, Heartbeat)."""

from __future__ import annotations

import logging

import pytest

from relay_agent.link import StallWatch
from shared.errors import InvalidState, LocalProtocolError, RemoteProtocolError
from shared.link import OPEN, CloseCode, EventReceived, decode
from shared.link.frames import Heartbeat, encode
from shared.link.session import HeartbeatReceived
from tests.helpers.linkpair import LinkPair, frames_in


def test_heartbeat_reaches_the_agent_as_an_event() -> None:
    """The relay's heartbeat arrives as HeartbeatReceived with its head; the link stays OPEN."""
    pair = LinkPair()
    pair.handshake()
    pair.take_agent_events()
    pair.relay.send_heartbeat(42)
    pair.pump()
    assert frames_in(pair.to_agent.delivered[-1:]) == [Heartbeat(head=42)]
    assert pair.take_agent_events() == [HeartbeatReceived(42)]
    assert pair.agent.state is OPEN and pair.relay.state is OPEN


def test_agent_reports_what_it_received_and_acked() -> None:
    """last_received and last_acked start at the resume point and follow events and acks."""
    pair = LinkPair(resume_after=5)
    pair.handshake()
    assert (pair.agent.last_received, pair.agent.last_acked) == (5, 5)
    pair.relay.offer(7, {"id": "e7"})
    pair.relay.offer(9, {"id": "e9"})
    pair.pump()
    assert [e.seq for e in pair.take_agent_events() if isinstance(e, EventReceived)] == [7, 9]
    assert (pair.agent.last_received, pair.agent.last_acked) == (9, 5)
    pair.agent.ack(7)
    assert (pair.agent.last_received, pair.agent.last_acked) == (9, 7)


def test_heartbeat_before_open_is_refused_by_the_relay_session() -> None:
    """send_heartbeat is the relay's app call: InvalidState before the handshake ends."""
    pair = LinkPair()
    with pytest.raises(InvalidState):
        pair.relay.send_heartbeat(1)


def test_negative_head_is_a_local_bug() -> None:
    """A negative head is our own bug, refused at once."""
    pair = LinkPair()
    pair.handshake()
    with pytest.raises(LocalProtocolError):
        pair.relay.send_heartbeat(-1)


def test_heartbeat_is_moot_once_closing() -> None:
    """A heartbeat racing the close sends nothing and does not raise."""
    pair = LinkPair()
    pair.handshake()
    pair.relay.close(1000, "bye")
    pair.relay.data_to_send()
    pair.relay.send_heartbeat(3)
    assert pair.relay.data_to_send() == []


def test_agent_refuses_a_negative_head_from_the_relay() -> None:
    """A heartbeat with a negative head is the relay's protocol error: close 4000."""
    pair = LinkPair()
    pair.handshake()
    pair.to_agent.inject('{"v":1,"type":"heartbeat","head":-1}')
    pair.pump()
    assert pair.agent.error is not None
    assert pair.closed is not None and pair.closed.code == CloseCode.PROTOCOL_ERROR
    assert not [e for e in pair.take_agent_events() if isinstance(e, HeartbeatReceived)]


def test_relay_refuses_a_heartbeat_from_the_agent() -> None:
    """Heartbeats flow relay → agent only; one from an agent is a protocol error."""
    pair = LinkPair()
    pair.handshake()
    pair.to_relay.inject(encode(Heartbeat(head=1)))
    pair.pump()
    assert pair.closed is not None and pair.closed.code == CloseCode.PROTOCOL_ERROR


def test_heartbeat_before_welcome_is_refused_by_the_agent() -> None:
    """A heartbeat is only allowed on an OPEN link."""
    pair = LinkPair()
    pair.to_agent.inject(encode(Heartbeat(head=1)))
    pair.pump()
    assert pair.closed is not None and pair.closed.code == CloseCode.PROTOCOL_ERROR
    assert pair.agent.error is not None


def test_debug_log_names_the_heartbeat_head(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG both sides log the heartbeat with its head, as for other frames."""
    caplog.set_level(logging.DEBUG, logger="shared.link.session")
    pair = LinkPair()
    pair.handshake()
    pair.relay.send_heartbeat(12)
    pair.pump()
    lines = [r.getMessage() for r in caplog.records]
    assert "> heartbeat head=12" in lines and "< heartbeat head=12" in lines


def test_heartbeat_frame_round_trips_and_needs_an_integer_head() -> None:
    """The codec writes {"type": "heartbeat", "head": N} and refuses a missing or bad head."""
    assert decode(encode(Heartbeat(head=7))) == Heartbeat(head=7)
    for text in ('{"v":1,"type":"heartbeat"}', '{"v":1,"type":"heartbeat","head":"7"}',
                 '{"v":1,"type":"heartbeat","head":true}'):
        with pytest.raises(RemoteProtocolError):
            decode(text)


def test_stalled_close_code_sends_its_name() -> None:
    """The agent's stall close (4013) is explained by an error frame named "stalled"."""
    pair = LinkPair()
    pair.handshake()
    pair.agent.close(CloseCode.STALLED, "relay sends nothing")
    pair.pump()
    assert pair.closed is not None and pair.closed.code == 4013
    assert '"code":"stalled"' in pair.to_relay.delivered[-1]


# -- the agent's judgement of heartbeats (relay_agent.link.StallWatch, pure) -------------------


def test_stall_starts_when_behind_with_everything_acked_and_ends_on_progress() -> None:
    """Behind with all acked starts the clock once; an event or a caught-up beat stops it."""
    watch = StallWatch(30.0)
    watch.heartbeat(10, received=5, acked=5, now=100.0)
    watch.heartbeat(12, received=5, acked=5, now=115.0)
    assert watch.deadline() == 130.0  # measured from the first beat that was ahead
    watch.progressed()
    assert watch.deadline() is None
    watch.heartbeat(12, received=5, acked=5, now=120.0)
    watch.heartbeat(12, received=12, acked=12, now=135.0)
    assert watch.deadline() is None


def test_no_stall_while_the_agent_itself_holds_acks_back() -> None:
    """Unacked events mean our inbox is the bottleneck (window full): not the relay's stall."""
    watch = StallWatch(30.0)
    watch.heartbeat(20, received=8, acked=3, now=100.0)
    assert watch.deadline() is None


def test_stall_watch_without_timeout_never_fires() -> None:
    """link.stall_timeout = none disables the judgement."""
    watch = StallWatch(None)
    watch.heartbeat(20, received=1, acked=1, now=100.0)
    assert watch.deadline() is None
