"""Commands, results, status, goaway, error and close (DESIGN §Link protocol, docs/protocol.md)."""

from __future__ import annotations

import pytest

from shared.errors import InvalidState, LocalProtocolError
from shared.link import (
    CLOSED,
    CLOSING,
    CONNECTING,
    OPEN,
    Close,
    CloseCode,
    Closed,
    Command,
    CommandReceived,
    CommandResult,
    CommandResultReceived,
    Error,
    GoAway,
    GoingAway,
    PeerError,
    Status,
    StatusReceived,
    encode,
)
from tests.helpers.linkpair import LinkPair, frames_in

COMMAND = Command(request_id="req-1", ctox_type="sms", params={"to": "07700"}, idempotency_key="k1")
RESULT = CommandResult(request_id="req-1", status=200, content_type="text/plain", body_b64="T0s=")


def _open() -> LinkPair:
    pair = LinkPair()
    pair.handshake()
    pair.take_relay_events()
    pair.take_agent_events()
    return pair


def test_command_and_result_pass_through() -> None:
    """An agent's command reaches the relay whole and the result comes back whole."""
    pair = _open()
    pair.agent.send_command(COMMAND)
    pair.pump()
    assert pair.take_relay_events() == [CommandReceived(COMMAND)]
    pair.relay.send_command_result(RESULT)
    pair.pump()
    assert pair.take_agent_events() == [CommandResultReceived(RESULT)]


def test_status_snapshot_and_changes_pass_through() -> None:
    """Status items arrive with their snapshot flag (DESIGN §Link protocol, Status)."""
    pair = _open()
    items = [{"name": "messages_waiting", "value": 2, "at": "2024-01-01T00:00:00Z"}]
    pair.relay.send_status(items, snapshot=True)
    pair.relay.send_status(({"name": "x", "value": 1},))
    pair.pump()
    assert pair.take_agent_events() == [
        StatusReceived(items, True),
        StatusReceived([{"name": "x", "value": 1}], False),
    ]


def test_go_away_sends_goaway_then_closes_1001() -> None:
    """go_away() queues goaway, no error frame, and a 1001 close; the agent echoes it."""
    pair = _open()
    pair.relay.go_away("relay shutting down")
    pair.relay.go_away("again")
    assert pair.relay.state is CLOSING
    assert pair.relay.close_requested == Close(1001, "relay shutting down")
    pair.pump()
    assert frames_in(pair.to_agent.written)[-1:] == [GoAway(reason="relay shutting down")]
    assert pair.agent_events == [
        GoingAway("relay shutting down"),
        Closed(1001, "relay shutting down"),
    ]
    assert pair.agent.close_requested == Close(1001, "relay shutting down")


def test_go_away_during_the_handshake() -> None:
    """A relay shutting down mid-handshake still sends goaway; the agent accepts it."""
    pair = LinkPair()
    pair.relay.go_away("draining")
    pair.pump()
    assert GoingAway("draining") in pair.agent_events
    assert pair.closed == Close(1001, "draining")


def test_peer_error_is_reported_and_echoed() -> None:
    """An error frame becomes PeerError and the session echoes the named close code."""
    pair = _open()
    pair.relay.close(CloseCode.REPLACED, "a newer link of this agent won")
    pair.pump()
    assert pair.agent_events[0] == PeerError("replaced", "a newer link of this agent won")
    assert pair.agent.close_requested == Close(CloseCode.REPLACED, "a newer link of this agent won")
    assert pair.agent.error is None


def test_peer_error_with_unknown_code_is_echoed_as_protocol_error() -> None:
    """An error code this version does not know still ends the link, with 4000."""
    pair = _open()
    pair.agent.receive_message(encode(Error(code="teapot", message="?")), 0.0)
    assert pair.agent.events_received() == [PeerError("teapot", "?")]
    assert pair.agent.close_requested == Close(CloseCode.PROTOCOL_ERROR, "?")
    assert pair.agent.state is CLOSING


def test_agent_error_reaches_the_relay() -> None:
    """An agent's error frame becomes PeerError on the relay."""
    pair = _open()
    pair.agent.close(CloseCode.INTERNAL_ERROR, "inbox unavailable")
    pair.pump()
    assert pair.relay_events[0] == PeerError("internal_error", "inbox unavailable")
    assert pair.closed == Close(CloseCode.INTERNAL_ERROR, "inbox unavailable")


@pytest.mark.parametrize("code", [1000, 1001])
def test_normal_close_sends_no_error_frame(code: int) -> None:
    """close(1000/1001) queues nothing and asks for that close."""
    pair = _open()
    pair.agent.close(code, "bye")
    assert pair.agent.data_to_send() == []
    assert pair.agent.close_requested == Close(code, "bye")
    assert pair.agent.state is CLOSING


def test_close_reason_is_cut_to_fit_a_close_frame() -> None:
    """The close reason fits in 123 UTF-8 bytes; the error frame keeps the whole message."""
    pair = _open()
    reason = "é" * 100
    pair.relay.close(CloseCode.INTERNAL_ERROR, reason)
    assert pair.relay.close_requested is not None
    assert pair.relay.close_requested.reason == "é" * 61
    assert frames_in(pair.relay.data_to_send()) == [Error(code="internal_error", message=reason)]


def test_second_close_is_moot() -> None:
    """Only the first close decision counts."""
    pair = _open()
    pair.relay.close(CloseCode.REVOKED, "revoked")
    pair.relay.close(1000, "later")
    assert pair.relay.close_requested == Close(CloseCode.REVOKED, "revoked")
    assert len(pair.relay.data_to_send()) == 1


@pytest.mark.parametrize("code", [999, 1002, 1006, 3000, 4500, 4999])
def test_close_with_a_foreign_code_is_caller_misuse(code: int) -> None:
    """Only 1000, 1001 and CloseCode values may be used."""
    pair = _open()
    with pytest.raises(LocalProtocolError):
        pair.relay.close(code, "x")
    assert pair.relay.state is OPEN


def test_receive_closed_emits_closed_once() -> None:
    """A transport end without a close frame gives Closed(None, …) once, from any state."""
    pair = LinkPair()
    pair.agent.receive_closed(None, "", 1.0)
    pair.agent.receive_closed(1000, "again", 2.0)
    assert pair.agent.events_received() == [Closed(None, "")]
    assert pair.agent.state is CLOSED
    assert pair.agent.next_deadline() is None


def test_input_after_closed_is_ignored() -> None:
    """Messages and timers after the transport ended change nothing."""
    pair = LinkPair()
    pair.relay.receive_closed(1006, "", 0.0)
    pair.relay.events_received()
    pair.relay.receive_message(pair.agent.data_to_send()[0], 0.0)
    pair.relay.handle_timer(100.0)
    assert pair.relay.events_received() == [] and pair.relay.data_to_send() == []
    assert pair.relay.state is CLOSED and pair.relay.close_requested is None


def test_send_command_needs_an_open_link() -> None:
    """send_command() raises InvalidState before OPEN and once closing (answer 503 at once)."""
    pair = LinkPair()
    assert pair.agent.state is CONNECTING
    with pytest.raises(InvalidState):
        pair.agent.send_command(COMMAND)
    pair.handshake()
    pair.agent.close(1000, "bye")
    with pytest.raises(InvalidState):
        pair.agent.send_command(COMMAND)


@pytest.mark.parametrize(
    "command",
    [Command(request_id="", ctox_type="sms"), Command(request_id="r", ctox_type="")],
)
def test_send_command_needs_ids(command: Command) -> None:
    """A command without a request id or CTOX type raises LocalProtocolError."""
    pair = _open()
    with pytest.raises(LocalProtocolError):
        pair.agent.send_command(command)


def test_relay_outputs_before_open_are_caller_misuse() -> None:
    """Results and status before the handshake raise InvalidState."""
    pair = LinkPair()
    with pytest.raises(InvalidState):
        pair.relay.send_command_result(RESULT)
    with pytest.raises(InvalidState):
        pair.relay.send_status([], snapshot=True)


def test_relay_outputs_after_close_are_moot() -> None:
    """A result or status that loses the race with the close is dropped quietly."""
    pair = _open()
    pair.relay.close(1000, "bye")
    pair.relay.send_command_result(RESULT)
    pair.relay.send_status([{"name": "x"}])
    assert pair.relay.data_to_send() == []


def test_status_frame_is_a_list_of_items() -> None:
    """send_status copies any sequence into the frame's items list."""
    pair = _open()
    pair.relay.send_status(({"a": 1},), snapshot=False)
    assert frames_in(pair.relay.data_to_send()) == [Status(items=[{"a": 1}], snapshot=False)]
