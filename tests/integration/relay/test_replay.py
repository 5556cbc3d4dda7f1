"""Replay (docs/operations.md, Replay): the real relay (both listeners) and a real agent link
with its SQLite inbox, in-process. The agent's inbox loses some events (rows deleted behind its
back, as a restored backup or its retention would); a replay brings every one back, once."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink, LinkState
from relay_server.agent_ws import AgentLink as RelayLink
from relay_server.cli import main
from shared.config import AgentConfig, LinkConfig, ServerConfig
from shared.link import Acked, LinkEvent
from tests.helpers.timing import MS

from .conftest import ADMIN_TOKEN, Instance, Tenant, new_tenant, running_instance

STEP = 10 * MS
WAIT = 10_000 * MS


async def until(check: Callable[[], bool], *, what: str) -> None:
    """Poll every STEP until ``check()`` holds; fail after WAIT."""
    for _ in range(int(WAIT / STEP)):
        if check():
            return
        await asyncio.sleep(STEP)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass(slots=True)
class Agent:
    """A real agent link and inbox in this process; start and stop it like the service."""

    instance: Instance
    tenant: Tenant
    data_dir: Path
    inbox: Inbox | None = None
    link: AgentLink | None = None
    task: asyncio.Task[Any] | None = None

    @property
    def db(self) -> Path:
        return self.data_dir / "inbox.db"

    async def start(self) -> None:
        self.inbox = await Inbox.open(self.db)
        config = AgentConfig(
            relay_url=self.instance.base_url,
            agent_id=self.tenant.agent_id,
            relay_id=self.instance.relay_id,
            data_dir=self.data_dir,
            backoff_initial=20 * MS,
            backoff_max=100 * MS,
        )
        self.link = AgentLink(config, private_key=self.tenant.private_key, inbox=self.inbox)
        self.task = asyncio.create_task(self.link.run())
        link = self.link
        await until(lambda: link.status.state is LinkState.CONNECTED, what="the welcome")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            assert self.task.cancelled(), self.task  # the link never gave up on its own
            self.task = None
        if self.inbox is not None:
            await self.inbox.close()
            self.inbox = None

    def rows(self) -> list[tuple[int, str]]:
        """(cursor, event id) of every event in the inbox, read straight from its file."""
        db = sqlite3.connect(self.db)
        try:
            return [(int(c), str(i)) for c, i in db.execute("SELECT cursor, id FROM events")]
        finally:
            db.close()

    def lose(self, ids: list[str]) -> None:
        """Delete events from the inbox behind the agent's back (its WAL allows a second
        connection): what a restored backup or retention before an app read would leave."""
        db = sqlite3.connect(self.db)
        try:
            with db:
                db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])
        finally:
            db.close()


@asynccontextmanager
async def relay_and_agent(tmp_path: Path, *, window: int = 256) -> AsyncIterator[Agent]:
    (tmp_path / "relay").mkdir()
    (tmp_path / "agent").mkdir()
    config = ServerConfig(
        data_dir=tmp_path / "relay", public_url="http://relay.test", link=LinkConfig(window=window)
    )
    async with running_instance(config) as instance:
        tenant = await new_tenant(instance.store, "acme")
        agent = Agent(instance, tenant, tmp_path / "agent")
        try:
            yield agent
        finally:
            await agent.stop()


async def post(agent: Agent, count: int) -> list[tuple[str, str]]:
    """Send ``count`` events to the relay's ingress; their (id, received_at)."""
    events = []
    async with aiohttp.ClientSession() as http:
        for n in range(count):
            url = f"{agent.instance.base_url}/xon/{agent.tenant.ingress_key}/sms.received"
            async with http.get(url, params={"n": str(n)}) as resp:
                assert resp.status == 200, await resp.text()
                stored = await agent.instance.store.get_event((await resp.json())["id"])
                assert stored is not None
                events.append((stored.event.id, stored.event.received_at))
    return events


async def replay(agent: Agent, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    url = f"{agent.instance.admin_url}/v1/agents/{agent.tenant.agent_id}/replay"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def ids_of(rows: list[tuple[int, str]]) -> list[str]:
    return [i for _, i in sorted(rows)]


async def test_replay_while_offline_refills_the_inbox_at_the_next_connect(
    tmp_path: Path,
) -> None:
    """Events lost from a stopped agent's inbox come back once it reconnects after a replay
    since the first event's time: all 10, each once; the ones it held keep their cursors."""
    async with relay_and_agent(tmp_path) as agent:
        await agent.start()
        events = await post(agent, 10)
        ids = [i for i, _ in events]
        await until(lambda: len(agent.rows()) == 10, what="the first delivery")
        await agent.stop()
        lost = ids[1:8:2]
        agent.lose(lost)
        kept = {i: c for c, i in agent.rows()}
        status, res = await replay(agent, {"since": events[0][1]})
        assert status == 200, res
        assert (res["after_seq"], res["events"], res["disconnected"]) == (0, 10, False)
        await agent.start()
        await until(lambda: len(agent.rows()) == 10, what="the replayed events")
        rows = agent.rows()
        assert sorted(ids_of(rows)) == sorted(ids) and len(rows) == len(set(ids_of(rows)))
        # An event still held is not stored again; a lost one comes back with a new cursor.
        again = {i: c for c, i in rows}
        assert all(again[i] == c for i, c in kept.items())
        assert min(again[i] for i in lost) > max(kept.values())
        store = agent.instance.store
        head = await store.head_seq(agent.tenant.account_id)
        for _ in range(int(WAIT / STEP)):
            if await store.get_cursor(agent.tenant.agent_id) == head:
                break
            await asyncio.sleep(STEP)
        assert await store.get_cursor(agent.tenant.agent_id) == head
        assert agent.inbox is not None and agent.inbox.last_seq() == head
        assert await store.pending_replay(agent.tenant.agent_id) is None


async def test_a_replay_point_at_the_resume_point_is_moot_and_dropped(tmp_path: Path) -> None:
    """A point at or above what the agent already has replays nothing: ordinary delivery
    sends the newer events, and the point is gone from the store, not read again at every
    connect."""
    async with relay_and_agent(tmp_path) as agent:
        await agent.start()
        ids = [i for i, _ in await post(agent, 3)]
        await until(lambda: len(agent.rows()) == 3, what="the first delivery")
        await agent.stop()
        head = await agent.instance.store.head_seq(agent.tenant.account_id)
        status, _ = await replay(agent, {"after_seq": head})
        assert status == 200
        ids += [i for i, _ in await post(agent, 2)]
        await agent.start()
        await until(lambda: len(agent.rows()) == 5, what="the newer events")
        assert ids_of(agent.rows()) == ids
        assert await agent.instance.store.pending_replay(agent.tenant.agent_id) is None


async def test_cli_replay_of_an_online_agent_reconnects_it_and_reports_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``agent replay --after-seq`` on a connected agent: it is disconnected, reconnects, gets
    the lost events back (once each) and the command reports the replay done."""
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN)
    async with relay_and_agent(tmp_path) as agent:
        await agent.start()
        ids = [i for i, _ in await post(agent, 10)]
        await until(lambda: len(agent.rows()) == 10, what="the first delivery")
        agent.lose(ids[:3])
        head = await agent.instance.store.head_seq(agent.tenant.account_id)
        argv = ["agent", "replay", agent.tenant.agent_id, "--after-seq", "0", "--json",
                "--wait", "10s", "--admin-url", agent.instance.admin_url,
                "--admin-token-file", str(token), "--data-dir", str(tmp_path)]

        def run() -> int:
            try:
                main(argv)
            except SystemExit as exc:
                return int(exc.code or 0)
            raise AssertionError("main() always exits")

        capsys.readouterr()
        code = await asyncio.to_thread(run)
        out, err = capsys.readouterr()
        assert code == 0, err
        result = json.loads(out)
        assert result["state"] == "done" and result["disconnected"] is True
        assert (result["after_seq"], result["through_seq"], result["events"]) == (0, head, 10)
        assert "replay of agent" in err and "Traceback" not in err
        await until(lambda: len(agent.rows()) == 10, what="the replayed events")
        assert sorted(ids_of(agent.rows())) == sorted(ids)


@pytest.mark.parametrize("next_link_reads_first", [False, True], ids=["in_turn", "overtaken"])
async def test_a_replay_cut_short_goes_on_at_the_next_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, next_link_reads_first: bool
) -> None:
    """The link carrying a replay drops after the first ack: the next link finishes the
    replay, every event back, once.

    ``overtaken``: the cut link is slow to end (or ends on another instance), so the next link
    reads the replay point before the cut link has settled it. The point was never taken away,
    so the next link still replays. (CI once lost this race when the first link took the point
    out of the store at its handshake.)"""
    original_handle = RelayLink._handle
    original_read = RelayLink._read_agent
    original_settle = RelayLink._settle_replay
    cut: list[RelayLink] = []
    read_after_cut = asyncio.Event()

    async def handle(self: RelayLink, event: LinkEvent) -> bool:
        over = await original_handle(self, event)
        if isinstance(event, Acked) and self._replay is not None and not cut:
            cut.append(self)
            await self.close(1000, "test: cut the replay short")
        return over

    async def read_agent(self: RelayLink, agent_id: str) -> tuple[Any, int, int]:
        found = await original_read(self, agent_id)
        if cut and self is not cut[0]:
            read_after_cut.set()
        return found

    async def settle(self: RelayLink, cursor: int) -> None:
        if cut and self is cut[0]:
            async with asyncio.timeout(WAIT):
                await read_after_cut.wait()
        await original_settle(self, cursor)

    monkeypatch.setattr(RelayLink, "_handle", handle)
    if next_link_reads_first:
        monkeypatch.setattr(RelayLink, "_read_agent", read_agent)
        monkeypatch.setattr(RelayLink, "_settle_replay", settle)
    async with relay_and_agent(tmp_path, window=1) as agent:
        await agent.start()
        ids = [i for i, _ in await post(agent, 10)]
        await until(lambda: len(agent.rows()) == 10, what="the first delivery")
        await agent.stop()
        agent.lose(ids)
        status, _ = await replay(agent, {"after_seq": 0})
        assert status == 200
        await agent.start()
        await until(lambda: len(agent.rows()) == 10, what="the rest of the replay")
        assert read_after_cut.is_set() is next_link_reads_first
        assert len(cut) == 1 and sorted(ids_of(agent.rows())) == sorted(ids)


async def test_cli_replay_of_an_offline_agent_says_it_waits_for_the_connect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text output for an agent that is not connected: recorded, replayed at its connect."""
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN)
    async with relay_and_agent(tmp_path) as agent:
        await post(agent, 2)
        argv = ["agent", "replay", agent.tenant.agent_id, "--since", "1h",
                "--admin-url", agent.instance.admin_url, "--admin-token-file", str(token),
                "--data-dir", str(tmp_path)]

        def run() -> int:
            try:
                main(argv)
            except SystemExit as exc:
                return int(exc.code or 0)
            raise AssertionError("main() always exits")

        capsys.readouterr()
        assert await asyncio.to_thread(run) == 0
        out, err = capsys.readouterr()
        assert "is offline: the replay starts when it next connects" in out
        assert "2 event(s) after seq 0" in err
        assert await agent.instance.store.pending_replay(agent.tenant.agent_id) == 0


@pytest.mark.parametrize(
    "body",
    [{}, {"since": "yesterday"}, {"after_seq": -1}, {"after_seq": True},
     {"since": "2026-01-01T00:00:00Z", "after_seq": 1}, {"since": 5}],
)
async def test_replay_refuses_a_bad_request(tmp_path: Path, body: dict[str, Any]) -> None:
    """Exactly one of since (ISO 8601) and after_seq (0 or more): anything else is a 400."""
    async with relay_and_agent(tmp_path) as agent:
        status, res = await replay(agent, body)
        assert status == 400 and res["error"]["code"] == "bad_request"


async def test_replay_of_an_unknown_agent_is_a_404(tmp_path: Path) -> None:
    """No such agent: 404 unknown_agent, nothing recorded."""
    async with relay_and_agent(tmp_path) as agent:
        agent.tenant.agent_id = "ag_missing"
        status, res = await replay(agent, {"after_seq": 0})
        assert status == 404 and res["error"]["code"] == "unknown_agent"
