"""Bench 2, latency at a fixed rate (issue 7): 200 events/s for 10 s, open loop.

Each event carries the Unix time it was sent; the receiver stamps its own receipt time with
the same clock (one machine). Direct: the time a minimal HTTP receiver (bench.sink) read the
request. Relay: the time a local app long-polling the agent (bench.consumer) got the event, so
the figure covers ingress, the durable commit, the link, the agent's durable inbox commit and
the long-poll wake-up. Targets: p50 ≤ direct + 3 ms, p99 ≤ direct + 10 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import Row, ms, percentile, print_table
from .loadgen import EVENT_TYPE, paced
from .procs import BenchFailed, Children
from .stack import (
    add_account,
    consumer_result,
    enroll_agent,
    sink_stats,
    start_agent,
    start_consumer,
    start_relay,
    start_sink,
    wait_connected,
)

__all__ = ["Options", "run"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    rate: float = 200.0
    duration: float = 10.0
    log_level: str = "info"


def _latencies(seen: Sequence[Sequence[float]]) -> list[float]:
    return [float(received) - float(sent) for _, sent, received in seen]


async def run(opts: Options, root: Path) -> dict[str, float]:
    count = int(opts.rate * opts.duration)
    limit = opts.duration + 120.0
    children = Children()
    try:
        sink = await start_sink(children, root, "latency-sink")
        direct_run = await paced(f"{sink}/xon/direct/{EVENT_TYPE}", opts.rate, opts.duration)
        direct = _latencies((await sink_stats(sink))["seen"])

        relay = await start_relay(children, root, log_level=opts.log_level)
        ingress = await add_account(relay, "bench") + "/" + EVENT_TYPE
        agent = await start_agent(children, await enroll_agent(relay, root, "bench", "lat"),
                                  name="latency-agent")
        await wait_connected(agent, children)
        out = root / "latency-consumer.json"
        consumer = await start_consumer(children, agent, count, out, limit)
        relay_run = await paced(ingress, opts.rate, opts.duration)
        relayed = _latencies((await consumer_result(children, consumer, out, limit))["seen"])
    finally:
        await children.stop_all()
    if len(direct) < count or len(relayed) < count:
        raise BenchFailed(f"latency: {len(direct)} direct and {len(relayed)} relayed events "
                          f"of {count} arrived")
    figures = {
        "direct_p50": percentile(direct, 50), "direct_p99": percentile(direct, 99),
        "direct_max": max(direct), "relay_p50": percentile(relayed, 50),
        "relay_p99": percentile(relayed, 99), "relay_max": max(relayed),
    }
    rows = [
        Row("direct p50", ms(figures["direct_p50"])),
        Row("direct p99", ms(figures["direct_p99"])),
        Row("direct max", ms(figures["direct_max"])),
        Row("ingress → consumer p50", ms(figures["relay_p50"]),
            f"<= direct + 3 ms ({ms(figures['direct_p50'] + 0.003)})"),
        Row("ingress → consumer p99", ms(figures["relay_p99"]),
            f"<= direct + 10 ms ({ms(figures['direct_p99'] + 0.010)})"),
        Row("ingress → consumer max", ms(figures["relay_max"])),
        Row("generator lag (worst send)",
            ms(max(direct_run.behind, relay_run.behind))),
    ]
    print_table("latency (bench 2)", {"rate": f"{opts.rate:g} ev/s",
                                      "duration": f"{opts.duration:g} s", "events": count,
                                      "relay log level": opts.log_level}, rows)
    return figures
