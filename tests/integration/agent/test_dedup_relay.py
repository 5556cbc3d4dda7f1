"""Dedup end to end (docs/delivery.md, Duplicates): X-on requests into the real relay's ingress
on a socket, on SQLite and on Redis, a real agent linked over WebSocket, read through its local
API. Requests that share an ``id`` param but differ are genuine events and all arrive; a true
retry answers 2xx again and arrives once; the status cache follows the newest status event."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay_server.app import create_public_app
from relay_server.services import open_services
from shared import crypto
from shared.config import LinkConfig, ServerConfig
from tests.helpers.timing import MS

from .support import TOKEN, RelayUnderTest, eventually
from .test_ctox_local import run_agent_under_test

INGRESS_KEY = "ingress-dedup-key-0123456789abcdef"
FORM = "application/x-www-form-urlencoded"
TIMEOUT = aiohttp.ClientTimeout(total=5000 * MS)

# (method, path suffix and query, form body or None, answer's "duplicate")
TABLE: list[tuple[str, str, bytes | None, bool]] = [
    ("GET", "/call.arriving?id=c1&caller=0123", None, False),
    ("GET", "/call.ended?id=c1&caller=0123&duration=30", None, False),
    ("GET", "/messages.waiting?id=201&count=5", None, False),
    ("GET", "/messages.waiting?id=201&count=6", None, False),
    ("POST", "/sms", b"id=m9&text=first", False),
    ("POST", "/sms", b"id=m9&text=first", True),
]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_store_url")
        return url
    return ""  # SQLite in the data dir


@asynccontextmanager
async def relay_on(data_dir: Path, store_url: str) -> AsyncIterator[RelayUnderTest]:
    data_dir.mkdir(exist_ok=True)
    config = ServerConfig(
        listen="127.0.0.1:0", data_dir=data_dir, store=store_url,
        link=LinkConfig(auth_timeout=5000 * MS),
    )
    async with open_services(config, admin_token="admin-test-token") as services:
        account = await services.store.create_account(
            name="acme", ingress_key_hash=crypto.hash_secret(INGRESS_KEY)
        )
        runner = web.AppRunner(create_public_app(services), shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            yield RelayUnderTest(runner.addresses[0][1], services, account.id)
        finally:
            await services.drain()
            await runner.cleanup()


async def events_at(http: aiohttp.ClientSession, local_url: str) -> list[dict[str, Any]]:
    async with http.get(
        f"{local_url}/v1/events", params={"limit": "100"}, timeout=TIMEOUT,
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as response:
        assert response.status == 200
        events: list[dict[str, Any]] = (await response.json())["events"]
        return events


async def test_every_genuine_event_arrives_and_a_true_retry_once(
    tmp_path: Path, store_url: str
) -> None:
    """The issue's table: five genuine events reach the app in order, the retry answers 2xx
    with the first copy's id and is stored once, the status cache holds count 6, and the two
    reused ids are counted."""
    async with relay_on(tmp_path / "relay", store_url) as relay:
        agent_id, key = await relay.add_agent()
        async with run_agent_under_test(
            tmp_path / "agent", relay.port, relay.services.relay_id, key, agent_id=agent_id
        ) as agent:
            await agent.connected()
            answers = []
            async with aiohttp.ClientSession() as http:
                for method, target, body, _ in TABLE:
                    async with http.request(
                        method, f"{relay.url}/xon/{INGRESS_KEY}{target}", data=body,
                        headers={"Content-Type": FORM} if body is not None else {},
                        timeout=TIMEOUT,
                    ) as response:
                        assert response.status == 200, await response.text()
                        answers.append(await response.json())
            assert [a["duplicate"] for a in answers] == [d for *_, d in TABLE]
            assert answers[5]["id"] == answers[4]["id"]

            async def all_arrived() -> bool:
                return len(await events_at(agent.http, agent.url)) >= 5

            await eventually(all_arrived, what="five events at the agent")
            events = await events_at(agent.http, agent.url)
            assert [e["id"] for e in events] == [a["id"] for a in answers[:5]]
            assert [(e["type"], e["params"].get("id")) for e in events] == [
                ("call.arriving", "c1"), ("call.ended", "c1"), ("messages.waiting", "201"),
                ("messages.waiting", "201"), ("sms", "m9"),
            ]
            # Nothing else can come: the account's log holds these five only.
            log = await relay.services.store.read_events(relay.account_id, after=0, limit=100)
            assert [s.event.id for s in log] == [a["id"] for a in answers[:5]]

            async def status_is_6() -> bool:
                items = (await agent.status())["items"]
                return [i["params"].get("count") for i in items] == ["6"]

            await eventually(status_is_6, what="status count 6 at the agent")
            sample = relay.services.hub.metrics.registry.get_sample_value
            assert sample("xon_relay_events_xon_id_reused_total") == 2
            assert sample("xon_relay_events_duplicate_total") == 1


async def test_an_agent_learns_nothing_of_another_tenants_volume(
    tmp_path: Path, store_url: str
) -> None:
    """Seqs are per account: after a busy tenant's 30 events, a quiet tenant's agent gets its
    one event as seq 1 (its health shows the relay seq), and both tenants' ingress works."""
    busy_key = "ingress-busy-key-0123456789abcdef"
    async with relay_on(tmp_path / "relay", store_url) as relay:
        await relay.services.store.create_account(
            name="busy", ingress_key_hash=crypto.hash_secret(busy_key)
        )
        agent_id, key = await relay.add_agent()
        async with run_agent_under_test(
            tmp_path / "agent", relay.port, relay.services.relay_id, key, agent_id=agent_id
        ) as agent, aiohttp.ClientSession() as http:
            await agent.connected()
            for n in range(30):
                async with http.get(
                    f"{relay.url}/xon/{busy_key}/sms?n={n}", timeout=TIMEOUT
                ) as response:
                    assert response.status == 200
            async with http.get(
                f"{relay.url}/xon/{INGRESS_KEY}/sms?n=0", timeout=TIMEOUT
            ) as response:
                assert response.status == 200

            async def arrived() -> bool:
                return len(await events_at(agent.http, agent.url)) == 1

            await eventually(arrived, what="the quiet tenant's event at its agent")
            async with agent.http.get(
                f"{agent.url}/v1/health", timeout=TIMEOUT,
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as response:
                health = await response.json()
            assert health["inbox"]["last_seq"] == 1
