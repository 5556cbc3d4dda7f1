"""Withheld events (docs/delivery.md): an event in the relay's log that the link cannot carry
(its frame over ``link.max_message_size``, or a lone surrogate with no UTF-8 form), written
straight into the real SQLite store as an older version would have, no longer ends the
account's link on every reconnect. A stand-in goes in its place; the events after it arrive;
the relay's metrics and ``agent show`` and the agent's health count it; another tenant's link
is untouched."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from relay_agent.inbox import Inbox
from relay_server.app import create_admin_app
from relay_server.store.base import StatusItem
from shared import crypto
from shared.events import format_time
from tests.helpers.relay_app import Agent

from .support import TOKEN, RelayUnderTest, eventually, make_event, serve_relay
from .test_ctox_local import run_agent_under_test

TOO_LARGE = 3 * 1024 * 1024
"""Body bytes of the oversized event: over the default 2 MiB message limit once base64'd."""


@dataclass(frozen=True)
class LinkUrl:
    """Where the helpers' test agent connects."""

    url: str
    relay_id: str


async def other_tenant(relay: RelayUnderTest) -> tuple[str, str, crypto.Ed25519PrivateKey]:
    """Another account with one enrolled agent: (account id, agent id, key)."""
    store = relay.services.store
    account = await store.create_account(
        name="other", ingress_key_hash=crypto.hash_secret(crypto.new_token())
    )
    code = crypto.new_token()
    await store.create_agent(
        account_id=account.id, name="pc", code_hash=crypto.hash_secret(code),
        code_expires_at=time.time() + 3600,
    )
    key = crypto.generate_private_key()
    agent = await store.enroll_agent(
        code_hash=crypto.hash_secret(code), public_key=crypto.public_key_b64(key),
        now=time.time(),
    )
    return account.id, agent.id, key


async def admin_agent(relay: RelayUnderTest, agent_id: str) -> dict[str, Any]:
    """``GET /v1/agents/ID`` on the relay's real admin app (what ``agent show`` prints)."""
    runner = web.AppRunner(create_admin_app(relay.services))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/agents/{agent_id}"
        async with aiohttp.ClientSession() as http, http.get(
            url, headers={"Authorization": "Bearer admin-test-token"}
        ) as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body
    finally:
        await runner.cleanup()


async def test_an_event_the_link_cannot_carry_is_withheld_and_delivery_goes_on(
    tmp_path: Path,
) -> None:
    """Two undeliverable events between two ordinary ones: the agent gets all four seqs, two
    of them as stand-ins that say why, and every count shows it."""
    data = tmp_path / "relay"
    async with serve_relay(data) as relay:
        port, relay_id = relay.port, relay.services.relay_id
        agent_id, key = await relay.add_agent()
        (first,) = await relay.append(1)
        big, bad = await relay.append(2)
        (last,) = await relay.append(1)
    # What an older version, or one with a higher limit, could have stored:
    with closing(sqlite3.connect(data / "relay.db")) as db, db:
        db.execute("UPDATE events SET body = zeroblob(?) WHERE seq = ?", (TOO_LARGE, big))
        db.execute("UPDATE events SET params = ? WHERE seq = ?", ('{"name":"\\ud800"}', bad))

    async with serve_relay(data, port=port) as relay:
        other_account, other_id, other_key = await other_tenant(relay)
        async with run_agent_under_test(
            tmp_path / "agent", relay.port, relay_id, key, agent_id=agent_id
        ) as agent:
            await eventually(lambda: agent.inbox.last_seq() >= last, what="the last event")
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with agent.http.get(f"{agent.url}/v1/events", headers=headers) as response:
                events = (await response.json())["events"]
            async with agent.http.get(f"{agent.url}/v1/health", headers=headers) as response:
                health = await response.json()
            # The link stayed up: no reconnect was needed to get past them.
            assert agent.link.status.last_error is None

        by_id = {event["id"]: event for event in events}
        assert len(by_id) == 4
        stand_ins = [event for event in events if "withheld" in event]
        assert [event["withheld"]["reason"] for event in stand_ins] == [
            "too_large", "not_encodable"
        ]
        too_large, not_encodable = stand_ins
        assert too_large["withheld"]["bytes"] > TOO_LARGE
        assert too_large["request"]["body_b64"] == "" and too_large["params"] == {}
        assert too_large["type"] == "sms.received" and too_large["received_at"]
        assert not_encodable["params"] == {}
        assert health["inbox"]["withheld"] == 2
        assert health["inbox"]["withheld_reason"] == "not_encodable"

        shown = await admin_agent(relay, agent_id)
        assert (shown["withheld"], shown["withheld_reason"]) == (2, "not_encodable")
        exposition = relay.services.hub.metrics.exposition().decode()
        assert 'xon_relay_events_withheld_total{reason="too_large"} 1.0' in exposition
        assert 'xon_relay_events_withheld_total{reason="not_encodable"} 1.0' in exposition
        assert await relay.services.store.get_cursor(agent_id) == last

        # Another tenant's link works and is told nothing of it.
        target = LinkUrl(f"ws://127.0.0.1:{relay.port}/v1/agent", relay_id)
        peer = await Agent(target, other_id, other_key).connect()
        assert (await peer.welcome()).account_id == other_account
        tenant = RelayUnderTest(relay.port, relay.services, other_account)
        (seq,) = await tenant.append(1)
        assert await peer.events(1) == [seq]
        await peer.close()
        assert (await admin_agent(relay, other_id))["withheld"] == 0
    assert first < big < bad < last


async def test_a_status_snapshot_too_large_for_one_frame_arrives_whole_in_several(
    tmp_path: Path,
) -> None:
    """Status items that together pass the message limit are sent as a snapshot frame and
    change frames; the agent's cache ends with every item."""
    async with serve_relay(tmp_path / "relay") as relay:
        agent_id, key = await relay.add_agent()
        store = relay.services.store
        value = "v" * (200 * 1024)
        for n in range(16):  # 3.2 MB in all, over the 2 MiB limit
            await store.put_status(
                StatusItem(
                    account_id=relay.account_id, key=f"messages.waiting?mailbox={n}",
                    type="messages.waiting", ids={"mailbox": str(n)},
                    params={"mailbox": str(n), "v": value}, event_id=f"ev-{n}", seq=n + 1,
                    received_at=format_time(time.time()),
                )
            )
        async with run_agent_under_test(
            tmp_path / "agent", relay.port, relay.services.relay_id, key, agent_id=agent_id
        ) as agent:
            async def whole() -> bool:
                return len((await agent.inbox.read_status()).items) == 16

            await eventually(whole, what="every status item")
            assert agent.link.status.last_error is None


async def test_the_inbox_counts_new_stand_ins_and_keeps_the_count(tmp_path: Path) -> None:
    """Stand-ins above the resume point count (a replayed one does not count again); the
    count and the last reason survive a restart; an unknown reason counts as ``other``."""
    def stand_in(n: int, reason: str) -> dict[str, Any]:
        return {**make_event(n), "params": {}, "withheld": {"reason": reason, "bytes": 9}}

    box = await Inbox.open(tmp_path / "inbox.db")
    await box.commit([(1, make_event(1)), (2, stand_in(2, "too_large"))])
    await box.commit([(2, stand_in(2, "too_large"))])  # resent: a duplicate
    await box.commit([(3, stand_in(3, "not_encodable"))])
    stats = await box.stats()
    assert (stats.withheld, stats.withheld_reason) == (2, "not_encodable")
    await box.close()
    box = await Inbox.open(tmp_path / "inbox.db")
    stats = await box.stats()
    assert (stats.withheld, stats.withheld_reason) == (2, "not_encodable")
    await box.commit([(4, stand_in(4, "from_the_future"))])
    assert (await box.stats()).withheld_reason == "other"
    await box.close()
