"""Several events per message: the ``events`` frame, its negotiation and the sessions' batching
(issue 7; docs/protocol.md, Batched events)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.link import (
    FEATURE_EVENTS,
    FEATURES,
    MAX_EVENTS_BYTES,
    MAX_EVENTS_ITEMS,
    OPEN,
    Ack,
    AgentSession,
    CloseCode,
    CommandResult,
    Error,
    Event,
    EventReceived,
    Events,
    Frame,
    GoAway,
    Hello,
    HelloReceived,
    decode,
    encode,
    encode_event_item,
    encode_events,
)
from tests.helpers.linkpair import AGENT_ID, RELAY_ID, LinkPair, frames_in

PROTOCOL = CloseCode.PROTOCOL_ERROR


class BatchPair(LinkPair):
    """A LinkPair whose agent asks for ``features`` in its hello (all of them by default)."""

    def __init__(
        self, *, features: Sequence[str] = FEATURES, resume_after: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(resume_after=resume_after, **kwargs)
        # Replaced before anything was collected: the first hello on the wire is this one's.
        self.agent = AgentSession(
            agent_id=AGENT_ID,
            relay_id=RELAY_ID,
            private_key=self.key,
            resume_after=resume_after,
            auth_timeout=self.auth_timeout,
            now=self.clock.now,
            client="linkpair/1",
            features=features,
        )


def _log(*seqs: int, body: str = "") -> list[tuple[int, dict[str, Any]]]:
    return [(seq, {"id": f"ev-{seq}", "type": "sms", "params": {"b": body}}) for seq in seqs]


def _m(**fields: Any) -> str:
    return json.dumps({"v": 1, **fields})


def _sent(pair: LinkPair) -> list[Frame]:
    """Frames the relay wrote after the handshake (challenge and welcome left out)."""
    return frames_in(pair.to_agent.written)[2:]


def _received(pair: LinkPair) -> list[int]:
    return [e.seq for e in pair.take_agent_events() if isinstance(e, EventReceived)]


def _open(pair: LinkPair) -> LinkPair:
    pair.handshake()
    pair.take_agent_events()
    pair.take_relay_events()
    return pair


def _reject(text: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(text)
    return info.value


# -- the frame ---------------------------------------------------------------------------------


def test_events_frame_round_trips_with_unicode_and_unknown_params() -> None:
    """encode/decode keep the items, their order and their event objects untouched."""
    frame = Events(
        items=[
            Event(seq=3, event={"id": "e3", "params": {"Über": "ünï", "n": None}}),
            Event(seq=9, event={"id": "e9", "params": {"x": [1.5, {"y": True}]}}),
        ]
    )
    text = encode(frame)
    assert json.loads(text) == {
        "v": 1,
        "type": "events",
        "items": [{"seq": i.seq, "event": i.event} for i in frame.items],
    }
    assert decode(text) == frame
    assert encode_events([encode_event_item(i.seq, i.event) for i in frame.items]) == text


def test_events_items_ignore_unknown_fields() -> None:
    """A newer relay may add fields to an item, as to any frame."""
    text = _m(type="events", items=[{"seq": 1, "event": {"id": "a"}, "extra": 1}])
    assert decode(text) == Events(items=[Event(seq=1, event={"id": "a"})])


@pytest.mark.parametrize(
    "items",
    [
        "x",
        {},
        [],
        [1],
        [None],
        [{"event": {}}],
        [{"seq": 1}],
        [{"seq": True, "event": {}}],
        [{"seq": 1.0, "event": {}}],
        [{"seq": "1", "event": {}}],
        [{"seq": 1, "event": []}],
        [{"seq": 1, "event": None}],
        [{"seq": 2, "event": {}}, {"seq": 2, "event": {}}],
        [{"seq": 2, "event": {}}, {"seq": 1, "event": {}}],
        [{"seq": 1, "event": {}}, {"seq": 3, "event": {}}, {"seq": 2, "event": {}}],
        [{"seq": n, "event": {}} for n in range(1, MAX_EVENTS_ITEMS + 2)],
    ],
    ids=lambda items: json.dumps(items)[:40],
)
def test_malformed_events_frame_is_a_protocol_error(items: Any) -> None:
    """Not a list, empty, too long, an item without an integer seq or an object event, or
    seqs that do not increase: refused with protocol_error."""
    assert _reject(_m(type="events", items=items)).close_code == PROTOCOL


def test_events_frame_without_items_is_a_protocol_error() -> None:
    """items is required."""
    assert "lacks field" in _reject(_m(type="events")).message


def test_events_frame_may_carry_the_most_items() -> None:
    """MAX_EVENTS_ITEMS items are allowed."""
    items = [{"seq": n, "event": {}} for n in range(1, MAX_EVENTS_ITEMS + 1)]
    frame = decode(_m(type="events", items=items))
    assert isinstance(frame, Events) and len(frame.items) == MAX_EVENTS_ITEMS


def test_hello_features_round_trip_and_stay_off_the_wire_when_unset() -> None:
    """features is an optional list: present when set, absent (as from older agents) if not."""
    assert "features" not in json.loads(encode(Hello(agent_id="a")))
    hello = Hello(agent_id="a", features=["events", "later"])
    assert decode(encode(hello)) == hello
    assert _reject(_m(type="hello", agent_id="a", features="events")).close_code == PROTOCOL


# -- negotiation -------------------------------------------------------------------------------


def test_agent_asking_for_batches_gets_one_events_frame() -> None:
    """Events offered together leave as one events frame; the agent reports each, in order."""
    pair = _open(BatchPair(window=8))
    log = _log(2, 5, 6)
    assert pair.offer_from(log) == 3
    assert pair.relay.in_flight == 3
    pair.pump()
    assert _sent(pair) == [Events(items=[Event(seq=s, event=e) for s, e in log])]
    assert pair.take_agent_events() == [EventReceived(s, e) for s, e in log]


def test_hello_of_a_batching_agent_lists_the_feature() -> None:
    """The relay sees the feature in hello; its HelloReceived is as before."""
    pair = BatchPair()
    pair.pump()
    hello = frames_in(pair.to_relay.written)[0]
    assert isinstance(hello, Hello) and hello.features == [FEATURE_EVENTS]
    assert pair.relay_events[0] == HelloReceived(AGENT_ID, 0, "linkpair/1")


def test_old_agent_gets_one_event_frame_per_event() -> None:
    """An agent whose hello has no features (every older agent) gets event frames only."""
    pair = _open(BatchPair(features=(), window=8))
    assert "features" not in json.loads(pair.to_relay.written[0])
    log = _log(1, 2, 3)
    pair.offer_from(log)
    pair.pump()
    assert _sent(pair) == [Event(seq=s, event=e) for s, e in log]
    assert _received(pair) == [1, 2, 3]


def _with_features(*names: str) -> Callable[[str], str]:
    """A tamper for the agent → relay wire: the hello lists ``names`` as its features."""

    def tamper(text: str) -> str:
        data = json.loads(text)
        if data["type"] == "hello":
            data["features"] = list(names)
        return json.dumps(data)

    return tamper


@pytest.mark.parametrize(
    ("names", "kinds"),
    [(("later", FEATURE_EVENTS), ["events"]), (("later",), ["event", "event"])],
)
def test_relay_ignores_features_it_does_not_know(names: tuple[str, ...], kinds: list[str]) -> None:
    """Unknown feature names (a newer agent's) change nothing; without "events", no batches."""
    pair = BatchPair(window=8)
    pair.to_relay.tamper = _with_features(*names)
    _open(pair)
    pair.offer_from(_log(1, 2))
    pair.pump()
    assert [f.type for f in _sent(pair)] == kinds


def test_agent_session_refuses_a_feature_it_does_not_implement() -> None:
    """Asking the relay for what this session cannot read is the caller's bug."""
    with pytest.raises(LocalProtocolError, match="later"):
        BatchPair(features=("later", FEATURE_EVENTS))


def test_batching_agent_takes_single_frames_from_an_older_relay() -> None:
    """A relay that ignores features (older relays do) sends event frames: the agent takes
    them and acks as usual."""
    pair = BatchPair(window=8)

    def as_old_agent(text: str) -> str:
        data = json.loads(text)
        data.pop("features", None)
        return json.dumps(data)

    pair.to_relay.tamper = as_old_agent
    _open(pair)
    pair.offer_from(_log(1, 2, 3))
    pair.pump()
    assert [f.type for f in _sent(pair)] == ["event"] * 3
    assert _received(pair) == [1, 2, 3]
    pair.agent.ack(3)
    pair.pump()
    assert pair.relay.in_flight == 0


@pytest.mark.parametrize("features", [[1], ["events", None], [["events"]]])
def test_hello_features_must_be_strings(features: list[Any]) -> None:
    """A features list holding anything but strings fails the handshake with protocol_error."""
    pair = LinkPair()
    pair.relay.receive_message(_m(type="hello", agent_id=AGENT_ID, features=features), 0.0)
    assert pair.relay.close_requested is not None
    assert pair.relay.close_requested.code == PROTOCOL


# -- coalescing on the relay ------------------------------------------------------------------


def test_other_frames_split_the_run_of_events_in_call_order() -> None:
    """A status, a command result or a heartbeat between offers goes out between them."""
    pair = _open(BatchPair(window=16))
    log = _log(1, 2, 3, 4, 5, 6)
    pair.relay.offer(*log[0])
    pair.relay.offer(*log[1])
    pair.relay.send_status([{"key": "k", "value": 1}])
    pair.relay.offer(*log[2])
    pair.relay.send_command_result(CommandResult(request_id="r", status=200))
    pair.relay.send_heartbeat(3)
    pair.relay.offer(*log[3])
    pair.relay.offer(*log[4])
    pair.relay.offer(*log[5])
    pair.pump()
    assert [(f.type, [i.seq for i in f.items] if isinstance(f, Events) else None)
            for f in _sent(pair)] == [
        ("events", [1, 2]),
        ("status", None),
        ("events", [3]),
        ("command_result", None),
        ("heartbeat", None),
        ("events", [4, 5, 6]),
    ]
    assert _received(pair) == [1, 2, 3, 4, 5, 6]


def test_each_data_to_send_call_frames_what_was_offered_since() -> None:
    """Events held are framed when the I/O layer asks for data; later ones form a new frame."""
    pair = _open(BatchPair(window=8))
    pair.relay.offer(*_log(1)[0])
    assert [decode(t) for t in pair.relay.data_to_send()] == [
        Events(items=[Event(seq=1, event=_log(1)[0][1])])
    ]
    assert pair.relay.data_to_send() == []
    pair.relay.offer(*_log(2)[0])
    pair.relay.offer(*_log(3)[0])
    (text,) = pair.relay.data_to_send()
    frame = decode(text)
    assert isinstance(frame, Events) and [i.seq for i in frame.items] == [2, 3]


def test_window_counts_events_not_frames() -> None:
    """With window 3, five offers give one frame of three; an ack lets the rest through."""
    pair = _open(BatchPair(window=3))
    log = _log(1, 2, 3, 4, 5)
    assert pair.offer_from(log) == 3
    pair.pump()
    assert _received(pair) == [1, 2, 3]
    pair.agent.ack(3)
    pair.pump()
    assert pair.offer_from(log) == 2
    pair.pump()
    assert _received(pair) == [4, 5]
    assert [f.type for f in _sent(pair)] == ["events", "events"]


def _item_size(seq: int, event: dict[str, Any]) -> int:
    return len(encode_event_item(seq, event).encode())


def _sized_event(seq: int, size: int, char: str = "x") -> dict[str, Any]:
    """An event whose item encodes to exactly ``size`` UTF-8 bytes, mostly ``char``."""
    event: dict[str, Any] = {"id": f"ev-{seq}", "params": {"b": ""}}
    room = size - _item_size(seq, event)
    width = len(char.encode())
    event["params"]["b"] = char * (room // width) + "x" * (room % width)
    assert _item_size(seq, event) == size
    return event


@pytest.mark.parametrize("char", ["x", "é"], ids=["ascii", "two-byte"])
def test_frame_may_reach_the_byte_cap_exactly_but_not_pass_it(char: str) -> None:
    """Two items filling MAX_EVENTS_BYTES to the byte share a frame; one byte more splits them.
    Bytes are counted, not characters."""
    room = MAX_EVENTS_BYTES - len(encode_events([])) - 1  # two items and the comma between
    first = room // 2
    for extra, count in ((0, 1), (1, 2)):
        pair = _open(BatchPair(window=8))
        pair.relay.offer(1, _sized_event(1, first, char))
        pair.relay.offer(2, _sized_event(2, room - first + extra, char))
        texts = pair.relay.data_to_send()
        assert len(texts) == count
        assert max(len(t.encode()) for t in texts) <= MAX_EVENTS_BYTES
    assert len(encode_events([encode_event_item(1, _sized_event(1, first, char)),
                              encode_event_item(2, _sized_event(2, room - first, char))]
                             ).encode()) == MAX_EVENTS_BYTES


def test_many_large_events_fill_frames_under_the_cap() -> None:
    """Events of a few KiB fill several frames, each under the cap, all in order."""
    pair = _open(BatchPair(window=64))
    log = [(seq, _sized_event(seq, 5000, "é")) for seq in range(1, 41)]
    assert pair.offer_from(log) == 40
    texts = pair.relay.data_to_send()
    assert len(texts) == 4  # 13 items of 5000 bytes fit in 64 KiB, not 14
    assert all(len(t.encode()) <= MAX_EVENTS_BYTES for t in texts)
    for text in texts:
        pair.to_agent.write(text)
    pair.pump()
    assert _received(pair) == list(range(1, 41))


def test_event_larger_than_the_cap_travels_alone() -> None:
    """An event too large for the cap is the only item of its frame; neighbours go apart."""
    pair = _open(BatchPair(window=8))
    pair.relay.offer(1, _sized_event(1, 100))
    pair.relay.offer(2, _sized_event(2, MAX_EVENTS_BYTES + 10))
    pair.relay.offer(3, _sized_event(3, 100))
    frames = [decode(t) for t in pair.relay.data_to_send()]
    assert [[i.seq for i in f.items] for f in frames if isinstance(f, Events)] == [[1], [2], [3]]


def test_frame_holds_at_most_max_events_items() -> None:
    """With a window above MAX_EVENTS_ITEMS, a long run is cut into frames of at most that."""
    pair = _open(BatchPair(window=MAX_EVENTS_ITEMS + 5))
    for seq in range(1, MAX_EVENTS_ITEMS + 6):
        assert pair.relay.offer(seq, {"id": str(seq)})
    frames = [decode(t) for t in pair.relay.data_to_send()]
    assert [len(f.items) for f in frames if isinstance(f, Events)] == [MAX_EVENTS_ITEMS, 5]


def test_events_held_at_a_close_go_out_before_the_error_frame() -> None:
    """close() frames the run first: the error frame is the last thing the agent reads."""
    pair = _open(BatchPair(window=8))
    pair.offer_from(_log(1, 2))
    pair.relay.close(CloseCode.INTERNAL_ERROR, "bye")
    frames = [decode(t) for t in pair.relay.data_to_send()]
    assert [f.type for f in frames] == ["events", "error"]
    assert frames[1] == Error(code="internal_error", message="bye")


def test_events_held_at_go_away_go_out_before_goaway() -> None:
    """go_away() frames the run first, then goaway, then the 1001 close."""
    pair = _open(BatchPair(window=8))
    pair.offer_from(_log(1))
    pair.relay.go_away("restart")
    frames = [decode(t) for t in pair.relay.data_to_send()]
    assert [f.type for f in frames] == ["events", "goaway"]
    assert frames[1] == GoAway(reason="restart")


# -- receiving on the agent --------------------------------------------------------------------


def test_one_batch_is_acked_once() -> None:
    """The agent commits what arrived together and sends one cumulative ack for it."""
    pair = _open(BatchPair(window=8))
    pair.offer_from(_log(1, 4, 9))
    pair.pump()
    assert _received(pair) == [1, 4, 9]
    pair.agent.ack(9)
    pair.pump()
    assert [f for f in frames_in(pair.to_relay.written) if isinstance(f, Ack)] == [Ack(seq=9)]
    assert pair.relay.in_flight == 0


def test_events_frame_not_above_the_last_seq_fails_the_link() -> None:
    """A batch starting at or below the highest seq received is a protocol error, and none of
    its events is reported."""
    pair = _open(BatchPair(window=8))
    pair.offer_from(_log(1, 2))
    pair.pump()
    assert _received(pair) == [1, 2]
    items = [{"seq": 2, "event": {"id": "e2"}}, {"seq": 3, "event": {"id": "e3"}}]
    pair.to_agent.inject(_m(type="events", items=items))
    pair.pump()
    assert _received(pair) == []
    assert pair.agent.error is not None and "not above" in pair.agent.error.message
    assert pair.closed is not None and pair.closed.code == PROTOCOL


def test_events_frame_to_an_agent_that_did_not_ask_fails_the_link() -> None:
    """An agent without the feature refuses the frame, as an older one would."""
    pair = _open(BatchPair(features=(), window=8))
    pair.to_agent.inject(encode(Events(items=[Event(seq=1, event={"id": "a"})])))
    pair.pump()
    assert _received(pair) == []
    assert pair.closed is not None and pair.closed.code == PROTOCOL


def test_events_frame_before_welcome_fails_the_link() -> None:
    """Like event, events is only allowed on an OPEN link."""
    pair = BatchPair()
    pair.agent.receive_message(encode(Events(items=[Event(seq=1, event={})])), 0.0)
    assert pair.agent.close_requested is not None
    assert pair.agent.close_requested.code == PROTOCOL


def test_events_frame_from_an_agent_fails_the_link() -> None:
    """events is sent by relays only."""
    pair = _open(BatchPair())
    pair.relay.receive_message(encode(Events(items=[Event(seq=1, event={})])), 0.0)
    assert pair.relay.error is not None and "sent by relays" in pair.relay.error.message


def test_batch_after_replay_rewind_is_accepted() -> None:
    """With a replay, a batch may start at or below the resume point (the window rewound)."""
    pair = BatchPair(resume_after=5, window=8, lookup=False)
    pair.run_until(lambda: any(isinstance(e, HelloReceived) for e in pair.relay_events))
    pair.relay.agent_found(*pair.agents[AGENT_ID], replay_after=2)
    pair.handshake()
    pair.take_agent_events()
    pair.offer_from(_log(3, 4, 6))
    pair.pump()
    assert _received(pair) == [3, 4, 6]
    assert pair.agent.state is OPEN


def test_debug_lines_name_batches_without_payloads(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG both sides name the batch's seqs and size, never an event body."""
    caplog.set_level(logging.DEBUG, logger="shared.link.session")
    pair = _open(BatchPair(window=8))
    pair.offer_from(_log(1, 2, 7, body="SECRET-BODY"))
    pair.pump()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "> events seq=1..7 n=3" in text
    assert "< events seq=1..7 n=3" in text
    assert "SECRET" not in text


@pytest.mark.parametrize(
    ("items", "reason"),
    [
        ([{"seq": 3, "event": {"id": "e3"}}, {"seq": 4, "event": {}}], "event without an id"),
        ([{"seq": 3, "event": {"id": "e3"}}, {"seq": 4, "event": {"id": 4}}],
         "event without an id"),
        ([{"seq": s, "event": {"id": f"e{s}"}} for s in range(3, 10)],
         "more events than the window allows"),
    ],
    ids=["no-id", "id-not-a-string", "window-overrun"],
)
def test_events_frame_the_agent_session_refuses(items: list[Any], reason: str) -> None:
    """The agent session judges ids and the window (not its pump): the whole frame is refused
    before any of its events is reported."""
    pair = _open(BatchPair(window=8))
    pair.offer_from(_log(1, 2))
    pair.pump()
    assert _received(pair) == [1, 2]  # held, not acked: room for 6 more
    pair.to_agent.inject(_m(type="events", items=items))
    pair.pump()
    assert _received(pair) == []
    assert pair.agent.error is not None and pair.agent.error.message == reason
    assert pair.closed is not None and pair.closed.code == PROTOCOL


def test_event_frames_past_the_window_fail_the_link_until_an_ack_frees_room() -> None:
    """Single event frames count against the window too; the agent's ack makes room."""
    pair = _open(LinkPair(window=2))
    pair.offer_from(_log(1, 2))
    pair.pump()
    assert _received(pair) == [1, 2]
    pair.agent.ack(1)
    pair.to_agent.inject(_m(type="event", seq=3, event={"id": "e3"}))
    pair.pump()
    assert _received(pair) == [3]
    pair.to_agent.inject(_m(type="event", seq=4, event={"id": "e4"}))
    pair.pump()
    assert _received(pair) == []
    assert pair.agent.error is not None
    assert pair.agent.error.message == "more events than the window allows"


def test_an_event_frame_without_an_id_fails_the_link() -> None:
    """The inbox keeps events by id: one without is the relay's protocol error."""
    pair = _open(LinkPair())
    pair.to_agent.inject(_m(type="event", seq=1, event={"type": "sms"}))
    pair.pump()
    assert _received(pair) == []
    assert pair.agent.error is not None and pair.agent.error.message == "event without an id"
