"""``python -m bench.soak [--runs N] [--events N]``: the long crash scenarios of issue 6.

Each run starts a fresh relay and agent (the console scripts, on 127.0.0.1, temporary data
dirs), sends a burst of mixed GET/POST encodings (shared.sim) while a local app reads the
agent's ``/v1/events`` by cursor, and ``kill -9``s one process at a random instant (seeded; the
seed is printed). The killed process is restarted on the same data dir (the relay on the same
port: the agent's config names it), and once every 2xx'd event and everything in the relay's
log has reached the reader (bounded), the queue checker (``bench.checker``) compares: 0 lost,
0 duplicated, 0 unexpected, cursors strictly increasing and never reused (the reader's live
view and a re-read from the start must agree).

Scenarios: ``relay`` (SIGKILL the relay), ``agent`` (SIGKILL the agent), and, when the agent
build has the ``XON_TESTS_CRASH_AT`` hook in ``relay_agent/link.py``, ``agent@before_commit``
and ``agent@before_ack`` (the agent ``os._exit``s at that point of its receive path once the
random number of events reached it, then is restarted without the hook).

The relay's abuse limits are off (one source sends thousands of requests per second); the
agent reconnects with a short back-off (0.05 s, at most 0.5 s) so recovery times measure the
product, not the production back-off. Exit status 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from shared.errors import RelayError
from shared.events import format_time
from shared.sim import (
    ENCODINGS,
    EVENT_TYPES,
    Planned,
    SendResult,
    build_request,
    example_params,
    params_as_sent,
    send_requests,
)
from shared.sim.procs import script

from .checker import CheckResult, Received, Sent, check, reused_cursors
from .common import Row, machine, print_table
from .procs import STEP, BenchFailed, Children
from .stack import START_TIMEOUT, RelayProc, add_account, child_env, enroll_agent

__all__ = ["main", "run_once", "RunResult", "Options", "HOOK_POINTS", "hook_available"]

HOOK_ENV = "XON_TESTS_CRASH_AT"
CRASH_EXIT_CODE = 70
"""The hook's ``os._exit`` status (relay_agent/link.py; not imported: the hook may be absent)."""
HOOK_POINTS = ("before_commit", "before_ack")
"""The hook's points: after the agent received an event, before its inbox commit; after the
commit, before the ack to the relay (the hook's module docstring in relay_agent/link.py)."""
LINK_SOURCE = Path(__file__).resolve().parents[1] / "relay_agent" / "link.py"
AGENT_ENV = {"XON_RELAY_AGENT_BACKOFF_INITIAL": "0.05", "XON_RELAY_AGENT_BACKOFF_MAX": "0.5"}
PAGE = 1000
POLL_WAIT = 0.5
MAX_PAGES = 10_000
"""Bounds a re-read of the inbox from the start (10 million events)."""


@dataclass(frozen=True, slots=True)
class Options:
    runs: int = 20
    events: int = 10_000
    concurrency: int = 24
    seed: int = 0
    scenarios: tuple[str, ...] = ("relay", "agent")
    recover_limit: float = 120.0
    log_level: str = "info"
    keep: bool = False
    store: str = ""
    """A ``redis://…`` base URL: each run's relay uses it under a fresh key prefix; empty:
    SQLite in the relay's data dir."""


@dataclass(slots=True)
class RunResult:
    scenario: str
    seed: int
    kill_after: int
    """The 2xx count at which the kill was due (the random instant)."""
    kill_time: float | None = None
    """Seconds from the burst's start to the kill; None when the process never died."""
    check: CheckResult | None = None
    relay_log: int = 0
    """Events in the relay's log at the end (committed, answered or not)."""
    relay_undelivered: int = 0
    redelivered: int | None = None
    """Events the restarted agent received again and its inbox dropped as duplicates (from its
    ``inbox.committed`` debug records); None when the agent was not restarted."""
    """Events in the relay's log the reader never got."""
    reread_reused: int = 0
    """Cursors naming another event in the re-read from the start than in the live read."""
    reread_breaches: str = ""
    recover: float | None = None
    """Seconds from the kill to everything delivered; None when it never was (bounded)."""
    note: str = ""
    ok: bool = field(default=False)

    def line(self, index: int, total: int) -> str:
        kill = f"{self.kill_time:.2f}s" if self.kill_time is not None else "never"
        rec = f"{self.recover:.2f}s" if self.recover is not None else "never"
        c = self.check
        counts = (f"2xx {c.acked}/{c.sent}, lost {c.lost}, dup {c.duplicated}, "
                  f"unexpected {c.unexpected}, recovered {c.recovered}"
                  if c is not None else "no check")
        if self.redelivered is not None:
            counts += f", redelivered {self.redelivered}"
        extra = f" [{self.note}]" if self.note else ""
        due = (f"at event {self.kill_after} in the agent" if "@" in self.scenario
               else f"after {self.kill_after} 2xx")
        return (f"run {index:>2}/{total} {self.scenario:<18} seed {self.seed:<10} kill at {kill} "
                f"({due}) | {counts} | relay log {self.relay_log} | "
                f"recover {rec} | {'OK' if self.ok else 'FAIL'}{extra}")


def hook_available() -> bool:
    """Whether the agent build has the crash-point hook (added by the link's owner)."""
    try:
        return HOOK_ENV in LINK_SOURCE.read_text(encoding="utf-8")
    except OSError:
        return False


# -- processes ---------------------------------------------------------------------------------


async def _own_json(path: Path, pid: int, children: Children) -> dict[str, Any]:
    """Wait until ``path`` holds a JSON object written by process ``pid`` (not a stale one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while loop.time() < deadline:
        children.check_alive()
        with contextlib.suppress(FileNotFoundError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("pid") == pid:
                return data
        await asyncio.sleep(STEP)
    raise BenchFailed(f"{path} of pid {pid} did not appear within {START_TIMEOUT:g} s")


@dataclass(slots=True)
class Relay:
    children: Children
    data_dir: Path
    log: Path
    log_level: str
    listen: str = "127.0.0.1:0"
    proc: asyncio.subprocess.Process | None = None
    public_url: str = ""
    store: str = ""

    async def start(self) -> None:
        """Run the relay; a restart binds the same public port (the agent's config names it)."""
        self.proc = await self.children.start(
            "xon-relay-server",
            [script("xon-relay-server"), "run", "--listen", self.listen, "--admin-listen",
             "127.0.0.1:0", "--data-dir", str(self.data_dir), "--log-level", self.log_level,
             *(["--store", self.store] if self.store else [])],
            self.log, env=child_env(),
        )
        admin = await _own_json(self.data_dir / "admin.json", self.proc.pid, self.children)
        self.public_url = str(admin["public_url"]).rstrip("/")
        self.listen = self.public_url.removeprefix("http://")
        await _until(lambda: _ready(self.public_url), "relay /readyz", START_TIMEOUT,
                     self.children)


@dataclass(slots=True)
class Agent:
    children: Children
    data_dir: Path
    log: Path
    proc: asyncio.subprocess.Process | None = None

    async def start(self, crash_at: str | None = None, debug_log: Path | None = None) -> None:
        """Run the agent (with the crash hook armed at ``crash_at``); wait for its API.

        With ``debug_log``, it logs JSON at debug level there (what :func:`redelivered` reads).
        """
        extra = {**AGENT_ENV, **({HOOK_ENV: crash_at} if crash_at else {})}
        if debug_log is not None:
            extra |= {"XON_RELAY_AGENT_LOG_LEVEL": "debug", "XON_RELAY_AGENT_LOG_FORMAT": "json"}
        self.proc = await self.children.start(
            "xon-relay-agent",
            [script("xon-relay-agent"), "run", "--data-dir", str(self.data_dir)],
            debug_log or self.log, env=child_env(extra),
        )
        await _own_json(self.data_dir / "agent.json", self.proc.pid, self.children)

    async def wait_connected(self) -> None:
        token = (self.data_dir / "local-token").read_text(encoding="utf-8").strip()

        async def connected() -> bool:
            health = await _get_json(_local_url(self.data_dir), "/v1/health", token)
            return health is not None and health.get("link") == "connected"

        await _until(connected, "the agent's link", START_TIMEOUT, self.children)


def _sigkill(proc: asyncio.subprocess.Process | None) -> None:
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)


async def _ready(url: str) -> bool:
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status == 200
    return False


async def _get_json(base: str | None, path: str, token: str) -> dict[str, Any] | None:
    if base is None:
        return None
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
        async with aiohttp.ClientSession() as http:
            async with http.get(base + path, headers={"Authorization": f"Bearer {token}"},
                                timeout=aiohttp.ClientTimeout(total=5)) as r:
                data = await r.json(content_type=None)
                return data if isinstance(data, dict) else None
    return None


def _local_url(data_dir: Path) -> str | None:
    """The local API URL the running agent wrote (port 0: it changes with every start)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        data = json.loads((data_dir / "agent.json").read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("local_url"):
            return str(data["local_url"]).rstrip("/")
    return None


async def _until(probe: Callable[[], Any], what: str, limit: float,
                 children: Children | None = None) -> None:
    """Poll ``probe`` (sync or async) every STEP until truthy; BenchFailed after ``limit`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        if children is not None:
            children.check_alive()
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(STEP)
    raise BenchFailed(f"{what} not reached within {limit:g} s")


# -- the local app -----------------------------------------------------------------------------


def sent_key(p: Planned) -> str:
    """The request as it went on the wire, minus the ingress key (which the event omits)."""
    r = p.request
    return "\n".join((r.method, r.path_suffix, r.query, r.content_type,
                      base64.b64encode(r.body).decode()))


def event_key(event: dict[str, Any]) -> str:
    r = event["request"]
    return "\n".join((str(r["method"]), str(r["path"]), str(r["query"]),
                      str(r["content_type"]), str(r["body_b64"])))


def burst(count: int, rng: random.Random) -> list[Planned]:
    """``count`` events cycling over every (type, encoding) pair, in a seeded random order.

    Each carries a ``soak_n`` parameter (passed through untouched, DESIGN principle 2) so that
    no two requests are alike: the checker matches sends and receipts on the request itself.
    """
    pairs = list(itertools.product(EVENT_TYPES, ENCODINGS))
    out = []
    for n in range(1, count + 1):
        event_type, encoding = pairs[n % len(pairs)]
        params = params_as_sent({**example_params(event_type, n), "soak_n": str(n)}, encoding)
        request = build_request(event_type, params, encoding, event_id=str(uuid.uuid4()),
                                created_at=format_time(time.time()))
        out.append(Planned(n=n, event_type=event_type, encoding=encoding, params=params,
                           request=request))
    rng.shuffle(out)
    return out


def _received(events: list[dict[str, Any]]) -> list[Received]:
    return [Received(agent="agent", cursor=str(e["cursor"]), event_id=str(e["id"]),
                     key=event_key(e)) for e in events]


class Reader:
    """A local app long-polling ``/v1/events`` by cursor, through kills of the agent."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.token = (data_dir / "local-token").read_text(encoding="utf-8").strip()
        self.received: list[Received] = []
        self.ids: set[str] = set()
        self.keys: set[str] = set()
        self.cursor = ""
        self.error = ""

    async def run(self, stop: asyncio.Event) -> None:
        """Read until ``stop`` is set (the caller's waits are bounded) or the API refuses."""
        async with aiohttp.ClientSession() as http:
            url = _local_url(self.data_dir)
            while not stop.is_set():
                if url is None:
                    await asyncio.sleep(STEP)
                    url = _local_url(self.data_dir)
                    continue
                try:
                    page = await self._page(http, url)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    # The agent died or restarted on another port: find it again.
                    await asyncio.sleep(STEP)
                    url = _local_url(self.data_dir)
                    continue
                if page is None:
                    return
                self._take(page)

    async def _page(self, http: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
        params = {"limit": str(PAGE), "wait": str(POLL_WAIT)}
        if self.cursor:
            params["after"] = self.cursor
        async with http.get(url + "/v1/events", params=params,
                            headers={"Authorization": f"Bearer {self.token}"},
                            timeout=aiohttp.ClientTimeout(total=POLL_WAIT + 10)) as resp:
            body = await resp.json(content_type=None)
            if resp.status == 200 and isinstance(body, dict):
                return body
            if resp.status >= 500:
                raise aiohttp.ClientError(f"status {resp.status}")
            # 400 bad_cursor: the inbox forgot events this reader already saw (not durable).
            self.error = f"/v1/events answered {resp.status}: {body}"
            return None

    def _take(self, page: dict[str, Any]) -> None:
        got = _received(list(page["events"]))
        self.received.extend(got)
        self.ids.update(r.event_id for r in got)
        self.keys.update(r.key for r in got)
        if page.get("cursor"):
            self.cursor = str(page["cursor"])

    async def reread(self) -> list[Received]:
        """Every event the inbox holds now, from the start, page by page (no waiting)."""
        out: list[Received] = []
        cursor = ""
        url = _local_url(self.data_dir)
        if url is None:
            raise BenchFailed("no agent.json to re-read the inbox from")
        async with aiohttp.ClientSession() as http:
            for _ in range(MAX_PAGES):
                params = {"limit": str(PAGE)} | ({"after": cursor} if cursor else {})
                async with http.get(url + "/v1/events", params=params,
                                    headers={"Authorization": f"Bearer {self.token}"},
                                    timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    page = await resp.json(content_type=None)
                    if resp.status != 200:
                        raise BenchFailed(f"re-read: /v1/events answered {resp.status}")
                if not page["events"]:
                    return out
                out.extend(_received(list(page["events"])))
                cursor = str(page["cursor"])
        raise BenchFailed(f"re-read: the inbox did not end within {MAX_PAGES} pages")


def redelivered(log: Path) -> int:
    """Events an agent's inbox got again and dropped, from its JSON ``inbox.committed`` lines.

    The agent resumes after the last seq its inbox committed; what it committed but had not
    acked may come again (at most the relay's window, DESIGN §Link protocol) and is dropped by
    id. Lines that are not JSON (websockets' own debug output is) are skipped.
    """
    total = 0
    with log.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"inbox.committed"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                if record.get("event") == "inbox.committed":
                    total += int(record["events"]) - int(record["stored"])
    return total


def relay_log_ids(data_dir: Path, store: str = "") -> list[str]:
    """Event ids in the relay's log, read-only beside the running relay (WAL), or from the
    run's Redis prefix (its one account's stream)."""
    if store:
        return _redis_log_ids(store)
    conn = sqlite3.connect(f"{(data_dir / 'relay.db').resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [str(row[0]) for row in conn.execute("SELECT id FROM events ORDER BY seq")]
    finally:
        conn.close()


def _redis_log_ids(store: str) -> list[str]:
    import redis

    base, _, query = store.partition("?")
    prefix = query.partition("prefix=")[2]
    client = redis.Redis.from_url(base, decode_responses=True)
    try:
        ids: list[str] = []
        for account_id in client.zrange(f"{prefix}{{relay}}:accounts", 0, -1):
            for _, fields in client.xrange(f"{prefix}{{acct:{account_id}}}:events"):
                ids.append(str(json.loads(fields["event"])["id"]))
        return ids
    finally:
        client.close()


# -- one run -----------------------------------------------------------------------------------


async def run_once(scenario: str, seed: int, opts: Options, root: Path) -> RunResult:
    """One crash run in ``root`` (fresh relay and agent); never raises for a failed check."""
    rng = random.Random(seed)
    # The random instant: the kill is due when this many requests got a 2xx.
    kill_after = rng.randrange(1, opts.events)
    result = RunResult(scenario=scenario, seed=seed, kill_after=kill_after)
    children = Children()
    stop = asyncio.Event()
    reader_task: asyncio.Task[None] | None = None
    try:
        relay = Relay(children, root / "relay", root / "relay.log", opts.log_level)
        if opts.store:
            relay.store = f"{opts.store}?prefix=soak-{uuid.uuid4().hex[:12]}:"
        relay.data_dir.mkdir(parents=True)
        await relay.start()
        assert relay.proc is not None
        admin = RelayProc(pid=relay.proc.pid, data_dir=relay.data_dir, public_url=relay.public_url)
        ingress = await add_account(admin, "soak")
        agent_dir = await enroll_agent(admin, root, "soak", "agent")
        agent = Agent(children, agent_dir, root / "agent.log")
        crash_at = scenario.partition("@")[2] or None
        await agent.start(f"{crash_at}:{kill_after}" if crash_at else None)
        await agent.wait_connected()
        reader = Reader(agent_dir)
        reader_task = asyncio.create_task(reader.run(stop))

        planned = burst(opts.events, rng)
        target = relay if scenario == "relay" else agent
        loop = asyncio.get_running_loop()
        started = loop.time()
        killed = asyncio.Event()
        ok = 0

        def on_result(r: SendResult) -> None:
            nonlocal ok
            ok += r.ok
            if crash_at is None and ok >= kill_after and not killed.is_set():
                _sigkill(target.proc)  # at once, from the sender's own callback
                result.kill_time = loop.time() - started
                killed.set()

        # The crash hook kills the agent itself: watch for its exit instead.
        watcher = asyncio.create_task(_watch_exit(agent, killed)) if crash_at else None
        sender = asyncio.create_task(send_requests(
            ingress, planned, concurrency=opts.concurrency, on_result=on_result, timeout=10.0))
        waiter = asyncio.create_task(killed.wait())
        await asyncio.wait({sender, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if watcher is not None and not killed.is_set():
            # The agent may reach the crash point after the burst ended (it lags the ingress).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), opts.recover_limit)
        waiter.cancel()
        if watcher is not None:
            watcher.cancel()
        if killed.is_set():
            if result.kill_time is None:
                result.kill_time = loop.time() - started
            killed_at = loop.time()
            assert target.proc is not None
            await children.stop(target.proc)  # reap it: it is no longer a child to watch
            if crash_at and target.proc.returncode != CRASH_EXIT_CODE:
                result.note = (f"the agent exited {target.proc.returncode}, not by the hook "
                               f"({CRASH_EXIT_CODE})")
            if target is relay:
                await relay.start()
            else:
                await agent.start(debug_log=root / "agent-restarted.log")
        else:
            result.note = "the process was never killed"
            killed_at = loop.time()
        results = await sender
        sent = [Sent(key=sent_key(r.planned), acked=r.ok, event_id=r.event_id) for r in results]
        acked = {s.key for s in sent if s.acked}

        def delivered() -> bool:
            if reader.error:
                raise BenchFailed(reader.error)
            if not acked <= reader.keys:
                return False
            log = relay_log_ids(relay.data_dir, relay.store)
            result.relay_log = len(log)
            return set(log) <= reader.ids

        try:
            await _until(delivered, "every event at the reader", opts.recover_limit, children)
            result.recover = loop.time() - killed_at
        except BenchFailed as exc:
            result.note = str(exc)
        stop.set()
        await reader_task
        log = relay_log_ids(relay.data_dir, relay.store)
        result.relay_log = len(log)
        result.relay_undelivered = len(set(log) - reader.ids)
        if target is agent and killed.is_set():
            result.redelivered = redelivered(root / "agent-restarted.log")
        result.check = check(sent, reader.received)
        if reader.error:
            result.note = reader.error
        again = await reader.reread()
        result.reread_reused = reused_cursors(reader.received, again)
        reread = check(sent, again)
        if not reread.ok:
            result.reread_breaches = reread.summary()
        result.ok = (result.check.ok and result.kill_time is not None and not result.note
                     and result.recover is not None and not result.relay_undelivered
                     and not result.reread_reused and not result.reread_breaches)
        if result.check.examples and not result.check.ok:
            result.note = (result.note + " " + str(result.check.examples)).strip()
    except RelayError as exc:
        result.note = str(exc)
    finally:
        stop.set()
        if reader_task is not None and not reader_task.done():
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader_task
        await children.stop_all()
    return result


async def _watch_exit(agent: Agent, killed: asyncio.Event) -> None:
    assert agent.proc is not None
    await agent.proc.wait()
    killed.set()


# -- the soak ----------------------------------------------------------------------------------


def _summary(scenario: str, runs: list[RunResult]) -> list[Row]:
    checks = [r.check for r in runs if r.check is not None]
    recover = [r.recover for r in runs if r.recover is not None]
    kills = [r.kill_time for r in runs if r.kill_time is not None]
    again = [r.redelivered for r in runs if r.redelivered is not None]

    def total(name: str) -> int:
        return sum(int(getattr(c, name)) for c in checks)

    rec = (f"{min(recover):.2f} / {statistics.median(recover):.2f} / {max(recover):.2f} s"
           if recover else "-")
    kill = f"{min(kills):.2f} – {max(kills):.2f} s" if kills else "-"
    return [
        Row("runs passed", f"{sum(r.ok for r in runs)}/{len(runs)}", "all"),
        Row("events sent", f"{total('sent'):,}"),
        Row("2xx", f"{total('acked'):,}"),
        Row("lost (2xx, never delivered)", str(total("lost")), "0"),
        Row("duplicated", str(total("duplicated")), "0"),
        Row("unexpected", str(total("unexpected")), "0"),
        Row("recovered (no 2xx, delivered)", str(total("recovered")), "allowed"),
        Row("id mismatch / out of order / reused / gaps",
            " / ".join(str(total(n)) for n in ("mismatched", "out_of_order", "reused", "gaps")),
            "0"),
        Row("relay log not delivered", str(sum(r.relay_undelivered for r in runs)), "0"),
        Row("redelivered to the restarted agent max", str(max(again)) if again else "-",
            "<= window (256)"),
        Row("re-read disagreeing", str(sum(bool(r.reread_reused or r.reread_breaches)
                                           for r in runs)), "0"),
        Row("kill instant (from burst start)", kill),
        Row("kill → all delivered min/med/max", rec),
    ]


async def soak(opts: Options, base: Path) -> bool:
    """Every scenario, ``opts.runs`` runs each; prints a line per run and a table each."""
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM ends the soak like Ctrl-C: cancelled, so every run's children are stopped.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    print(f"soak: seed {opts.seed}, {opts.runs} runs x {opts.events} events, concurrency "
          f"{opts.concurrency}, scenarios {', '.join(opts.scenarios)}")
    print(f"machine: {machine()}")
    sys.stdout.flush()
    passed = True
    for scenario in opts.scenarios:
        runs: list[RunResult] = []
        for i in range(opts.runs):
            seed = opts.seed + i
            root = base / f"{scenario.replace('@', '-')}-{i + 1:02d}"
            root.mkdir(parents=True)
            r = await run_once(scenario, seed, opts, root)
            runs.append(r)
            print(r.line(i + 1, opts.runs), flush=True)
            if r.ok and not opts.keep:
                shutil.rmtree(root, ignore_errors=True)
        what = (f"the agent exits (hook) at {scenario.partition('@')[2]}" if "@" in scenario
                else f"kill -9 the {scenario}")
        print_table(f"soak: {what}",
                    {"runs": opts.runs, "events": opts.events, "C": opts.concurrency,
                     "seeds": f"{opts.seed}..{opts.seed + opts.runs - 1}"},
                    _summary(scenario, runs))
        passed = passed and all(r.ok for r in runs)
    return passed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20, help="runs per scenario (default 20)")
    parser.add_argument("--events", type=int, default=10_000,
                        help="events per burst (default 10000)")
    parser.add_argument("-c", "--concurrency", type=int, default=24,
                        help="requests in flight (default 24)")
    parser.add_argument("--seed", type=int,
                        help="seed of run 1 (run i uses seed + i - 1); default: random")
    parser.add_argument("--scenario", action="append", dest="scenarios",
                        help="relay, agent, agent@<point> or all (default: all; repeatable)")
    parser.add_argument("--recover-limit", type=float, default=120.0,
                        help="seconds to wait for everything to be delivered (default 120)")
    parser.add_argument("--log-level", default="info", help="relay log level (default info)")
    parser.add_argument("--store", default="",
                        help="redis://HOST:PORT/DB: run the relay on Redis (a fresh prefix per"
                             " run) instead of SQLite")
    parser.add_argument("--keep", action="store_true",
                        help="keep every run's dir (failed runs are always kept)")
    return parser


def _scenarios(asked: list[str] | None) -> tuple[str, ...]:
    every = ["relay", "agent"] + ([f"agent@{p}" for p in HOOK_POINTS] if hook_available() else [])
    if not asked or "all" in asked:
        return tuple(every)
    for name in asked:
        if name not in ("relay", "agent") and not (
                name.startswith("agent@") and name.partition("@")[2] in HOOK_POINTS):
            raise BenchFailed(f"unknown scenario {name!r} (relay, agent, agent@<point>, all)")
        if name.startswith("agent@") and not hook_available():
            raise BenchFailed(f"{HOOK_ENV} is not in {LINK_SOURCE}: no crash points to use")
    return tuple(asked)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.runs < 1 or args.events < 2 or args.concurrency < 1:
            raise BenchFailed("--runs and --concurrency must be >= 1, --events >= 2")
        opts = Options(
            runs=args.runs, events=args.events, concurrency=args.concurrency,
            seed=args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big"),
            scenarios=_scenarios(args.scenarios), recover_limit=args.recover_limit,
            log_level=args.log_level, keep=args.keep, store=args.store,
        )
        base = Path(tempfile.mkdtemp(prefix="xon-soak-"))
        started = time.monotonic()
        passed = asyncio.run(soak(opts, base))
    except RelayError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak: interrupted", file=sys.stderr)
        return 1
    kept = "" if passed and not opts.keep else f"; run dirs under {base}"
    print(f"\nsoak: {'all runs passed' if passed else 'FAILED'} in "
          f"{time.monotonic() - started:.0f} s{kept}")
    if passed and not opts.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
