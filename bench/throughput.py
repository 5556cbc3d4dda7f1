"""Bench 1, end-to-end throughput (issue 7): N events POSTed at concurrency C.

Three paths, all driven by the same load generator (bench.loadgen) in this process:

- **direct**: straight to a minimal HTTP receiver (bench.sink): the ceiling of this machine.
- **relay → agent → consumer**: ingress (durable group commit), link, agent inbox (durable),
  a local app long-polling ``/v1/events`` (bench.consumer, its own process).
- **relay → agent → forward sink**: the agent re-issues each request to a local URL (forward
  mode); skipped with a note while the agent has no forward setting.

The figure is events per second from the first POST to the last event at the receiver, and
its ratio to the direct path (target ≥ 0.7×).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from .common import Row, cpu_seconds, own_cpu_seconds, print_table, rate
from .loadgen import EVENT_TYPE, blast
from .procs import STEP, BenchFailed, Children
from .profile import Profiler
from .stack import (
    RelayProc,
    add_account,
    consumer_result,
    enroll_agent,
    forward_toml,
    sink_stats,
    start_agent,
    start_consumer,
    start_relay,
    start_sink,
    wait_connected,
)

__all__ = ["Options", "run"]

_SILENCE = 10.0
"""Seconds after the last POST with nothing at the forward sink before the variant gives up."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    count: int = 20_000
    concurrency: int = 32
    log_level: str = "info"
    profile: Path | None = None


async def run(opts: Options, root: Path) -> dict[str, float]:
    """Run the three paths; print the table; return the figures (ev/s) by path."""
    limit = max(120.0, opts.count / 50)
    figures: dict[str, float] = {}
    rows: list[Row] = []
    children = Children()
    try:
        gen0 = own_cpu_seconds()
        direct, sink_cpu = await _direct(children, root, opts)
        figures["direct"] = direct
        rows += [Row("direct to sink (ceiling)", f"{direct:,.0f} ev/s"),
                 Row("  sink CPU", _per_event(sink_cpu, opts.count)),
                 Row("  load generator CPU", f"{own_cpu_seconds() - gen0:.1f} s")]

        relay = await start_relay(children, root, log_level=opts.log_level)
        ingress = await add_account(relay, "bench") + "/" + EVENT_TYPE
        profiler = Profiler(opts.profile, children)
        await profiler.attach("relay", relay.pid)

        agent = await start_agent(children, await enroll_agent(relay, root, "bench", "poll"),
                                  name="poll-agent")
        await wait_connected(agent, children)
        await profiler.attach("agent", agent.pid)
        out = root / "consumer.json"
        consumer = await start_consumer(children, agent, opts.count, out, limit)
        cpu0 = cpu_seconds(relay.pid), cpu_seconds(agent.pid), own_cpu_seconds()
        sent = await blast(ingress, opts.count, opts.concurrency)
        got = await consumer_result(children, consumer, out, limit)
        cpu1 = cpu_seconds(relay.pid), cpu_seconds(agent.pid), own_cpu_seconds()
        await profiler.finish()
        _check(sent.ok, got["count"], opts.count, "relay → consumer")
        e2e = opts.count / (float(got["last"]) - sent.started)
        figures["poll"] = e2e
        rows += [
            Row("ingress accepted (POST phase)", rate(sent.ok, sent.seconds)),
            Row("relay → agent → consumer", f"{e2e:,.0f} ev/s"),
            Row("  ratio to direct", f"{e2e / direct:.2f}x", ">= 0.7x"),
            Row("  relay CPU", _per_event(cpu1[0] - cpu0[0], opts.count)),
            Row("  agent CPU", _per_event(cpu1[1] - cpu0[1], opts.count)),
            Row("  consumer CPU", _per_event(float(got["cpu"]), opts.count)),
            Row("  load generator CPU", f"{cpu1[2] - cpu0[2]:.1f} s"),
            Row("  wall time", f"{float(got['last']) - sent.started:.1f} s"),
        ]

        toml, why = forward_toml("")
        if toml is None:
            rows.append(Row("relay → agent → forward sink", "skipped", why))
        else:
            try:
                fwd = await _forward(children, root, opts, relay, limit)
            except BenchFailed as exc:
                rows.append(Row("relay → agent → forward sink", "failed", str(exc)))
            else:
                figures["forward"] = fwd
                rows += [
                    Row("relay → agent → forward sink", f"{fwd:,.0f} ev/s"),
                    Row("  ratio to direct", f"{fwd / direct:.2f}x", ">= 0.7x"),
                ]
    finally:
        await children.stop_all()
    print_table("throughput (bench 1)",
                {"N": opts.count, "C": opts.concurrency, "relay log level": opts.log_level},
                rows)
    return figures


def _per_event(seconds: float, count: int) -> str:
    return f"{seconds:.1f} s ({1e6 * seconds / count:.0f} µs/event)"


async def _direct(children: Children, root: Path, opts: Options) -> tuple[float, float]:
    """The ceiling (ev/s) and the sink's CPU seconds for it."""
    url = await start_sink(children, root, "direct-sink")
    before = await sink_stats(url)
    sent = await blast(f"{url}/xon/direct/{EVENT_TYPE}", opts.count, opts.concurrency)
    stats = await sink_stats(url)
    _check(sent.ok, int(stats["count"]), opts.count, "direct")
    return (opts.count / (float(stats["last"]) - sent.started),
            float(stats["cpu"]) - float(before["cpu"]))


async def _forward(children: Children, root: Path, opts: Options, relay: RelayProc,
                   limit: float) -> float:
    sink = await start_sink(children, root, "forward-sink")
    toml, _ = forward_toml(f"{sink}/xon-push")
    # A second account, so that the polling agent above does not share this log.
    fwd_ingress = await add_account(relay, "bench-forward") + "/" + EVENT_TYPE
    agent = await start_agent(
        children, await enroll_agent(relay, root, "bench-forward", "forward"),
        name="forward-agent", extra_toml=toml or "",
    )
    await wait_connected(agent, children)
    profiler = Profiler(opts.profile, children)
    await profiler.attach("agent-forward", agent.pid)
    sent = await blast(fwd_ingress, opts.count, opts.concurrency)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    stats = await sink_stats(sink)
    silent = loop.time() + _SILENCE
    while int(stats["count"]) < sent.ok and loop.time() < deadline:
        children.check_alive()
        if not stats["count"] and loop.time() > silent:
            raise BenchFailed(f"the agent forwarded nothing within {_SILENCE:g} s "
                              "(is forward delivery wired into the agent?)")
        await asyncio.sleep(STEP * 4)
        stats = await sink_stats(sink)
    await profiler.finish()
    _check(sent.ok, int(stats["count"]), opts.count, "relay → forward sink")
    return opts.count / (float(stats["last"]) - sent.started)


def _check(accepted: int, received: int, count: int, path: str) -> None:
    if accepted != count:
        raise BenchFailed(f"{path}: only {accepted} of {count} POSTs were accepted")
    if received < count:
        raise BenchFailed(f"{path}: only {received} of {count} events arrived")
