"""xon-relay-server as a real process (DESIGN §Command line)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
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


# -- secrets at rest (docs/deployment.md, Files and modes; X-on API keys) -----------------------


def stored_api_key(data_dir: Path, account: str) -> str:
    """The X-on API key as the relay stored it (read beside the running relay, as a backup
    would)."""
    with closing(sqlite3.connect(data_dir / "relay.db")) as conn:
        row = conn.execute("SELECT xon_api_key FROM accounts WHERE name = ?", (account,)).fetchone()
    assert row is not None
    return str(row[0])


def test_api_key_from_file_stdin_or_environment(server: Server, tmp_path: Path) -> None:
    """account add/set take the X-on API key from a file, standard input or
    XON_RELAY_XON_API_KEY (none of them visible in the process list); --xon-api-key still
    works; a flag wins over the environment."""
    server.wait_ready()
    data = ["--data-dir", str(server.data_dir)]
    key_file = tmp_path / "xon.key"
    key_file.write_text("key-from-file\n")
    assert cli("account", "add", "a", "--xon-api-key-file", str(key_file), *data).returncode == 0
    assert stored_api_key(server.data_dir, "a") == "key-from-file"

    done = subprocess.run(
        [*CLI, "account", "add", "b", "--xon-api-key-file", "-", *data],
        input="key-from-stdin\n", capture_output=True, text=True, timeout=EXIT,
    )
    assert done.returncode == 0, done.stderr
    assert stored_api_key(server.data_dir, "b") == "key-from-stdin"

    env = {"XON_RELAY_XON_API_KEY": "key-from-env"}
    assert cli("account", "add", "c", *data, env=env).returncode == 0
    assert stored_api_key(server.data_dir, "c") == "key-from-env"
    assert cli("account", "set", "a", *data, env=env).returncode == 0
    assert stored_api_key(server.data_dir, "a") == "key-from-env"
    done = cli("account", "set", "a", "--xon-api-key-file", str(key_file), *data, env=env)
    assert done.returncode == 0, done.stderr
    assert stored_api_key(server.data_dir, "a") == "key-from-file"
    assert cli("account", "set", "c", "--xon-api-key", "key-from-argv", *data).returncode == 0
    assert stored_api_key(server.data_dir, "c") == "key-from-argv"
    assert cli("account", "add", "d", *data, env={"XON_RELAY_XON_API_KEY": ""}).returncode == 0
    assert stored_api_key(server.data_dir, "d") == ""
    log = server.log.read_text()
    for key in ("key-from-file", "key-from-stdin", "key-from-env", "key-from-argv"):
        assert key not in log
    assert server.stop() == 0


def test_bad_api_key_sources_are_one_line(server: Server, tmp_path: Path) -> None:
    """A missing, empty, oversized or multi-line key file, or both flags at once, fails with
    one line and changes nothing."""
    server.wait_ready()
    data = ["--data-dir", str(server.data_dir)]
    empty, two_lines, huge = tmp_path / "empty", tmp_path / "two", tmp_path / "huge"
    empty.write_text("\n")
    two_lines.write_text("key\r\nX-Injected: 1\n")
    huge.write_bytes(b"k" * (64 * 1024 + 1))
    cases = [
        (str(tmp_path / "missing"), "cannot read the X-on API key"),
        (str(empty), "no X-on API key in"),
        (str(two_lines), "visible ASCII"),
        (str(huge), "not a key"),
    ]
    for name, text in cases:
        done = cli("account", "add", "a", "--xon-api-key-file", name, *data)
        assert_one_line_error(done, 1, text)
    both = ["--xon-api-key-file", str(empty), "--xon-api-key", "k"]
    done = cli("account", "add", "a", *both, *data)
    assert done.returncode == 2 and "not allowed with" in done.stderr
    assert_one_line_error(
        cli("account", "add", "a", *data, env={"XON_RELAY_XON_API_KEY": "a b"}), 1, "visible ASCII"
    )
    assert cli_json("account", "list", *data) == {"accounts": []}
    assert server.stop() == 0


def test_data_dir_and_store_are_owner_only(tmp_path: Path) -> None:
    """A new data dir is 0700 and relay.db with its -wal, -shm and lock files 0600, whatever
    the umask; an existing looser data dir and store files of ours are tightened, and said so."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    with closing(sqlite3.connect(data_dir / "relay.db")):
        pass  # an older relay's store, made with the umask's 0644
    (data_dir / "relay.db").chmod(0o644)
    saved = os.umask(0o022)  # the relay, not the umask, must keep these private
    try:
        srv = Server(data_dir, tmp_path / "server.log")
    finally:
        os.umask(saved)
    try:
        srv.wait_ready()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.iterdir()}
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        for name in ("relay.db", "relay.db-wal", "relay.db-shm", "relay.db.lock", "admin.json"):
            assert modes[name] == 0o600, (name, oct(modes[name]))
        assert srv.stop() == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(timeout=EXIT)
    log = srv.log.read_text()
    assert "server.data_dir_tightened" in log and "mode=0755" in log
    assert "store.file_tightened" in log and "mode=0644" in log


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root to chown")
def test_an_open_data_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    """A data dir open to others and owned by another user is not ours to change: run
    refuses it with one line and writes nothing into it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    os.chown(data_dir, 65534, 65534)
    done = cli("run", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0")
    assert_one_line_error(done, 1, "owned by uid 65534")
    assert list(data_dir.iterdir()) == []
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o755


# -- a full disk (docs/operations.md, Readiness) -----------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: root only (and a kernel that lets this process mount), else skipped."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True, timeout=EXIT,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=EXIT)


def fill(disk: Path) -> Path:
    """Write zeros into ``disk`` until it is full; the file to delete to free it again."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for _ in range(100_000):  # bounded: 4 MiB in 4 KiB writes fills it long before
            try:
                out.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return filler
    raise AssertionError("the disk never filled")


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=EXIT) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def ready(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=EXIT) as resp:
            return int(resp.status), json.loads(resp.read())["status"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]["code"]


def test_a_real_full_disk(small_disk: Path, tmp_path: Path) -> None:
    """On a full disk ingress answers 503 and /readyz 503 store_unavailable, the relay stays
    up and comes back by itself once there is room (no restart, no other traffic); a restart
    on a full disk exits 1 with one line saying the disk is full."""
    data_dir = small_disk / "data"
    srv = Server(data_dir, tmp_path / "server.log")
    try:
        info = srv.wait_ready()
        public = info["public_url"]
        data = ["--data-dir", str(data_dir)]
        urls = [cli_json("account", "add", name, *data)["ingress_url"] for name in "ab"]
        assert post(urls[0] + "/sms.received", b"text=before") == 200
        filler = fill(small_disk)
        assert post(urls[0] + "/sms.received", b"text=" + b"x" * 8192) == 503
        assert post(urls[1] + "/sms.received", b"text=" + b"x" * 8192) == 503
        assert ready(public) == (503, "store_unavailable")
        assert srv.proc.poll() is None
        filler.unlink()
        assert ready(public) == (200, "ok")
        assert post(urls[1] + "/sms.received", b"text=" + b"x" * 8192) == 200
        assert srv.stop() == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(timeout=EXIT)
    log = srv.log.read_text()
    assert log.count("store.commit_failed") == 1 and "store.commit_recovered" in log
    assert "Traceback" not in log
    fill(small_disk)
    done = cli("run", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
               "--admin-listen", "127.0.0.1:0")
    assert_one_line_error(done, 1, "disk is full")
