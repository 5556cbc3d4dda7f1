"""``GET /metrics`` on the admin listener (DESIGN §Relay server endpoints; docs/operations.md):
Prometheus text after real ingress traffic and a real agent link."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay_server.metrics import OTHER_AGENTS, RelayMetrics
from shared.config import ServerConfig
from shared.link.frames import Command, CommandResult
from tests.helpers.relay_app import Agent, eventually

from .conftest import ADMIN_TOKEN, Instance, Tenant, new_tenant, running_instance

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def instance(tmp_path: Path) -> AsyncIterator[Instance]:
    config = ServerConfig(data_dir=tmp_path, public_url="http://relay.test")
    async with running_instance(config) as running:
        yield running


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample in the exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def scrape(instance: Instance) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{instance.admin_url}/metrics", headers=AUTH) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return samples(await resp.text())


async def ingress(instance: Instance, tenant: Tenant, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        for n in range(count):
            url = f"{instance.base_url}/xon/{tenant.ingress_key}/sms.received?n={n}"
            async with http.get(url) as resp:
                assert resp.status == 200
        async with http.get(f"{instance.base_url}/xon/not-a-key") as resp:
            assert resp.status == 404
        url = f"{instance.base_url}/xon/{tenant.ingress_key}/sms.received?id=x-1"
        for _ in range(2):  # X-on's retry of the same event id
            async with http.get(url) as resp:
                assert resp.status == 200


async def test_metrics_after_traffic(instance: Instance) -> None:
    """Ingress by status, stored events, deliveries, acks, link and backlog gauges."""
    tenant = await new_tenant(instance.store)
    await ingress(instance, tenant, 3)
    before = await scrape(instance)
    assert before['xon_relay_ingress_requests_total{status="200"}'] == 5
    assert before['xon_relay_ingress_requests_total{status="404"}'] == 1
    assert before["xon_relay_events_stored_total"] == 4
    assert before["xon_relay_events_duplicate_total"] == 1
    assert before["xon_relay_store_commit_seconds_count"] == 5
    assert before["xon_relay_connected_agents"] == 0
    assert before[f'xon_relay_agent_backlog{{agent="{tenant.agent_id}"}}'] == 4
    assert before["xon_relay_backlog"] == 4

    agent = await Agent(instance, tenant.agent_id, tenant.private_key).connect()
    await agent.welcome()
    seqs = await agent.events(4)
    await agent.ack(seqs[-1])
    await agent.ack(seqs[-1])  # a repeated ack sends nothing

    async def acked() -> bool:
        return await instance.store.get_cursor(tenant.agent_id) == seqs[-1]

    await eventually(acked)
    after = await scrape(instance)
    assert after["xon_relay_deliveries_total"] == 4
    assert after["xon_relay_acks_total"] == 1
    assert after["xon_relay_connected_agents"] == 1
    assert after[f'xon_relay_agent_backlog{{agent="{tenant.agent_id}"}}'] == 0
    await agent.close()


async def test_metrics_need_the_admin_token(instance: Instance) -> None:
    """Without the bearer token /metrics answers 401."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{instance.admin_url}/metrics") as resp:
            assert resp.status == 401


def test_backlog_labels_are_capped() -> None:
    """Only the largest backlogs get their own series; the rest are summed as _other."""
    metrics = RelayMetrics(max_agent_labels=2)
    metrics.set_link_state(connected=1, backlogs=[("a", 1), ("b", 7), ("c", 3), ("d", 2)])
    found = samples(metrics.exposition().decode())
    backlog = {k: v for k, v in found.items() if k.startswith("xon_relay_agent_backlog{")}
    assert backlog == {
        'xon_relay_agent_backlog{agent="b"}': 7,
        'xon_relay_agent_backlog{agent="c"}': 3,
        f'xon_relay_agent_backlog{{agent="{OTHER_AGENTS}"}}': 3,
    }
    assert found["xon_relay_backlog"] == 13
    metrics.set_link_state(connected=0, backlogs=[("a", 1)])
    again = samples(metrics.exposition().decode())
    assert [k for k in again if k.startswith("xon_relay_agent_backlog{")] == [
        'xon_relay_agent_backlog{agent="a"}'
    ]


def test_command_results_and_ingress_rates() -> None:
    """Command outcomes feed the latency histogram and the dashboard list; rates window."""
    now = [1_000_000.0]
    metrics = RelayMetrics(clock=lambda: now[0])
    command = Command(request_id="r1", ctox_type="sms.send", params={"to": "1", "text": "hi"})
    result = CommandResult(
        request_id="r1", status=502, content_type="", body_b64="", headers={}, error="upstream"
    )
    metrics.command_finished("acc_1", command, result, 0.2)
    text = metrics.exposition().decode()
    assert 'xon_relay_commands_total{status="5xx"} 1.0' in text
    assert re.search(r'xon_relay_command_seconds_bucket\{le="0.25"\} 1.0', text)
    (outcome,) = metrics.recent_commands
    assert (outcome.ctox_type, outcome.status, outcome.error) == ("sms.send", 502, "upstream")
    assert "hi" not in repr(outcome)

    for status in (200, 200, 404, 503):
        metrics.ingress_answered(status)
    now[0] += 10 * 60
    metrics.ingress_answered(200)
    recent, hour = metrics.ingress_rates(5), metrics.ingress_rates(60)
    assert (recent.total, recent.client_errors, recent.server_errors) == (1, 0, 0)
    assert (hour.total, hour.client_errors, hour.server_errors) == (5, 1, 1)
    assert hour.error_rate == pytest.approx(0.4)
