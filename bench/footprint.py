"""Bench 5, agent footprint (issue 7): an enrolled agent, connected and idle.

Figures: the agent's RSS (target ≤ 50 MB), its CPU over the idle window, and its wake-ups
(context switches of all its threads) per second: with nothing to deliver, only the
keepalive pings (every ``link.ping_interval``), the relay's pings and the retention timer
should wake it. The relay beside it is measured too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from .common import Row, context_switches, cpu_seconds, print_table, rss_kib
from .procs import Children
from .stack import add_account, enroll_agent, start_agent, start_relay, wait_connected

__all__ = ["Options", "run"]

_SETTLE = 3.0
"""Seconds after the link is up before measuring: start-up work (snapshot, first prune)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    idle: float = 30.0
    log_level: str = "info"


async def run(opts: Options, root: Path) -> dict[str, float]:
    children = Children()
    try:
        relay = await start_relay(children, root, log_level=opts.log_level)
        await add_account(relay, "bench")
        agent = await start_agent(children, await enroll_agent(relay, root, "bench", "idle"),
                                  name="idle-agent")
        await wait_connected(agent, children)
        await asyncio.sleep(_SETTLE)
        pids = {"agent": agent.pid, "relay": relay.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        ctx0 = {k: context_switches(p) for k, p in pids.items()}
        await asyncio.sleep(opts.idle)
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
        ctx = {k: context_switches(p) - ctx0[k] for k, p in pids.items()}
        rss = {k: rss_kib(p) for k, p in pids.items()}
        anon, files = rss_kib(agent.pid, "RssAnon"), rss_kib(agent.pid, "RssFile")
    finally:
        await children.stop_all()
    rows = [
        Row("agent RSS (idle, connected)", f"{rss['agent'] * 1024 / 1e6:.1f} MB", "<= 50 MB"),
        Row("  of which heap / mapped files",
            f"{anon * 1024 / 1e6:.1f} / {files * 1024 / 1e6:.1f} MB"),
        Row("agent CPU", f"{cpu['agent'] * 1000:.0f} ms in {opts.idle:g} s "
            f"({100 * cpu['agent'] / opts.idle:.2f} %)"),
        Row("agent wake-ups", f"{ctx['agent'] / opts.idle:.1f} /s",
            "keepalive only (ping every 20 s)"),
        Row("relay RSS (1 agent)", f"{rss['relay'] * 1024 / 1e6:.1f} MB"),
        Row("relay CPU", f"{cpu['relay'] * 1000:.0f} ms in {opts.idle:g} s"),
        Row("relay wake-ups", f"{ctx['relay'] / opts.idle:.1f} /s"),
    ]
    print_table("agent footprint (bench 5)", {"idle window": f"{opts.idle:g} s",
                                              "log level": opts.log_level}, rows)
    return {"agent_rss_mb": rss["agent"] * 1024 / 1e6,
            "agent_cpu_pct": 100 * cpu["agent"] / opts.idle}
