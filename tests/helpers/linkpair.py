"""LinkPair: a RelaySession and an AgentSession wired through an in-memory link.

The link is two :class:`Wire` objects, one per direction, that can drop, duplicate, reorder,
delay or inject messages (h11's ConnectionPair plus websockets' intercepting connection, moved
into the pure layer). :meth:`LinkPair.pump` plays both I/O layers until nothing moves: it
writes what each session queued, answers the relay's ``HelloReceived`` from a directory of
enrolled agents, fires due timers, delivers one ready message at a time, and closes the
"transport" for both sides once either asks for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from shared import crypto
from shared.link import (
    AgentSession,
    Close,
    Frame,
    HelloReceived,
    LinkEvent,
    LinkSession,
    LinkState,
    RelaySession,
    decode,
)
from tests.helpers.clock import FakeClock

RELAY_ID = "relay-test"
AGENT_ID = "agent-1"
ACCOUNT_ID = "acct-1"


def frames_in(texts: Sequence[str]) -> list[Frame]:
    """Decode messages for assertions."""
    return [decode(text) for text in texts]


class Wire:
    """One direction of the link: messages in flight, oldest first, with delivery times.

    Faults apply to messages as they are written: ``drop`` and ``duplicate`` count down,
    ``delay`` holds messages until the clock reaches their time. Delivery keeps stream order:
    a delayed head holds back everything behind it, as on one TCP connection.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.in_flight: list[tuple[float, str]] = []
        self.written: list[str] = []
        """Every message the sender wrote, before faults."""
        self.delivered: list[str] = []
        """Every message handed to the receiver."""
        self.drop = 0
        self.duplicate = 0
        self.delay = 0.0
        self.tamper: Callable[[str], str] | None = None
        """Rewrites each written message (e.g. to corrupt a field)."""

    def write(self, text: str) -> None:
        self.written.append(text)
        if self.tamper is not None:
            text = self.tamper(text)
        if self.drop:
            self.drop -= 1
            return
        copies = 1
        if self.duplicate:
            self.duplicate -= 1
            copies = 2
        for _ in range(copies):
            self.in_flight.append((self.clock.now + self.delay, text))

    def inject(self, text: str) -> None:
        """Put a raw message in flight, ready now, as if the peer had written it."""
        self.in_flight.append((self.clock.now, text))

    def swap(self) -> None:
        """Reorder: exchange the two oldest messages in flight."""
        if len(self.in_flight) < 2:
            raise AssertionError("swap needs two messages in flight")
        self.in_flight[0], self.in_flight[1] = self.in_flight[1], self.in_flight[0]

    def pop_ready(self) -> str | None:
        if self.in_flight and self.in_flight[0][0] <= self.clock.now:
            text = self.in_flight.pop(0)[1]
            self.delivered.append(text)
            return text
        return None

    def flush_all(self) -> list[str]:
        """Everything in flight, delays ignored (what a closing side wrote before its close)."""
        texts = [text for _, text in self.in_flight]
        self.in_flight.clear()
        self.delivered.extend(texts)
        return texts


class LinkPair:
    """Both ends of one link plus the directory the relay's I/O layer would consult.

    Args:
        clock: shared clock; a new one at 0.0 by default.
        key: the agent's private key; a new one by default.
        resume_after: the agent's resume point (its inbox's highest committed seq).
        window: the relay's window.
        nonce: this connection's challenge nonce.
        expected_relay_id: the relay id the agent enrolled with (``RELAY_ID`` by default).
        agents: agent id → (public key, account id); by default just this agent.
        revoked: agent ids the relay refuses with REVOKED.
        lookup: answer ``HelloReceived`` automatically (False: the test does it).
    """

    def __init__(
        self,
        *,
        clock: FakeClock | None = None,
        key: crypto.Ed25519PrivateKey | None = None,
        agent_id: str = AGENT_ID,
        relay_id: str = RELAY_ID,
        expected_relay_id: str = RELAY_ID,
        resume_after: int = 0,
        window: int = 4,
        auth_timeout: float = 10.0,
        nonce: str = "nonce-1",
        agents: dict[str, tuple[str, str]] | None = None,
        revoked: frozenset[str] = frozenset(),
        lookup: bool = True,
    ) -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.key = key if key is not None else crypto.generate_private_key()
        self.agents = (
            agents
            if agents is not None
            else {agent_id: (crypto.public_key_b64(self.key), ACCOUNT_ID)}
        )
        self.revoked = revoked
        self.lookup = lookup
        self.auth_timeout = auth_timeout
        self.relay = RelaySession(
            relay_id=relay_id,
            nonce=nonce,
            window=window,
            auth_timeout=auth_timeout,
            now=self.clock.now,
        )
        self.agent = AgentSession(
            agent_id=agent_id,
            relay_id=expected_relay_id,
            private_key=self.key,
            resume_after=resume_after,
            auth_timeout=auth_timeout,
            now=self.clock.now,
            client="linkpair/1",
        )
        self.to_relay = Wire(self.clock)
        self.to_agent = Wire(self.clock)
        self.relay_events: list[LinkEvent] = []
        self.agent_events: list[LinkEvent] = []
        self.closed: Close | None = None
        """The close the transport ended with, once it did."""

    # -- driving ---------------------------------------------------------------------------

    def pump(self, limit: int = 1000) -> None:
        """Step until nothing moves; fail if the link is still busy after ``limit`` steps."""
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError(f"link still busy after {limit} steps")

    def step(self) -> bool:
        """Make one move (a timer, a delivery or the transport close); False if none was due."""
        now = self.clock.now
        for session in (self.relay, self.agent):
            deadline = session.next_deadline()
            if deadline is not None and deadline <= now:
                session.handle_timer(now)
        self._collect()
        if self.closed is not None:
            return False
        for session in (self.relay, self.agent):
            if session.close_requested is not None:
                self._close_transport(session.close_requested, closer=session)
                return True
        for wire, receiver in ((self.to_relay, self.relay), (self.to_agent, self.agent)):
            text = wire.pop_ready()
            if text is not None:
                receiver.receive_message(text, now)
                return True
        return False

    def run_until(self, done: Callable[[], bool], limit: int = 1000) -> None:
        """Step until ``done()`` holds; fail if it does not within ``limit`` steps."""
        for _ in range(limit):
            self._collect()  # what the sessions queued is on the wires when done() holds
            if done():
                return
            if not self.step():
                break
        raise AssertionError("condition not reached")

    def handshake(self) -> None:
        """Pump until both sides are OPEN (fails otherwise)."""
        self.pump()
        assert self.relay.state is LinkState.OPEN, self.relay.close_requested
        assert self.agent.state is LinkState.OPEN, self.agent.close_requested

    def offer_from(self, log: Sequence[tuple[int, dict[str, Any]]]) -> int:
        """Offer the log's events after ``last_offered`` while the window has room.

        This is what the relay pump does with its store; returns how many were offered.
        """
        offered = 0
        for seq, event in log:
            if seq <= self.relay.last_offered:
                continue
            if not self.relay.offer(seq, event):
                break
            offered += 1
        return offered

    def drop_transport(self, code: int | None = None, reason: str = "") -> None:
        """The connection dies (no close frame by default); both sides learn it."""
        self._collect()
        self.closed = Close(code if code is not None else 1006, reason)
        for session in (self.relay, self.agent):
            session.receive_closed(code, reason, self.clock.now)
        self._collect()

    def reconnect(self, *, resume_after: int, nonce: str, **kwargs: Any) -> LinkPair:
        """A fresh pair for the next connection: same clock, key and directory."""
        return LinkPair(
            clock=self.clock,
            key=self.key,
            agents=self.agents,
            revoked=self.revoked,
            resume_after=resume_after,
            nonce=nonce,
            auth_timeout=self.auth_timeout,
            **kwargs,
        )

    def take_relay_events(self) -> list[LinkEvent]:
        events, self.relay_events = self.relay_events, []
        return events

    def take_agent_events(self) -> list[LinkEvent]:
        events, self.agent_events = self.agent_events, []
        return events

    # -- the two I/O layers ----------------------------------------------------------------

    def _collect(self) -> None:
        for text in self.relay.data_to_send():
            self.to_agent.write(text)
        for text in self.agent.data_to_send():
            self.to_relay.write(text)
        for event in self.relay.events_received():
            self.relay_events.append(event)
            if isinstance(event, HelloReceived) and self.lookup:
                self._look_up(event.agent_id)
        self.agent_events.extend(self.agent.events_received())
        # A lookup may have queued an error frame.
        for text in self.relay.data_to_send():
            self.to_agent.write(text)

    def _look_up(self, agent_id: str) -> None:
        # What relay_server/agent_ws.py does: refused agents wait for auth like the others.
        known = self.agents.get(agent_id)
        if agent_id in self.revoked:
            self.relay.agent_refused(known[0] if known else None, revoked=True)
        elif known is not None:
            self.relay.agent_found(*known)
        else:
            self.relay.agent_refused(None, revoked=False)

    def _close_transport(self, close: Close, *, closer: LinkSession) -> None:
        # WebSocket order: the closing side's frames arrive before its close frame; frames
        # travelling the other way are lost with the connection.
        peer: LinkSession
        if closer is self.relay:
            outgoing, peer, back = self.to_agent, self.agent, self.to_relay
        else:
            outgoing, peer, back = self.to_relay, self.relay, self.to_agent
        for text in outgoing.flush_all():
            peer.receive_message(text, self.clock.now)
        back.in_flight.clear()
        self.closed = close
        for session in (self.relay, self.agent):
            session.receive_closed(close.code, close.reason, self.clock.now)
        self._collect()
