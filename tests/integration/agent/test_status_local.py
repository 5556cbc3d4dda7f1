"""The agent's status cache and ``GET /v1/status`` (DESIGN §Link protocol, Status; §Agent
local API), fed by a small relay made of the real RelaySession on a real socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay_agent.inbox import Inbox
from shared import crypto
from shared.events import parse_time

from .support import eventually
from .test_ctox_local import (
    AGENT_ID,
    AgentUnderTest,
    MiniRelay,
    free_port,
    online,
    run_agent_under_test,
)


@pytest.fixture
def agent_key() -> crypto.Ed25519PrivateKey:
    return crypto.generate_private_key()


@pytest.fixture
def mini_relay(agent_key: crypto.Ed25519PrivateKey) -> MiniRelay:
    return MiniRelay(agents={AGENT_ID: crypto.public_key_b64(agent_key)})


def item(mailbox: str, waiting: str, seq: int) -> dict[str, Any]:
    """A status item as the relay sends it (relay_server/store/base.py StatusItem.to_json)."""
    return {
        "key": f"messages.waiting?mailbox={mailbox}",
        "type": "messages.waiting",
        "ids": {"mailbox": mailbox},
        "params": {"mailbox": mailbox, "waiting": waiting},
        "event_id": f"ev-{seq}",
        "seq": seq,
        "received_at": f"2026-01-01T00:00:{seq:02d}.000Z",
    }


async def stored_item_count(agent: AgentUnderTest, count: int) -> None:
    async def check() -> bool:
        return len((await agent.status())["items"]) == count

    await eventually(check, what=f"{count} status items")


async def wait_for_event(agent: AgentUnderTest, event_id: str) -> None:
    async def check() -> bool:
        return event_id in [i["event_id"] for i in (await agent.status())["items"]]

    await eventually(check, what=f"status item from {event_id}")


async def test_status_is_empty_and_link_down_before_anything_arrived(tmp_path: Path) -> None:
    """A fresh agent with no relay: no items, no update time, link_up false, at once."""
    async with run_agent_under_test(tmp_path / "agent", free_port(), "relay-x",
                                    crypto.generate_private_key()) as agent:
        assert await agent.status() == {"link_up": False, "updated_at": None, "items": []}


async def test_latest_value_of_each_item_survives_a_restart_with_the_relay_down(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """Two changes of one item and one of another; after an agent restart with the relay
    stopped, /v1/status shows the latest values with their times and link_up false."""
    async with online(tmp_path, mini_relay, agent_key) as agent:
        await mini_relay.send_status([], snapshot=True)
        await mini_relay.send_status([item("201", "1", 1)])
        await mini_relay.send_status([item("201", "2", 2)])
        await mini_relay.send_status([item("202", "5", 3)])
        await wait_for_event(agent, "ev-3")
        live = await agent.status()
        assert live["link_up"] is True
    port = mini_relay.port
    async with run_agent_under_test(tmp_path / "agent", port, mini_relay.relay_id,
                                    agent_key) as agent:
        body = await agent.status()
    assert body["link_up"] is False
    assert body["items"] == [item("201", "2", 2), item("202", "5", 3)]
    assert body["updated_at"] == live["updated_at"]
    parse_time(body["updated_at"])


async def test_a_snapshot_replaces_every_item(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """A snapshot (sent on connect) drops items the relay no longer has."""
    async with online(tmp_path, mini_relay, agent_key) as agent:
        await mini_relay.send_status([item("201", "1", 1), item("202", "1", 2)], snapshot=True)
        await stored_item_count(agent, 2)
        await mini_relay.send_status([item("203", "9", 3)], snapshot=True)
        await wait_for_event(agent, "ev-3")
        assert [i["key"] for i in (await agent.status())["items"]] == [
            "messages.waiting?mailbox=203"
        ]


async def test_an_older_change_does_not_roll_a_value_back(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """A change with a lower relay seq than the stored one is ignored."""
    async with online(tmp_path, mini_relay, agent_key) as agent:
        await mini_relay.send_status([item("201", "7", 7)])
        await mini_relay.send_status([item("201", "3", 3), item("202", "1", 8)])
        await wait_for_event(agent, "ev-8")
        values = {i["key"]: i["params"]["waiting"] for i in (await agent.status())["items"]}
    assert values == {"messages.waiting?mailbox=201": "7", "messages.waiting?mailbox=202": "1"}


async def test_malformed_items_are_skipped_and_missing_times_are_filled(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """Items without a string key are dropped; an item without received_at gets the agent's
    time, so every value served has one."""
    async with online(tmp_path, mini_relay, agent_key) as agent:
        await mini_relay.send_status(
            [{"type": "x"}, {"key": 5}, "junk", {"key": "q", "event_id": "ev-q"}],  # type: ignore[list-item]
            snapshot=True,
        )
        await wait_for_event(agent, "ev-q")
        [only] = (await agent.status())["items"]
    assert only["key"] == "q"
    parse_time(only["received_at"])


async def test_status_table_is_kept_in_the_inbox_database(tmp_path: Path) -> None:
    """save_status/read_status round-trip through SQLite, across a reopen."""
    path = tmp_path / "inbox.db"
    box = await Inbox.open(path, clock=lambda: 1_700_000_000.0)
    try:
        assert await box.save_status([item("201", "1", 1), {"nokey": 1}], snapshot=False) == 1
    finally:
        await box.close()
    box = await Inbox.open(path)
    try:
        view = await box.read_status()
    finally:
        await box.close()
    assert view.items == [item("201", "1", 1)]
    assert view.updated_at == 1_700_000_000.0
