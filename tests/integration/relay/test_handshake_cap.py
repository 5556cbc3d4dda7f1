"""Load shedding on ``/v1/agent``: at most ``link.max_handshakes`` handshakes at once per relay
process; beyond it the upgrade is answered 503 ``busy`` with ``Retry-After`` and the agent
retries with its jittered back-off (docs/performance.md, reconnect storm)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink as RealAgentLink
from relay_agent.link import LinkState
from shared.config import SERVER_ENV_PREFIX, AgentConfig, LinkConfig, ServerConfig, load
from shared.errors import ConfigError
from tests.helpers.relay_app import Agent, Relay, eventually, raw_connect, running_relay
from tests.helpers.timing import MS


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async with running_relay(tmp_path, link=LinkConfig(max_handshakes=2)) as relay:
        yield relay


async def refused(relay: Relay) -> InvalidStatus:
    """The refusal of one more upgrade (fails the test if the upgrade succeeds)."""
    with pytest.raises(InvalidStatus) as caught:
        ws = await raw_connect(relay)
        await ws.close()
    return caught.value


async def connects(relay: Relay) -> ClientConnection | None:
    """One upgrade attempt: the connection, or None when the relay is busy."""
    try:
        return await raw_connect(relay)
    except InvalidStatus as exc:
        assert exc.response.status_code == 503
        return None


async def test_upgrade_beyond_the_cap_gets_503_busy_with_retry_after(relay: Relay) -> None:
    """With two handshakes held open (connected, no hello), a third upgrade is refused busy."""
    holders = [await raw_connect(relay), await raw_connect(relay)]
    response = (await refused(relay)).response
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert json.loads(bytes(response.body))["error"]["code"] == "busy"
    for ws in holders:
        await ws.close()


async def test_a_closed_handshake_frees_its_slot_for_a_new_agent(relay: Relay) -> None:
    """Once one held handshake closes, a new agent gets in and is welcomed."""
    holders = [await raw_connect(relay), await raw_connect(relay)]
    await refused(relay)
    await holders[0].close()
    record, key = await relay.add_agent()
    agent = Agent(relay, record.id, key)

    async def agent_in() -> bool:
        try:
            await agent.connect()
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            return False
        return True

    await eventually(agent_in)
    await agent.welcome()
    await agent.close()
    await holders[1].close()


async def test_authenticated_links_hold_no_handshake_slot(relay: Relay) -> None:
    """More welcomed agents than the cap stay connected; only handshakes count."""
    agents = []
    for n in range(3):
        record, key = await relay.add_agent(f"pc-{n}")
        agent = await Agent(relay, record.id, key).connect()
        await agent.welcome()
        agents.append(agent)
    holder = await raw_connect(relay)
    second = await raw_connect(relay)
    await refused(relay)
    for ws in (holder, second):
        await ws.close()
    for agent in agents:
        await agent.close()


async def test_no_cap_when_max_handshakes_is_none(tmp_path: Path) -> None:
    """``link.max_handshakes = None`` refuses no upgrade."""
    async with running_relay(tmp_path, link=LinkConfig(max_handshakes=None)) as relay:
        holders = [await raw_connect(relay) for _ in range(4)]
        for ws in holders:
            await ws.close()


def test_max_handshakes_is_off_by_default_and_set_from_the_environment() -> None:
    """No cap unless configured; ``XON_RELAY_LINK_MAX_HANDSHAKES=256`` sets one."""
    assert LinkConfig().max_handshakes is None
    env = {"XON_RELAY_LINK_MAX_HANDSHAKES": "256"}
    config = load(ServerConfig, path=None, env=env, flags={}, env_prefix=SERVER_ENV_PREFIX)
    assert config.link.max_handshakes == 256


def test_max_handshakes_must_be_positive() -> None:
    """A cap of 0 would refuse every agent: a configuration error."""
    with pytest.raises(ConfigError, match="max_handshakes"):
        LinkConfig(max_handshakes=0)


async def test_real_agent_retries_a_busy_relay_and_gets_in(tmp_path: Path, relay: Relay) -> None:
    """The agent's link treats 503 busy as transient and connects once a slot frees."""
    holders = [await raw_connect(relay), await raw_connect(relay)]
    record, key = await relay.add_agent()
    inbox = await Inbox.open(tmp_path / "inbox.db")
    config = AgentConfig(
        relay_url=relay.url.replace("ws://", "http://").removesuffix("/v1/agent"),
        agent_id=record.id, relay_id=relay.relay_id, data_dir=tmp_path,
        backoff_initial=10 * MS, backoff_max=50 * MS,
    )
    link = RealAgentLink(config, private_key=key, inbox=inbox)
    task = asyncio.create_task(link.run())
    try:

        async def refused_busy() -> bool:
            return "503" in (link.status.last_error or "")

        async def welcomed() -> bool:
            return link.status.state is LinkState.CONNECTED

        await eventually(refused_busy)
        assert not task.done()
        await holders[0].close()
        await eventually(welcomed)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await inbox.close()
        for ws in holders:
            await ws.close()


async def test_refusals_take_no_slot(relay: Relay) -> None:
    """After many refusals, closing both holders lets exactly two handshakes in again."""
    holders = [await raw_connect(relay), await raw_connect(relay)]
    for _ in range(5):
        await refused(relay)
    for ws in holders:
        await ws.close()
    again: list[ClientConnection] = []

    async def two_in() -> bool:
        ws = await connects(relay)
        if ws is not None:
            again.append(ws)
        return len(again) == 2

    await eventually(two_in)
    await refused(relay)
    for ws in again:
        await ws.close()
