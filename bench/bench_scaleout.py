"""Scale-out bench (issue 5): ingress throughput of one relay on SQLite, and of one and two
relay instances sharing one Redis.

``python -m bench.bench_scaleout [--count N] [--concurrency C] [--redis URL]``

Each setup gets fresh processes (``xon-relay-server run``) and a fresh data dir; the Redis runs
use a fresh key prefix on ``--redis`` (default ``redis://127.0.0.1:6379/15``), deleted at the
end. The load is ``--count`` X-on requests (about 120-byte SMS events) with ``--concurrency``
in flight, split evenly over the instances, as a load balancer would; the figure is 2xx answers
per second, each one a committed event (DESIGN principle 1). Figures depend on the machine and
on Redis's persistence settings, so nothing is asserted; every wait is bounded. Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
from collections import Counter
from pathlib import Path

from shared.sim.procs import script

from .common import Row, machine, print_table, rate
from .loadgen import blast
from .procs import BenchFailed, Children, run_command, wait_for_json
from .stack import START_TIMEOUT, child_env

DEFAULT_REDIS = "redis://127.0.0.1:6379/15"


async def _start(children: Children, root: Path, name: str, store: str | None) -> str:
    """One relay instance; returns its public URL."""
    data_dir = root / name
    data_dir.mkdir(parents=True)
    args = [
        script("xon-relay-server"),
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
    ]
    if store is not None:
        args += ["--store", store]
    await children.start(name, args, root / f"{name}.log", env=child_env())
    admin = await wait_for_json(data_dir / "admin.json", children, timeout=START_TIMEOUT)
    return str(admin["public_url"]).rstrip("/")


async def _run(
    root: Path, instances: int, store: str | None, count: int, concurrency: int
) -> tuple[int, float, Counter[int]]:
    """Start ``instances`` relays on ``store``, blast them; returns (2xx, seconds, statuses)."""
    children = Children()
    try:
        urls = [await _start(children, root, f"relay-{i}", store) for i in range(instances)]
        out = await run_command(
            [
                script("xon-relay-server"),
                "account",
                "add",
                "bench",
                "--json",
                "--data-dir",
                str(root / "relay-0"),
            ],
            env=child_env(),
        )
        path = "/xon/" + str(json.loads(out)["ingress_url"]).rsplit("/xon/", 1)[1]
        share, spare = divmod(count, instances)
        results = await asyncio.gather(
            *(
                blast(
                    url + path + "/sms.received",
                    share + (i < spare),
                    max(1, concurrency // instances),
                )
                for i, url in enumerate(urls)
            )
        )
        children.check_alive()
    finally:
        await children.stop_all()
    statuses: Counter[int] = Counter()
    for result in results:
        statuses.update(result.statuses)
    seconds = max(r.finished for r in results) - min(r.started for r in results)
    return sum(r.ok for r in results), seconds, statuses


async def _delete_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=prefix + "*", count=1000):
            await client.unlink(key)
    finally:
        await client.aclose()


async def main(count: int, concurrency: int, redis_url: str) -> int:
    prefix = f"xonbench:{secrets.token_hex(4)}:"
    separator = "&" if "?" in redis_url else "?"
    # One key prefix per setup: each starts from an empty relay.
    setups = [
        ("sqlite, 1 instance", 1, None),
        ("redis, 1 instance", 1, f"{redis_url}{separator}prefix={prefix}1:"),
        ("redis, 2 instances", 2, f"{redis_url}{separator}prefix={prefix}2:"),
    ]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="xon-bench-scaleout-") as tmp:
            for n, (label, instances, url) in enumerate(setups):
                ok, seconds, statuses = await _run(
                    Path(tmp) / str(n), instances, url, count, concurrency
                )
                other = sum(c for s, c in statuses.items() if not 200 <= s < 300)
                rows.append(Row(label, rate(ok, seconds), f"{ok} ok, {other} refused"))
    finally:
        await _delete_prefix(redis_url, prefix)
    print_table(
        "scale-out: ingress throughput (2xx = committed)",
        {"events": count, "concurrency": concurrency, "machine": machine()},
        rows,
    )
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-n", "--count", type=int, default=5000, help="events per setup")
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--redis", default=DEFAULT_REDIS, help="Redis URL (a fresh prefix is used)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(main(args.count, args.concurrency, args.redis))
    except BenchFailed as exc:
        print(f"bench_scaleout: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
