"""Status items: the snapshot on connect, then changes (DESIGN §Link protocol, Status)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.config import StatusConfig
from shared.link.session import EventReceived, StatusReceived
from tests.helpers.relay_app import Agent

from .test_ctox import ADMIN_TOKEN, RunningRelay, connect, relay_config, running_relay


@dataclasses.dataclass(slots=True)
class Ingress:
    http: aiohttp.ClientSession
    url: str
    account_id: str

    async def post(self, event_type: str, **params: str) -> str:
        """Post one event as X-on would; returns its event id."""
        async with self.http.post(f"{self.url}/{event_type}", data=params) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["id"])


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    async with running_relay(relay_config(tmp_path)) as running:
        yield running


async def make_ingress(relay: RunningRelay, http: aiohttp.ClientSession) -> Ingress:
    async with http.post(
        f"{relay.admin_url}/v1/accounts",
        json={"name": "acme"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as resp:
        assert resp.status == 201, await resp.text()
        data = await resp.json()
    ingress_url = relay.public_url + "/xon/" + data["ingress_url"].rsplit("/xon/", 1)[1]
    return Ingress(http, ingress_url, data["id"])


@pytest.fixture
async def ingress(relay: RunningRelay) -> AsyncIterator[Ingress]:
    async with aiohttp.ClientSession() as http:
        yield await make_ingress(relay, http)


async def next_events(agent: Agent, count: int) -> list[Any]:
    """The next ``count`` status or event deliveries, in arrival order."""
    found: list[Any] = []
    for _ in range(100):
        found += [e for e in await agent.read() if isinstance(e, StatusReceived | EventReceived)]
        if len(found) >= count:
            return found
    raise AssertionError("too few deliveries")


def values(items: list[dict[str, Any]]) -> dict[str, str]:
    return {item["key"]: item["params"]["count"] for item in items}


async def test_snapshot_arrives_on_connect_before_any_event(
    relay: RunningRelay, ingress: Ingress
) -> None:
    """A new link first gets the whole status snapshot, then the events (status ones too)."""
    first = await ingress.post("messages.waiting", mailbox="201", count="1")
    latest = await ingress.post("messages.waiting", mailbox="201", count="4")
    await ingress.post("messages.waiting", mailbox="202", count="2")
    await ingress.post("sms.received", message="hi")
    agent = await relay.add_agent(ingress.account_id)
    snapshot, *events = await next_events(agent, 5)
    assert isinstance(snapshot, StatusReceived) and snapshot.snapshot
    assert values(snapshot.items) == {
        "messages.waiting?mailbox=201": "4",
        "messages.waiting?mailbox=202": "2",
    }
    item = snapshot.items[0]
    assert (item["type"], item["ids"], item["event_id"]) == (
        "messages.waiting",
        {"mailbox": "201"},
        latest,
    )
    assert item["received_at"].endswith("Z") and item["seq"] > 0
    assert all(isinstance(e, EventReceived) for e in events)
    assert events[0].event["id"] == first
    await agent.close()


async def test_empty_snapshot_is_still_sent(relay: RunningRelay, ingress: Ingress) -> None:
    """An account without status items still gets an (empty) snapshot, clearing old values."""
    agent = await relay.add_agent(ingress.account_id)
    (snapshot,) = await agent.read_until(StatusReceived)
    assert (snapshot.items, snapshot.snapshot) == ([], True)
    await agent.close()


async def test_changes_are_pushed_and_replace_older_values(
    relay: RunningRelay, ingress: Ingress
) -> None:
    """Each new value of an item is pushed to the connected agent; a reconnect gets the latest."""
    agent = await relay.add_agent(ingress.account_id)
    await agent.read_until(StatusReceived)  # the empty snapshot
    for mailbox, count in (("201", "1"), ("201", "3"), ("202", "5")):
        await ingress.post("messages.waiting", mailbox=mailbox, count=count)
        (change,) = await agent.read_until(StatusReceived)
        assert not change.snapshot
        assert values(change.items) == {f"messages.waiting?mailbox={mailbox}": count}
    agent_id, key = agent.agent_id, agent.key
    await agent.close()
    again = await connect(relay.target, agent_id, key)
    (snapshot,) = await again.read_until(StatusReceived)
    assert snapshot.snapshot
    assert values(snapshot.items) == {
        "messages.waiting?mailbox=201": "3",
        "messages.waiting?mailbox=202": "5",
    }
    await again.close()


async def test_non_status_events_leave_the_status_alone(
    relay: RunningRelay, ingress: Ingress
) -> None:
    """An ordinary event updates no status item."""
    await ingress.post("sms.received", message="hello")
    assert await relay.services.store.status_snapshot(ingress.account_id) == []


async def test_status_types_are_configurable(tmp_path: Path) -> None:
    """ServerConfig.status.types decides which events are status and what identifies an item."""
    config = dataclasses.replace(
        relay_config(tmp_path), status=StatusConfig(types={"queue.size": ["queue"]})
    )
    async with running_relay(config) as relay, aiohttp.ClientSession() as http:
        ingress = await make_ingress(relay, http)
        await ingress.post("messages.waiting", mailbox="201", count="1")
        await ingress.post("queue.size", queue="sales", size="3")
        (item,) = await relay.services.store.status_snapshot(ingress.account_id)
        assert (item.key, item.params) == (
            "queue.size?queue=sales",
            {"queue": "sales", "size": "3"},
        )


async def test_every_agent_of_the_account_gets_the_change(
    relay: RunningRelay, ingress: Ingress
) -> None:
    """Two connected agents of one account both receive a pushed change."""
    agents = [await relay.add_agent(ingress.account_id) for _ in range(2)]
    for agent in agents:
        await agent.read_until(StatusReceived)
    await ingress.post("messages.waiting", mailbox="301", count="9")
    for agent in agents:
        (change,) = await agent.read_until(StatusReceived)
        assert values(change.items) == {"messages.waiting?mailbox=301": "9"}
        await agent.close()
