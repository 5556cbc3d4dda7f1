"""End-to-end fixtures: the real console scripts as subprocesses, all on 127.0.0.1.

Simulator (in-process, shared.sim) → ``xon-relay-server run`` → ``xon-relay-agent run`` → a
local app (an aiohttp client in the test) reading the agent's local API. Every child is started
through :class:`Procs`, whose fixture always ends them, whatever the test did.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest

from shared.sim import Planned
from tests.helpers.timing import MS

BIN = Path(sys.executable).parent
STEP = 20 * MS
START_LIMIT = 20_000 * MS
DELIVERY_LIMIT = 30_000 * MS
EXIT_LIMIT = 15_000 * MS

Key = tuple[str, str, str, str, str]


def child_env() -> dict[str, str]:
    """The environment of every child: no stray XON_RELAY_* settings, fast agent reconnects."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XON_RELAY_")}
    env["XON_RELAY_AGENT_BACKOFF_INITIAL"] = f"{50 * MS:.3f}"
    env["XON_RELAY_AGENT_BACKOFF_MAX"] = f"{500 * MS:.3f}"
    return env


class Procs:
    """Long-running children with their output in log files; :meth:`close` ends them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._children: list[tuple[subprocess.Popen[bytes], IO[bytes], Path]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        path = self.log_dir / f"{len(self._children):02d}-{name}.log"
        log = path.open("wb")
        proc = subprocess.Popen(
            [str(BIN / name), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        self._children.append((proc, log, path))
        return proc

    def tail(self, lines: int = 15) -> str:
        """The end of every child's log, for failure messages."""
        out = []
        for proc, log, path in self._children:
            log.flush()
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} (exit {proc.poll()}) ---\n" + "\n".join(text))
        return "\n".join(out)

    def close(self) -> None:
        for proc, _, _ in self._children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc, log, _ in self._children:
            try:
                proc.wait(timeout=EXIT_LIMIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        self._children.clear()


async def wait_until(
    probe: Callable[[], Any],
    what: str,
    *,
    limit: float = START_LIMIT,
    procs: Procs | None = None,
) -> Any:
    """Poll ``probe`` (sync or async) every STEP until it gives a truthy value; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            detail = f"\n{procs.tail()}" if procs is not None else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        await asyncio.sleep(STEP)


async def wait_exit(proc: subprocess.Popen[bytes], procs: Procs) -> int:
    """Wait (bounded) for a child to exit on its own; return its exit code."""
    await wait_until(
        lambda: proc.poll() is not None, f"pid {proc.pid} to exit", limit=EXIT_LIMIT, procs=procs
    )
    assert proc.returncode is not None
    return proc.returncode


async def run_cli(name: str, *args: str) -> str:
    """Run a short console-script command; fail the test with its stderr on non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / name),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), START_LIMIT)
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited {proc.returncode}: {err!r}"
    return out.decode()


def read_json(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return None


def planned_key(p: Planned) -> Key:
    """What identifies a sent request at the far end: its raw request minus the ingress key."""
    r = p.request
    return (r.method, r.path_suffix, r.query, r.content_type, base64.b64encode(r.body).decode())


def event_key(event: dict[str, Any]) -> Key:
    r = event["request"]
    return (r["method"], r["path"], r["query"], r["content_type"], r["body_b64"])


# -- relay -------------------------------------------------------------------------------------


@dataclass
class Account:
    id: str
    ingress_url: str


@dataclass
class Relay:
    procs: Procs
    data_dir: Path
    listen: str = "127.0.0.1:0"
    proc: subprocess.Popen[bytes] | None = None
    public_url: str = ""

    async def start(self) -> None:
        """Start ``run`` and wait until it wrote admin.json and answers /readyz."""
        self.proc = self.procs.start(
            "xon-relay-server",
            "run",
            "--listen",
            self.listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.data_dir),
        )
        pid = self.proc.pid

        def admin() -> dict[str, Any] | None:
            assert self.proc is not None and self.proc.poll() is None, self.procs.tail()
            data = read_json(self.data_dir / "admin.json")
            return data if data is not None and data.get("pid") == pid else None

        info = await wait_until(admin, "relay admin.json", procs=self.procs)
        self.public_url = str(info["public_url"]).rstrip("/")
        # A restart must come back on the same public port: the agent's config names it.
        self.listen = self.public_url.removeprefix("http://")
        async with aiohttp.ClientSession() as http:
            await wait_until(lambda: self._ready(http), "relay /readyz", procs=self.procs)

    async def _ready(self, http: aiohttp.ClientSession) -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(self.public_url + "/readyz") as resp:
                return resp.status == 200
        return False

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=EXIT_LIMIT)

    async def admin(self, *args: str) -> dict[str, Any]:
        out = await run_cli("xon-relay-server", *args, "--json", "--data-dir", str(self.data_dir))
        data = json.loads(out)
        assert isinstance(data, dict)
        return data

    async def add_account(self, name: str) -> Account:
        data = await self.admin("account", "add", name)
        return Account(id=str(data["id"]), ingress_url=str(data["ingress_url"]))

    async def revoke(self, agent_id: str) -> dict[str, Any]:
        return await self.admin("agent", "revoke", agent_id)


# -- agent -------------------------------------------------------------------------------------


@dataclass
class Agent:
    procs: Procs
    data_dir: Path
    agent_id: str
    proc: subprocess.Popen[bytes] | None = None
    local_url: str = ""
    token: str = ""
    http: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def start(self, *, wait_connected: bool = True) -> None:
        """Start ``run``, wait for agent.json of this process and, by default, the link."""
        self.proc = self.procs.start("xon-relay-agent", "run", "--data-dir", str(self.data_dir))
        pid = self.proc.pid

        def state() -> dict[str, Any] | None:
            assert self.proc is not None and self.proc.poll() is None, self.procs.tail()
            data = read_json(self.data_dir / "agent.json")
            return data if data is not None and data.get("pid") == pid else None

        info = await wait_until(state, "agent.json", procs=self.procs)
        self.local_url = str(info["local_url"]).rstrip("/")
        self.token = (self.data_dir / "local-token").read_text(encoding="utf-8").strip()
        if wait_connected:
            await wait_until(self._connected, "agent link connected", procs=self.procs)

    async def _connected(self) -> bool:
        status, body = await self.get("/v1/health")
        return status == 200 and body.get("link") == "connected"

    async def get(
        self,
        path: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """GET on the local API with the token (unless headers override it)."""
        assert self.http is not None
        hdrs = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        async with self.http.get(
            self.local_url + path,
            params=params,
            headers=hdrs,
            timeout=aiohttp.ClientTimeout(total=DELIVERY_LIMIT),
        ) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body

    async def collect(self, count: int, *, limit: float = DELIVERY_LIMIT) -> list[dict[str, Any]]:
        """Read events as a local app (long-poll by cursor) until ``count`` arrived."""
        events: list[dict[str, Any]] = []
        cursor = ""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while len(events) < count:
            if loop.time() >= deadline:
                raise AssertionError(
                    f"only {len(events)} of {count} events arrived\n{self.procs.tail()}"
                )
            params = {"limit": "1000", "wait": f"{500 * MS:.3f}"}
            if cursor:
                params["after"] = cursor
            status, page = await self.get("/v1/events", params=params)
            assert status == 200, page
            events.extend(page["events"])
            cursor = page["cursor"] or cursor
        # Nothing more should be waiting: each event is seen once.
        status, page = await self.get("/v1/events", params={"after": cursor, "limit": "1000"})
        assert status == 200
        return events + list(page["events"])

    async def read_all(self) -> list[dict[str, Any]]:
        """Every event the inbox holds now, page by page from the start (no waiting)."""
        events: list[dict[str, Any]] = []
        cursor = ""
        for _ in range(1000):
            params = {"limit": "1000"} | ({"after": cursor} if cursor else {})
            status, page = await self.get("/v1/events", params=params)
            assert status == 200, page
            if not page["events"]:
                return events
            events.extend(page["events"])
            cursor = page["cursor"]
        raise AssertionError("the inbox did not end within 1000 pages")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=EXIT_LIMIT)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=EXIT_LIMIT)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Every child of the test; all of them are ended at teardown, pass or fail."""
    p = Procs(tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def relay(procs: Procs, tmp_path: Path) -> Relay:
    r = Relay(procs=procs, data_dir=tmp_path / "relay")
    await r.start()
    return r


@pytest.fixture
async def account(relay: Relay) -> Account:
    return await relay.add_account("acme")


MakeAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
def make_agent(
    relay: Relay, procs: Procs, tmp_path: Path, http: aiohttp.ClientSession
) -> MakeAgent:
    """Factory: create an agent in the relay, enroll it in its own data dir, start it."""
    counter = iter(range(1, 100))

    async def make(account: Account, *, start: bool = True) -> Agent:
        n = next(counter)
        added = await relay.admin("agent", "add", account.id, "--name", f"pc-{n}")
        data_dir = tmp_path / f"agent-{n}"
        await run_cli(
            "xon-relay-agent",
            "enroll",
            "--relay",
            relay.public_url,
            "--code",
            str(added["code"]),
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
        )
        agent = Agent(procs=procs, data_dir=data_dir, agent_id=str(added["agent_id"]), http=http)
        if start:
            await agent.start()
        return agent

    return make
