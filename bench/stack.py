"""Start the product as a deployment runs it: the console scripts as child processes.

A relay (``xon-relay-server run``) with its data dir under the bench's temp dir, accounts and
agents made through its admin CLI, agents enrolled and run with ``xon-relay-agent``. Everything
listens on 127.0.0.1 with port 0. The relay's abuse limits are switched off (a bench is one
source sending thousands of requests per second); durability settings are left as shipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from shared.config import AgentConfig
from shared.sim.procs import script

from .procs import STEP, BenchFailed, Children, run_command, wait_for_json

__all__ = [
    "START_TIMEOUT",
    "RelayProc",
    "AgentProc",
    "child_env",
    "start_relay",
    "add_account",
    "enroll_agent",
    "start_agent",
    "forward_toml",
    "python_module",
    "agent_health",
    "wait_connected",
    "start_consumer",
    "consumer_result",
    "start_sink",
    "sink_stats",
]

START_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class RelayProc:
    pid: int
    data_dir: Path
    public_url: str


@dataclass(frozen=True, slots=True)
class AgentProc:
    pid: int
    data_dir: Path
    agent_id: str
    local_url: str
    token: str


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """No stray XON_RELAY_* settings from the caller's shell; abuse limits off; ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XON_RELAY_")}
    env["XON_RELAY_LIMITS_SOURCE_RATE"] = "none"
    env["XON_RELAY_LIMITS_ACCOUNT_RATE"] = "none"
    env.update(extra or {})
    return env


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``python -m module`` with this interpreter (the venv)."""
    return [sys.executable, "-m", module, *args]


async def start_relay(children: Children, root: Path, *, log_level: str = "info") -> RelayProc:
    """Run a relay whose data dir is ``root/relay`` (which may already hold a store)."""
    data_dir = root / "relay"
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = await children.start(
        "xon-relay-server",
        [script("xon-relay-server"), "run", "--listen", "127.0.0.1:0", "--admin-listen",
         "127.0.0.1:0", "--data-dir", str(data_dir), "--log-level", log_level],
        root / "relay.log",
        env=child_env(),
    )
    admin = await wait_for_json(data_dir / "admin.json", children, timeout=START_TIMEOUT)
    return RelayProc(pid=proc.pid, data_dir=data_dir, public_url=str(admin["public_url"]))


async def add_account(relay: RelayProc, name: str) -> str:
    """A new account; returns its ingress URL."""
    out = await run_command([script("xon-relay-server"), "account", "add", name, "--json",
                             "--data-dir", str(relay.data_dir)], env=child_env())
    return str(json.loads(out)["ingress_url"])


async def enroll_agent(relay: RelayProc, root: Path, account: str, name: str) -> Path:
    """Make an agent of ``account`` and enroll it into ``root/name``; returns its data dir."""
    added = json.loads(await run_command(
        [script("xon-relay-server"), "agent", "add", account, "--name", name, "--json",
         "--data-dir", str(relay.data_dir)], env=child_env()
    ))
    data_dir = root / name
    await run_command([script("xon-relay-agent"), "enroll", "--relay", relay.public_url,
                       "--code", str(added["code"]), "--data-dir", str(data_dir),
                       "--listen", "127.0.0.1:0"], env=child_env())
    return data_dir


async def start_agent(
    children: Children, data_dir: Path, *, name: str = "agent", extra_toml: str = ""
) -> AgentProc:
    """Run the agent of ``data_dir`` (``extra_toml`` appended to its config); wait for its API."""
    if extra_toml:
        with (data_dir / "config.toml").open("a", encoding="utf-8") as f:
            f.write(extra_toml)
    proc = await children.start(
        "xon-relay-agent",
        [script("xon-relay-agent"), "run", "--data-dir", str(data_dir)],
        data_dir.parent / f"{name}.log",
        env=child_env(),
    )
    info = await wait_for_json(data_dir / "agent.json", children, timeout=START_TIMEOUT)
    token = (data_dir / "local-token").read_text(encoding="utf-8").strip()
    return AgentProc(pid=proc.pid, data_dir=data_dir, agent_id=str(info["agent_id"]),
                     local_url=str(info["local_url"]).rstrip("/"), token=token)


def forward_toml(sink_url: str) -> tuple[str | None, str]:
    """``config.toml`` text adding a forward target to ``sink_url``, or (None, why not).

    Forward delivery (DESIGN §Agent local API, delivery modes) is a ``[[forward]]`` table of
    the agent config; this checks the config has it, so that the bench says clearly when the
    installed agent does not.
    """
    fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    if "forward" not in fields or not isinstance(getattr(AgentConfig(), "forward"), list):
        return None, "the agent config has no [[forward]] targets (forward mode not built)"
    url = json.dumps(sink_url)
    return f'\n[[forward]]\nurl = {url}\nname = "bench"\nstart = "oldest"\n', ""


async def agent_health(agent: AgentProc) -> dict[str, Any]:
    """The agent's ``GET /v1/health`` answer."""
    headers = {"Authorization": f"Bearer {agent.token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{agent.local_url}/v1/health",
                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data


async def wait_connected(agent: AgentProc, children: Children,
                         timeout: float = START_TIMEOUT) -> dict[str, Any]:
    """Poll the agent's health until its link is connected; returns that health answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        children.check_alive()
        health = await agent_health(agent)
        if health.get("link") == "connected":
            return health
        await asyncio.sleep(STEP)
    raise BenchFailed(f"agent {agent.agent_id} did not connect within {timeout:g} s")


async def start_consumer(children: Children, agent: AgentProc, count: int, out: Path,
                         timeout: float) -> asyncio.subprocess.Process:
    """Start a long-poll consumer (bench.consumer) reading ``count`` events into ``out``;
    returns once it has read the agent's API the first time."""
    proc = await children.start(
        "consumer",
        python_module("bench.consumer", "--url", agent.local_url, "--token-file",
                      str(agent.data_dir / "local-token"), "--count", str(count),
                      "--out", str(out), "--timeout", f"{timeout:g}"),
        out.with_suffix(".log"),
        env=child_env(),
    )
    await wait_for_json(out.with_suffix(".ready"), children, timeout=START_TIMEOUT)
    return proc


async def consumer_result(children: Children, proc: asyncio.subprocess.Process, out: Path,
                          timeout: float) -> dict[str, Any]:
    """Wait (bounded) for a consumer to finish and return what it wrote."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        raise BenchFailed(f"the consumer did not finish within {timeout:g} s") from None
    finally:
        await children.stop(proc)  # its exit is expected: no longer a child to watch
    if proc.returncode != 0:
        raise BenchFailed(f"the consumer failed (exit {proc.returncode}; log "
                          f"{out.with_suffix('.log')})")
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return data


async def start_sink(children: Children, root: Path, name: str) -> str:
    """Start a bench.sink process; returns its base URL."""
    port_file = root / f"{name}.json"
    await children.start("sink", python_module("bench.sink", "--port-file", str(port_file)),
                         root / f"{name}.log", env=child_env())
    data = await wait_for_json(port_file, children, timeout=START_TIMEOUT)
    return str(data["url"])


async def sink_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/_bench/stats",
                            timeout=aiohttp.ClientTimeout(total=30)) as resp:
            data: dict[str, Any] = await resp.json()
            return data
