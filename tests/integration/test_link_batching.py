"""Batched events over real sockets (issue 7; docs/protocol.md, Batched events).

The real relay (public app, SQLite) and the real agent (``AgentLink``, SQLite inbox) talk
through :class:`FrameTap`, a WebSocket relay on 127.0.0.1 that records every message both ways.
It can also drop ``features`` from the agent's ``hello``: the relay then sees an older agent,
and the agent an older relay (which ignores the field), so both compatibility directions run
against the code of this release.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from relay_agent.inbox import CommitResult, Inbox
from relay_agent.link import AgentLink
from shared import crypto
from shared.config import AgentConfig, LinkConfig
from shared.link import SUBPROTOCOL
from tests.helpers.relay_app import Agent, running_relay
from tests.helpers.timing import MS
from tests.integration.agent.support import RelayUnderTest, eventually, serve_relay

WAIT = 5000 * MS
_PROTOCOLS = [Subprotocol(SUBPROTOCOL)]


class FrameTap:
    """Forwards each WebSocket of an agent to the relay and records every text message.

    ``down``: relay → agent messages as the relay sent them, decoded; ``up``: agent → relay, as
    the agent sent them. With ``strip_features`` the agent's ``hello`` reaches the relay without
    its ``features``.
    """

    def __init__(self, upstream: str, *, strip_features: bool = False) -> None:
        self.upstream = upstream
        self.strip_features = strip_features
        self.down: list[dict[str, Any]] = []
        self.up: list[dict[str, Any]] = []
        self._server: Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        """Relay → agent frames of these types, in order."""
        return [frame for frame in self.down if frame["type"] in types]

    def delivered_seqs(self) -> list[int]:
        """Every seq the relay sent, in order, from event and events frames alike."""
        seqs: list[int] = []
        for frame in self.of_type("event", "events"):
            items = frame["items"] if frame["type"] == "events" else [frame]
            seqs += [item["seq"] for item in items]
        return seqs

    def acks(self) -> list[int]:
        return [frame["seq"] for frame in self.up if frame["type"] == "ack"]

    async def _serve(self, agent: ServerConnection) -> None:
        async with connect(
            self.upstream, subprotocols=_PROTOCOLS, open_timeout=WAIT, compression=None
        ) as relay:
            pipes = [
                asyncio.create_task(self._pipe(agent, relay, self.up)),
                asyncio.create_task(self._pipe(relay, agent, self.down)),
            ]
            _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _pipe(
        self,
        source: ServerConnection | ClientConnection,
        target: ServerConnection | ClientConnection,
        record: list[dict[str, Any]],
    ) -> None:
        try:
            async for message in source:
                assert isinstance(message, str)
                frame = json.loads(message)
                record.append(frame)
                if record is self.up and frame["type"] == "hello" and self.strip_features:
                    message = json.dumps({k: v for k, v in frame.items() if k != "features"})
                await target.send(message)
        except ConnectionClosed:
            pass
        await target.close()

    async def __aenter__(self) -> FrameTap:
        self._server = await serve(
            self._serve, "127.0.0.1", 0, subprotocols=_PROTOCOLS, compression=None
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


class BatchRecordingInbox(Inbox):
    """An inbox that records the seqs of each commit call."""

    commits: list[list[int]]

    async def commit(self, items: Sequence[tuple[int, dict[str, Any]]]) -> CommitResult:
        self.commits.append([seq for seq, _ in items])
        return await super().commit(items)


@dataclass(slots=True)
class TapTarget:
    """Where the test ``Agent`` of tests/helpers/relay_app.py connects: through the tap."""

    url: str
    relay_id: str


@asynccontextmanager
async def running_agent(
    tmp_path: Path, tap: FrameTap, agent_id: str, key: crypto.Ed25519PrivateKey, relay_id: str
) -> AsyncIterator[BatchRecordingInbox]:
    """The real agent connected through ``tap``; its inbox, open until the block ends."""
    inbox = await BatchRecordingInbox.open(tmp_path / "inbox.db")
    assert isinstance(inbox, BatchRecordingInbox)
    inbox.commits = []
    config = AgentConfig(
        relay_url=f"http://127.0.0.1:{tap.port}", agent_id=agent_id, relay_id=relay_id,
        data_dir=tmp_path, backoff_initial=10 * MS, backoff_max=100 * MS,
        link=LinkConfig(auth_timeout=WAIT),
    )
    task = asyncio.create_task(AgentLink(config, private_key=key, inbox=inbox).run())
    try:
        yield inbox
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await inbox.close()


def _ws_url(relay: RelayUnderTest) -> str:
    return f"ws://127.0.0.1:{relay.port}/v1/agent"


async def _cursor_is(relay: RelayUnderTest, agent_id: str, seq: int) -> bool:
    return await relay.cursor(agent_id) == seq


async def test_batching_agent_commits_and_acks_each_batch_once(tmp_path: Path) -> None:
    """Events waiting at connect arrive as one events frame, in order, once; the agent commits
    them in one inbox commit and sends one ack; later events arrive batched too."""
    async with serve_relay(tmp_path / "relay") as relay, FrameTap(_ws_url(relay)) as tap:
        agent_id, key = await relay.add_agent()
        before = await relay.append(20)
        relay_id = relay.services.relay_id
        async with running_agent(tmp_path, tap, agent_id, key, relay_id) as inbox:
            await eventually(lambda: inbox.last_seq() == before[-1], what="the first batch")
            await eventually(lambda: tap.acks() == [before[-1]], what="the ack of the batch")
            hello = tap.up[0]
            assert hello["type"] == "hello" and hello["features"] == ["events"]
            assert [len(frame["items"]) for frame in tap.of_type("events")] == [20]
            assert inbox.commits == [before]
            await eventually(lambda: _cursor_is(relay, agent_id, before[-1]), what="cursor")

            after = await relay.append(7)
            await eventually(lambda: inbox.last_seq() == after[-1], what="later events")
            await eventually(lambda: tap.acks()[-1] == after[-1], what="their ack")
            stored = [e.event["id"] for e in await inbox.read(None, 100)]
        assert tap.of_type("event") == []
        assert tap.delivered_seqs() == before + after
        assert [seq for commit in inbox.commits for seq in commit] == before + after
        assert len(tap.acks()) == len(inbox.commits)
        assert stored == [
            e.event.id
            for e in await relay.services.store.read_events(relay.account_id, after=0, limit=100)
        ]


async def test_window_bounds_a_batching_agent(tmp_path: Path) -> None:
    """With window 4, a batch holds at most 4 events and the next waits for the ack."""
    async with (
        running_relay(tmp_path, link=LinkConfig(window=4)) as relay,
        FrameTap(relay.url) as tap,
    ):
        record, key = await relay.add_agent()
        seqs = await relay.append(10)
        async with running_agent(tmp_path, tap, record.id, key, relay.relay_id) as inbox:
            await eventually(lambda: inbox.last_seq() == seqs[-1], what="every event")
        batches = [[item["seq"] for item in frame["items"]] for frame in tap.of_type("events")]
        assert batches == [seqs[:4], seqs[4:8], seqs[8:]]
        assert inbox.commits == batches
        assert tap.of_type("event") == []


async def test_old_agent_gets_single_event_frames(tmp_path: Path) -> None:
    """New relay, older agent (a hello without features): one event frame per event, in
    order, and the agent's acks work as before."""
    async with serve_relay(tmp_path / "relay") as relay, FrameTap(_ws_url(relay)) as tap:
        agent_id, key = await relay.add_agent()
        seqs = await relay.append(6)
        target = TapTarget(f"ws://127.0.0.1:{tap.port}/v1/agent", relay.services.relay_id)
        # The helper's AgentSession asks for no features: its hello is an older agent's.
        agent = await Agent(target, agent_id, key).connect()
        await agent.welcome()
        assert await agent.events(6) == seqs
        await agent.ack(seqs[-1])
        await eventually(lambda: _cursor_is(relay, agent_id, seqs[-1]), what="the ack")
        await agent.close()
        assert "features" not in tap.up[0]
        assert tap.of_type("events") == []
        assert [frame["seq"] for frame in tap.of_type("event")] == seqs
        assert agent.session.error is None


async def test_batching_agent_works_with_a_relay_that_ignores_features(tmp_path: Path) -> None:
    """New agent, older relay (the hello's features never reach it): single event frames
    arrive, are committed in order once and acked."""
    async with (
        serve_relay(tmp_path / "relay") as relay,
        FrameTap(_ws_url(relay), strip_features=True) as tap,
    ):
        agent_id, key = await relay.add_agent()
        seqs = await relay.append(12)
        relay_id = relay.services.relay_id
        async with running_agent(tmp_path, tap, agent_id, key, relay_id) as inbox:
            await eventually(lambda: inbox.last_seq() == seqs[-1], what="every event")
            await eventually(lambda: tap.acks()[-1:] == [seqs[-1]], what="the last ack")
        assert tap.up[0]["features"] == ["events"]  # what the agent sent, before the tap
        assert tap.of_type("events") == []
        assert [frame["seq"] for frame in tap.of_type("event")] == seqs
        assert [seq for commit in inbox.commits for seq in commit] == seqs
