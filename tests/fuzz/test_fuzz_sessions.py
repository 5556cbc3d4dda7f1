"""Random and mutated frames fed straight to the sans-I/O sessions (issue 6, fuzzing).

STYLE §2 rule 2: peer faults never raise out of ``receive_message``; they set ``error``,
queue an ``error`` frame and ``close_requested``, and further input is ignored. Each example
drives a fresh :class:`~tests.helpers.linkpair.LinkPair`, before or after the handshake.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.link import CloseCode, LinkState
from tests.helpers.linkpair import LinkPair

from .strategies import messages
from .support import FUZZ, measured

_CODES = {int(c) for c in CloseCode} | {1000, 1001}


def _feed(side: str, handshake: bool, texts: list[str]) -> None:
    pair = LinkPair()
    if handshake:
        pair.handshake()
        pair.offer_from([(1, {"id": "ev-1"})])
        pair.pump()
    session = pair.relay if side == "relay" else pair.agent
    for text in texts:
        was_closing = session.close_requested is not None
        session.receive_message(text, pair.clock.advance(0.001))
        sent, events = session.data_to_send(), session.events_received()
        if was_closing:
            # Once closing, further input is ignored (docs/protocol.md, session API).
            assert (sent, events) == ([], []), text
    close = session.close_requested
    if close is not None:
        assert close.code in _CODES, close
        assert session.state in (LinkState.CLOSING, LinkState.CLOSED)
    session.receive_closed(1006, "", pair.clock.advance(0.001))
    session.events_received()
    assert session.state is LinkState.CLOSED


def test_random_frames_never_raise_out_of_the_sessions() -> None:
    """Any sequence of inbound messages, on either side, before or after the handshake,
    leaves the session open or closing with a known code; nothing raises."""
    with measured("sessions") as counter:

        @FUZZ
        @given(
            side=st.sampled_from(["relay", "agent"]),
            handshake=st.booleans(),
            texts=st.lists(messages, min_size=1, max_size=6),
        )
        def run(side: str, handshake: bool, texts: list[str]) -> None:
            counter.examples += 1
            _feed(side, handshake, texts)

        run()
