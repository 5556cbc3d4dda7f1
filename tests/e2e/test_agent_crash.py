"""The agent dies between receiving and committing, or between committing and acking (issue 6).

``XON_TESTS_CRASH_AT`` (relay_agent/link.py) makes the real ``xon-relay-agent run`` exit at once
(``os._exit``, as abrupt as ``kill -9``: no cleanup, no close frame) at the named point. After a
restart the agent has every event once, and what the relay sent twice is bounded by the window:
the inbox, not the relay's cursor, is where delivery resumes (DESIGN principle 1).
"""

from __future__ import annotations

import signal
from typing import Any

import aiohttp
import pytest

from relay_agent.link import CRASH_ENV, CRASH_EXIT_CODE
from shared.sim import plan, send_requests

from .conftest import Account, MakeAgent, Procs, Relay, read_json, wait_exit

pytestmark = pytest.mark.slow

WINDOW = 32
BURST = 240
CRASH_AFTER = 100


async def deliveries(relay: Relay) -> int:
    """The relay's count of events sent to agents (resends included), from /metrics."""
    admin = read_json(relay.data_dir / "admin.json")
    assert admin is not None
    headers = {"Authorization": f"Bearer {admin['token']}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin['admin_url']}/metrics", headers=headers) as response:
            text = await response.text()
    for line in text.splitlines():
        if line.startswith("xon_relay_deliveries_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no xon_relay_deliveries_total in /metrics")


async def restart_with_window(relay: Relay, procs: Procs) -> None:
    (relay.data_dir / "config.toml").write_text(f"[link]\nwindow = {WINDOW}\n")
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(relay.proc, procs) == 0
    await relay.start()


@pytest.mark.parametrize("point", ["before_commit", "before_ack"])
async def test_agent_crash_loses_nothing_and_redelivery_is_bounded_by_the_window(
    relay: Relay, account: Account, make_agent: MakeAgent, procs: Procs,
    monkeypatch: pytest.MonkeyPatch, point: str,
) -> None:
    """The agent exits abruptly at ``point`` mid-burst; restarted, it holds every event once
    and the relay resent at most a window of them."""
    await restart_with_window(relay, procs)
    monkeypatch.setenv(CRASH_ENV, f"{point}:{CRASH_AFTER}")
    agent = await make_agent(account)
    monkeypatch.delenv(CRASH_ENV)

    results = await send_requests(account.ingress_url, plan(["sms.received"], ["form"], BURST),
                                  concurrency=8)
    assert all(r.ok for r in results)
    assert agent.proc is not None
    assert await wait_exit(agent.proc, procs) == CRASH_EXIT_CODE
    sent_before_restart = await deliveries(relay)

    await agent.start()
    events: list[dict[str, Any]] = await agent.collect(BURST)
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)) == BURST
    assert set(ids) == {r.event_id for r in results}
    redelivered = await deliveries(relay) - BURST
    print(f"\nagent crash {point} after {CRASH_AFTER}: sent before the crash "
          f"{sent_before_restart}, delivered {len(ids)}/{BURST}, lost 0, duplicated 0, "
          f"redelivered {redelivered} (window {WINDOW})")
    assert 0 <= redelivered <= WINDOW
