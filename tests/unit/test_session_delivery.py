"""Events, acks, the window and resume (DESIGN §Link protocol, Events; principle 1)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import InvalidState, LocalProtocolError
from shared.link import (
    CLOSING,
    OPEN,
    Ack,
    Acked,
    Authenticated,
    Close,
    CloseCode,
    Event,
    EventReceived,
    PeerError,
)
from tests.helpers.linkpair import LinkPair, frames_in


def _log(*seqs: int) -> list[tuple[int, dict[str, Any]]]:
    """One account's log as the relay store would give it: seqs with gaps, stable ids."""
    return [(seq, {"id": f"ev-{seq}", "type": "sms", "params": {"n": str(seq)}}) for seq in seqs]


def _received(events: list[Any]) -> list[int]:
    return [e.seq for e in events if isinstance(e, EventReceived)]


def _has_room(pair: LinkPair) -> bool:
    return pair.relay.can_offer


def test_events_and_cumulative_ack() -> None:
    """Offered events arrive in order with their seqs; one ack frees them all."""
    pair = LinkPair(window=8)
    pair.handshake()
    pair.take_agent_events()
    log = _log(2, 3, 7)
    assert pair.offer_from(log) == 3
    assert pair.relay.in_flight == 3 and pair.relay.last_offered == 7
    pair.pump()
    assert pair.take_agent_events() == [EventReceived(seq, event) for seq, event in log]

    pair.agent.ack(7)
    pair.pump()
    assert pair.take_relay_events()[-1] == Acked(7)
    assert pair.relay.in_flight == 0
    assert frames_in(pair.to_relay.written)[-1] == Ack(seq=7)


def test_ack_naming_a_gap_frees_up_to_it() -> None:
    """An ack between two offered seqs is valid and frees only the seqs at or below it."""
    pair = LinkPair(window=8)
    pair.handshake()
    pair.offer_from(_log(2, 5, 9))
    pair.pump()
    pair.agent.ack(6)
    pair.pump()
    assert pair.relay_events[-1] == Acked(6)
    assert pair.relay.in_flight == 1


def test_repeated_and_lower_acks_send_nothing() -> None:
    """The agent sends one ack per new high mark; repeats and lower values are no-ops."""
    pair = LinkPair(window=8)
    pair.handshake()
    pair.offer_from(_log(1, 2, 3))
    pair.pump()
    pair.agent.ack(2)
    pair.agent.ack(2)
    pair.agent.ack(1)
    pair.agent.ack(3)
    pair.pump()
    assert [f for f in frames_in(pair.to_relay.written) if isinstance(f, Ack)] == [
        Ack(seq=2),
        Ack(seq=3),
    ]


def test_window_full_offer_returns_false_until_acked() -> None:
    """With the window full offer() refuses; an ack makes room again (back-pressure)."""
    pair = LinkPair(window=2)
    pair.handshake()
    log = _log(1, 2, 3, 4)
    assert pair.relay.offer(*log[0]) and pair.relay.offer(*log[1])
    assert not _has_room(pair)
    assert pair.relay.offer(*log[2]) is False
    pair.pump()
    assert _received(pair.take_agent_events()) == [1, 2]

    pair.agent.ack(1)
    pair.pump()
    assert _has_room(pair) and pair.relay.in_flight == 1
    assert pair.offer_from(log) == 1
    assert not _has_room(pair)
    pair.pump()
    assert _received(pair.take_agent_events()) == [3]


def test_offer_seq_not_above_last_offered_is_caller_misuse() -> None:
    """Offering a seq at or below the last offered one raises LocalProtocolError."""
    pair = LinkPair(resume_after=10)
    pair.handshake()
    with pytest.raises(LocalProtocolError):
        pair.relay.offer(10, {"id": "old"})
    pair.relay.offer(11, {"id": "e"})
    with pytest.raises(LocalProtocolError):
        pair.relay.offer(11, {"id": "e"})


def test_offer_before_open_is_caller_misuse() -> None:
    """offer() during the handshake raises InvalidState; can_offer is False."""
    pair = LinkPair()
    assert not pair.relay.can_offer
    with pytest.raises(InvalidState):
        pair.relay.offer(1, {})


def test_offer_after_close_returns_false() -> None:
    """Once the link is closing, offer() sends nothing and returns False."""
    pair = LinkPair()
    pair.handshake()
    pair.relay.close(1000, "bye")
    assert not pair.relay.can_offer
    assert pair.relay.offer(1, {}) is False
    assert pair.relay.data_to_send() == []


def test_ack_beyond_last_offered_fails_the_link() -> None:
    """An ack for a seq never offered is a protocol error, not an exception."""
    pair = LinkPair()
    pair.handshake()
    pair.offer_from(_log(4))
    pair.pump()
    pair.relay.receive_message('{"v":1,"type":"ack","seq":5}', pair.clock.now)
    assert pair.relay.state is CLOSING
    assert pair.relay.error is not None
    assert pair.relay.close_requested is not None
    assert pair.relay.close_requested.code == CloseCode.PROTOCOL_ERROR


def test_agent_ack_of_unreceived_seq_is_caller_misuse() -> None:
    """The agent may not ack above what it received: that would lose events."""
    pair = LinkPair()
    pair.handshake()
    pair.offer_from(_log(4))
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.agent.ack(5)


def test_agent_ack_before_open_is_caller_misuse() -> None:
    """ack() during the handshake raises InvalidState."""
    pair = LinkPair()
    with pytest.raises(InvalidState):
        pair.agent.ack(0)


def test_agent_ack_after_close_is_moot() -> None:
    """An ack after the link began closing sends nothing (resume covers it)."""
    pair = LinkPair()
    pair.handshake()
    pair.offer_from(_log(1))
    pair.pump()
    pair.agent.close(1000, "bye")
    pair.agent.data_to_send()
    pair.agent.ack(1)
    assert pair.agent.data_to_send() == []


def test_resume_after_reconnect_loses_nothing() -> None:
    """Across a dropped link every event reaches the inbox; re-sent ones keep their seq."""
    log = _log(2, 3, 7, 8, 11, 15, 16)
    inbox: dict[int, dict[str, Any]] = {}
    seen: list[tuple[int, dict[str, Any]]] = []

    pair = LinkPair(window=4)
    pair.handshake()
    pair.offer_from(log)
    pair.pump()
    received = [e for e in pair.take_agent_events() if isinstance(e, EventReceived)]
    seen += [(e.seq, e.event) for e in received]
    # The inbox commits the first two, acks, and the link dies before the rest commit.
    for e in received[:2]:
        inbox[e.seq] = e.event
    pair.agent.ack(3)
    pair.pump()
    assert pair.relay_events[-1] == Acked(3)
    pair.drop_transport()
    assert pair.relay.state.name == pair.agent.state.name == "CLOSED"

    resume = max(inbox)
    second = pair.reconnect(resume_after=resume, nonce="nonce-2")
    second.handshake()
    assert second.relay_events[-1] == Authenticated("agent-1", "acct-1", 3)
    for _ in range(len(log)):
        second.offer_from(log)
        second.pump()
        events = [e for e in second.take_agent_events() if isinstance(e, EventReceived)]
        if not events:
            break
        seen += [(e.seq, e.event) for e in events]
        for e in events:
            inbox[e.seq] = e.event
        second.agent.ack(events[-1].seq)
        second.pump()

    assert inbox == dict(log)
    assert second.relay.in_flight == 0 and second.relay.last_offered == 16
    # Duplicates are exactly the uncommitted events, re-sent with the same seq and body.
    duplicates = [item for item in seen if seen.count(item) > 1]
    assert sorted({seq for seq, _ in duplicates}) == [7, 8]
    assert len({seq for seq, _ in seen}) == len(log)


def test_duplicated_event_fails_the_link_cleanly() -> None:
    """An event delivered twice is a protocol error on the agent, never an exception."""
    pair = LinkPair()
    pair.handshake()
    pair.to_agent.duplicate = 1
    pair.offer_from(_log(1))
    pair.pump()
    assert _received(pair.agent_events) == [1]
    assert pair.agent.error is not None
    assert pair.closed == Close(CloseCode.PROTOCOL_ERROR, pair.agent.error.message)
    assert PeerError("protocol_error", pair.agent.error.message) in pair.relay_events


def test_reordered_events_fail_the_link_cleanly() -> None:
    """Events arriving out of order close the link with protocol_error."""
    pair = LinkPair()
    pair.handshake()
    pair.offer_from(_log(1, 2))
    pair.run_until(lambda: len(pair.to_agent.in_flight) == 2)
    pair.to_agent.swap()
    pair.pump()
    assert _received(pair.agent_events) == [2]
    assert pair.closed is not None and pair.closed.code == CloseCode.PROTOCOL_ERROR


def test_reordered_and_duplicated_acks_are_harmless() -> None:
    """A late or repeated cumulative ack is ignored; the link stays open."""
    pair = LinkPair(window=8)
    pair.handshake()
    pair.offer_from(_log(1, 2))
    pair.pump()
    pair.to_relay.duplicate = 1
    pair.agent.ack(1)
    pair.agent.ack(2)
    pair.run_until(lambda: len(pair.to_relay.in_flight) == 3)
    pair.to_relay.in_flight.reverse()  # ack 2, then ack 1 twice
    pair.pump()
    assert [e for e in pair.relay_events if isinstance(e, Acked)] == [Acked(2)]
    assert pair.relay.state is OPEN and pair.closed is None
    assert pair.relay.in_flight == 0


def test_dropped_ack_is_covered_by_the_next_one() -> None:
    """Acks are cumulative, so losing one only delays freeing the window."""
    pair = LinkPair(window=2)
    pair.handshake()
    pair.offer_from(_log(1, 2))
    pair.pump()
    pair.to_relay.drop = 1
    pair.agent.ack(1)
    pair.pump()
    assert pair.relay.in_flight == 2
    pair.agent.ack(2)
    pair.pump()
    assert pair.relay.in_flight == 0
    assert [e for e in pair.relay_events if isinstance(e, Acked)] == [Acked(2)]


def test_delayed_events_arrive_in_order_after_the_delay() -> None:
    """A slow link only delays delivery; order and content are kept."""
    pair = LinkPair(window=8)
    pair.handshake()
    pair.to_agent.delay = 2.0
    pair.offer_from(_log(1, 2, 3))
    pair.pump()
    assert _received(pair.agent_events) == []
    pair.clock.advance(2.0)
    pair.pump()
    assert _received(pair.agent_events) == [1, 2, 3]
    assert pair.agent.state is OPEN


def test_event_frame_carries_the_event_untouched() -> None:
    """The relay writes the event object as given, unknown params included."""
    pair = LinkPair()
    pair.handshake()
    event = {"id": "x", "params": {"unknown_param": "kept"}, "request": {"body_b64": "AA=="}}
    pair.relay.offer(1, event)
    pair.pump()
    assert frames_in(pair.to_agent.written)[-1] == Event(seq=1, event=event)
    assert pair.agent_events[-1] == EventReceived(1, event)
