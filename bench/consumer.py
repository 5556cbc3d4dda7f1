"""A local app reading the agent's API by long-poll, run as its own process.

It reads ``GET /v1/events?after=CURSOR&limit=1000&wait=5`` until it has ``--count`` events (or
``--timeout`` passes), then writes ``--out``. Once its first read answered it writes
``<out>.ready``, so that the parent starts its load only when the app is reading. ``--out``
holds the count, the receipt time of the first and last
event, each event's (n, sent, received) from the load generator's fields, and the event ids in
the order they arrived (the drain bench compares them with the relay's log order).

    python -m bench.consumer --url URL --token-file FILE --count N --out FILE [--timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["main"]

_WAIT = 5
_LIMIT = 1000


async def _consume(url: str, token: str, count: int, timeout: float,
                   ready: Path) -> dict[str, Any]:
    seen: list[tuple[int, float, float]] = []
    ids: list[str] = []
    first = last = 0.0
    cpu_ready = 0.0
    cursor: str | None = None
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        while len(ids) < count and time.monotonic() < deadline:
            # The first read does not wait: once it answered, the connection is up and the
            # parent may start its load (it waits for the ready file).
            params = {"limit": str(_LIMIT), "wait": str(_WAIT if cursor is not None else 0)}
            if cursor:
                params["after"] = cursor
            async with http.get(f"{url}/v1/events", params=params,
                                timeout=aiohttp.ClientTimeout(total=_WAIT + 30)) as resp:
                resp.raise_for_status()
                page = await resp.json()
            now = time.time()
            for event in page["events"]:
                params_in = event.get("params") or {}
                ids.append(str(event["id"]))
                if "n" in params_in and "t" in params_in:
                    seen.append((int(params_in["n"]), float(params_in["t"]), now))
            if page["events"]:
                first = first or now
                last = now
            if cursor is None:
                cpu_ready = time.process_time()
                ready.write_text("{}")
            cursor = page["cursor"] or cursor or ""
    return {"count": len(ids), "first": first, "last": last, "seen": seen, "ids": ids,
            "cpu": time.process_time() - cpu_ready}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.consumer")
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    token = args.token_file.read_text(encoding="utf-8").strip()
    ready = args.out.with_suffix(".ready")
    result = asyncio.run(_consume(args.url, token, args.count, args.timeout, ready))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
