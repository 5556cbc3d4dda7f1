"""The relay end of the agent link (DESIGN §Link protocol) over real 127.0.0.1 WebSockets.

The agent side is the real ``AgentSession`` driven by a small ``websockets`` client; the relay
is a real aiohttp server with the real SQLite store.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from shared import crypto
from shared.config import LinkConfig
from shared.link import frames
from shared.link.frames import CloseCode
from shared.link.session import (
    Closed,
    CommandResultReceived,
    EventReceived,
    GoingAway,
    LinkState,
    PeerError,
)
from tests.helpers.relay_app import (
    WAIT,
    Agent,
    Relay,
    eventually,
    raw_close_code,
    raw_connect,
    running_relay,
)
from tests.helpers.timing import MS


@pytest.fixture
async def relay(tmp_path: Path) -> Any:
    async with running_relay(tmp_path) as relay:
        yield relay


# -- handshake and delivery --------------------------------------------------------------------


async def test_delivers_events_in_order_from_before_and_after_connect(relay: Relay) -> None:
    """Events committed before and after the agent connects arrive once each, in log order."""
    record, key = await relay.add_agent()
    before = await relay.append(3)
    agent = await Agent(relay, record.id, key).connect()
    welcomed = await agent.welcome()
    assert (welcomed.account_id, welcomed.resume_after) == (relay.account_id, 0)
    assert await agent.events(3) == before
    after = await relay.append(4)
    assert await agent.events(4) == after
    assert before + after == sorted(before + after)
    await agent.close()


async def test_delivered_event_carries_the_stored_event(relay: Relay) -> None:
    """An event frame holds the stored event object unchanged (DESIGN principle 2)."""
    record, key = await relay.add_agent()
    (seq,) = await relay.append(1)
    agent = await Agent(relay, record.id, key).connect()
    (received,) = await agent.read_until(EventReceived)
    (stored,) = await relay.store.read_events(relay.account_id, after=0, limit=1)
    assert received.seq == seq == stored.seq
    assert received.event == stored.event.to_json()
    await agent.close()


async def test_acks_move_the_stored_cursor(relay: Relay) -> None:
    """A cumulative ack is stored as the agent's cursor."""
    record, key = await relay.add_agent()
    seqs = await relay.append(5)
    agent = await Agent(relay, record.id, key).connect()
    await agent.events(5)
    await agent.ack(seqs[2])

    async def cursor_at(seq: int) -> bool:
        return await relay.store.get_cursor(record.id) == seq

    await eventually(lambda: cursor_at(seqs[2]))
    await agent.ack(seqs[4])
    await eventually(lambda: cursor_at(seqs[4]))
    await agent.close()


async def test_reconnect_resumes_after_the_agents_resume_point(relay: Relay) -> None:
    """A new link starts right after resume_after: nothing lost, nothing repeated below it."""
    record, key = await relay.add_agent()
    seqs = await relay.append(6)
    first = await Agent(relay, record.id, key).connect()
    assert await first.events(6) == seqs
    await first.ack(seqs[3])
    await first.close()
    await first.closed()
    more = await relay.append(2)
    second = await Agent(relay, record.id, key, resume_after=seqs[3]).connect()
    welcomed = await second.welcome()
    assert welcomed.resume_after == seqs[3]
    assert await second.events(4) == seqs[4:] + more
    assert await relay.store.get_cursor(record.id) == seqs[3]
    await second.close()


async def test_resume_point_of_the_agent_overrides_the_stored_cursor(relay: Relay) -> None:
    """The agent's inbox is authoritative: a lower resume_after makes the relay send again."""
    record, key = await relay.add_agent()
    seqs = await relay.append(4)
    await relay.store.set_cursor(record.id, seqs[3])
    agent = await Agent(relay, record.id, key, resume_after=seqs[1]).connect()
    assert await agent.events(2) == seqs[2:]
    assert await relay.store.get_cursor(record.id) == seqs[1]
    await agent.close()


async def test_window_bounds_unacked_events(tmp_path: Path) -> None:
    """With window=4 and 20 events, never more than 4 are unacked in flight."""
    async with running_relay(tmp_path, link=LinkConfig(window=4)) as relay:
        record, key = await relay.add_agent()
        seqs = await relay.append(20)
        agent = await Agent(relay, record.id, key).connect()
        assert (await agent.welcome()).window == 4
        received: list[int] = []
        while len(received) < 20:
            received += await agent.events(4)
            assert len(agent.unacked) == 4
            # Nothing more may come until the ack: give a misbehaving relay time to show it.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(50 * MS):
                    await agent.ws.recv()
            await agent.ack(received[-1])
        assert received == seqs
        await agent.close()


async def test_online_lists_connected_agents(relay: Relay) -> None:
    """hub.online() names authenticated agents and forgets them when they leave."""
    record, key = await relay.add_agent()
    assert relay.hub.online() == {}
    agent = await Agent(relay, record.id, key).connect()
    await agent.welcome()
    assert list(relay.hub.online()) == [record.id]
    await agent.close()

    async def gone() -> bool:
        return relay.hub.online() == {}

    await eventually(gone)


async def test_touch_agent_records_last_seen(relay: Relay) -> None:
    """Authenticating records the agent's last_seen time."""
    record, key = await relay.add_agent()
    assert record.last_seen is None
    agent = await Agent(relay, record.id, key).connect()
    await agent.welcome()

    async def seen() -> bool:
        found = await relay.store.get_agent(record.id)
        return found is not None and found.last_seen is not None

    await eventually(seen)
    await agent.close()


async def test_command_is_answered_not_implemented(relay: Relay) -> None:
    """Commands are refused with 501 not_implemented for now, and the link stays up."""
    record, key = await relay.add_agent()
    agent = await Agent(relay, record.id, key).connect()
    await agent.welcome()
    agent.session.send_command(frames.Command(request_id="r1", ctox_type="sms.send"))
    await agent._flush()
    (answer,) = await agent.read_until(CommandResultReceived)
    assert (answer.result.request_id, answer.result.status) == ("r1", 501)
    assert answer.result.error == "not_implemented"
    (seq,) = await relay.append(1)
    assert await agent.events(1) == [seq]
    await agent.close()


# -- authentication ----------------------------------------------------------------------------


async def test_unknown_agent_is_refused_with_4401(relay: Relay) -> None:
    """An agent id the relay does not know is closed with 4401 after an error frame."""
    agent = await Agent(relay, "ag-unknown", crypto.generate_private_key()).connect()
    closed = await agent.closed()
    assert closed.code == CloseCode.UNAUTHORIZED
    assert agent.session.state is LinkState.CLOSED


async def test_wrong_key_is_refused_with_4401(relay: Relay) -> None:
    """A signature by another key than the enrolled one is refused."""
    record, _ = await relay.add_agent()
    agent = await Agent(relay, record.id, crypto.generate_private_key()).connect()
    closed = await agent.closed()
    assert closed.code == CloseCode.UNAUTHORIZED


async def test_pending_agent_is_refused_with_4401(relay: Relay) -> None:
    """An agent that never enrolled (no public key) cannot connect."""
    pending = await relay.store.create_agent(
        account_id=relay.account_id, name="new", code_hash="0" * 64, code_expires_at=1e12
    )
    agent = await Agent(relay, pending.id, crypto.generate_private_key()).connect()
    assert (await agent.closed()).code == CloseCode.UNAUTHORIZED


async def test_revoked_agent_is_refused_with_4403(relay: Relay) -> None:
    """A revoked agent cannot reconnect (DESIGN §Link protocol, Auth)."""
    record, key = await relay.add_agent()
    await relay.store.revoke_agent(record.id, now=1.0)
    agent = await Agent(relay, record.id, key).connect()
    closed = await agent.closed()
    assert closed.code == CloseCode.REVOKED


async def test_disconnect_cuts_a_live_agent_with_4403(relay: Relay) -> None:
    """hub.disconnect closes a connected agent at once; False when it is not connected."""
    record, key = await relay.add_agent()
    agent = await Agent(relay, record.id, key).connect()
    await agent.welcome()
    await relay.store.revoke_agent(record.id, now=1.0)
    assert await relay.hub.disconnect(record.id, CloseCode.REVOKED, "agent revoked")
    events = []
    for _ in range(100):
        batch = await agent.read()
        events += batch
        if any(isinstance(e, Closed) for e in batch):
            break
    assert agent.close_code == CloseCode.REVOKED
    assert any(isinstance(e, PeerError) and e.code == "revoked" for e in events)
    assert not await relay.hub.disconnect(record.id, CloseCode.REVOKED, "agent revoked")


async def test_replayed_auth_frame_fails_on_a_new_connection(relay: Relay) -> None:
    """A captured auth frame is useless on another connection: each gets a fresh nonce."""
    record, key = await relay.add_agent()
    first = await Agent(relay, record.id, key).connect()
    await first.welcome()
    hello, auth = first.sent[:2]
    assert json.loads(auth)["type"] == "auth"
    await first.close()

    ws = await raw_connect(relay)
    await ws.send(hello)
    challenge = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    assert challenge["type"] == "challenge"
    await ws.send(auth)
    assert await raw_close_code(ws) == CloseCode.UNAUTHORIZED


async def test_auth_timeout_closes_with_4008(tmp_path: Path) -> None:
    """A connection that does not finish the handshake in link.auth_timeout is closed."""
    async with running_relay(tmp_path, link=LinkConfig(auth_timeout=100 * MS)) as relay:
        silent = await raw_connect(relay)
        assert await raw_close_code(silent) == CloseCode.AUTH_TIMEOUT
        record, _ = await relay.add_agent()
        half = await raw_connect(relay)
        await half.send(frames.encode(frames.Hello(agent_id=record.id)))
        assert await raw_close_code(half) == CloseCode.AUTH_TIMEOUT


# -- one link per agent ------------------------------------------------------------------------


async def test_newest_link_wins_and_the_old_is_closed_with_4010(relay: Relay) -> None:
    """A second link of the same agent replaces the first; later events go only to the new one."""
    record, key = await relay.add_agent()
    seqs = await relay.append(3)
    old = await Agent(relay, record.id, key).connect()
    assert await old.events(3) == seqs
    await old.ack(seqs[-1])
    new = await Agent(relay, record.id, key, resume_after=seqs[-1]).connect()
    await new.welcome()
    closed = await old.closed()
    assert closed.code == CloseCode.REPLACED
    assert old.unacked == [], "the old link received events after it was replaced"
    more = await relay.append(5)
    assert await new.events(5) == more
    assert list(relay.hub.online()) == [record.id]
    await new.close()


# -- refusals and shutdown ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("this is not json", CloseCode.PROTOCOL_ERROR),
        ('{"v": 1, "type": "teleport"}', CloseCode.UNKNOWN_FRAME),
        ('{"v": 99, "type": "hello", "agent_id": "x"}', CloseCode.UNSUPPORTED_VERSION),
        (b"\x00\x01binary", CloseCode.PROTOCOL_ERROR),
    ],
)
async def test_bad_frames_close_with_a_protocol_error_and_others_keep_working(
    relay: Relay, message: str | bytes, code: int
) -> None:
    """Garbage, unknown frame types or binary frames close that link only."""
    record, key = await relay.add_agent()
    good = await Agent(relay, record.id, key).connect()
    await good.welcome()
    bad = await raw_connect(relay)
    await bad.send(message)
    assert await raw_close_code(bad) == code
    seqs = await relay.append(2)
    assert await good.events(2) == seqs
    await good.close()


async def test_missing_subprotocol_is_refused(relay: Relay) -> None:
    """A client that does not offer xon-relay.v1 is closed with a protocol error."""
    ws = await connect(relay.url, open_timeout=WAIT)
    assert await raw_close_code(ws) == CloseCode.PROTOCOL_ERROR


async def test_shutdown_sends_goaway_and_closes_1001(relay: Relay) -> None:
    """hub.shutdown() tells each agent to go away, closes with 1001, and waits for the links."""
    first, first_key = await relay.add_agent("a")
    second, second_key = await relay.add_agent("b")
    agents = [
        await Agent(relay, first.id, first_key).connect(),
        await Agent(relay, second.id, second_key).connect(),
    ]
    for agent in agents:
        await agent.welcome()
    handshaking = await raw_connect(relay)
    await relay.hub.shutdown()
    assert relay.hub.online() == {}
    for agent in agents:
        await agent.read_until(GoingAway)
        closed = await agent.closed()
        assert closed.code == 1001
    assert await raw_close_code(handshaking) == 1001
    late = await raw_connect(relay)
    assert await raw_close_code(late) == 1001


async def test_newest_link_wins_even_when_the_old_peer_is_unresponsive(relay: Relay) -> None:
    """The new link does not wait for a half-open old link's close handshake."""
    record, key = await relay.add_agent()
    old = await Agent(relay, record.id, key).connect()
    await old.welcome()
    transport = old.ws.transport
    transport.pause_reading()  # the old peer stops answering, like a dead half-open link
    new = await Agent(relay, record.id, key).connect()
    await new.welcome()
    seqs = await relay.append(2)
    assert await new.events(2) == seqs
    transport.resume_reading()
    assert (await old.closed()).code == CloseCode.REPLACED
    assert old.unacked == []
    await new.close()


async def test_unresponsive_agent_is_dropped_after_the_close_timeout(tmp_path: Path) -> None:
    """hub.disconnect returns even if the agent never answers the close."""
    async with running_relay(tmp_path, close_timeout=100 * MS) as relay:
        record, key = await relay.add_agent()
        agent = await Agent(relay, record.id, key).connect()
        await agent.welcome()
        agent.ws.transport.pause_reading()
        assert await relay.hub.disconnect(record.id, CloseCode.REVOKED, "agent revoked")

        async def gone() -> bool:
            return relay.hub.online() == {}

        await eventually(gone)
        agent.ws.transport.resume_reading()
        await agent.closed()


async def test_store_failure_during_the_handshake_closes_with_4011(relay: Relay) -> None:
    """A store that cannot look the agent up ends the handshake with internal_error."""
    record, key = await relay.add_agent()
    await relay.store.close()
    agent = await Agent(relay, record.id, key).connect()
    assert (await agent.closed()).code == CloseCode.INTERNAL_ERROR
