"""Seq/window bookkeeping: gaps in seqs, cumulative acks, bounds, and who is at fault."""

from __future__ import annotations

import pytest

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.link.window import ReceiveWindow, SendWindow


def test_send_window_starts_at_the_resume_point() -> None:
    """Nothing is in flight and both marks sit at the agent's resume point."""
    window = SendWindow(size=2, start=10)
    assert (window.last_offered, window.acked, window.in_flight) == (10, 10, 0)
    assert window.can_offer


def test_send_window_refuses_when_full() -> None:
    """offer returns False once size events are unacked, and records nothing."""
    window = SendWindow(size=2, start=0)
    assert window.offer(3) and window.offer(9)
    assert not window.can_offer
    assert window.offer(12) is False
    assert (window.last_offered, window.in_flight) == (9, 2)


def test_send_window_ack_frees_every_slot_up_to_it() -> None:
    """A cumulative ack between two offered seqs frees exactly the seqs at or below it."""
    window = SendWindow(size=3, start=0)
    for seq in (2, 5, 9):
        window.offer(seq)
    assert window.ack(7) is True
    assert (window.acked, window.in_flight) == (7, 1)
    assert window.ack(9) is True
    assert window.in_flight == 0


def test_send_window_ignores_stale_acks() -> None:
    """A repeated or older ack changes nothing and says so."""
    window = SendWindow(size=3, start=4)
    window.offer(5)
    assert window.ack(4) is False
    window.ack(5)
    assert window.ack(5) is False
    assert window.acked == 5


def test_send_window_ack_beyond_last_offered_is_the_peers_fault() -> None:
    """Acking a seq never offered raises RemoteProtocolError."""
    window = SendWindow(size=3, start=0)
    window.offer(5)
    with pytest.raises(RemoteProtocolError):
        window.ack(6)


@pytest.mark.parametrize("seq", [0, 4, 5])
def test_send_window_offer_out_of_order_is_our_fault(seq: int) -> None:
    """Offering a seq not above the last offered (or the resume point) is a local bug."""
    window = SendWindow(size=3, start=4)
    window.offer(5)
    with pytest.raises(LocalProtocolError):
        window.offer(seq)


@pytest.mark.parametrize(("size", "start"), [(0, 0), (-1, 0), (1, -1)])
def test_send_window_rejects_bad_arguments(size: int, start: int) -> None:
    """A window below 1 or a negative resume point is refused."""
    with pytest.raises(LocalProtocolError):
        SendWindow(size=size, start=start)


def test_receive_window_accepts_increasing_seqs_with_gaps() -> None:
    """Seqs only have to increase; gaps are normal."""
    window = ReceiveWindow(start=3)
    window.receive(4)
    window.receive(40)
    assert window.highest == 40


@pytest.mark.parametrize("seq", [3, 2, 0])
def test_receive_window_repeat_or_step_back_is_the_peers_fault(seq: int) -> None:
    """A seq at or below the resume point or the last one received is refused."""
    window = ReceiveWindow(start=3)
    with pytest.raises(RemoteProtocolError):
        window.receive(seq)


def test_receive_window_ack_moves_forward_only() -> None:
    """ack returns True once per new high mark and False for repeats or lower values."""
    window = ReceiveWindow(start=0)
    window.receive(5)
    window.receive(8)
    assert window.ack(6) is True
    assert window.ack(6) is False
    assert window.ack(5) is False
    assert window.ack(8) is True
    assert window.acked == 8


def test_receive_window_ack_beyond_received_is_our_fault() -> None:
    """Acking what never arrived would lose events, so it raises LocalProtocolError."""
    window = ReceiveWindow(start=2)
    with pytest.raises(LocalProtocolError):
        window.ack(3)


def test_receive_window_rejects_negative_start() -> None:
    """A negative resume point is refused."""
    with pytest.raises(LocalProtocolError):
        ReceiveWindow(start=-1)
