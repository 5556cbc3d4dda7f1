"""xon-relay-server run on the event loop XON_RELAY_EVENT_LOOP picks (shared/aio.py, issue 7).

A real process: its start-up line (at DEBUG) names the loop, and an ingress request is stored
and answered on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.timing import MS

CLI = [sys.executable, "-m", "relay_server.cli"]
STEP = 20 * MS
STARTUP = 15000 * MS
EXIT = 15000 * MS

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def _env(loop: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XON_RELAY_")}
    env["XON_RELAY_EVENT_LOOP"] = loop
    return env


def _cli(data_dir: Path, loop: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--data-dir", str(data_dir)], capture_output=True,
                          text=True, timeout=EXIT, env=_env(loop))


@pytest.mark.parametrize(
    "loop",
    ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
        not HAVE_UVLOOP, reason="uvloop is not installed"))],
)
def test_relay_serves_ingress_on_the_chosen_loop(tmp_path: Path, loop: str) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--data-dir", str(data_dir), "--log-level", "debug"],
            stdout=out, stderr=subprocess.STDOUT, env=_env(loop),
        )
    try:
        deadline = time.monotonic() + STARTUP
        while not (data_dir / "admin.json").exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"server did not start: {log.read_text()}"
            time.sleep(STEP)  # polling a file another process writes: bounded loop
        added = _cli(data_dir, loop, "account", "add", "acme", "--json")
        assert added.returncode == 0, added.stderr
        url = json.loads(added.stdout)["ingress_url"] + "/sms.received"
        request = urllib.request.Request(url, data=b"from=%2B44&text=hi", method="POST")
        with urllib.request.urlopen(request, timeout=EXIT) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["duplicate"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=EXIT)
    assert code == 0, log.read_text()
    lines = [line for line in log.read_text().splitlines() if "event_loop.selected" in line]
    assert len(lines) == 1 and f"loop={loop}" in lines[0], log.read_text()


def test_unknown_loop_is_a_one_line_config_error(tmp_path: Path) -> None:
    """Exit 2 (configuration), one line naming the variable, no traceback."""
    done = subprocess.run(
        [*CLI, "run", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=EXIT, env=_env("fastest"),
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "XON_RELAY_EVENT_LOOP" in errors[0], done.stderr
