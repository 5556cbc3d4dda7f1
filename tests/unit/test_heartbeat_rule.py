"""The relay's heartbeat rule: which rounds send a ``heartbeat`` frame to a link, with which head
(docs/protocol.md, Heartbeat; ``relay_server.hub.HeartbeatRule``)."""

from __future__ import annotations

from relay_agent.link import StallWatch
from relay_server.hub import HeartbeatRule


def test_an_agent_that_acked_everything_gets_no_frame() -> None:
    """Nothing in flight and the sender scanned through the head: every round is skipped,
    however the log grows with events not for this link (routing)."""
    rule = HeartbeatRule()
    for head in (10, 10, 25, 40):
        assert rule.due(head, scanned=head, offered=10, in_flight=0) is None


def test_events_in_flight_are_announced_up_to_the_last_offered() -> None:
    """Unacked events: the frame names the last seq offered, every round."""
    rule = HeartbeatRule()
    assert rule.due(12, scanned=12, offered=12, in_flight=2) == 12
    assert rule.due(12, scanned=12, offered=12, in_flight=2) == 12


def test_a_stuck_sender_is_announced_from_the_second_round() -> None:
    """The sender gets a whole interval: the head read in one round is announced in the next
    only if the sender still has not scanned that far."""
    rule = HeartbeatRule()
    assert rule.due(20, scanned=5, offered=5, in_flight=0) is None  # first round: no past head
    assert rule.due(20, scanned=5, offered=5, in_flight=0) == 20
    assert rule.due(30, scanned=5, offered=5, in_flight=0) == 20
    assert rule.due(30, scanned=5, offered=5, in_flight=0) == 30


def test_a_busy_sender_that_catches_up_within_the_interval_is_not_announced() -> None:
    rule = HeartbeatRule()
    assert rule.due(20, scanned=5, offered=5, in_flight=0) is None
    assert rule.due(40, scanned=20, offered=20, in_flight=0) is None
    assert rule.due(40, scanned=40, offered=20, in_flight=0) is None


def test_after_an_announcement_one_more_frame_ends_the_stall() -> None:
    """Once caught up, the next round still sends (it ends a stall the earlier frame may have
    started at the agent); the rounds after it are skipped."""
    rule = HeartbeatRule()
    rule.due(20, scanned=5, offered=5, in_flight=0)
    assert rule.due(20, scanned=5, offered=5, in_flight=0) == 20
    assert rule.due(20, scanned=20, offered=20, in_flight=0) == 20
    assert rule.due(20, scanned=20, offered=20, in_flight=0) is None


def test_skipped_frames_never_change_the_agents_verdict() -> None:
    """Against the agent's real StallWatch: over a run of rounds, applying only the frames
    the rule sends leaves the agent stalled exactly when applying every frame would."""
    # (head read, scanned, offered, in flight, agent received, agent acked) per round.
    rounds = [
        (10, 10, 10, 0, 10, 10),
        (15, 10, 10, 0, 10, 10),  # new events; the sender has not looked yet
        (15, 10, 10, 0, 10, 10),  # still not: stuck
        (15, 15, 15, 3, 15, 12),  # it moved; the agent has not acked all
        (15, 15, 15, 0, 15, 15),
        (15, 15, 15, 0, 15, 15),
        (30, 30, 15, 0, 15, 15),  # routed: passed over events not for the agent
        (30, 30, 15, 0, 15, 15),
    ]
    rule = HeartbeatRule()
    every, sent = StallWatch(100.0), StallWatch(100.0)
    previous: int | None = None
    for now, (head, scanned, offered, in_flight, received, acked) in enumerate(rounds):
        full = previous if previous is not None and previous > scanned else offered
        previous = head
        every.heartbeat(full, received=received, acked=acked, now=float(now))
        due = rule.due(head, scanned=scanned, offered=offered, in_flight=in_flight)
        if due is not None:
            assert due == full
            sent.heartbeat(due, received=received, acked=acked, now=float(now))
        assert sent.since == every.since, f"round {now}"
    assert every.since is None
