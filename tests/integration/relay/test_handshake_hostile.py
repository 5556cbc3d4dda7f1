"""Silent WebSocket upgrades cannot keep real agents out (docs/protocol.md, Reconnecting): an
upgrade that sends no ``hello`` within ``link.hello_timeout`` is closed and frees its slot, and
one source address holds at most its share of the slots (``link.handshake_share``); beyond it
its upgrades are refused at once with 429 ``busy``, without a place in the retry schedule."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.protocol import State
from websockets.typing import Subprotocol

from relay_server.agent_ws import HandshakeGate, handshake_gate, handshake_source
from shared import crypto
from shared.config import LimitsConfig, LinkConfig
from shared.errors import ConfigError
from shared.link.frames import SUBPROTOCOL, CloseCode
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

ATTACKER = "203.0.113.9"
"""The source the silent upgrades claim through the trusted proxy's ``X-Forwarded-For``."""
SILENT = 70


async def upgrade_from(relay: Relay, source: str) -> ClientConnection:
    return await connect(
        relay.url,
        subprotocols=[Subprotocol(SUBPROTOCOL)],
        open_timeout=WAIT,
        additional_headers={"X-Forwarded-For": source},
    )


async def test_one_source_holds_only_its_share_and_a_real_agent_gets_in_at_once(
    tmp_path: Path,
) -> None:
    """70 silent upgrades from one address: 2 hold slots, the rest get 429 at once, and a
    real agent from another address is welcomed while the silent ones still hold theirs."""
    link = LinkConfig(max_handshakes=16, handshake_queue_timeout=WAIT, hello_timeout=10 * WAIT)
    limits = LimitsConfig(trusted_proxies=["127.0.0.1"])
    async with running_relay(tmp_path, link=link, limits=limits) as relay:
        gate = handshake_gate(relay.hub)
        held: list[ClientConnection] = []
        refusals: list[InvalidStatus] = []
        for _ in range(SILENT):
            try:
                held.append(await upgrade_from(relay, ATTACKER))
            except InvalidStatus as exc:
                refusals.append(exc)
        assert len(held) == gate.per_source == 2
        assert len(refusals) == SILENT - 2
        response = refusals[0].response
        assert response.status_code == 429
        assert json.loads(bytes(response.body))["error"]["code"] == "busy"
        assert int(response.headers["Retry-After"]) >= 1
        assert gate.waiting == 0  # refused, not queued

        record, key = await relay.add_agent()
        agent = await Agent(relay, record.id, key).connect()
        await agent.welcome()
        # Admitted while every silent upgrade still holds its slot: nothing waited for them.
        assert all(ws.state is State.OPEN for ws in held)
        assert gate.running == 2
        # Another tenant's link works too, and gets its events.
        account = await relay.store.create_account(
            name="other", ingress_key_hash=crypto.hash_secret(crypto.new_token())
        )
        tenant = dataclasses.replace(relay, account_id=account.id)
        peer_record, peer_key = await tenant.add_agent("other-pc")
        peer = await Agent(tenant, peer_record.id, peer_key).connect()
        assert (await peer.welcome()).account_id == account.id
        (seq,) = await tenant.append(1)
        assert await peer.events(1) == [seq]
        await peer.close()
        await agent.close()
        for ws in held:
            await ws.close()

        async def released() -> bool:
            return gate.running == 0 and not gate.source_full(ATTACKER)

        await eventually(released)


async def test_queued_upgrades_count_against_their_source_too(tmp_path: Path) -> None:
    """With every slot taken, a source may queue up to its share and is refused beyond it
    while the queue stays open to others; the queued ones are served as slots free."""
    link = LinkConfig(max_handshakes=4, handshake_queue_timeout=WAIT, hello_timeout=10 * WAIT)
    limits = LimitsConfig(trusted_proxies=["127.0.0.1"])
    async with running_relay(tmp_path, link=link, limits=limits) as relay:
        gate = handshake_gate(relay.hub)
        assert gate.per_source == 2
        holders = [await upgrade_from(relay, f"198.51.100.{n // 2}") for n in range(4)]
        queued = [asyncio.create_task(upgrade_from(relay, ATTACKER)) for _ in range(2)]
        await eventually(waiting(gate, 2))
        with pytest.raises(InvalidStatus) as refused:
            await upgrade_from(relay, ATTACKER)
        assert refused.value.response.status_code == 429
        other = asyncio.create_task(upgrade_from(relay, "192.0.2.1"))  # not refused: queued
        await eventually(waiting(gate, 3))
        for ws in holders[:3]:
            await ws.close()
        served = [await task for task in (*queued, other)]
        for ws in (*served, holders[3]):
            await ws.close()

        async def released() -> bool:
            return gate.running == 0 and gate.waiting == 0 and not gate.source_full(ATTACKER)

        await eventually(released)


def waiting(gate: HandshakeGate, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return gate.waiting == count

    return check


async def test_silent_upgrades_are_closed_after_the_hello_timeout_and_free_their_slots(
    tmp_path: Path,
) -> None:
    """Every slot taken by upgrades that never speak: each is closed 4008 once
    ``hello_timeout`` passes, the slots are free again and an agent gets in."""
    link = LinkConfig(
        max_handshakes=4,
        handshake_queue_timeout=0,
        hello_timeout=100 * MS,
        handshake_share=None,
    )
    async with running_relay(tmp_path, link=link) as relay:
        gate = handshake_gate(relay.hub)
        silent = [await raw_connect(relay) for _ in range(4)]
        assert gate.running == 4
        with pytest.raises(InvalidStatus):
            await raw_connect(relay)  # all slots held: refused 503 at once
        codes = [await raw_close_code(ws) for ws in silent]
        assert codes == [CloseCode.AUTH_TIMEOUT] * 4

        async def all_free() -> bool:
            return gate.running == 0

        await eventually(all_free)
        record, key = await relay.add_agent()
        agent = await Agent(relay, record.id, key).connect()
        await agent.welcome()
        await agent.close()


async def test_a_hello_in_time_is_not_cut_by_the_hello_timeout(tmp_path: Path) -> None:
    """The hello timeout bounds only the silence before ``hello``: an agent that sent it
    and then authenticates is served past it."""
    link = LinkConfig(hello_timeout=50 * MS, handshake_share=None)
    async with running_relay(tmp_path, link=link) as relay:
        record, key = await relay.add_agent()
        agent = await Agent(relay, record.id, key).connect()
        await agent.welcome()
        await asyncio.sleep(2 * link.hello_timeout)  # let the hello deadline pass: not applied
        (seq,) = await relay.append(1)
        assert await agent.events(1) == [seq]
        await agent.close()


def test_an_ipv6_source_is_its_64_network() -> None:
    """Addresses of one IPv6 /64 share one allowance; an IPv4 address (mapped or not) has its
    own."""
    assert handshake_source("2001:db8:1:2::1") == handshake_source("2001:db8:1:2:ffff::9")
    assert handshake_source("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert handshake_source("2001:db8:1:3::1") != handshake_source("2001:db8:1:2::1")
    assert handshake_source("192.0.2.1") != handshake_source("192.0.2.2")
    assert handshake_source("::ffff:192.0.2.1") == "192.0.2.1"
    assert handshake_source("") == ""


def test_hello_timeout_and_share_are_validated() -> None:
    """A hello timeout must be positive; a share lies in (0, 1]."""
    assert (LinkConfig().hello_timeout, LinkConfig().handshake_share) == (3.0, 0.125)
    with pytest.raises(ConfigError, match="hello_timeout"):
        LinkConfig(hello_timeout=0)
    with pytest.raises(ConfigError, match="handshake_share"):
        LinkConfig(handshake_share=0)
    with pytest.raises(ConfigError, match="handshake_share"):
        LinkConfig(handshake_share=1.5)
