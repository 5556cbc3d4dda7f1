"""Load shedding on ``/v1/agent`` by queueing delay: at most ``link.max_handshakes`` handshakes
at once per relay process; an upgrade beyond it waits in a FIFO for up to
``link.handshake_queue_timeout`` (or not at all when the queue is longer than the relay serves
in that time) and is then answered 503 ``busy`` with a ``Retry-After`` booked after the queue
and the earlier refusals (docs/protocol.md, Reconnecting). A held handshake is a raw
connection that never sends ``hello``: it keeps its slot until it closes (these relays wait
longer for a ``hello`` than any test runs, and cap no source: tests/integration/relay/
test_handshake_hostile.py covers both)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink as RealAgentLink
from relay_agent.link import LinkState
from relay_server.agent_ws import HandshakeRate, RetrySchedule, handshake_gate
from shared.config import SERVER_ENV_PREFIX, AgentConfig, LinkConfig, ServerConfig, load
from shared.errors import ConfigError
from tests.helpers.relay_app import Agent, Relay, eventually, raw_connect, running_relay
from tests.helpers.timing import MS

PATIENT = 5000 * MS
"""A queue wait no test reaches: every waiter gets its slot first."""
IMPATIENT = 50 * MS
"""A queue wait that passes while the slots stay held."""
QUIET_OK: dict[str, Any] = {"hello_timeout": 10 * PATIENT, "handshake_share": None}
"""Holders (silent upgrades, all from 127.0.0.1) keep their slots for the whole test."""
BACKOFF_MAX = 50 * MS
"""The agent's ``backoff_max``: it bounds the wait a Retry-After of whole seconds asks for."""


@pytest.fixture
async def patient(tmp_path: Path) -> AsyncIterator[Relay]:
    link = LinkConfig(max_handshakes=2, handshake_queue_timeout=PATIENT, **QUIET_OK)
    async with running_relay(tmp_path, link=link) as relay:
        yield relay


@pytest.fixture
async def impatient(tmp_path: Path) -> AsyncIterator[Relay]:
    link = LinkConfig(max_handshakes=2, handshake_queue_timeout=IMPATIENT, **QUIET_OK)
    async with running_relay(tmp_path, link=link) as relay:
        yield relay


async def refused(relay: Relay) -> InvalidStatus:
    """The refusal of one more upgrade (fails the test if the upgrade succeeds)."""
    with pytest.raises(InvalidStatus) as caught:
        ws = await raw_connect(relay)
        await ws.close()
    return caught.value


async def holding(relay: Relay, count: int = 2) -> list[ClientConnection]:
    return [await raw_connect(relay) for _ in range(count)]


async def waiting(relay: Relay, count: int) -> None:
    """Until ``count`` upgrades wait in the relay's queue."""

    async def queued() -> bool:
        return handshake_gate(relay.hub).waiting == count

    await eventually(queued)


async def test_an_upgrade_waits_for_a_slot_and_is_served_when_one_frees(patient: Relay) -> None:
    """Beyond the cap the upgrade is queued, not refused; a freed slot lets it in."""
    holders = await holding(patient)
    record, key = await patient.add_agent()
    agent = Agent(patient, record.id, key)
    connecting = asyncio.create_task(agent.connect())
    await waiting(patient, 1)
    assert not connecting.done()
    await holders[0].close()
    await connecting
    await agent.welcome()
    gate = handshake_gate(patient.hub)
    assert (gate.running, gate.waiting) == (1, 0)  # holders[1]; the agent's handshake ended
    await agent.close()
    await holders[1].close()


async def test_queued_upgrades_are_served_in_arrival_order(patient: Relay) -> None:
    """Two waiters and one freed slot: the first to arrive gets it, the second still waits."""
    holders = await holding(patient)
    first = asyncio.create_task(raw_connect(patient))
    await waiting(patient, 1)
    second = asyncio.create_task(raw_connect(patient))
    await waiting(patient, 2)
    await holders[0].close()
    in_first = await first
    await waiting(patient, 1)
    assert not second.done()
    await holders[1].close()
    in_second = await second
    for ws in (in_first, in_second):
        await ws.close()


async def test_a_wait_past_the_queue_timeout_gets_503_busy_with_retry_after(
    impatient: Relay,
) -> None:
    """With both slots held past the queue timeout, the upgrade is refused busy."""
    holders = await holding(impatient)
    response = (await refused(impatient)).response
    assert response.status_code == 503
    assert 1 <= int(response.headers["Retry-After"]) <= 30
    assert json.loads(bytes(response.body))["error"]["code"] == "busy"
    assert handshake_gate(impatient.hub).waiting == 0
    for ws in holders:
        await ws.close()


async def test_an_upgrade_behind_a_queue_longer_than_the_timeout_is_refused_at_once(
    patient: Relay,
) -> None:
    """At one handshake a second (so at best two) and a 5 s queue timeout, ten waiters are
    all the queue could serve in time: an eleventh upgrade is refused without queueing,
    booked after them."""
    gate = handshake_gate(patient.hub)
    gate.rate.finished(time.monotonic() - 1.5)  # one handshake finished in a past second
    holders = await holding(patient)
    queued = []
    for n in range(10):
        queued.append(asyncio.create_task(raw_connect(patient)))
        await waiting(patient, n + 1)  # in this order
    response = (await refused(patient)).response
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) == 11  # (10 + 1) at 1 per second
    # A waiter that timed out would still be in the queue (it is skipped lazily).
    assert (gate.waiting, len(gate._queue)) == (10, 10)
    for ws in holders:
        await ws.close()
    for task in queued:  # each holds its slot until closed: served in arrival order
        await (await task).close()


def test_retry_after_is_the_queue_over_the_handshake_rate_within_1_to_30_s() -> None:
    """A first refusal: waiters ahead (plus this one) / handshakes per second, rounded up,
    clamped to [1, 30]; without a known rate, one handshake per slot per second."""
    for waiting, rate, expected in [
        (0, 200.0, 1),
        (999, 200.0, 5),
        (1000, 200.0, 6),
        (100_000, 200.0, 30),
        (127, None, 2),
        (127, 0.0, 2),
    ]:
        assert RetrySchedule().book(50.0, waiting, rate, slots=64) == expected, (waiting, rate)


def test_refusals_in_a_row_are_booked_one_handshake_apart() -> None:
    """Each refusal takes the place after the previous one: at 128 handshakes/s the first
    128 refused now come back within 1 s, the next 128 within 2 s, and so on; places up to
    30 s ahead, later ones share the 30th second. Time frees places again."""
    schedule = RetrySchedule()
    waits = [schedule.book(16.0, 0, 128.0, slots=64) for _ in range(4000)]
    assert waits[:128] == [1] * 128
    assert waits[128:256] == [2] * 128
    assert waits[3711] == 29
    assert waits[3712:] == [30] * 288
    assert waits == sorted(waits)
    # 20 s later the places booked are those up to 30 s after the first refusals.
    assert schedule.book(36.0, 0, 128.0, slots=64) == 11
    # Upgrades waiting in the queue go first: a refusal is booked after them.
    queued = RetrySchedule()
    assert queued.book(0.0, 0, 10.0, slots=64) == 1
    assert queued.book(0.0, 50, 10.0, slots=64) == 6


def test_the_handshake_rate_is_the_busy_seconds_average_but_not_under_half_the_best() -> None:
    """Finishes are counted per whole second; a busy second (others were waiting) counts as
    much as all busy seconds before it. The estimate never drops under half of the best
    second, which halves every minute; quiet seconds leave the average alone."""
    rate = HandshakeRate()
    assert rate.per_second(100.0) == 0.0
    for n in range(400):
        rate.finished(100.0 + n / 400)  # 400 in second 100
    assert rate.per_second(100.5) == 0.0  # that second is not over yet
    assert rate.per_second(101.0) == 400.0
    for n in range(200):
        rate.finished(101.0 + n / 200)  # a slower second: the average follows
    assert rate.per_second(102.0) == 300.0
    for n in range(10):
        rate.finished(102.0 + n / 10)  # closing links, hardly a handshake: half the best
    assert rate.per_second(103.0) == pytest.approx(200.0 * 0.5 ** (2 / 60))
    for n in range(3):
        rate.finished(103.0 + n / 3, busy=False)  # nobody waited: says nothing
    rate.finished(104.0, busy=False)
    assert rate.per_second(161.5) == 155.0  # (300 + 10) / 2; half the best is 100 by now
    assert rate.per_second(221.0) == 155.0


async def test_a_waiter_whose_client_left_is_skipped_without_an_upgrade(
    patient: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends the upgrade request and leaves while queued gets no 101, and the
    freed slot goes to the next waiter instead of being spent on it."""
    caplog.set_level(logging.DEBUG, logger="relay_server.agent_ws")
    holders = await holding(patient)
    url = urlsplit(patient.url)
    assert url.hostname is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        b"GET /v1/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: xon-relay.v1\r\n\r\n"
    )
    await writer.drain()
    await waiting(patient, 1)
    writer.write_eof()  # gone, as far as the relay can tell; we can still read its answer
    later = asyncio.create_task(raw_connect(patient))
    await waiting(patient, 2)
    await holders[0].close()
    in_later = await later
    async with asyncio.timeout(PATIENT):
        assert await reader.read() == b""  # no 101, no answer at all
    gate = handshake_gate(patient.hub)
    assert (gate.running, gate.waiting) == (2, 0)  # holders[1] and the later one
    messages = [r.getMessage() for r in caplog.records]
    assert "agent.upgrade_abandoned" in messages
    assert "agent.upgrade_aborted" not in messages  # no upgrade was started for it
    writer.close()
    await writer.wait_closed()
    for ws in (holders[1], in_later):
        await ws.close()

    async def all_free() -> bool:
        return gate.running == 0

    await eventually(all_free)


async def test_real_agent_told_busy_comes_back_after_retry_after_and_gets_in(
    tmp_path: Path, impatient: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's link waits the relay's Retry-After plus jitter (here held within a 50 ms
    ``backoff_max``) without growing its back-off, and connects once a slot frees."""
    caplog.set_level(logging.INFO, logger="relay_agent.link")
    holders = await holding(impatient)
    record, key = await impatient.add_agent()
    inbox = await Inbox.open(tmp_path / "inbox.db")
    config = AgentConfig(
        relay_url=impatient.url.replace("ws://", "http://").removesuffix("/v1/agent"),
        agent_id=record.id,
        relay_id=impatient.relay_id,
        data_dir=tmp_path,
        backoff_initial=10 * MS,
        backoff_max=BACKOFF_MAX,
    )
    link = RealAgentLink(config, private_key=key, inbox=inbox)
    task = asyncio.create_task(link.run())
    try:

        async def refused_twice() -> bool:
            return len(reconnecting(caplog)) >= 2

        async def welcomed() -> bool:
            return link.status.state is LinkState.CONNECTED

        await eventually(refused_twice)
        assert not task.done()
        await holders[0].close()
        await eventually(welcomed)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await inbox.close()
        for ws in holders:
            await ws.close()
    records = reconnecting(caplog)
    assert all("HTTP 503 (busy, Retry-After" in r.__dict__["error"] for r in records)
    assert all(r.__dict__["attempt"] == 0 for r in records)
    assert all(BACKOFF_MAX / 2 - 1e-3 <= r.__dict__["delay"] <= BACKOFF_MAX for r in records)


def reconnecting(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "link.reconnecting"]


async def test_authenticated_links_hold_no_handshake_slot(impatient: Relay) -> None:
    """More welcomed agents than the cap stay connected; only handshakes count."""
    agents = []
    for n in range(3):
        record, key = await impatient.add_agent(f"pc-{n}")
        agent = await Agent(impatient, record.id, key).connect()
        await agent.welcome()
        agents.append(agent)
    holders = await holding(impatient)
    await refused(impatient)
    for ws in holders:
        await ws.close()
    for agent in agents:
        await agent.close()


async def test_refusals_take_no_slot(impatient: Relay) -> None:
    """After several refusals, closing both holders lets exactly two handshakes in again."""
    holders = await holding(impatient)
    for _ in range(3):
        await refused(impatient)
    for ws in holders:
        await ws.close()
    gate = handshake_gate(impatient.hub)

    async def all_free() -> bool:
        return gate.running == 0

    await eventually(all_free)
    again = await holding(impatient)
    await refused(impatient)
    for ws in again:
        await ws.close()


async def test_a_zero_queue_timeout_refuses_at_once(tmp_path: Path) -> None:
    """``handshake_queue_timeout = 0``: no queue, a full relay refuses the upgrade at once."""
    link = LinkConfig(max_handshakes=1, handshake_queue_timeout=0, **QUIET_OK)
    async with running_relay(tmp_path, link=link) as relay:
        (holder,) = await holding(relay, 1)
        response = (await refused(relay)).response
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"  # nobody waits: the next slot
        await holder.close()


async def test_no_cap_when_max_handshakes_is_none(tmp_path: Path) -> None:
    """``link.max_handshakes = None`` neither queues nor refuses an upgrade."""
    async with running_relay(tmp_path, link=LinkConfig(max_handshakes=None)) as relay:
        holders = await holding(relay, 4)
        assert handshake_gate(relay.hub).waiting == 0
        for ws in holders:
            await ws.close()


def test_shedding_is_on_by_default_and_set_from_the_environment() -> None:
    """64 handshakes and a 2 s queue unless configured; both come from the environment."""
    assert (LinkConfig().max_handshakes, LinkConfig().handshake_queue_timeout) == (64, 2.0)
    env = {"XON_RELAY_LINK_MAX_HANDSHAKES": "256", "XON_RELAY_LINK_HANDSHAKE_QUEUE_TIMEOUT": "3"}
    config = load(ServerConfig, path=None, env=env, flags={}, env_prefix=SERVER_ENV_PREFIX)
    assert (config.link.max_handshakes, config.link.handshake_queue_timeout) == (256, 3.0)
    env = {"XON_RELAY_LINK_MAX_HANDSHAKES": "none"}
    config = load(ServerConfig, path=None, env=env, flags={}, env_prefix=SERVER_ENV_PREFIX)
    assert config.link.max_handshakes is None


def test_shedding_settings_are_validated() -> None:
    """A cap of 0 would refuse every agent; a negative or absent queue wait means nothing."""
    with pytest.raises(ConfigError, match="max_handshakes"):
        LinkConfig(max_handshakes=0)
    with pytest.raises(ConfigError, match="handshake_queue_timeout"):
        LinkConfig(handshake_queue_timeout=-1.0)
    with pytest.raises(ConfigError, match="handshake_queue_timeout"):
        load(
            ServerConfig,
            path=None,
            env={"XON_RELAY_LINK_HANDSHAKE_QUEUE_TIMEOUT": "none"},
            flags={},
            env_prefix=SERVER_ENV_PREFIX,
        )
    assert LinkConfig(handshake_queue_timeout=0).handshake_queue_timeout == 0
