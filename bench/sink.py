"""A minimal HTTP receiver, run as its own process: the "direct path" and the forward target.

Any request is answered 200 with ``{"t": <receipt time>}``; its ``n``/``t`` form fields (see
bench.loadgen) are recorded. ``GET /_bench/stats`` returns the count, the first and last
receipt times and every (n, sent, received) triple, so latency is measured at the receiver
with the same wall clock the sender stamped.

    python -m bench.sink --port-file FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from urllib.parse import parse_qsl

from aiohttp import web

__all__ = ["main"]


class _Record:
    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.seen: list[tuple[int, float, float]] = []


def _app(record: _Record) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        data = await request.read()
        now = time.time()
        if request.path == "/_bench/stats":
            return web.json_response({"count": record.count, "first": record.first,
                                      "last": record.last, "seen": record.seen,
                                      "cpu": time.process_time()})
        record.count += 1
        record.first = record.first or now
        record.last = now
        fields = dict(parse_qsl(data.decode("utf-8", "replace") or request.query_string))
        if "n" in fields and "t" in fields:
            record.seen.append((int(fields["n"]), float(fields["t"]), now))
        return web.Response(text=json.dumps({"t": now}), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receive)
    return app


async def _serve(port_file: Path) -> None:
    runner = web.AppRunner(_app(_Record()), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    port_file.write_text(json.dumps({"url": f"http://127.0.0.1:{port}"}))
    try:
        await asyncio.Event().wait()  # until SIGTERM ends the process
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sink")
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port_file))


if __name__ == "__main__":
    main()
