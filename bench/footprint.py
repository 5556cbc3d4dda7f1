"""Bench 5, agent footprint (issue 7): an enrolled agent, connected and idle.

Figures: the agent's RSS (target ≤ 50 MB), its CPU over the idle window, and its wake-ups
(context switches of all its threads) per second: with nothing to deliver, only the
keepalive pings (every ``link.ping_interval``), the relay's pings and the retention timer
should wake it. The relay beside it is measured too.

Both run from cached bytecode, as an installed agent does (pip compiles the ``.pyc`` files when
it installs a wheel). Where ``PYTHONDONTWRITEBYTECODE`` is set, a source checkout has none, and
each start would compile the agent's own modules, leaving ~1 MB of the compiler's garbage in
its heap that no user has; so the children get a bytecode cache of their own under the
bench's directory (``PYTHONPYCACHEPREFIX``), filled before they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .common import Row, context_switches, cpu_seconds, print_table, rss_kib
from .procs import Children, run_command
from .stack import add_account, child_env, enroll_agent, start_agent, start_relay, wait_connected

__all__ = ["Options", "run"]

_SETTLE = 3.0
"""Seconds after the link is up before measuring: start-up work (snapshot, first prune)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    idle: float = 30.0
    log_level: str = "info"


@contextlib.contextmanager
def _bytecode_cache(cache: Path) -> Iterator[None]:
    """Children started inside read and write their ``.pyc`` files under ``cache``.

    The stack starts children with this process's environment (:func:`.stack.child_env`), so
    the setting goes there, and is undone on the way out for the benches that follow.
    """
    saved = {k: os.environ.get(k) for k in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def run(opts: Options, root: Path) -> dict[str, float]:
    with _bytecode_cache(root / "pycache"):
        # Compiles every module the two processes import at start into the cache.
        await run_command([sys.executable, "-c", "import relay_agent.cli, relay_server.cli"],
                          env=child_env())
        return await _measure(opts, root)


async def _measure(opts: Options, root: Path) -> dict[str, float]:
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
        Row("  RssAnon: heap, stacks (its own)", f"{anon * 1024 / 1e6:.1f} MB"),
        Row("  RssFile: mapped code (shared)", f"{files * 1024 / 1e6:.1f} MB"),
        Row("agent CPU", f"{cpu['agent'] * 1000:.0f} ms in {opts.idle:g} s "
            f"({100 * cpu['agent'] / opts.idle:.2f} %)"),
        Row("agent wake-ups", f"{ctx['agent'] / opts.idle:.1f} /s",
            "keepalive only (ping every 20 s)"),
        Row("relay RSS (1 agent)", f"{rss['relay'] * 1024 / 1e6:.1f} MB"),
        Row("relay CPU", f"{cpu['relay'] * 1000:.0f} ms in {opts.idle:g} s"),
        Row("relay wake-ups", f"{ctx['relay'] / opts.idle:.1f} /s"),
    ]
    print_table("agent footprint (bench 5)", {"idle window": f"{opts.idle:g} s",
                                              "log level": opts.log_level,
                                              "bytecode": "cached, as installed"}, rows)
    return {"agent_rss_mb": rss["agent"] * 1024 / 1e6,
            "agent_rss_anon_mb": anon * 1024 / 1e6,
            "agent_rss_file_mb": files * 1024 / 1e6,
            "agent_cpu_pct": 100 * cpu["agent"] / opts.idle}
