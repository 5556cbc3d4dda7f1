"""Status end to end: X-on status events into the real relay's ingress, the snapshot and
changes over the link, the agent's cache and ``GET /v1/status`` (issue 3, acceptance)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.events import parse_time
from shared.sim.xon_api import FakeXonApi
from tests.helpers.timing import MS

from .support import RelayUnderTest, eventually
from .test_ctox_local import AgentUnderTest, run_agent_under_test
from .test_ctox_relay import XON_KEY, real_relay

INGRESS_KEY = "ingress-test-key-0123456789abcdef"


@pytest.fixture
async def xon() -> AsyncIterator[FakeXonApi]:
    async with FakeXonApi(api_key=XON_KEY) as api:
        yield api


async def post_status(relay: RelayUnderTest, mailbox: str, count: str) -> None:
    """X-on sends one Messages Waiting status event to the relay's ingress."""
    url = f"{relay.url}/xon/{INGRESS_KEY}/messages.waiting"
    async with aiohttp.ClientSession() as http, http.post(
        url, data={"mailbox": mailbox, "count": count},
        timeout=aiohttp.ClientTimeout(total=5000 * MS),
    ) as response:
        assert response.status == 200, await response.text()


def counts(body: dict[str, Any]) -> dict[str, str]:
    return {item["params"]["mailbox"]: item["params"]["count"] for item in body["items"]}


async def wait_for_counts(agent: AgentUnderTest, expected: dict[str, str]) -> None:
    async def check() -> bool:
        return counts(await agent.status()) == expected

    await eventually(check, what=f"status {expected}")


async def test_latest_status_survives_an_agent_restart_with_the_relay_stopped(
    tmp_path: Path, xon: FakeXonApi
) -> None:
    """Two changes of one item and one of another; restart the agent with the relay stopped:
    /v1/status shows the latest values with their times, and link_up false."""
    async with real_relay(tmp_path / "relay", xon, ingress_key=INGRESS_KEY) as relay:
        agent_id, key = await relay.add_agent()
        port, relay_id = relay.port, relay.services.relay_id
        async with run_agent_under_test(tmp_path / "agent", port, relay_id, key,
                                        agent_id=agent_id) as agent:
            await agent.connected()
            await post_status(relay, "201", "1")
            await post_status(relay, "201", "4")
            await post_status(relay, "202", "2")
            await wait_for_counts(agent, {"201": "4", "202": "2"})
            assert (await agent.status())["link_up"] is True
    async with run_agent_under_test(tmp_path / "agent", port, relay_id, key,
                                    agent_id=agent_id) as agent:
        body = await agent.status()
    assert body["link_up"] is False
    assert counts(body) == {"201": "4", "202": "2"}
    for item in body["items"]:
        assert item["type"] == "messages.waiting"
        assert item["key"] == f"messages.waiting?mailbox={item['params']['mailbox']}"
        parse_time(item["received_at"])
        assert item["event_id"]
    parse_time(body["updated_at"])


async def test_agent_gets_the_snapshot_of_changes_made_while_it_was_away(
    tmp_path: Path, xon: FakeXonApi
) -> None:
    """Status events the relay took while the agent was offline arrive as the snapshot on
    connect, replacing what the agent had."""
    async with real_relay(tmp_path / "relay", xon, ingress_key=INGRESS_KEY) as relay:
        agent_id, key = await relay.add_agent()
        args = (tmp_path / "agent", relay.port, relay.services.relay_id, key)
        async with run_agent_under_test(*args, agent_id=agent_id) as agent:
            await agent.connected()
            await post_status(relay, "201", "1")
            await wait_for_counts(agent, {"201": "1"})
        await post_status(relay, "201", "0")
        await post_status(relay, "203", "6")
        async with run_agent_under_test(*args, agent_id=agent_id) as agent:
            await wait_for_counts(agent, {"201": "0", "203": "6"})
