"""Random and mutated frames fed to an agent session that asked for batched events (issue 7).

The session must never raise for the peer's input (STYLE §2 rule 2), and whatever it reports
as received keeps the link's order: every seq above the one before it.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.link import CloseCode, EventReceived, LinkState
from tests.unit.test_events_batch import BatchPair

from .strategies import messages
from .support import FUZZ, measured

_CODES = {int(c) for c in CloseCode} | {1000, 1001}


def _feed(delivered: bool, texts: list[str]) -> None:
    pair = BatchPair(window=8)
    pair.handshake()
    if delivered:  # else the sample events frames (seqs 1 and 2) are valid here
        pair.offer_from([(1, {"id": "ev-1"}), (2, {"id": "ev-2"})])
        pair.pump()
    agent = pair.agent
    highest = agent.last_received
    for text in texts:
        agent.receive_message(text, pair.clock.advance(0.001))
        agent.data_to_send()
        for event in agent.events_received():
            if isinstance(event, EventReceived):
                assert event.seq > highest, text
                highest = event.seq
    close = agent.close_requested
    if close is not None:
        assert close.code in _CODES, close
        assert agent.state in (LinkState.CLOSING, LinkState.CLOSED)


def test_random_frames_never_break_a_batching_agent() -> None:
    """Any inbound messages leave a batching agent open or closing with a known code, and
    the events it reports keep increasing."""
    with measured("events") as counter:

        @FUZZ
        @given(delivered=st.booleans(), texts=st.lists(messages, min_size=1, max_size=6))
        def run(delivered: bool, texts: list[str]) -> None:
            counter.examples += 1
            _feed(delivered, texts)

        run()
