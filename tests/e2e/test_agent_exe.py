"""The single-file agent runs the office-PC quick start with no Python on the PATH
(docs/install-agent.md).

The executable is built once per test session by ``packaging/build_agent.py`` (what
``make agent-exe`` runs), which skips the build when its inputs have not changed since the last
one. The relay is the project's own, run as a subprocess on loopback; every command of the quick
start (``init``, ``enroll``, ``doctor``, ``run``, ``status``, ``open``) comes from the executable,
with a PATH that holds no program at all and no Python variables in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import EXIT_LIMIT, START_LIMIT, Account, Relay, child_env, read_json, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BUILD_LIMIT = 600.0
"""Seconds for one build (about 30 s on an idle 2-core machine)."""


@pytest.fixture(scope="session")
def agent_exe() -> Path:
    """dist/xon-relay-agent, built now unless an up-to-date one is there."""
    done = subprocess.run([sys.executable, str(REPO / "packaging" / "build_agent.py")],
                          capture_output=True, text=True, timeout=BUILD_LIMIT, cwd=REPO)
    assert done.returncode == 0, f"build failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
    exe = REPO / "dist" / "xon-relay-agent"
    assert exe.read_bytes()[:4] == b"\x7fELF", "not a native executable"
    return exe


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """The agent's environment: PATH is an empty folder, no PYTHON* or VIRTUAL_ENV."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {k: v for k, v in child_env().items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=str(empty), HOME=str(tmp_path / "home"))
    for name in ("python", "python3", "python3.11"):
        assert shutil.which(name, path=env["PATH"]) is None
    return env


class Exe:
    """Runs the executable's commands in a folder outside the checkout."""

    def __init__(self, path: Path, env: dict[str, str], cwd: Path) -> None:
        self.path, self.env, self.cwd = path, env, cwd

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            str(self.path), *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self.env, cwd=self.cwd)
        out, err = await asyncio.wait_for(proc.communicate(), START_LIMIT)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str) -> str:
        code, out, err = await self(*args)
        assert code == 0, f"{' '.join(args)} exited {code}:\n{out}{err}"
        return out

    @contextlib.contextmanager
    def running(self, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
        """A long-running command, stopped with SIGTERM (then killed) whatever happens."""
        with log.open("wb") as out:
            proc = subprocess.Popen([str(self.path), *args], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.cwd)
            try:
                yield proc
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=EXIT_LIMIT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def checks_of(doctor_json: str) -> dict[str, str]:
    return {c["check"]: c["status"] for c in json.loads(doctor_json)["checks"]}


async def test_quick_start_runs_from_the_single_file_agent(
    agent_exe: Path, bare_env: dict[str, str], relay: Relay, account: Account,
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    """init, enroll, doctor, run, status, open and the local API serving an event, all from
    the executable; a second run on the data dir is refused while the first keeps serving."""
    work = tmp_path / "office-pc"
    work.mkdir()
    exe = Exe(agent_exe, bare_env, work)
    data = work / "data"

    assert "enroll" in await exe.ok("--help")
    await exe.ok("init", "--data-dir", str(data))
    # The config's comments come from the config classes' source, kept in the bundle.
    assert "# Base URL of the relay" in (data / "config.toml").read_text(encoding="utf-8")

    added = await relay.admin("agent", "add", account.id, "--name", "office-pc")
    enrolled = json.loads(await exe.ok("enroll", "--relay", relay.public_url, "--code",
                                       str(added["code"]), "--data-dir", str(data),
                                       "--listen", "127.0.0.1:0", "--json"))
    assert enrolled["agent_id"] == added["agent_id"]
    checks = checks_of(await exe.ok("doctor", "--data-dir", str(data), "--json"))
    assert checks["enrollment"] == checks["relay_health"] == "ok", checks

    with exe.running("run", "--data-dir", str(data), log=tmp_path / "agent.log") as proc:
        def started() -> dict[str, Any] | None:
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            return read_json(data / "agent.json")

        state = await wait_until(started, "agent.json")
        local_url = str(state["local_url"])
        token = (data / "local-token").read_text(encoding="utf-8").strip()
        auth = {"Authorization": f"Bearer {token}"}

        async def connected() -> bool:
            async with http.get(local_url + "/v1/health", headers=auth) as resp:
                return resp.status == 200 and (await resp.json())["link"] == "connected"

        await wait_until(connected, "the link")
        status = json.loads(await exe.ok("status", "--data-dir", str(data), "--json"))
        assert status["running"] is True and status["link"] == "connected"
        assert status["local_url"] == local_url

        async with http.post(account.ingress_url + "/sms.received",
                             data={"from": "+447700900001", "message": "hello"}) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(local_url + "/v1/events", headers=auth,
                            params={"wait": f"{START_LIMIT:.1f}"}) as resp:
            assert resp.status == 200
            events = (await resp.json())["events"]
        assert [(e["type"], e["params"]["message"]) for e in events] == [
            ("sms.received", "hello")]

        # The one-time link sets a session cookie for 127.0.0.1 and redirects to the page:
        # a browser-like jar that keeps cookies of an IP address.
        link = (await exe.ok("open", "--data-dir", str(data), "--no-browser")).split()[-1]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.get(link) as resp:
                assert resp.status == 200 and resp.content_type == "text/html"

        code, _, err = await exe("run", "--data-dir", str(data))
        assert code == 1 and "already running" in err and str(state["pid"]) in err
        checks = checks_of(await exe.ok("doctor", "--data-dir", str(data), "--json"))
        assert checks["local_port"] == "ok", checks

        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: proc.poll() is not None, "the agent to stop",
                         limit=EXIT_LIMIT)
        assert proc.returncode == 0, (tmp_path / "agent.log").read_text()
