"""Replay (docs/operations.md, Replay): ``welcome.replay_after`` and the window rewind."""

from __future__ import annotations

import pytest

from shared import crypto
from shared.errors import LocalProtocolError
from shared.link import (
    Ack,
    AgentSession,
    Authenticated,
    CloseCode,
    EventReceived,
    LinkState,
    ReceiveWindow,
    RelaySession,
    Welcome,
    Welcomed,
    decode,
    encode,
)
from tests.helpers.linkpair import ACCOUNT_ID, AGENT_ID, RELAY_ID


def sessions(resume_after: int) -> tuple[RelaySession, AgentSession, str]:
    """A relay and an agent session with the hello delivered; the agent's public key."""
    key = crypto.generate_private_key()
    relay = RelaySession(relay_id=RELAY_ID, nonce="n1", window=8, auth_timeout=10.0, now=0.0)
    agent = AgentSession(
        agent_id=AGENT_ID,
        relay_id=RELAY_ID,
        private_key=key,
        resume_after=resume_after,
        auth_timeout=10.0,
        now=0.0,
    )
    [hello] = agent.data_to_send()
    relay.receive_message(hello, 1.0)
    relay.events_received()
    return relay, agent, crypto.public_key_b64(key)


def finish_handshake(relay: RelaySession, agent: AgentSession) -> Welcome:
    [challenge] = relay.data_to_send()
    agent.receive_message(challenge, 2.0)
    [auth] = agent.data_to_send()
    relay.receive_message(auth, 3.0)
    [welcome] = relay.data_to_send()
    agent.receive_message(welcome, 4.0)
    frame = decode(welcome)
    assert isinstance(frame, Welcome)
    return frame


def test_replay_sends_again_below_the_resume_point_and_acks_flow() -> None:
    """With replay_after the relay offers seqs from there, the agent accepts and acks them."""
    relay, agent, public_key = sessions(resume_after=10)
    relay.agent_found(public_key, ACCOUNT_ID, replay_after=3)
    welcome = finish_handshake(relay, agent)
    assert (welcome.resume_after, welcome.replay_after) == (10, 3)
    assert relay.events_received() == [Authenticated(AGENT_ID, ACCOUNT_ID, 10, 3)]
    assert agent.events_received() == [Welcomed(ACCOUNT_ID, 10, 8, 0, 3)]
    assert relay.last_offered == 3 and agent.last_received == agent.last_acked == 3
    assert relay.offer(4, {"id": "e4"}) and relay.offer(7, {"id": "e7"})
    for text in relay.data_to_send():
        agent.receive_message(text, 5.0)
    assert agent.events_received() == [
        EventReceived(4, {"id": "e4"}),
        EventReceived(7, {"id": "e7"}),
    ]
    agent.ack(7)
    [ack] = agent.data_to_send()
    assert decode(ack) == Ack(seq=7)
    relay.receive_message(ack, 6.0)
    assert relay.in_flight == 0 and agent.state is LinkState.OPEN


def test_a_welcome_without_replay_leaves_the_field_off_the_wire() -> None:
    """No replay: the welcome has no replay_after and the agent resumes where it said."""
    relay, agent, public_key = sessions(resume_after=5)
    relay.agent_found(public_key, ACCOUNT_ID)
    welcome = finish_handshake(relay, agent)
    assert welcome.replay_after is None
    assert "replay_after" not in encode(welcome)
    assert agent.events_received() == [Welcomed(ACCOUNT_ID, 5, 8, 0, None)]


@pytest.mark.parametrize("replay_after", [-1, 5, 6])
def test_relay_refuses_a_replay_point_not_below_the_resume_point(replay_after: int) -> None:
    """A replay point at or above the agent's resume point, or negative, is the caller's bug."""
    relay, _, public_key = sessions(resume_after=5)
    with pytest.raises(LocalProtocolError):
        relay.agent_found(public_key, ACCOUNT_ID, replay_after=replay_after)


@pytest.mark.parametrize("replay_after", [-1, 5, 9])
def test_agent_refuses_a_welcome_replay_not_below_its_resume_point(replay_after: int) -> None:
    """A relay naming a replay point that would skip events (or a negative one) fails the link."""
    relay, agent, public_key = sessions(resume_after=5)
    relay.agent_found(public_key, ACCOUNT_ID)
    [challenge] = relay.data_to_send()
    agent.receive_message(challenge, 2.0)
    agent.data_to_send()
    bad = Welcome(
        agent_id=AGENT_ID, account_id=ACCOUNT_ID, resume_after=5, window=8,
        replay_after=replay_after,
    )
    agent.receive_message(encode(bad), 3.0)
    assert agent.close_requested is not None
    assert agent.close_requested.code == CloseCode.PROTOCOL_ERROR


def test_without_replay_a_seq_below_the_resume_point_is_still_refused() -> None:
    """The rewind is the replay's alone: an ordinary link still refuses an old seq."""
    relay, agent, public_key = sessions(resume_after=5)
    relay.agent_found(public_key, ACCOUNT_ID)
    finish_handshake(relay, agent)
    event = encode(decode('{"v":1,"type":"event","seq":4,"event":{"id":"e4"}}'))
    agent.receive_message(event, 5.0)
    assert agent.close_requested is not None
    assert agent.close_requested.code == CloseCode.PROTOCOL_ERROR


def test_receive_window_rewind_restarts_receipt_and_acks() -> None:
    """After a rewind, seqs above the new start are accepted and acked afresh."""
    window = ReceiveWindow(start=9)
    window.rewind(2)
    assert (window.highest, window.acked) == (2, 2)
    window.receive(3)
    assert window.ack(3)


@pytest.mark.parametrize("start", [-1, 10])
def test_receive_window_rewind_checks_its_start(start: int) -> None:
    """A negative start or one above what was received is our own bug."""
    window = ReceiveWindow(start=9)
    with pytest.raises(LocalProtocolError):
        window.rewind(start)
