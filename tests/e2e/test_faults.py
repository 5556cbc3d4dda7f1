"""End to end under faults: revocation, kill -9 of the relay or the agent mid-burst.

DESIGN principle 1: nothing acknowledged is lost. Every event that got a 2xx from the relay is
delivered to the local app once the killed process is back, and the app sees each event once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from shared.sim import SendResult, plan, send_requests

from .conftest import (
    DELIVERY_LIMIT,
    Account,
    Agent,
    MakeAgent,
    Procs,
    Relay,
    event_key,
    planned_key,
    wait_exit,
    wait_until,
)

pytestmark = pytest.mark.slow

BURST = 400
KILL_AFTER = 60


async def _burst_with_kill(ingress_url: str, kill: Callable[[], None]) -> list[SendResult]:
    """Send BURST events (8 in flight); call ``kill`` once KILL_AFTER of them got a 2xx."""
    planned = plan(["sms.received", "call.ended"], ["json", "form", "xml"], BURST)
    ok = 0
    reached = asyncio.Event()

    def on_result(result: SendResult) -> None:
        nonlocal ok
        ok += result.ok
        if ok >= KILL_AFTER:
            reached.set()

    sender = asyncio.create_task(
        send_requests(ingress_url, planned, concurrency=8, on_result=on_result)
    )
    waiter = asyncio.create_task(reached.wait())
    await asyncio.wait({sender, waiter}, return_when=asyncio.FIRST_COMPLETED)
    assert reached.is_set(), "the burst ended before the kill point"
    kill()
    return await sender


def _assert_delivered_once(results: list[SendResult], events: list[dict[str, Any]]) -> None:
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "the local app saw an event twice"
    delivered = {event_key(e) for e in events}
    acked = [r for r in results if r.ok]
    missing = [r.planned.n for r in acked if planned_key(r.planned) not in delivered]
    assert not missing, f"2xx'd events lost: {missing[:10]}"


async def test_revoked_agent_is_cut_off_and_cannot_reconnect(
    relay: Relay, account: Account, make_agent: MakeAgent, procs: Procs
) -> None:
    """Revoking a connected agent makes its process exit 3, and a restart exits 3 too."""
    agent = await make_agent(account)
    answer = await relay.revoke(agent.agent_id)
    assert answer["revoked"] is True
    assert agent.proc is not None
    assert await wait_exit(agent.proc, procs) == 3

    again = procs.start("xon-relay-agent", "run", "--data-dir", str(agent.data_dir))
    assert await wait_exit(again, procs) == 3


async def test_relay_kill9_mid_burst_loses_no_acknowledged_event(
    relay: Relay, account: Account, make_agent: MakeAgent
) -> None:
    """Events that got a 2xx before the relay was SIGKILLed are delivered after its restart."""
    agent = await make_agent(account)
    results = await _burst_with_kill(account.ingress_url, relay.kill9)
    acked = sum(r.ok for r in results)
    assert KILL_AFTER <= acked < BURST

    await relay.start()
    # Up to `acked` plus events committed whose answer was lost in the kill.
    events = await _collect_at_least(agent, results)
    _assert_delivered_once(results, events)


async def test_agent_kill9_mid_burst_loses_no_acknowledged_event(
    account: Account, make_agent: MakeAgent
) -> None:
    """SIGKILL of the agent while events stream in loses none of them once it restarts."""
    agent = await make_agent(account)
    results = await _burst_with_kill(account.ingress_url, agent.kill9)
    assert all(r.ok for r in results)

    await agent.start()
    events = await agent.collect(BURST)
    assert len(events) == BURST
    _assert_delivered_once(results, events)
    assert {e["id"] for e in events} == {r.event_id for r in results}


async def _collect_at_least(agent: Agent, results: list[SendResult]) -> list[dict[str, Any]]:
    """Read until every 2xx'd event arrived (extra events that committed unanswered may too)."""
    want = {planned_key(r.planned) for r in results if r.ok}
    seen: list[dict[str, Any]] = []

    async def all_there() -> bool:
        seen[:] = await agent.read_all()
        return want <= {event_key(e) for e in seen}

    await wait_until(
        all_there, "every 2xx'd event at the agent", procs=agent.procs, limit=DELIVERY_LIMIT
    )
    return seen
