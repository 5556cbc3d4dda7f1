"""``xon-relay-agent doctor``: one line per check, against a real relay on loopback."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay_agent import cli
from relay_agent.doctor import Check, all_ok, format_text, run_checks
from tests.helpers.timing import MS

from .support import RelayUnderTest, agent_process, eventually, serve_relay

NAMES = ["config", "enrollment", "local_token", "local_port", "relay_url", "proxy", "dns", "tcp",
         "tls", "relay_health", "relay_auth"]


async def enroll(relay: RelayUnderTest, data_dir: Path) -> None:
    _, code = await relay.new_code()
    argv = ["enroll", "--relay", relay.url, "--code", code, "--data-dir", str(data_dir),
            "--listen", "127.0.0.1:0"]
    assert await asyncio.to_thread(cli.main, argv) == 0


async def checks_for(data_dir: Path, env: dict[str, str] | None = None,
                     clock: Callable[[], float] = time.time) -> dict[str, Check]:
    checks = await asyncio.to_thread(run_checks, config_path=data_dir / "config.toml",
                                     data_dir=None, env=env or {}, timeout=5.0, clock=clock)
    assert [c.name for c in checks] == NAMES
    return {c.name: c for c in checks}


def set_config(data_dir: Path, old: str, new: str) -> None:
    path = data_dir / "config.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


async def test_doctor_passes_against_a_running_relay(
    tmp_path: Path, relay: RelayUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Enrolled agent, relay up: every line ok (no TLS on loopback http), exit 0."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    capsys.readouterr()
    argv = ["doctor", "--data-dir", str(data_dir), "--json"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    statuses = {c["check"]: c["status"] for c in report["checks"]}
    assert statuses.pop("tls") == "skip"
    assert statuses.pop("proxy") in ("ok", "warn")  # the machine's own HTTPS_PROXY
    assert set(statuses.values()) == {"ok"}, report

    assert await asyncio.to_thread(cli.main, ["doctor", "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == NAMES


async def test_doctor_names_a_relay_that_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Relay stopped: the tcp line fails with "connection refused", later steps skip, exit 1."""
    data_dir = tmp_path / "agent"
    async with serve_relay(tmp_path / "relay") as relay:
        await enroll(relay, data_dir)
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["doctor", "--data-dir", str(data_dir)]) == 1
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["dns"].startswith("ok")
    assert lines["tcp"].startswith("fail") and "connection refused" in lines["tcp"]
    assert lines["relay_health"].startswith("skip") and "tcp failed" in lines["relay_health"]


async def test_doctor_without_a_config_says_what_to_do(tmp_path: Path) -> None:
    """No config.toml: the config line fails naming init/enroll; nothing else fails after it."""
    checks = await checks_for(tmp_path)
    assert checks["config"].status == "fail" and "init" in checks["config"].detail
    assert not all_ok(list(checks.values()))
    assert {checks[n].status for n in NAMES[4:] if n != "proxy"} == {"skip"}


async def test_doctor_flags_secret_files_readable_by_others(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """Key and token mode 0644: both lines fail and say chmod 600."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    (data_dir / "agent.key").chmod(0o644)
    (data_dir / "local-token").chmod(0o640)
    checks = await checks_for(data_dir)
    for name in ("enrollment", "local_token"):
        assert checks[name].status == "fail" and "chmod 600" in checks[name].detail


async def test_doctor_local_port_in_use_or_held_by_the_agent(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """A port another program listens on fails; the same port held by this agent is ok."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        set_config(data_dir, 'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
        busy = (await checks_for(data_dir))["local_port"]
        assert busy.status == "fail" and "in use" in busy.detail
        (data_dir / "agent.json").write_text(json.dumps(
            {"pid": os.getpid(), "local_url": f"http://127.0.0.1:{port}", "agent_id": "a"}))
        held = (await checks_for(data_dir))["local_port"]
        assert held.status == "ok" and "held by this agent" in held.detail


async def test_doctor_reports_a_proxy_without_its_password(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """HTTPS_PROXY set: a warning naming the proxy, never its credentials; NO_PROXY: direct."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    env = {"HTTPS_PROXY": "http://alice:s3cret@proxy.example:3128"}
    checks = await checks_for(data_dir, env)
    assert checks["proxy"].status == "warn"
    assert "proxy.example:3128" in checks["proxy"].detail
    assert "s3cret" not in format_text(list(checks.values()))
    assert all_ok(list(checks.values()))
    direct = await checks_for(data_dir, {**env, "no_proxy": "localhost,127.0.0.1"})
    assert direct["proxy"].status == "ok" and "NO_PROXY" in direct["proxy"].detail


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


@asynccontextmanager
async def tls_listener(context: ssl.SSLContext) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_doctor_explains_an_untrusted_certificate(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """https to a self-signed relay: the tls line fails naming the certificate problem."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    async with tls_listener(self_signed(tmp_path)) as port:
        set_config(data_dir, f'relay_url = "{relay.url}"',
                   f'relay_url = "https://127.0.0.1:{port}"')
        checks = await checks_for(data_dir)
    assert checks["tcp"].status == "ok"
    assert checks["tls"].status == "fail"
    assert "not trusted" in checks["tls"].detail and "self-signed" in checks["tls"].detail
    assert checks["relay_health"].status == "skip"


# -- the enrollment at the relay (docs/protocol.md, Enrollment probe) ----------------------------


async def doctor_json(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[
        str, Any]]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["doctor", "--data-dir", str(data_dir), "--json"])
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, report


def line(report: dict[str, Any], name: str) -> dict[str, str]:
    found: dict[str, str] = next(c for c in report["checks"] if c["check"] == name)
    return found


async def test_doctor_json_has_one_entry_per_check(
    tmp_path: Path, relay: RelayUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json: {"ok", "checks": [{"check", "status", "detail"}]} in order, relay_auth ok."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    code, report = await doctor_json(data_dir, capsys)
    assert code == 0 and set(report) == {"ok", "checks"} and report["ok"] is True
    assert [c["check"] for c in report["checks"]] == NAMES
    assert all(set(c) == {"check", "status", "detail"} for c in report["checks"])
    assert {c["status"] for c in report["checks"]} <= {"ok", "warn", "skip"}
    auth = line(report, "relay_auth")
    assert auth["status"] == "ok" and "accepts its key" in auth["detail"]


async def test_doctor_fails_a_revoked_agent_with_re_enroll(
    tmp_path: Path, relay: RelayUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Revoked at the relay: relay_auth fails with "re-enroll: …" and the command; exit 1."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    config = (data_dir / "config.toml").read_text()
    agent_id = config.split('agent_id = "', 1)[1].split('"', 1)[0]
    await relay.services.store.revoke_agent(agent_id, now=time.time())
    code, report = await doctor_json(data_dir, capsys)
    assert code == 1 and report["ok"] is False
    auth = line(report, "relay_auth")
    assert auth["status"] == "fail"
    assert auth["detail"].startswith(f"re-enroll: the relay's operator revoked agent {agent_id}")
    assert f"enroll --force --relay {relay.url} --code CODE" in auth["detail"]
    assert [c["check"] for c in report["checks"] if c["status"] == "fail"] == ["relay_auth"]


async def test_doctor_fails_an_agent_the_relay_does_not_know(
    tmp_path: Path, relay: RelayUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent id the relay never enrolled: relay_auth fails with "re-enroll"; exit 1."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    text = (data_dir / "config.toml").read_text()
    agent_id = text.split('agent_id = "', 1)[1].split('"', 1)[0]
    set_config(data_dir, f'agent_id = "{agent_id}"', 'agent_id = "agt_unknown"')
    code, report = await doctor_json(data_dir, capsys)
    assert code == 1
    auth = line(report, "relay_auth")
    assert auth["status"] == "fail"
    assert auth["detail"].startswith(f"re-enroll: the relay at {relay.url} does not know agent "
                                     "agt_unknown")


async def test_doctor_names_a_wrong_clock(tmp_path: Path, relay: RelayUnderTest) -> None:
    """A PC clock an hour ahead: the relay refuses the probe's time, and the line says so."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    checks = await checks_for(data_dir, clock=lambda: time.time() + 3600)
    auth = checks["relay_auth"]
    assert auth.status == "fail"
    assert "clock is wrong" in auth.detail and "ahead of the relay's clock" in auth.detail


async def test_doctor_does_not_disturb_a_running_agent(
    tmp_path: Path, relay: RelayUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """doctor beside a running agent: relay_auth ok, and the agent's link is the same one
    (a link login would have replaced it and reset its authentication time)."""
    data_dir = tmp_path / "agent"
    await enroll(relay, data_dir)
    agent_id = (data_dir / "config.toml").read_text().split('agent_id = "', 1)[1].split('"')[0]
    async with agent_process("--data-dir", str(data_dir), data_dir=data_dir):
        await eventually(lambda: agent_id in relay.services.hub.online(), what="agent online",
                         limit=20_000 * MS)
        since = relay.services.hub.online()[agent_id]
        code, report = await doctor_json(data_dir, capsys)
        assert line(report, "relay_auth")["status"] == "ok", report
        assert line(report, "local_port")["detail"].startswith("held by this agent")
        assert code == 0
        assert relay.services.hub.online() == {agent_id: since}
