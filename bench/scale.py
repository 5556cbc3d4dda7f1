"""Bench 3, connection scale (issue 7): many idle agents on one relay process.

The agents are enrolled through the relay's store before the relay starts (key pairs made
here, ``create_agent`` + ``enroll_agent``: what ``POST /v1/enroll`` does, without thousands of
HTTP round trips), spread over accounts of 100 agents each. The relay is the real console
script; the agents are light clients (bench.swarm: the real ``AgentSession`` over websockets),
several hundred per event loop in a few processes.

Figures: relay RSS per connection (target ≤ 40 KB), relay CPU while every link idles with its
keepalive pings, and a reconnect storm (every connection reset at once; agents come back with
the real agent's jittered back-off) → time until all are authenticated again (target ≤ 30 s).

``python -m bench scale`` runs it with the relay's default settings. ``python -m bench.scale``
runs it alone and can set the relay's ``[link]`` table, for trying load-shedding settings::

    python -m bench.scale --agents 10000 --idle 10 --link max_handshakes=128 \
        --link handshake_queue_timeout=3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay_server.store import open_store
from shared import crypto

from .common import Row, context_switches, cpu_seconds, print_table, raise_nofile, rss_kib
from .procs import BenchFailed, Children
from .profile import Profiler
from .stack import child_env, python_module, start_relay

__all__ = ["Options", "run"]

_PER_ACCOUNT = 100
_FD_SLACK = 512
"""File descriptors the relay needs besides its agent sockets (store, listeners, logs)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    agents: int = 10_000
    processes: int = 4
    idle: float = 30.0
    """Seconds the idle CPU is measured over; at least one keepalive interval (20 s) shows
    every link's ping."""
    limit: float = 120.0
    """Longest wait for all agents to connect, or to reconnect after the storm."""
    log_level: str = "info"
    profile: Path | None = None
    compression: bool = True
    """False: an experiment, the agents do not offer permessage-deflate (the real one does)."""
    relay_link: tuple[tuple[str, str], ...] = ()
    """``[link]`` settings of the relay (key, value as in the environment), e.g.
    ``(("max_handshakes", "128"),)``; empty: the defaults."""


async def _enroll(db: Path, count: int) -> tuple[str, list[tuple[str, str]]]:
    """Make ``count`` enrolled agents in the store at ``db``; (relay id, [(agent id, key hex)])."""
    store = await open_store(f"sqlite:///{db}")
    try:
        relay_id = await store.relay_id()
        agents: list[tuple[str, str]] = []
        now = time.time()
        for first in range(0, count, _PER_ACCOUNT):
            account = await store.create_account(
                name=f"bench-{first // _PER_ACCOUNT}",
                ingress_key_hash=crypto.hash_secret(crypto.new_token()),
            )

            async def one(n: int, account_id: str = account.id) -> tuple[str, str]:
                code = crypto.new_token()
                await store.create_agent(
                    account_id=account_id,
                    name=f"pc-{n}",
                    code_hash=crypto.hash_secret(code),
                    code_expires_at=now + 3600,
                )
                key = crypto.generate_private_key()
                agent = await store.enroll_agent(
                    code_hash=crypto.hash_secret(code),
                    public_key=crypto.public_key_b64(key),
                    now=now,
                )
                return agent.id, key.private_bytes_raw().hex()

            agents += await asyncio.gather(
                *(one(n) for n in range(first, min(first + _PER_ACCOUNT, count)))
            )
        return relay_id, agents
    finally:
        await store.close()


def _listen_drops() -> int:
    """Connections every listening socket on this machine dropped because its accept queue
    was full (``TcpExt: ListenDrops``): the client resends its SYN 1, 3, 7 s later."""
    with open("/proc/net/netstat", encoding="ascii") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenDrops"])
    return 0


async def _read(proc: asyncio.subprocess.Process, event: str, limit: float) -> dict[str, Any]:
    assert proc.stdout is not None
    async with asyncio.timeout(limit):
        while line := await proc.stdout.readline():
            data: dict[str, Any] = json.loads(line)
            if data.get("event") == event:
                return data
    raise BenchFailed(f"a swarm process ended before reporting {event!r}")


async def _gather(
    procs: list[asyncio.subprocess.Process], event: str, limit: float
) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(_read(p, event, limit + 30) for p in procs)))


async def run(opts: Options, root: Path) -> dict[str, float]:
    nofile = raise_nofile(opts.agents + _FD_SLACK)
    count = min(opts.agents, nofile - _FD_SLACK)
    processes = max(1, min(opts.processes, count // 50 or 1))
    (root / "relay").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    relay_id, agents = await _enroll(root / "relay" / "relay.db", count)
    enroll_seconds = time.time() - t0
    if opts.relay_link:
        # The bench strips XON_RELAY_* from the children's environment; the relay reads
        # config.toml from its data dir instead.
        lines = ["[link]"] + [f"{key} = {json.dumps(value)}" for key, value in opts.relay_link]
        (root / "relay" / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    children = Children()
    try:
        relay = await start_relay(children, root, log_level=opts.log_level)
        url = relay.public_url.replace("http://", "ws://") + "/v1/agent"
        rss0 = rss_kib(relay.pid)
        swarms = []
        for i in range(processes):
            part = agents[i::processes]
            keys = root / f"swarm-{i}.json"
            keys.write_text(json.dumps(part))
            keys.chmod(0o600)
            swarms.append(
                await children.start(
                    f"swarm-{i}",
                    python_module(
                        "bench.swarm",
                        "--url",
                        url,
                        "--relay-id",
                        relay_id,
                        "--keys",
                        str(keys),
                        "--limit",
                        f"{opts.limit:g}",
                        *([] if opts.compression else ["--no-compression"]),
                    ),
                    root / f"swarm-{i}.log",
                    env=child_env(),
                    pipes=True,
                )
            )
        ready = await _gather(swarms, "ready", opts.limit)
        connected = sum(int(r["connected"]) for r in ready)
        if connected < count:
            raise BenchFailed(f"scale: only {connected} of {count} agents connected")
        connect_seconds = max(float(r["seconds"]) for r in ready)
        await asyncio.sleep(2.0)  # let the last handshakes' garbage go before measuring
        rss1 = rss_kib(relay.pid)

        cpu0, ctx0 = cpu_seconds(relay.pid), context_switches(relay.pid)
        await asyncio.sleep(opts.idle)
        idle_cpu = cpu_seconds(relay.pid) - cpu0
        idle_ctx = context_switches(relay.pid) - ctx0

        profiler = Profiler(opts.profile, children)
        await profiler.attach("relay-storm", relay.pid)
        cpu0 = cpu_seconds(relay.pid)
        drops0 = _listen_drops()
        for proc in swarms:
            assert proc.stdin is not None
            proc.stdin.write(b"storm\n")
            await proc.stdin.drain()
        storm = await _gather(swarms, "reauthed", opts.limit)
        storm_cpu = cpu_seconds(relay.pid) - cpu0
        storm_drops = _listen_drops() - drops0
        await profiler.finish()
        await asyncio.sleep(2.0)
        rss2 = rss_kib(relay.pid)
        for proc in swarms:
            assert proc.stdin is not None
            proc.stdin.write(b"quit\n")
            await proc.stdin.drain()
    finally:
        await children.stop_all()
    left = sum(int(s["left"]) for s in storm)
    failures: collections.Counter[str] = collections.Counter()
    for report in storm:
        failures.update(report["failures"])
    storm_seconds = max(float(s["seconds"]) for s in storm)
    per_conn = (rss1 - rss0) * 1024 / count
    rows = [
        Row("enroll via store (setup)", f"{enroll_seconds:.1f} s"),
        Row("all connected (64 handshakes/process)", f"{connect_seconds:.1f} s"),
        Row("relay RSS before / after connect", f"{rss0 / 1024:.0f} / {rss1 / 1024:.0f} MiB"),
        Row("relay RSS per connection", f"{per_conn / 1000:.1f} KB", "<= 40 KB"),
        Row(
            f"relay CPU idle ({opts.idle:g} s, keepalive on)", f"{100 * idle_cpu / opts.idle:.1f} %"
        ),
        Row("relay wake-ups idle", f"{idle_ctx / opts.idle:,.0f} /s"),
        Row(
            "storm: all re-authenticated",
            f"{storm_seconds:.1f} s" + (f" ({left} missing)" if left else ""),
            "<= 30 s",
        ),
        Row("storm: failed attempts (retried)", str(sum(int(s["retries"]) for s in storm))),
        Row("storm: … of them refused busy (503)", str(sum(int(s["busy"]) for s in storm))),
        *(Row(f"storm: … {kind}", str(n)) for kind, n in sorted(failures.items())),
        Row("storm: SYNs dropped, accept queue full (machine)", str(storm_drops)),
        Row("storm: relay CPU", f"{storm_cpu:.1f} s"),
        Row(
            "storm: agents' CPU (all swarm processes)",
            f"{sum(float(s['cpu']) for s in storm):.1f} s",
        ),
        Row("relay RSS after storm", f"{rss2 / 1024:.0f} MiB"),
    ]
    print_table(
        "connection scale (bench 3)",
        {
            "agents": count,
            "swarm processes": processes,
            "fd limit": nofile,
            "permessage-deflate": "offered" if opts.compression else "off (experiment)",
            "relay log level": opts.log_level,
            "relay link": " ".join(f"{k}={v}" for k, v in opts.relay_link) or "defaults",
        },
        rows,
    )
    return {
        "rss_per_conn_kb": per_conn / 1000,
        "idle_cpu_pct": 100 * idle_cpu / opts.idle,
        "storm_s": storm_seconds,
    }


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Options()
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--processes", type=int, default=defaults.processes)
    parser.add_argument("--idle", type=float, default=defaults.idle)
    parser.add_argument("--limit", type=float, default=defaults.limit)
    parser.add_argument("--log-level", default=defaults.log_level)
    parser.add_argument(
        "--link",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a relay [link] setting (repeatable)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record a py-spy profile of the relay during the storm into DIR",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    opts = Options(
        agents=args.agents,
        processes=args.processes,
        idle=args.idle,
        limit=args.limit,
        log_level=args.log_level,
        profile=args.profile,
        relay_link=tuple(args.link),
    )
    root = Path(tempfile.mkdtemp(prefix="xon-bench-scale-"))
    try:
        asyncio.run(run(opts, root))
    except BenchFailed as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"bench: data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
