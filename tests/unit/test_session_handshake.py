"""Handshake (DESIGN §Link protocol, Auth): hello → challenge → auth → welcome, and refusals."""

from __future__ import annotations

import pytest

from shared import crypto
from shared.errors import InvalidState
from shared.link import (
    AUTHENTICATING,
    CLOSED,
    CLOSING,
    CONNECTING,
    OPEN,
    AgentSession,
    Auth,
    Authenticated,
    AuthFailed,
    Challenge,
    Close,
    CloseCode,
    Closed,
    Error,
    Hello,
    HelloReceived,
    PeerError,
    RelaySession,
    Welcome,
    Welcomed,
    decode,
    encode,
)
from tests.helpers.linkpair import ACCOUNT_ID, AGENT_ID, RELAY_ID, LinkPair, frames_in


def test_handshake_step_by_step() -> None:
    """Each handshake input yields exactly the documented frame, event and state."""
    key = crypto.generate_private_key()
    relay = RelaySession(relay_id=RELAY_ID, nonce="n1", window=8, auth_timeout=10.0, now=0.0)
    agent = AgentSession(
        agent_id=AGENT_ID,
        relay_id=RELAY_ID,
        private_key=key,
        resume_after=5,
        auth_timeout=10.0,
        now=0.0,
        client="agent/1",
    )
    assert (relay.state, agent.state) == (CONNECTING, CONNECTING)
    assert relay.next_deadline() == agent.next_deadline() == 10.0

    [hello] = agent.data_to_send()
    assert decode(hello) == Hello(agent_id=AGENT_ID, resume_after=5, client="agent/1")
    assert agent.events_received() == []

    relay.receive_message(hello, 1.0)
    [challenge] = relay.data_to_send()
    assert decode(challenge) == Challenge(relay_id=RELAY_ID, nonce="n1")
    assert relay.events_received() == [HelloReceived(AGENT_ID, 5, "agent/1")]
    assert relay.state is AUTHENTICATING
    relay.agent_found(crypto.public_key_b64(key), ACCOUNT_ID)

    agent.receive_message(challenge, 2.0)
    [auth] = agent.data_to_send()
    assert agent.state is AUTHENTICATING
    frame = decode(auth)
    assert isinstance(frame, Auth)
    assert crypto.verify_auth(crypto.public_key_b64(key), frame.signature, RELAY_ID, AGENT_ID, "n1")

    relay.receive_message(auth, 3.0)
    [welcome] = relay.data_to_send()
    assert decode(welcome) == Welcome(
        agent_id=AGENT_ID, account_id=ACCOUNT_ID, resume_after=5, window=8
    )
    assert relay.events_received() == [Authenticated(AGENT_ID, ACCOUNT_ID, 5)]
    assert relay.state is OPEN
    assert relay.next_deadline() is None
    assert (relay.last_offered, relay.in_flight, relay.can_offer) == (5, 0, True)

    agent.receive_message(welcome, 4.0)
    assert agent.events_received() == [Welcomed(ACCOUNT_ID, 5, 8)]
    assert agent.state is OPEN
    assert agent.next_deadline() is None
    assert agent.data_to_send() == []
    assert relay.close_requested is None and agent.close_requested is None


def test_handshake_through_link_pair() -> None:
    """The pair reaches OPEN on both sides with one event each."""
    pair = LinkPair(resume_after=3)
    pair.handshake()
    assert pair.relay_events == [
        HelloReceived(AGENT_ID, 3, "linkpair/1"),
        Authenticated(AGENT_ID, ACCOUNT_ID, 3),
    ]
    assert pair.agent_events == [Welcomed(ACCOUNT_ID, 3, 4)]
    assert pair.closed is None


def test_replayed_auth_fails_on_a_new_connection() -> None:
    """An auth frame captured on one link is refused on a link with another nonce."""
    first = LinkPair(nonce="nonce-A")
    first.handshake()
    captured_auth = first.to_relay.written[1]
    assert isinstance(decode(captured_auth), Auth)

    second = LinkPair(key=first.key, nonce="nonce-B", lookup=False)
    relay = second.relay
    relay.receive_message(encode(Hello(agent_id=AGENT_ID)), 0.0)
    relay.agent_found(crypto.public_key_b64(first.key), ACCOUNT_ID)
    relay.events_received()
    relay.data_to_send()
    relay.receive_message(captured_auth, 0.0)

    assert relay.events_received() == [AuthFailed(AGENT_ID, "bad signature")]
    assert frames_in(relay.data_to_send()) == [
        Error(code="unauthorized", message="authentication failed")
    ]
    assert relay.close_requested == Close(CloseCode.UNAUTHORIZED, "authentication failed")
    assert relay.state is CLOSING


def test_wrong_signature_closes_unauthorized() -> None:
    """A key that does not match the enrolled public key is refused with 4401 on both sides."""
    other = crypto.generate_private_key()
    pair = LinkPair(agents={AGENT_ID: (crypto.public_key_b64(other), ACCOUNT_ID)})
    pair.pump()
    assert AuthFailed(AGENT_ID, "bad signature") in pair.relay_events
    assert pair.closed == Close(CloseCode.UNAUTHORIZED, "authentication failed")
    assert pair.agent_events == [
        PeerError("unauthorized", "authentication failed"),
        Closed(CloseCode.UNAUTHORIZED, "authentication failed"),
    ]
    assert (pair.relay.state, pair.agent.state) == (CLOSED, CLOSED)


def test_garbage_public_key_closes_unauthorized() -> None:
    """A registered key that is not a valid Ed25519 key fails like a bad signature."""
    pair = LinkPair(agents={AGENT_ID: ("not-a-key", ACCOUNT_ID)})
    pair.pump()
    assert pair.closed is not None and pair.closed.code == CloseCode.UNAUTHORIZED


def test_unknown_agent_is_challenged_then_closed_unauthorized() -> None:
    """The relay challenges an unknown agent like a known one, then closes 4401."""
    pair = LinkPair(agents={})
    pair.pump()
    assert frames_in(pair.to_agent.written) == [
        Challenge(relay_id=RELAY_ID, nonce="nonce-1"),
        Error(code="unauthorized", message="authentication failed"),
    ]
    assert pair.closed == Close(CloseCode.UNAUTHORIZED, "authentication failed")
    assert any(isinstance(f, Auth) for f in frames_in(pair.to_relay.written))
    assert [type(e) for e in pair.relay_events] == [HelloReceived, AuthFailed, Closed]
    assert pair.relay_events[1] == AuthFailed(AGENT_ID, "unknown or pending agent")
    assert PeerError("unauthorized", "authentication failed") in pair.agent_events


def _refused_pair(kind: str) -> LinkPair:
    """A link whose agent the relay refuses: ``kind`` says why and how the agent signs."""
    stranger = crypto.public_key_b64(crypto.generate_private_key())
    match kind:
        case "unknown":
            return LinkPair(agents={})
        case "revoked-bad-signature":  # the directory holds another key than the agent's
            return LinkPair(
                agents={AGENT_ID: (stranger, ACCOUNT_ID)}, revoked=frozenset({AGENT_ID})
            )
        case "revoked-no-key":
            return LinkPair(agents={}, revoked=frozenset({AGENT_ID}))
        case "bad-signature":
            return LinkPair(agents={AGENT_ID: (stranger, ACCOUNT_ID)})
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["unknown", "revoked-bad-signature", "revoked-no-key", "bad-signature"]
)
def test_agents_without_a_proven_key_get_one_answer(kind: str) -> None:
    """Unknown (or pending: no key either) and revoked agents, and a wrong signature, all see
    the same frames and close: challenge, nothing until auth, then 4401 (docs/protocol.md,
    Handshake)."""
    pair = _refused_pair(kind)
    # The hello is answered with a challenge and no earlier close, whatever the lookup said.
    pair.run_until(lambda: any(isinstance(f, Auth) for f in frames_in(pair.to_relay.written)))
    assert frames_in(pair.to_agent.written) == [Challenge(relay_id=RELAY_ID, nonce="nonce-1")]
    assert pair.relay.close_requested is None and pair.relay.state is AUTHENTICATING
    pair.pump()
    assert frames_in(pair.to_agent.written) == [
        Challenge(relay_id=RELAY_ID, nonce="nonce-1"),
        Error(code="unauthorized", message="authentication failed"),
    ]
    assert pair.closed == Close(CloseCode.UNAUTHORIZED, "authentication failed")


def test_only_a_revoked_agent_that_signs_learns_it_is_revoked() -> None:
    """A revoked agent with a valid signature is told 4403, after its auth."""
    pair = LinkPair(revoked=frozenset({AGENT_ID}))
    pair.run_until(lambda: any(isinstance(f, Auth) for f in frames_in(pair.to_relay.written)))
    assert pair.relay.close_requested is None
    pair.pump()
    assert pair.closed == Close(CloseCode.REVOKED, "agent revoked")
    assert AuthFailed(AGENT_ID, "agent revoked") in pair.relay_events


def test_agent_refused_answers_one_hello() -> None:
    """agent_refused() is the lookup's answer: a second answer is caller misuse."""
    pair = LinkPair(agents={})
    pair.run_until(lambda: pair.relay.state is AUTHENTICATING)
    pair.step()
    with pytest.raises(InvalidState):
        pair.relay.agent_found("key", ACCOUNT_ID)
    with pytest.raises(InvalidState):
        pair.relay.agent_refused(None, revoked=False)


def test_revoked_agent_is_closed_revoked() -> None:
    """A revoked agent gets error{revoked} and close 4403."""
    pair = LinkPair(revoked=frozenset({AGENT_ID}))
    pair.pump()
    assert frames_in(pair.to_agent.written)[-1] == Error(code="revoked", message="agent revoked")
    assert pair.closed == Close(CloseCode.REVOKED, "agent revoked")
    assert PeerError("revoked", "agent revoked") in pair.agent_events
    assert pair.agent.close_requested == Close(CloseCode.REVOKED, "agent revoked")


def test_wrong_relay_identity_is_refused_before_signing() -> None:
    """An agent enrolled with another relay sends no auth and closes 4401."""
    pair = LinkPair(expected_relay_id="relay-elsewhere")
    pair.pump()
    assert pair.agent_events[0] == AuthFailed(AGENT_ID, "unexpected relay identity")
    assert not any(isinstance(f, Auth) for f in frames_in(pair.to_relay.written))
    assert frames_in(pair.to_relay.written)[-1] == Error(
        code="unauthorized", message="unexpected relay identity"
    )
    assert pair.closed == Close(CloseCode.UNAUTHORIZED, "unexpected relay identity")
    assert PeerError("unauthorized", "unexpected relay identity") in pair.relay_events


def test_empty_expected_relay_id_accepts_any_relay() -> None:
    """An agent with no recorded relay identity signs for the relay that challenged it."""
    pair = LinkPair(expected_relay_id="", relay_id="relay-other")
    pair.handshake()


def test_relay_auth_timeout_when_hello_never_arrives() -> None:
    """Without a hello the relay closes with auth_timeout at its deadline."""
    pair = LinkPair(auth_timeout=5.0)
    pair.to_relay.drop = 1
    pair.pump()
    assert pair.relay.close_requested is None
    assert pair.relay.next_deadline() == 5.0
    pair.clock.advance(4.9)
    pair.pump()
    assert pair.relay.state is CONNECTING
    pair.clock.advance(0.1)
    pair.pump()
    assert pair.closed == Close(CloseCode.AUTH_TIMEOUT, "handshake timed out")
    assert frames_in(pair.to_agent.written)[-1] == Error(
        code="auth_timeout", message="handshake timed out"
    )


def test_relay_auth_timeout_while_waiting_for_auth() -> None:
    """A relay that challenged but got no auth closes with auth_timeout."""
    pair = LinkPair(auth_timeout=5.0)
    pair.run_until(lambda: pair.relay.state is AUTHENTICATING)
    pair.to_agent.in_flight.clear()  # the challenge is lost
    pair.pump()
    pair.clock.advance(5.0)
    pair.pump()
    assert pair.closed == Close(CloseCode.AUTH_TIMEOUT, "handshake timed out")


def test_agent_auth_timeout_when_welcome_never_arrives() -> None:
    """An agent whose welcome is lost closes with auth_timeout; the relay learns why."""
    pair = LinkPair(auth_timeout=5.0)
    pair.run_until(lambda: pair.relay.state is OPEN)
    pair.to_agent.in_flight.clear()  # the welcome is lost
    pair.pump()
    assert pair.agent.next_deadline() == 5.0
    pair.clock.advance(5.0)
    pair.pump()
    assert pair.closed == Close(CloseCode.AUTH_TIMEOUT, "handshake timed out")
    assert PeerError("auth_timeout", "handshake timed out") in pair.relay_events
    assert pair.relay.state is CLOSED


def test_late_welcome_loses_to_the_deadline() -> None:
    """A welcome delivered after the deadline closes with auth_timeout instead of opening."""
    pair = LinkPair(auth_timeout=5.0)
    pair.run_until(lambda: pair.relay.state is OPEN)
    [(_, welcome)] = pair.to_agent.in_flight
    pair.agent.receive_message(welcome, 6.0)
    assert pair.agent.state is CLOSING
    assert pair.agent.close_requested == Close(CloseCode.AUTH_TIMEOUT, "handshake timed out")
    assert pair.agent.events_received() == []


def test_timer_before_deadline_does_nothing() -> None:
    """handle_timer before the deadline leaves the session as it was."""
    pair = LinkPair(auth_timeout=5.0)
    pair.relay.handle_timer(4.0)
    pair.agent.handle_timer(4.0)
    assert pair.relay.state is CONNECTING and pair.relay.close_requested is None
    assert pair.agent.state is CONNECTING and pair.agent.close_requested is None


def test_timer_after_open_does_nothing() -> None:
    """Once OPEN there is no deadline and late timer calls are harmless."""
    pair = LinkPair(auth_timeout=5.0)
    pair.handshake()
    pair.relay.handle_timer(100.0)
    pair.agent.handle_timer(100.0)
    assert pair.relay.state is OPEN and pair.agent.state is OPEN


def test_auth_before_lookup_is_caller_misuse() -> None:
    """Feeding auth before agent_found() or close() raises InvalidState."""
    pair = LinkPair(lookup=False)
    with pytest.raises(InvalidState):
        pair.pump()


@pytest.mark.parametrize("twice", [False, True])
def test_agent_found_outside_the_lookup_is_caller_misuse(twice: bool) -> None:
    """agent_found() before a hello, or a second time, raises InvalidState."""
    pair = LinkPair()
    if twice:
        pair.run_until(lambda: pair.relay.state is AUTHENTICATING)
        pair.step()
    with pytest.raises(InvalidState):
        pair.relay.agent_found("key", ACCOUNT_ID)


def test_agent_found_after_close_is_moot() -> None:
    """A lookup that finishes after the link closed changes nothing."""
    pair = LinkPair(lookup=False)
    pair.run_until(lambda: pair.relay.state is AUTHENTICATING)
    pair.relay.close(CloseCode.INTERNAL_ERROR, "store unavailable")
    pair.relay.agent_found("key", ACCOUNT_ID)
    assert pair.relay.state is CLOSING
    assert pair.relay.close_requested == Close(CloseCode.INTERNAL_ERROR, "store unavailable")
