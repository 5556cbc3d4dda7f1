"""Routing on the relay (docs/protocol.md, Routing): each link offers only the events its
agent's hello subscribed to, and keeps the agent's stored cursor at "everything up to here is
committed by the agent or not for it".

A real aiohttp relay with the real SQLite store; agents are real ``AgentSession``s over
``websockets`` (tests/helpers/relay_app.py), and once the real agent (``relay_agent.link``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink as RealAgentLink
from relay_server import agent_ws
from relay_server.store.base import StatusItem
from shared import crypto
from shared.config import AgentConfig, LinkConfig, SubscriptionConfig
from shared.events import RawRequest, XonEvent, format_time
from shared.link.frames import SUBPROTOCOL
from shared.link.session import AgentSession, EventReceived, StatusReceived
from tests.helpers.relay_app import WAIT, Agent, Relay, eventually, running_relay
from tests.helpers.timing import MS

CALLS = {"types": ["call.*"]}
RECEPTION = {"params": {"dialled": ["0201"]}}


class RoutedAgent(Agent):
    """The helpers' test agent, with a ``subscription`` in its hello."""

    def __init__(self, relay: Relay, agent_id: str, key: crypto.Ed25519PrivateKey, *,
                 subscription: dict[str, Any] | None, resume_after: int = 0) -> None:
        super().__init__(relay, agent_id, key, resume_after=resume_after)
        self.subscription = subscription

    async def connect(self) -> RoutedAgent:
        self.ws = await connect(
            self.relay.url, subprotocols=[Subprotocol(SUBPROTOCOL)], open_timeout=WAIT
        )
        self.session = AgentSession(
            agent_id=self.agent_id,
            relay_id=self.relay.relay_id,
            private_key=self.key,
            resume_after=self.resume_after,
            auth_timeout=WAIT,
            now=asyncio.get_running_loop().time(),
            client="tests",
            subscription=self.subscription,
        )
        await self._flush()
        return self


async def routed(relay: Relay, subscription: dict[str, Any] | None, *,
                 resume_after: int = 0, name: str = "pc") -> RoutedAgent:
    record, key = await relay.add_agent(name)
    return await RoutedAgent(relay, record.id, key, subscription=subscription,
                             resume_after=resume_after).connect()


async def append(relay: Relay, *events: tuple[str, dict[str, str]]) -> list[int]:
    """Commit events of the given (type, params) to the test account; notify; their seqs."""
    seqs = []
    for event_type, params in events:
        token = crypto.new_token(6)
        event = XonEvent(
            id=f"ev-{token}",
            account=relay.account_id,
            type=event_type,
            received_at=format_time(time.time()),
            params=params,
            request=RawRequest(method="GET", path=f"/{event_type}", query="", content_type="",
                               body=b""),
        )
        seqs.append((await relay.store.append_event(event, xon_id=None)).stored.seq)
    relay.hub.notify(relay.account_id)
    return seqs


async def caught_up(relay: Relay, agent_id: str) -> bool:
    """The agent's stored cursor is at the log's head: no backlog left."""
    cursor = await relay.store.get_cursor(agent_id)
    return (cursor == await relay.store.head_seq(relay.account_id)
            and await relay.store.count_after(relay.account_id, cursor) == 0)


MIXED = [
    ("sms.received", {"from": "07700"}),                    # neither routed agent
    ("call.arriving", {"dialled": "0201"}),                 # calls and reception
    ("call.arriving", {"dialled": "0999"}),                 # calls
    ("sms.received", {"dialled": "0201"}),                  # reception
    ("call.ended", {"dialled": "0201", "user": "12"}),      # calls and reception
    ("presence", {}),                                       # neither
    ("callx.y", {"dialled": "02010"}),                      # neither ("call.*" is a prefix.)
]


@pytest.fixture
async def relay(tmp_path: Path) -> Any:
    async with running_relay(tmp_path) as relay:
        yield relay


async def test_routed_agents_get_only_their_events_and_an_unrouted_one_all(relay: Relay) -> None:
    """A type subscription and a param subscription each get only their events, in log
    order; an agent without a subscription gets every event."""
    before = await append(relay, *MIXED)
    calls = await routed(relay, CALLS, name="calls")
    reception = await routed(relay, RECEPTION, name="reception")
    everything = await routed(relay, None, name="all")
    after = await append(relay, *MIXED)
    # A last event every agent wants: what arrives before it is all each one gets.
    (last,) = await append(relay, ("call.arriving", {"dialled": "0201"}))
    seqs = before + after + [last]
    events = (MIXED + MIXED + [("call.arriving", {"dialled": "0201"})])

    def wanted(match: Any) -> list[int]:
        return [seq for seq, (kind, params) in zip(seqs, events, strict=True)
                if match(kind, params)]

    expected = {
        calls: wanted(lambda kind, _: kind.startswith("call.")),
        reception: wanted(lambda _, params: params.get("dialled") == "0201"),
        everything: seqs,
    }
    for agent, want in expected.items():
        got = await agent.read_until(EventReceived, len(want))
        assert [e.seq for e in got] == want
        assert [e.event["type"] for e in got] == [events[seqs.index(s)][0] for s in want]
        await agent.close()


async def test_idle_routed_agent_cursor_reaches_the_head_without_any_event(relay: Relay) -> None:
    """Events never for a routed agent move its stored cursor to the head: no backlog."""
    agent = await routed(relay, CALLS)
    await agent.welcome()
    await append(relay, *[("sms.received", {"n": str(i)}) for i in range(10)])
    await eventually(lambda: caught_up(relay, agent.agent_id))
    assert agent.unacked == []
    await agent.close()


async def test_routed_cursor_reaches_the_head_after_trailing_non_matching_events(
    relay: Relay,
) -> None:
    """After the ack of its last event, the cursor passes the non-matching events after it."""
    agent = await routed(relay, CALLS)
    seqs = await append(relay, ("call.arriving", {}),
                        *[("sms.received", {"n": str(i)}) for i in range(5)])
    assert await agent.events(1) == seqs[:1]
    assert not await caught_up(relay, agent.agent_id)  # not before the agent committed it
    await agent.ack(seqs[0])
    await eventually(lambda: caught_up(relay, agent.agent_id))
    await agent.close()


async def test_cursor_never_passes_an_unacked_event(tmp_path: Path) -> None:
    """With a full window the scan stops before the refused event; the cursor stays at the
    acks until the agent committed everything offered."""
    async with running_relay(tmp_path, link=LinkConfig(window=2)) as relay:
        agent = await routed(relay, CALLS)
        seqs = await append(relay, *[("call.arriving", {"n": str(i)}) for i in range(3)],
                            ("sms.received", {}))
        assert await agent.events(2) == seqs[:2]
        await agent.ack(seqs[0])
        assert await agent.events(1) == seqs[2:3]
        await eventually(lambda: _cursor_is(relay, agent.agent_id, seqs[0]))
        await agent.ack(seqs[2])
        await eventually(lambda: caught_up(relay, agent.agent_id))
        await agent.close()


async def _cursor_is(relay: Relay, agent_id: str, seq: int) -> bool:
    return await relay.store.get_cursor(agent_id) == seq


async def test_reconnect_with_a_subscription_loses_nothing_that_matches(tmp_path: Path) -> None:
    """A routed agent that drops its link mid-stream resumes and gets every matching event
    exactly once after its resume point, across small windows and interleaved events."""
    async with running_relay(tmp_path, link=LinkConfig(window=3)) as relay:
        record, key = await relay.add_agent()
        first_half = await append(relay, *(MIXED * 4))
        agent = await RoutedAgent(relay, record.id, key, subscription=RECEPTION).connect()
        received = await agent.events(3)
        await agent.ack(received[1])  # the third is lost with the link
        await agent.close()
        await agent.closed()
        second_half = await append(relay, *(MIXED * 4))
        seqs = first_half + second_half
        matching = [s for s, (_, p) in zip(seqs, MIXED * 8, strict=True)
                    if p.get("dialled") == "0201"]
        again = await RoutedAgent(relay, record.id, key, subscription=RECEPTION,
                                  resume_after=received[1]).connect()
        assert (await again.welcome()).trimmed_through == 0
        rest: list[int] = []
        while len(rest) < len(matching) - 2:
            rest += await again.events(1)
            await again.ack(rest[-1])
        assert received[:2] + rest == matching
        await eventually(lambda: caught_up(relay, record.id))
        await again.close()


async def test_trimmed_passed_over_events_are_no_hole_for_a_routed_agent(relay: Relay) -> None:
    """Retention dropping events the agent passed over is not reported as lost (welcome's
    trimmed_through is 0, no 4012), even when it reconnects with an older resume point;
    a trim past its cursor still is."""
    record, key = await relay.add_agent()
    (mine,) = await append(relay, ("call.arriving", {}))
    others = await append(relay, *[("sms.received", {"n": str(i)}) for i in range(6)])
    agent = await RoutedAgent(relay, record.id, key, subscription=CALLS).connect()
    assert await agent.events(1) == [mine]
    await agent.ack(mine)
    await eventually(lambda: caught_up(relay, record.id))
    await agent.close()
    await agent.closed()
    await relay.store.trim_events(relay.account_id, through=others[-2], limit=100)
    (later,) = await append(relay, ("call.ended", {}))
    for _ in range(2):  # the second link starts from the cursor the first one reset
        again = await RoutedAgent(relay, record.id, key, subscription=CALLS,
                                  resume_after=mine).connect()
        assert (await again.welcome()).trimmed_through == 0
        assert await again.events(1) == [later]
        await again.close()
        await again.closed()
    more = await append(relay, *[("sms.received", {}) for _ in range(3)])
    await relay.store.trim_events(relay.account_id, through=more[-2], limit=100)
    lost = await RoutedAgent(relay, record.id, key, subscription=CALLS,
                             resume_after=mine).connect()
    assert (await lost.welcome()).trimmed_through == more[-2]
    await lost.close()


async def test_status_is_not_filtered_by_the_subscription(relay: Relay) -> None:
    """A routed agent gets the account's whole status snapshot (status is account-wide)."""
    (seq,) = await append(relay, ("messages.waiting", {"mailbox": "201", "count": "2"}))
    await relay.store.put_status(StatusItem(
        account_id=relay.account_id, key="messages.waiting?mailbox=201",
        type="messages.waiting", ids={"mailbox": "201"},
        params={"mailbox": "201", "count": "2"}, event_id="ev-1", seq=seq,
        received_at=format_time(time.time()),
    ))
    agent = await routed(relay, CALLS)
    (status,) = await agent.read_until(StatusReceived)
    assert status.snapshot
    assert [item["key"] for item in status.items] == ["messages.waiting?mailbox=201"]
    await agent.close()


async def test_long_runs_of_non_matching_events_are_scanned_in_bounded_steps(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5,000 events not for the agent are passed over a bounded slice per wake-up (the
    sender wakes itself to go on); the event after them arrives and the cursor ends at the
    head."""
    monkeypatch.setattr(agent_ws, "_SCAN_PER_WAKE", 600)
    reads: list[int] = []
    read_events = relay.store.read_events

    async def counting(account_id: str, *, after: int, limit: int) -> Any:
        batch = await read_events(account_id, after=after, limit=limit)
        reads.append(len(batch))
        return batch

    monkeypatch.setattr(relay.store, "read_events", counting)
    agent = await routed(relay, CALLS)
    await agent.welcome()
    await append(relay, *[("sms.received", {"n": str(i)}) for i in range(5000)])
    (last,) = await append(relay, ("call.arriving", {}))
    assert await agent.events(1) == [last]
    await agent.ack(last)
    await eventually(lambda: caught_up(relay, agent.agent_id))
    assert max(reads) <= agent_ws._ROUTED_READ
    await agent.close()


async def test_real_agent_inbox_holds_only_its_subscription(tmp_path: Path) -> None:
    """The real agent, configured with a [subscription], commits only matching events to its
    inbox, and the relay's cursor for it ends at the head."""
    async with running_relay(tmp_path) as relay:
        record, key = await relay.add_agent()
        seqs = await append(relay, *MIXED)
        config = AgentConfig(
            relay_url=relay.url.replace("ws://", "http://").removesuffix("/v1/agent"),
            agent_id=record.id, relay_id=relay.relay_id, data_dir=tmp_path,
            backoff_initial=10 * MS, backoff_max=100 * MS,
            link=LinkConfig(auth_timeout=WAIT),
            subscription=SubscriptionConfig(types=["call.arriving"], params={"dialled": ["0201"]}),
        )
        inbox = await Inbox.open(tmp_path / "inbox.db")
        task = asyncio.create_task(RealAgentLink(config, private_key=key, inbox=inbox).run())
        try:
            await eventually(lambda: caught_up(relay, record.id))
            stored = await inbox.read(None, 100)
            assert [(e.event["type"], e.event["params"]) for e in stored] == [
                ("call.arriving", {"dialled": "0201"})
            ]
            assert inbox.last_seq() == seqs[1]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await inbox.close()


class ReadCounter:
    """Counts the events the relay reads from the real store (a spy: reads still happen)."""

    def __init__(self, relay: Relay) -> None:
        self.events = 0
        store = relay.store
        read = store.read_events

        async def counted(account_id: str, *, after: int, limit: int) -> Any:
            batch = await read(account_id, after=after, limit=limit)
            self.events += len(batch)
            return batch

        store.read_events = counted  # type: ignore[method-assign]


async def test_a_reconnect_with_the_same_subscription_does_not_rescan_passed_over_events(
    relay: Relay,
) -> None:
    """The run a link passed over is not read again by the agent's next link with the same
    subscription (docs/protocol.md, Routing); a later match still arrives, and a changed
    subscription reads the run again and gets what now matches."""
    (wanted,) = await append(relay, ("call.arriving", {}))
    passed = await append(relay, *[("sms.received", {})] * 600)
    first = await routed(relay, CALLS)
    await first.welcome()
    assert await first.events(1) == [wanted]
    await first.ack(wanted)
    await eventually(lambda: caught_up(relay, first.agent_id))
    await first.close()
    await first.closed()

    reads = ReadCounter(relay)
    again = await RoutedAgent(relay, first.agent_id, first.key, subscription=CALLS,
                              resume_after=wanted).connect()
    await again.welcome()
    (later,) = await append(relay, ("call.ended", {}))
    assert await again.events(1) == [later]
    assert reads.events < 10  # the new event, not the 600 passed over
    await again.close()
    await again.closed()

    widened = await RoutedAgent(relay, first.agent_id, first.key,
                                subscription={"types": ["call.*", "sms.*"]},
                                resume_after=later).connect()
    await widened.welcome()
    # Events after the resume point are matched again: none of the 600 is below it, and the
    # widened subscription is a new one, so nothing is skipped for it.
    await append(relay, ("sms.received", {}))
    assert len(await widened.events(1)) == 1
    assert passed[-1] < later
    await widened.close()


async def test_a_lost_inbox_still_gets_its_events_again_past_a_known_run(relay: Relay) -> None:
    """An agent that comes back from resume 0 gets its matching events again; only the run
    after them, known to hold none, is jumped over."""
    (wanted,) = await append(relay, ("call.arriving", {}))
    await append(relay, *[("sms.received", {})] * 300)
    first = await routed(relay, CALLS)
    await first.welcome()
    assert await first.events(1) == [wanted]
    await first.ack(wanted)
    await eventually(lambda: caught_up(relay, first.agent_id))
    await first.close()
    await first.closed()
    wiped = await RoutedAgent(relay, first.agent_id, first.key, subscription=CALLS).connect()
    await wiped.welcome()
    assert await wiped.events(1) == [wanted]
    await wiped.close()
