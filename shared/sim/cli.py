"""``xon-sim``: the X-on platform simulator (send events; run the demo).

::

    xon-sim send --url INGRESS_URL [--type T | --all-types] [--encoding E|all] [--count N]
                 [--concurrency C] [--rate R] [--json]
    xon-sim demo [--data-dir DIR] [--once]
    xon-sim xon-api [--listen HOST:PORT] [--api-key KEY]
    xon-sim catalogue
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
from pathlib import Path
from typing import cast

from .. import logs
from ..config import parse_hostport
from ..errors import ConfigError
from .catalogue import CATALOGUE, EVENT_TYPES
from .demo import DemoOptions, run_demo
from .encode import ENCODINGS, Encoding
from .procs import DemoFailed
from .send import SendResult, plan, send_requests
from .xon_api import serve

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xon-sim", description="X-on platform simulator")
    sub = parser.add_subparsers(dest="command", required=True)

    send = sub.add_parser("send", help="send example X-on events to an ingress URL")
    send.add_argument("--url", required=True, help="the account's ingress URL (…/xon/KEY)")
    which = send.add_mutually_exclusive_group()
    which.add_argument("--type", choices=EVENT_TYPES, help="one event type (default: all)")
    which.add_argument("--all-types", action="store_true", help="every example type")
    send.add_argument(
        "--encoding", choices=(*ENCODINGS, "all"), default="all",
        help="how X-on encodes the request (default: all)",
    )
    send.add_argument(
        "--count", type=_positive_int,
        help="requests to send, cycling over types x encodings (default: one of each)",
    )
    send.add_argument("--concurrency", type=_positive_int, default=1)
    send.add_argument("--rate", type=_positive_float, help="requests per second at most")
    send.add_argument("--json", action="store_true", help="print one JSON summary at the end")

    demo = sub.add_parser("demo", help="run relay + agent on loopback and watch events arrive")
    demo.add_argument("--data-dir", type=Path, default=Path("demo-data"))
    demo.add_argument("--once", action="store_true",
                      help="exit 0 once every event sent arrived (non-zero on failure)")

    api = sub.add_parser(
        "xon-api", help="run a fake X-on API (records CTOX calls; faults via /_sim/faults)"
    )
    api.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT (default: %(default)s)")
    api.add_argument("--api-key", default="sim-key",
                     help="the Bearer key it requires (default: %(default)s)")

    sub.add_parser("catalogue", help="list the example event types and their params")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # live output even through a pipe
    try:
        match args.command:
            case "send":
                return asyncio.run(_send(args))
            case "demo":
                return asyncio.run(run_demo(DemoOptions(data_dir=args.data_dir, once=args.once)))
            case "xon-api":
                host, port = parse_hostport(args.listen, what="--listen")
                logs.setup("info", "text")
                print(f"fake X-on API on http://{host}:{port} (Bearer {args.api_key})")
                asyncio.run(serve(host, port, args.api_key))
                return 0
            case _:
                _print_catalogue()
                return 0
    except (DemoFailed, ConfigError) as exc:
        print(f"xon-sim: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the fake API's port is taken
        print(f"xon-sim: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("xon-sim: stopped", file=sys.stderr)
        return 0 if args.command in ("demo", "xon-api") else 130


async def _send(args: argparse.Namespace) -> int:
    types = [args.type] if args.type else list(EVENT_TYPES)
    encodings = list(ENCODINGS) if args.encoding == "all" else [cast(Encoding, args.encoding)]
    planned = plan(types, encodings, args.count)
    on_result = None if args.json else _print_line
    results = await send_requests(
        args.url, planned, concurrency=args.concurrency, rate=args.rate, on_result=on_result
    )
    ok = [r for r in results if r.ok]
    if args.json:
        summary = {
            "sent": len(results),
            "ok": len(ok),
            "failed": len(results) - len(ok),
            "ids": [r.event_id for r in ok if r.event_id is not None],
        }
        print(json.dumps(summary))
    return 0 if len(ok) == len(results) else 1


def _print_line(result: SendResult) -> None:
    p = result.planned
    status = str(result.status) if result.status is not None else "---"
    tail = f" {result.error}" if result.error else ""
    ident = f" id={result.event_id}" if result.event_id else ""
    print(f"{status} {p.event_type} {p.encoding}{ident}{tail}")


def _print_catalogue() -> None:
    for spec in CATALOGUE.values():
        kind = "status" if spec.status else "real-time"
        print(f"{spec.type:18} {kind:9} {', '.join(spec.params)}  ({spec.description})")


if __name__ == "__main__":
    sys.exit(main())
