"""``xon-relay-agent`` enroll / run / status as real subprocesses (DESIGN §Command line)."""

from __future__ import annotations

import asyncio
import json
import stat
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from relay_agent.enroll import check_relay_url
from shared import crypto
from shared.errors import ConfigError
from shared.link import CloseCode
from tests.helpers.timing import MS

from .support import REPO, RelayUnderTest, agent_command, agent_env, agent_process, eventually


@dataclass
class Done:
    code: int
    out: str
    err: str


async def agent(*args: str, timeout: float = 30_000 * MS) -> Done:
    proc = await asyncio.create_subprocess_exec(
        *agent_command(*args), cwd=REPO, env=agent_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def enrolled(relay: RelayUnderTest, data_dir: Path) -> dict[str, str]:
    agent_id, code = await relay.new_code()
    done = await agent("enroll", "--relay", relay.url, f"--code={code}", "--data-dir",
                       str(data_dir), "--listen", "127.0.0.1:0", "--json")
    assert done.code == 0, done.err
    result: dict[str, str] = json.loads(done.out)
    assert result["agent_id"] == agent_id
    return result


async def test_enroll_refuses_plain_http_to_a_remote_relay(tmp_path: Path) -> None:
    """http:// to a non-loopback host is refused in one line, before any network use."""
    done = await agent("enroll", "--relay", "http://relay.example.com", "--code", "abc",
                       "--data-dir", str(tmp_path / "agent"))
    assert done.code == 1
    assert len(done.err.strip().splitlines()) == 1
    assert "https" in done.err and "--insecure" in done.err
    assert not (tmp_path / "agent").exists()


def test_relay_url_rules() -> None:
    """https anywhere; http only to loopback, or anywhere with insecure; nothing else."""
    assert check_relay_url("https://relay.example.com", insecure=False) is False
    assert check_relay_url("http://127.0.0.5:80", insecure=False) is True
    assert check_relay_url("http://[::1]:80", insecure=False) is True
    assert check_relay_url("http://localhost", insecure=False) is True
    assert check_relay_url("http://relay.example.com", insecure=True) is True
    for bad in ("http://relay.example.com", "http://10.0.0.1", "ftp://relay.example.com",
                "relay.example.com", "https://relay.example.com/?x=1"):
        with pytest.raises(ConfigError):
            check_relay_url(bad, insecure=False)


async def test_enroll_with_insecure_warns(tmp_path: Path) -> None:
    """--insecure prints a warning that the link is not encrypted."""
    done = await agent("enroll", "--relay", "http://127.0.0.1:9", "--code", "abc",
                       "--data-dir", str(tmp_path / "agent"), "--insecure")
    assert "warning" in done.err and "not encrypted" in done.err
    assert done.code == 1


async def test_enroll_fails_cleanly_when_the_relay_is_unreachable(tmp_path: Path) -> None:
    """No relay listening: one line on stderr, exit 1, nothing written."""
    done = await agent("enroll", "--relay", "http://127.0.0.1:9", "--code", "abc",
                       "--data-dir", str(tmp_path / "agent"))
    assert done.code == 1
    assert done.err.strip().count("\n") == 0
    assert "cannot reach the relay" in done.err
    assert "Traceback" not in done.err
    assert not (tmp_path / "agent" / "agent.key").exists()


async def test_enroll_with_an_invalid_code_fails(tmp_path: Path, relay: RelayUnderTest) -> None:
    """The relay's 400 invalid_code becomes one line and exit 1."""
    done = await agent("enroll", "--relay", relay.url, "--code", "not-a-code",
                       "--data-dir", str(tmp_path / "agent"))
    assert done.code == 1
    assert done.err.strip().count("\n") == 0 and "enrollment failed" in done.err
    assert not (tmp_path / "agent" / "agent.key").exists()


async def test_enroll_writes_private_files(tmp_path: Path, relay: RelayUnderTest) -> None:
    """Key, token and config are 0600 in a 0700 dir; a second enroll needs --force."""
    data_dir = tmp_path / "agent"
    result = await enrolled(relay, data_dir)
    assert result["local_url"] == "http://127.0.0.1:0"
    assert result["data_dir"] == str(data_dir.resolve())
    assert mode(data_dir) == 0o700
    for name in ("agent.key", "local-token", "config.toml"):
        assert mode(data_dir / name) == 0o600, name
    assert (data_dir / "agent.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    config = (data_dir / "config.toml").read_text()
    assert f'agent_id = "{result["agent_id"]}"' in config
    assert f'relay_id = "{relay.services.relay_id}"' in config
    token = (data_dir / "local-token").read_text()

    _, code = await relay.new_code()
    again = await agent("enroll", "--relay", relay.url, f"--code={code}", "--data-dir",
                        str(data_dir))
    assert again.code == 1 and "--force" in again.err
    forced = await agent("enroll", "--relay", relay.url, f"--code={code}", "--data-dir",
                         str(data_dir), "--force")
    assert forced.code == 0, forced.err
    assert "enrolled agent" in forced.out
    assert (data_dir / "local-token").read_text() == token


async def test_run_refuses_a_non_loopback_listen(tmp_path: Path, relay: RelayUnderTest) -> None:
    """DESIGN principle 3: the local API listens on loopback only (exit 2)."""
    data_dir = tmp_path / "agent"
    await enrolled(relay, data_dir)
    done = await agent("run", "--data-dir", str(data_dir), "--listen", "0.0.0.0:0")
    assert done.code == 2
    assert "loopback" in done.err and done.err.strip().count("\n") == 0


async def test_run_without_enrollment_exits_2(tmp_path: Path) -> None:
    """run on an empty data dir says to enroll first."""
    done = await agent("run", "--data-dir", str(tmp_path / "agent"))
    assert done.code == 2 and "enroll" in done.err


async def test_run_serves_events_and_stops_on_sigterm(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """run links up, serves events on its local API, answers status, exits 0 on SIGTERM."""
    data_dir = tmp_path / "agent"
    enrolled_as = await enrolled(relay, data_dir)
    state_file = data_dir / "agent.json"
    async with agent_process(
        "--data-dir", str(data_dir), data_dir=data_dir, stderr=asyncio.subprocess.PIPE
    ) as proc:
        state = json.loads(state_file.read_text())
        assert state["pid"] == proc.pid and state["agent_id"] == enrolled_as["agent_id"]
        assert mode(state_file) == 0o600
        token = (data_dir / "local-token").read_text().strip()
        seqs = await relay.append(3)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:

            async def delivered() -> bool:
                async with http.get(state["local_url"] + "/v1/events") as response:
                    return len((await response.json())["events"]) == 3

            await eventually(delivered, what="events on the local API", limit=10_000 * MS)
        status = await agent("status", "--data-dir", str(data_dir), "--json")
        report = json.loads(status.out)
        assert report["running"] is True and report["link"] == "connected"
        assert report["local_url"] == state["local_url"]
        assert report["relay_url"] == relay.url
        assert report["inbox"]["events"] == 3 and report["inbox"]["last_seq"] == seqs[-1]
        text = await agent("status", "--data-dir", str(data_dir))
        assert text.code == 0
        assert f"running (pid {proc.pid}), link connected since" in text.out
        assert f"relay: {relay.url}" in text.out and "last event: " in text.out
        assert "inbox: 3 events" in text.out
    assert not state_file.exists()
    offline = await agent("status", "--data-dir", str(data_dir))
    assert offline.code == 1
    assert "not running" in offline.out and "3 events" in offline.out
    assert f"run --data-dir {data_dir}" in offline.out
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert "agent.started" in err and "Traceback" not in err


async def test_run_exits_3_when_revoked(tmp_path: Path, relay: RelayUnderTest) -> None:
    """A revoked agent logs agent.revoked once and exits 3 instead of reconnecting."""
    data_dir = tmp_path / "agent"
    enrolled_as = await enrolled(relay, data_dir)
    agent_id = enrolled_as["agent_id"]
    proc = await asyncio.create_subprocess_exec(
        *agent_command("run", "--data-dir", str(data_dir)), cwd=REPO, env=agent_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await eventually(lambda: agent_id in relay.services.hub.online(), what="agent online",
                         limit=20_000 * MS)
        await relay.services.store.revoke_agent(agent_id, now=0.0)
        await relay.services.hub.disconnect(agent_id, CloseCode.REVOKED, "agent revoked")
        assert await asyncio.wait_for(proc.wait(), 20_000 * MS) == 3
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert "agent.revoked" in err and "Traceback" not in err
    assert f"re-enroll: the relay's operator revoked agent {agent_id}" in err
    assert f"enroll --force --relay {relay.url} --code CODE --data-dir {data_dir}" in err

    # status says the same after the fact, and exits 3 like the run did.
    done = await agent("status", "--data-dir", str(data_dir))
    assert done.code == 3
    assert "the relay refused this agent (revoked)" in done.out and "re-enroll:" in done.out
    report = json.loads((await agent("status", "--data-dir", str(data_dir), "--json")).out)
    assert report["state"] == "refused" and report["refused"]["kind"] == "revoked"
    assert report["refused"]["action"].startswith("re-enroll: ")


@pytest.mark.parametrize("as_json", [False, True])
async def test_status_of_a_never_enrolled_agent(tmp_path: Path, as_json: bool) -> None:
    """status of a data dir that was never enrolled: "not enrolled", what to run, exit 2."""
    data_dir = tmp_path / "agent"
    args = ["status", "--data-dir", str(data_dir)] + (["--json"] if as_json else [])
    done = await agent(*args)
    assert done.code == 2
    if as_json:
        report = json.loads(done.out)
        assert report["running"] is False and report["enrolled"] is False
        assert report["state"] == "not enrolled" and report["inbox"]["events"] == 0
    else:
        assert done.out.splitlines()[0] == "not enrolled"
        assert f"enroll --relay URL --code CODE --data-dir {data_dir}" in done.out
    # A commented config from init is no enrollment either.
    assert (await agent("init", "--data-dir", str(data_dir))).code == 0
    assert (await agent("status", "--data-dir", str(data_dir))).code == 2


async def test_status_of_an_enrolled_agent_that_is_not_running(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """Enrolled, never run: "not running", exit 1 (no agent answers)."""
    data_dir = tmp_path / "agent"
    await enrolled(relay, data_dir)
    done = await agent("status", "--data-dir", str(data_dir), "--json")
    assert done.code == 1
    report = json.loads(done.out)
    assert (report["state"], report["enrolled"]) == ("not running", True)


async def test_run_checks_the_relay_url_and_warns_when_insecure(tmp_path: Path) -> None:
    """run refuses http:// to a remote relay (exit 2) unless insecure, then warns at start."""
    data_dir = tmp_path / "agent"
    data_dir.mkdir(mode=0o700)
    (data_dir / "agent.key").write_bytes(
        crypto.private_key_to_pem(crypto.generate_private_key()))
    (data_dir / "local-token").write_text("t\n")
    config = data_dir / "config.toml"
    base = (f'relay_url = "http://192.0.2.1:9"\nagent_id = "a"\nrelay_id = "r"\n'
            f'data_dir = "{data_dir}"\nlisten = "127.0.0.1:0"\n')
    config.write_text(base)
    refused = await agent("run", "--config", str(config))
    assert refused.code == 2 and "--insecure" in refused.err

    # Insecure: accepted (checked without network in test_relay_url_rules) and warned about.
    config.write_text(base.replace("192.0.2.1", "127.0.0.1") + "insecure = true\n")
    async with agent_process(
        "--config", str(config), data_dir=data_dir, stderr=asyncio.subprocess.PIPE
    ) as proc:
        pass
    assert proc.stderr is not None
    assert "agent.insecure" in (await proc.stderr.read()).decode()


async def test_enroll_refuses_a_non_loopback_listen_unless_allowed(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """enroll --listen 0.0.0.0:0 exits 2; with --allow-non-loopback the config records it."""
    data_dir = tmp_path / "agent"
    _, code = await relay.new_code()
    args = ["enroll", "--relay", relay.url, f"--code={code}", "--data-dir", str(data_dir),
            "--listen", "0.0.0.0:0"]
    refused = await agent(*args)
    assert refused.code == 2 and "allow-non-loopback" in refused.err
    assert refused.err.count("\n") == 1 and not data_dir.exists()
    allowed = await agent(*args, "--allow-non-loopback")
    assert allowed.code == 0, allowed.err
    config = (data_dir / "config.toml").read_text()
    assert "\nallow_non_loopback = true\n" in config and 'listen = "0.0.0.0:0"' in config


async def test_run_allow_non_loopback_passes_the_listen_check(tmp_path: Path) -> None:
    """run --allow-non-loopback gets past the listen check (here to a broken key: exit 2,
    naming the key), where the same run without the flag stops at the listen check."""
    data_dir = tmp_path / "agent"
    data_dir.mkdir(mode=0o700)
    (data_dir / "agent.key").write_text("not a key\n")
    (data_dir / "local-token").write_text("t\n")
    (data_dir / "config.toml").write_text(
        f'relay_url = "http://127.0.0.1:9"\nagent_id = "a"\nrelay_id = "r"\n'
        f'data_dir = "{data_dir}"\nlisten = "0.0.0.0:0"\n')
    refused = await agent("run", "--data-dir", str(data_dir))
    assert refused.code == 2 and "loopback" in refused.err
    allowed = await agent("run", "--data-dir", str(data_dir), "--allow-non-loopback")
    assert allowed.code == 2 and "agent.key" in allowed.err
    assert "must be a loopback" not in allowed.err


async def test_a_second_agent_on_a_data_dir_is_refused(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """A second run on the same data dir exits 1 at once naming the first (pid, local URL);
    enroll --force is refused too; the first keeps serving and keeps its files."""
    data_dir = tmp_path / "agent"
    await enrolled(relay, data_dir)
    async with agent_process("--data-dir", str(data_dir), data_dir=data_dir) as first:
        state = json.loads((data_dir / "agent.json").read_text())
        second = await agent("run", "--data-dir", str(data_dir))
        assert second.code == 1
        assert second.err.strip() == (
            f"xon-relay-agent: another agent is already running on {data_dir}"
            f" (pid {first.pid}, local API {state['local_url']})"
        )
        _, code = await relay.new_code()
        again = await agent("enroll", "--relay", relay.url, f"--code={code}", "--data-dir",
                            str(data_dir), "--force")
        assert again.code == 1 and f"pid {first.pid}" in again.err
        # The first agent's files are intact and it still answers with its own token.
        assert json.loads((data_dir / "agent.json").read_text()) == state
        token = (data_dir / "local-token").read_text().strip()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            async with http.get(state["local_url"] + "/v1/health") as response:
                assert response.status == 200


async def test_run_names_a_busy_local_address(tmp_path: Path, relay: RelayUnderTest) -> None:
    """A local API port held by another agent (another data dir) is named in one line that
    says an agent holds it; one held by some other program says so."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    await enrolled(relay, first_dir)
    await enrolled(relay, second_dir)
    async with agent_process("--data-dir", str(first_dir), data_dir=first_dir):
        address = json.loads((first_dir / "agent.json").read_text())["local_url"][7:]
        done = await agent("run", "--data-dir", str(second_dir), "--listen", address)
        assert done.code == 1
        assert done.err.strip().splitlines()[-1] == (
            f"xon-relay-agent: cannot listen on {address}: another xon-relay-agent (with"
            " another data dir) listens there; choose another --listen"
        )
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        done = await agent("run", "--data-dir", str(second_dir), "--listen", f"127.0.0.1:{port}")
        assert done.code == 1
        assert done.err.strip().splitlines()[-1] == (
            f"xon-relay-agent: cannot listen on 127.0.0.1:{port}: another program listens"
            " there; choose another --listen"
        )
    finally:
        server.close()
        await server.wait_closed()
