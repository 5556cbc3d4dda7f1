"""Send simulated X-on events to an ingress URL over HTTP (aiohttp).

Like X-on, the sender does not retry: a request that fails is reported as failed (the relay's
job is to answer 2xx only after a durable commit, DESIGN principle 1; this is what the tests
check). Every loop is bounded by the number of planned requests.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
from yarl import URL

from shared.events import format_time

from .catalogue import example_params
from .encode import Encoding, SimRequest, build_request, params_as_sent

__all__ = ["Planned", "SendResult", "plan", "request_url", "send_requests"]

USER_AGENT = "xon-sim/1"


@dataclass(frozen=True, slots=True, kw_only=True)
class Planned:
    """One event to send: what it is and the exact request that carries it."""

    n: int
    event_type: str
    encoding: Encoding
    params: dict[str, str]
    request: SimRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class SendResult:
    """The outcome of one request. ``status`` is ``None`` when no HTTP answer came back."""

    planned: Planned
    status: int | None
    error: str = ""
    """Why there was no answer, or the error code the relay answered with."""
    event_id: str | None = None
    """The relay's id for the stored event, when its answer carried one."""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def plan(
    types: Sequence[str], encodings: Sequence[Encoding], count: int | None = None, *, start: int = 1
) -> list[Planned]:
    """Plan ``count`` events cycling over every (type, encoding) pair; default one per pair.

    Events are numbered per type from ``start``, so the k-th event of each type shares its
    item ids with the k-th of the others (one call's ``call.arriving`` and ``call.ended``:
    shared/sim/catalogue.py) while bodies stay unique. Each envelope gets a fresh X-on id and
    creation time; an item ``id`` param travels in it as ``itemId``, since the envelope's own
    ``id`` is X-on's event id (docs/delivery.md, Duplicates).
    """
    pairs = list(itertools.product(types, encodings))
    total = len(pairs) if count is None else count
    numbers: dict[str, int] = {}
    out: list[Planned] = []
    for event_type, encoding in itertools.islice(itertools.cycle(pairs), total):
        n = numbers[event_type] = numbers.get(event_type, start - 1) + 1
        params = params_as_sent(example_params(event_type, n), encoding)
        request = build_request(
            event_type,
            params,
            encoding,
            event_id=str(uuid.uuid4()),
            created_at=format_time(time.time()),
        )
        out.append(
            Planned(
                n=n, event_type=event_type, encoding=encoding, params=params, request=request,
            )
        )
    return out


def request_url(ingress_url: str, request: SimRequest) -> URL:
    """The full URL of ``request``, its query kept byte-exact (no re-encoding)."""
    full = ingress_url.rstrip("/") + request.path_suffix
    if request.query:
        full += "?" + request.query
    return URL(full, encoded=True)


async def send_requests(
    ingress_url: str,
    planned: Sequence[Planned],
    *,
    concurrency: int = 1,
    rate: float | None = None,
    timeout: float = 10.0,
    on_result: Callable[[SendResult], None] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> list[SendResult]:
    """Send every planned request once; results come back in plan order.

    Args:
        ingress_url: ``http://host:port/xon/<ingress key>``.
        planned: from :func:`plan`.
        concurrency: requests in flight at most.
        rate: requests per second at most (``None``: as fast as the relay answers).
        timeout: seconds for one request.
        on_result: called as each request completes (for live output).
        session: reuse a client session; by default one is made and closed.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    results: list[SendResult | None] = [None] * len(planned)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    next_index = iter(range(len(planned)))

    async def worker(http: aiohttp.ClientSession) -> None:
        for i in next_index:
            if rate is not None:
                await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
            result = await _send_one(http, ingress_url, planned[i], timeout)
            results[i] = result
            if on_result is not None:
                on_result(result)

    own = session is None
    http = session or aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(concurrency, max(1, len(planned)))):
                tg.create_task(worker(http))
    finally:
        if own:
            await http.close()
    return [r for r in results if r is not None]


async def _send_one(
    http: aiohttp.ClientSession, ingress_url: str, item: Planned, timeout: float
) -> SendResult:
    req = item.request
    headers = {"Content-Type": req.content_type} if req.content_type else {}
    try:
        async with http.request(
            req.method,
            request_url(ingress_url, req),
            data=req.body if req.body or req.method != "GET" else None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            event_id, code = await _read_answer(resp)
            return SendResult(planned=item, status=resp.status, error=code, event_id=event_id)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return SendResult(planned=item, status=None, error=_describe(exc))


async def _read_answer(resp: aiohttp.ClientResponse) -> tuple[str | None, str]:
    """(relay event id, error code) from a JSON answer; missing parts are None / ""."""
    if resp.content_type != "application/json":
        return None, ""
    try:
        data = await resp.json()
    except (aiohttp.ClientError, ValueError):
        return None, ""
    if not isinstance(data, dict):
        return None, ""
    error = data.get("error")
    code = str(error.get("code", "")) if isinstance(error, dict) else ""
    event_id = data.get("id")
    return (str(event_id) if event_id is not None else None), code


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__
