"""The load generator: X-on-like form POSTs, closed-loop (N at concurrency C) or paced (rate).

Each body carries ``n`` (the event's number) and ``t`` (the Unix time it was sent), so whoever
receives it (the agent's local consumer, the forward sink, the direct sink) can tell which
event it is and how long it took. The same generator drives the relay and the direct sink, so
their figures compare like for like.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp

__all__ = ["BlastResult", "PacedResult", "body", "blast", "paced", "EVENT_TYPE"]

EVENT_TYPE = "sms.received"
_TIMEOUT = aiohttp.ClientTimeout(total=60)
_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def body(n: int, t: float) -> bytes:
    """An SMS event as X-on would post it (about 120 bytes), numbered and timestamped."""
    return urlencode({
        "from": "+447700900123", "to": "+441632960001",
        "message": f"Bench message {n}: please call back", "n": n, "t": f"{t:.6f}",
    }).encode()


@dataclass(slots=True)
class BlastResult:
    started: float = 0.0
    """Unix time the first request went out."""
    finished: float = 0.0
    """Unix time the last answer came back."""
    statuses: Counter[int] = field(default_factory=Counter)
    """HTTP status → count; 0 counts requests that got no answer."""
    answers: list[dict[str, object]] = field(default_factory=list)
    """The JSON answers of 2xx responses, in completion order (sink receipt times)."""

    @property
    def ok(self) -> int:
        return sum(c for s, c in self.statuses.items() if 200 <= s < 300)

    @property
    def seconds(self) -> float:
        return self.finished - self.started


async def _post(http: aiohttp.ClientSession, url: str, n: int, result: BlastResult,
                keep: bool) -> None:
    try:
        async with http.post(url, data=body(n, time.time()), headers=_HEADERS) as resp:
            data = await resp.read()
            result.statuses[resp.status] += 1
            if keep and resp.status < 300:
                result.answers.append({"n": n, "raw": data})
    except (aiohttp.ClientError, TimeoutError):
        result.statuses[0] += 1


async def blast(url: str, count: int, concurrency: int, *, keep: bool = False) -> BlastResult:
    """POST ``count`` events to ``url`` with ``concurrency`` requests in flight (closed loop)."""
    result = BlastResult()
    numbers = iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT) as http:

        async def worker() -> None:
            for n in numbers:
                await _post(http, url, n, result, keep)

        result.started = time.time()
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(concurrency, count)):
                tg.create_task(worker())
        result.finished = time.time()
    return result


@dataclass(slots=True)
class PacedResult:
    blast: BlastResult
    behind: float
    """Largest lateness of a send against its schedule, in seconds (the generator's own lag)."""


async def paced(url: str, rate: float, duration: float, *, keep: bool = False) -> PacedResult:
    """POST at a fixed ``rate`` for ``duration`` seconds (open loop: sends never wait for
    answers, so a slow receiver shows as latency, not as a lower rate)."""
    result = BlastResult()
    count = int(rate * duration)
    loop = asyncio.get_running_loop()
    behind = 0.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT) as http:
        tasks: set[asyncio.Task[None]] = set()
        t0 = loop.time()
        result.started = time.time()
        for n in range(count):
            due = t0 + n / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                behind = max(behind, -delay)
            task = asyncio.create_task(_post(http, url, n, result, keep))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
        result.finished = time.time()
    return PacedResult(result, behind)
