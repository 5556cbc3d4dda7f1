"""``python -m bench [all|throughput|latency|scale|drain|footprint] [--quick] [options]``.

Runs the benches one after another, each in a fresh temporary directory (kept with
``--keep``), and prints one table per bench. Exit status 0 when every bench ran (whatever the
figures), 1 when one could not run (a child died, events went missing: the message says).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shared.errors import RelayError

from . import drain, footprint, latency, scale, throughput
from .common import machine

BENCHES = ("throughput", "latency", "scale", "drain", "footprint")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", nargs="*", default=["all"], choices=("all", *BENCHES),
                        help="benches to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small parameters: a smoke run in about a minute")
    parser.add_argument("-n", "--count", type=int, help="events (throughput; default 20000)")
    parser.add_argument("-c", "--concurrency", type=int, help="requests in flight (default 32)")
    parser.add_argument("--rate", type=float, help="latency: events per second (default 200)")
    parser.add_argument("--duration", type=float, help="latency: seconds (default 10)")
    parser.add_argument("--agents", type=int, help="scale: idle agents (default 10000)")
    parser.add_argument("--processes", type=int, help="scale: swarm processes (default 4)")
    parser.add_argument("--drain", type=int, help="drain: queued events (default 100000)")
    parser.add_argument("--idle", type=float, help="scale/footprint: idle window s (default 30)")
    parser.add_argument("--no-compression", action="store_true",
                        help="scale experiment: agents do not offer permessage-deflate")
    parser.add_argument("--log-level", default="info",
                        help="relay and agent log level (default info, as shipped)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record py-spy profiles of relay and agent into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, stores)")
    return parser


def _pick(value: float | None, quick: float, full: float, is_quick: bool) -> float:
    """The option's value if given, else the quick or the full default."""
    return value if value is not None else (quick if is_quick else full)


async def _run(args: argparse.Namespace, which: list[str], base: Path) -> None:
    q = args.quick
    level = args.log_level
    for name in which:
        root = base / name
        root.mkdir()
        prof = args.profile / name if args.profile else None
        if name == "throughput":
            await throughput.run(throughput.Options(
                count=int(_pick(args.count, 2000, 20_000, q)),
                concurrency=int(_pick(args.concurrency, 32, 32, q)),
                log_level=level, profile=prof), root)
        elif name == "latency":
            await latency.run(latency.Options(
                rate=float(_pick(args.rate, 200.0, 200.0, q)),
                duration=float(_pick(args.duration, 3.0, 10.0, q)),
                log_level=level), root)
        elif name == "scale":
            await scale.run(scale.Options(
                agents=int(_pick(args.agents, 500, 10_000, q)),
                processes=int(_pick(args.processes, 2, 4, q)),
                idle=float(_pick(args.idle, 10.0, 30.0, q)),
                log_level=level, profile=prof, compression=not args.no_compression), root)
        elif name == "drain":
            await drain.run(drain.Options(
                count=int(_pick(args.drain, 5000, 100_000, q)),
                concurrency=int(_pick(args.concurrency, 32, 32, q)),
                log_level=level, profile=prof), root)
        elif name == "footprint":
            await footprint.run(footprint.Options(
                idle=float(_pick(args.idle, 10.0, 30.0, q)),
                log_level=level), root)


def main() -> int:
    args = _parser().parse_args()
    which = list(BENCHES) if "all" in args.which else list(dict.fromkeys(args.which))
    print(f"bench: {machine()}")
    print(f"bench: {' '.join(which)}{' (quick)' if args.quick else ''}")
    base = Path(tempfile.mkdtemp(prefix="xon-bench-"))
    started = time.monotonic()
    try:
        asyncio.run(_run(args, which, base))
    except RelayError as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            print(f"bench: data kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nbench: done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
