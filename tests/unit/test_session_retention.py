"""The "behind retention" signal (docs/protocol.md, Retention): ``welcome.trimmed_through``."""

from __future__ import annotations

import pytest

from shared import crypto
from shared.link import AgentSession, CloseCode, RelaySession, Welcome, Welcomed, decode, encode
from shared.link.frames import FATAL_CLOSE_CODES
from tests.helpers.linkpair import ACCOUNT_ID, AGENT_ID, RELAY_ID


def handshake(resume_after: int, trimmed_through: int) -> tuple[Welcome, list[object]]:
    """Run one handshake; return the relay's welcome frame and the agent's events."""
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
    relay.agent_found(crypto.public_key_b64(key), ACCOUNT_ID, trimmed_through=trimmed_through)
    [challenge] = relay.data_to_send()
    agent.receive_message(challenge, 2.0)
    [auth] = agent.data_to_send()
    relay.receive_message(auth, 3.0)
    [welcome] = relay.data_to_send()
    agent.receive_message(welcome, 4.0)
    frame = decode(welcome)
    assert isinstance(frame, Welcome)
    return frame, list(agent.events_received())


@pytest.mark.parametrize(("resume_after", "trimmed", "told"), [(5, 9, 9), (5, 5, 0), (9, 5, 0)])
def test_welcome_names_a_hole_only_past_the_resume_point(
    resume_after: int, trimmed: int, told: int
) -> None:
    """trimmed_through reaches the agent only when retention dropped events after its resume
    point; the agent's Welcomed event carries it."""
    welcome, events = handshake(resume_after, trimmed)
    assert welcome.trimmed_through == told and welcome.resume_after == resume_after
    assert events == [Welcomed(ACCOUNT_ID, resume_after, 8, told)]


def test_a_welcome_without_the_field_decodes_as_no_hole() -> None:
    """An older relay omits trimmed_through: the agent reads 0, nothing lost."""
    text = encode(Welcome(agent_id="a", account_id="b", resume_after=3, window=4))
    legacy = text.replace(',"trimmed_through":0', "")
    assert "trimmed_through" not in legacy
    assert decode(legacy) == Welcome(agent_id="a", account_id="b", resume_after=3, window=4)


def test_behind_retention_is_a_retryable_close_code() -> None:
    """4012 is in the private range and not one of the codes that stop the agent."""
    assert int(CloseCode.BEHIND_RETENTION) == 4012
    assert CloseCode.BEHIND_RETENTION not in FATAL_CLOSE_CODES
