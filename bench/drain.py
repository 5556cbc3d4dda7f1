"""Bench 4, drain (issue 7): 100,000 events queued while the agent is offline.

The events go in through the ingress (C requests in flight) while the enrolled agent is not
running. Then the agent starts, with a long-polling local app beside it. Figures: the rate the
relay filled at; the drain rate from the link's welcome to the last event committed in the
agent's inbox (target ≥ 5,000 ev/s); the rate the app read them at; and whether the app saw
exactly the relay's log, in the relay's order (DESIGN principle 1: in order, each once).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from shared.events import parse_time

from .common import Row, cpu_seconds, print_table, rate
from .loadgen import EVENT_TYPE, blast
from .procs import STEP, BenchFailed, Children
from .profile import Profiler
from .stack import (
    AgentProc,
    add_account,
    agent_health,
    consumer_result,
    enroll_agent,
    start_agent,
    start_consumer,
    start_relay,
    wait_connected,
)

__all__ = ["Options", "run"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    count: int = 100_000
    concurrency: int = 32
    log_level: str = "info"
    profile: Path | None = None


def _relay_order(db: Path) -> list[str]:
    """Event ids of the relay's log in seq order, read-only beside the running relay (WAL)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM events ORDER BY seq")]
    finally:
        conn.close()


async def run(opts: Options, root: Path) -> dict[str, float]:
    limit = max(300.0, opts.count / 100)
    children = Children()
    try:
        relay = await start_relay(children, root, log_level=opts.log_level)
        ingress = await add_account(relay, "bench") + "/" + EVENT_TYPE
        agent_dir = await enroll_agent(relay, root, "bench", "drain")
        filled = await blast(ingress, opts.count, opts.concurrency)
        if filled.ok != opts.count:
            raise BenchFailed(f"drain: only {filled.ok} of {opts.count} POSTs were accepted "
                              f"({dict(filled.statuses)})")
        order = _relay_order(relay.data_dir / "relay.db")

        profiler = Profiler(opts.profile, children)
        await profiler.attach("relay-drain", relay.pid)
        relay_cpu = cpu_seconds(relay.pid)
        started = time.time()
        agent = await start_agent(children, agent_dir, name="drain-agent")
        health = await wait_connected(agent, children)
        welcomed = parse_time(str(health["connected_since"]))
        await profiler.attach("agent-drain", agent.pid)
        out = root / "drain-consumer.json"
        consumer = await start_consumer(children, agent, opts.count, out, limit)
        committed = await _wait_committed(agent, children, len(order), limit)
        relay_cpu = cpu_seconds(relay.pid) - relay_cpu
        agent_cpu = cpu_seconds(agent.pid)
        got = await consumer_result(children, consumer, out, limit)
        await profiler.finish()
    finally:
        await children.stop_all()
    in_order = got["ids"] == order
    drain = opts.count / (committed - welcomed)
    rows = [
        Row("fill via ingress (agent offline)", rate(filled.ok, filled.seconds)),
        Row("agent start → link welcomed", f"{welcomed - started:.2f} s"),
        Row("drain: welcome → all in inbox", f"{drain:,.0f} ev/s", ">= 5,000 ev/s"),
        Row("  drain time", f"{committed - welcomed:.1f} s"),
        Row("app read all (from welcome)", rate(int(got["count"]), float(got["last"]) - welcomed)),
        Row("app saw the relay's log in order", "yes" if in_order else "NO", "yes"),
        Row("relay CPU during drain", f"{relay_cpu:.1f} s"),
        Row("agent CPU (start to drained)", f"{agent_cpu:.1f} s"),
    ]
    print_table("drain (bench 4)", {"N": opts.count, "fill C": opts.concurrency,
                                    "relay log level": opts.log_level}, rows)
    if not in_order:
        raise BenchFailed(f"drain: the app saw {got['count']} events not matching the relay's "
                          f"{len(order)} in order")
    return {"drain": drain}


async def _wait_committed(agent: AgentProc, children: Children, count: int,
                          limit: float) -> float:
    """Poll the agent's health until its inbox holds ``count`` events; the Unix time it did.

    The poll step bounds the error of the figure (2 * STEP / drain time).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        children.check_alive()
        health = await agent_health(agent)
        if int(health["inbox"]["events"]) >= count:
            return time.time()
        await asyncio.sleep(2 * STEP)
    raise BenchFailed(f"drain: the inbox did not reach {count} events within {limit:g} s")
