"""Sequence numbers, cumulative acks and the flow window of the link (pure bookkeeping).

A ``seq`` is an event's position in its account's log on the relay: strictly increasing, never
reused, *not* contiguous (DESIGN §Storage: one log per account, several agents per account, so
one agent's view of it has gaps). Nothing here may assume ``seq + 1`` is the next event.

:class:`SendWindow` is the relay's view of one link: the last seq offered, the last seq the agent
acked, and the seqs in between that are in flight. :class:`ReceiveWindow` is the agent's view:
the highest seq received and the last seq acked. Both start at the agent's resume point, the
highest seq its inbox committed (DESIGN §Link protocol, Events: "on reconnect the agent says what
it has and the relay resumes from there").

The classes only keep counts and check order. They raise ``LocalProtocolError`` when our own
side breaks the rules (a bug) and ``RemoteProtocolError`` when the peer does; the session turns
the latter into a clean close.
"""

from __future__ import annotations

from collections import deque

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = ["SendWindow", "ReceiveWindow"]


class SendWindow:
    """Relay side: which offered events are still unacked, bounded by ``size``.

    Args:
        size: most events in flight at once (DESIGN §Link protocol: "a bounded window of unacked
            events gives back-pressure").
        start: the agent's resume point; every offered seq must be above it.

    Raises:
        LocalProtocolError: ``size`` is below 1 or ``start`` is negative.
    """

    def __init__(self, *, size: int, start: int) -> None:
        if size < 1:
            raise LocalProtocolError(f"window size must be at least 1, not {size}")
        if start < 0:
            raise LocalProtocolError(f"resume point must not be negative, not {start}")
        self.size = size
        self.last_offered = start
        """Highest seq handed to the link (the resume point until the first offer)."""
        self.acked = start
        """Highest seq the agent acked on this link (cumulative)."""
        # Seqs offered and not yet acked, oldest first. Never longer than ``size``, so the
        # deque is bounded by construction (STYLE §2 rule 4: no unbounded queues).
        self._in_flight: deque[int] = deque()

    @property
    def in_flight(self) -> int:
        """How many offered events are unacked."""
        return len(self._in_flight)

    @property
    def can_offer(self) -> bool:
        """True while the window has room for one more event."""
        return len(self._in_flight) < self.size

    def offer(self, seq: int) -> bool:
        """Record ``seq`` as sent, if the window has room.

        Returns:
            False when the window is full: the caller keeps the event and offers it again after
            an ack.

        Raises:
            LocalProtocolError: ``seq`` is not above the last offered seq. The relay sends one
                account's log in order (DESIGN §Link protocol, Events), so this is our bug.
        """
        if seq <= self.last_offered:
            raise LocalProtocolError(
                f"offered seq {seq} is not above the last offered seq {self.last_offered}"
            )
        if not self.can_offer:
            return False
        self._in_flight.append(seq)
        self.last_offered = seq
        return True

    def ack(self, seq: int) -> bool:
        """Apply a cumulative ack from the agent.

        Any value between the current ack and the last offered seq is valid, even one that
        names no event of this link: seqs have gaps, and "everything up to N" is still exact.

        Returns:
            True when the ack moved forward; False for a repeated or older ack, which is
            harmless (acks are cumulative, so a late one says nothing new).

        Raises:
            RemoteProtocolError: ``seq`` is above the last offered seq: the agent claims to
                have committed events it was never sent.
        """
        if seq > self.last_offered:
            raise RemoteProtocolError(
                f"ack {seq} is above the last offered seq {self.last_offered}"
            )
        if seq <= self.acked:
            return False
        while self._in_flight and self._in_flight[0] <= seq:
            self._in_flight.popleft()
        self.acked = seq
        return True


class ReceiveWindow:
    """Agent side: the highest seq received, the last seq acked, and the seqs in between
    (received, not yet acked), which the relay's window bounds once ``size`` is known.

    Args:
        start: the resume point, the highest seq the inbox committed.

    Raises:
        LocalProtocolError: ``start`` is negative.
    """

    def __init__(self, *, start: int) -> None:
        if start < 0:
            raise LocalProtocolError(f"resume point must not be negative, not {start}")
        self.highest = start
        """Highest seq received on this link (the resume point until the first event)."""
        self.acked = start
        """Highest seq acked on this link."""
        self.size = 0
        """The relay's window (its ``welcome``); 0 until then, and no bound."""
        self._unacked: deque[int] = deque()

    @property
    def room(self) -> int | None:
        """How many more events the relay may send before our next ack (None: no bound yet)."""
        return self.size - len(self._unacked) if self.size else None

    def receive(self, seq: int) -> None:
        """Record an event from the relay.

        Raises:
            RemoteProtocolError: ``seq`` is not above every seq seen so far. The relay sends in
                increasing order and resumes after the resume point (DESIGN §Link protocol),
                so a repeat or a step back means the relay lost track of the link. Or the
                event is one more than the window: the relay must wait for our ack, and the
                window is what bounds the events we hold before committing them.
        """
        if seq <= self.highest:
            raise RemoteProtocolError(
                f"event seq {seq} is not above the highest seq received {self.highest}"
            )
        if self.room == 0:
            raise RemoteProtocolError("more events than the window allows")
        self.highest = seq
        self._unacked.append(seq)

    def rewind(self, start: int) -> None:
        """Accept the seqs after ``start`` again, even those at or below the resume point:
        the relay replays the account's log from there (docs/operations.md, Replay). Acks
        start over from ``start`` too, so that each replayed batch is acked as it commits.

        Raises:
            LocalProtocolError: ``start`` is negative or above the highest seq received.
        """
        if not 0 <= start <= self.highest:
            raise LocalProtocolError(
                f"cannot rewind to {start}: it must be 0 to the highest seq {self.highest}"
            )
        self.highest = start
        self.acked = start
        self._unacked.clear()

    def ack(self, seq: int) -> bool:
        """Record that everything up to ``seq`` is committed in the inbox.

        Returns:
            True when an ack frame should go out; False for a repeated or older ack.

        Raises:
            LocalProtocolError: ``seq`` is above the highest seq received: acking what we never
                received would make the relay skip it (DESIGN principle 1).
        """
        if seq > self.highest:
            raise LocalProtocolError(
                f"cannot ack seq {seq}: the highest seq received is {self.highest}"
            )
        if seq <= self.acked:
            return False
        self.acked = seq
        while self._unacked and self._unacked[0] <= seq:
            self._unacked.popleft()
        return True
