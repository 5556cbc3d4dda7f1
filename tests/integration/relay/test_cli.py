"""xon-relay-server as a real process (DESIGN §Command line)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.timing import MS

CLI = [sys.executable, "-m", "relay_server.cli"]
STEP = 20 * MS
STARTUP = 15000 * MS
EXIT = 15000 * MS


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=EXIT,
        env={**os.environ, **(env or {})},
    )


def cli_json(*args: str) -> Any:
    done = cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Server:
    """``run`` on ports 0 as a subprocess, its output in ``log``; ``env`` replaces the
    environment."""

    def __init__(
        self, data_dir: Path, log: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.log = log
        self.admin_file = data_dir / "admin.json"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *CLI,
                    "run",
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-listen",
                    "127.0.0.1:0",
                    "--data-dir",
                    str(data_dir),
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if self.admin_file.exists():
                info: dict[str, Any] = json.loads(self.admin_file.read_text())
                return info
            time.sleep(STEP)  # polling a file another process writes: bounded loop
        raise AssertionError(f"server did not start: {self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=EXIT)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data", tmp_path / "server.log")
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(timeout=EXIT)


def http(url: str, data: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=EXIT) as resp:
        return resp.status, json.loads(resp.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_run_manage_and_stop(server: Server) -> None:
    """run writes admin.json; admin commands work with --json; SIGTERM exits 0."""
    info = server.wait_ready()
    data_dir = str(server.data_dir)
    assert set(info) == {"admin_url", "token", "public_url", "pid"}
    assert info["pid"] == server.proc.pid
    assert oct(server.admin_file.stat().st_mode & 0o777) == "0o600"
    assert oct(server.data_dir.stat().st_mode & 0o777) == "0o700"
    assert (server.data_dir / "admin-token").read_text().strip() == info["token"]

    account = cli_json("account", "add", "acme", "--data-dir", data_dir)
    assert set(account) == {"id", "name", "ingress_url"}
    assert account["ingress_url"].startswith(info["public_url"] + "/xon/")
    status, body = http(account["ingress_url"] + "/call.started?from=1")
    assert status == 200 and body["duplicate"] is False
    assert http(info["public_url"] + "/readyz")[0] == 200

    agent = cli_json("agent", "add", "acme", "--name", "pc", "--data-dir", data_dir)
    assert set(agent) == {"agent_id", "code", "expires_at", "account_id"}
    assert agent["account_id"] == account["id"]
    listing = cli_json("agent", "list", "acme", "--data-dir", data_dir)
    assert [a["agent_id"] for a in listing["agents"]] == [agent["agent_id"]]
    revoked = cli_json("agent", "revoke", agent["agent_id"], "--data-dir", data_dir)
    assert revoked == {"agent_id": agent["agent_id"], "revoked": True, "disconnected": False}

    assert server.stop() == 0
    assert not server.admin_file.exists()
    log = server.log.read_text()
    assert "server.started" in log and "server.stopped" in log
    assert info["token"] not in log
    assert account["ingress_url"].rsplit("/", 1)[1] not in log
    assert "Traceback" not in log


def test_human_output_and_admin_url_flag(server: Server) -> None:
    """Without --json the commands print short text; --admin-url plus the token file works."""
    info = server.wait_ready()
    data_dir = str(server.data_dir)
    done = cli("account", "add", "acme", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    assert "keep it secret" in done.stdout and "/xon/" in done.stdout
    done = cli(
        "agent",
        "add",
        "acme",
        "--admin-url",
        info["admin_url"],
        "--admin-token-file",
        str(server.data_dir / "admin-token"),
    )
    assert done.returncode == 0, done.stderr
    assert "xon-relay-agent enroll --relay " in done.stdout and "--code " in done.stdout
    done = cli("agent", "list", "--data-dir", data_dir)
    assert done.returncode == 0 and "pending" in done.stdout
    done = cli("account", "add", "acme", "--data-dir", data_dir)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "account_exists" in done.stderr
    assert server.stop() == 0


def test_token_and_relay_reused_across_restarts(tmp_path: Path) -> None:
    """A restarted server keeps its admin token and its accounts."""
    data_dir = tmp_path / "data"
    tokens = []
    for round_ in range(2):
        srv = Server(data_dir, tmp_path / f"server{round_}.log")
        try:
            tokens.append(srv.wait_ready()["token"])
            if round_ == 0:
                cli_json("account", "add", "acme", "--data-dir", str(data_dir))
            else:
                done = cli("agent", "add", "acme", "--data-dir", str(data_dir), "--json")
                assert done.returncode == 0, done.stderr
            assert srv.stop() == 0
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()
                srv.proc.wait(timeout=EXIT)
    assert tokens[0] == tokens[1]


def test_config_file_in_data_dir_is_read(tmp_path: Path) -> None:
    """data_dir/config.toml sets public_url; flags still win for the listeners."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "config.toml").write_text('public_url = "https://relay.example.com"\n')
    srv = Server(data_dir, tmp_path / "server.log")
    try:
        assert srv.wait_ready()["public_url"] == "https://relay.example.com"
        account = cli_json("account", "add", "acme", "--data-dir", str(data_dir))
        assert account["ingress_url"].startswith("https://relay.example.com/xon/")
        assert srv.stop() == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(timeout=EXIT)


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], done.stderr


def test_admin_command_without_server(tmp_path: Path) -> None:
    """No admin.json: one line on stderr, exit 1, no traceback."""
    done = cli("agent", "list", "--data-dir", str(tmp_path))
    assert_one_line_error(done, 1, "relay server not running")


def test_admin_command_with_dead_server(tmp_path: Path) -> None:
    """A stale admin.json (server gone) gives a one-line connection error."""
    admin = {"admin_url": f"http://127.0.0.1:{free_port()}", "token": "t", "public_url": "x"}
    (tmp_path / "admin.json").write_text(json.dumps(admin))
    done = cli("account", "add", "acme", "--data-dir", str(tmp_path))
    assert_one_line_error(done, 1, "relay server not running at")
    env = {"XON_RELAY_ADMIN_URL": admin["admin_url"]}
    done = cli("agent", "list", "--data-dir", str(tmp_path / "none"), env=env)
    assert_one_line_error(done, 1, "admin token")


def test_bad_configuration_exits_2(tmp_path: Path) -> None:
    """Bad flags, env values and config files are one line and exit 2."""
    data_dir = str(tmp_path / "d")
    done = cli("run", "--listen", "nonsense", "--data-dir", data_dir)
    assert_one_line_error(done, 2, "listen")
    done = cli("run", "--data-dir", data_dir, env={"XON_RELAY_MAX_BODY_SIZE": "big"})
    assert_one_line_error(done, 2, "XON_RELAY_MAX_BODY_SIZE")
    done = cli("run", "--config", str(tmp_path / "missing.toml"))
    assert_one_line_error(done, 2, "does not exist")
    done = cli("run", "--data-dir", data_dir, "--log-level", "loud")
    assert_one_line_error(done, 2, "log_level")


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    """A listen address already in use fails with one line and exit 1."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = cli("run", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(done, 1, "cannot listen")
