"""The agent's secrets on Windows as the CLI and the doctor see them: the access list on
Windows, the mode bits elsewhere (docs/deployment.md, Secrets on Windows).

The Windows calls are the fake of tests/unit/test_acl.py; the relay URL is a closed loopback
port, so the network checks fail at once without leaving the machine.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from relay_agent import cli, doctor, winacl
from relay_agent.enroll import KEY_FILE, Enrollment, write_enrollment
from shared import crypto
from tests.unit.test_acl import APP, FakeAcl

from .support import RelayUnderTest


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def enroll_into(data_dir: Path, api: FakeAcl | None) -> None:
    write_enrollment(data_dir, key=crypto.generate_private_key(),
                     enrollment=Enrollment("agt_1", "acc_1", "rly_1"),
                     relay_url=f"http://127.0.0.1:{closed_port()}", listen="127.0.0.1:0",
                     insecure=False, token_readers=(APP,) if api else (), acl_api=api)


def test_doctor_reads_the_access_list_not_the_mode(tmp_path: Path) -> None:
    """With ACL calls, the doctor's key and token lines judge the ACL: a key that still
    inherits "Users may read" fails (even at mode 0600), the token written by the agent is ok
    and names its readers."""
    api = FakeAcl()
    data_dir = tmp_path / "agent"
    enroll_into(data_dir, api)
    del api.sddl[data_dir / KEY_FILE]  # as if copied in from elsewhere: inherited ACL
    checks = {c.name: c for c in doctor.run_checks(config_path=data_dir / "config.toml",
                                                   data_dir=None, env={}, timeout=1.0,
                                                   acl_api=api)}
    key, token = checks["enrollment"], checks["local_token"]
    assert key.status == "fail" and "every local user (Users)" in key.detail
    assert "0600" not in key.detail and "chmod" not in key.detail
    assert token.status == "ok" and "access list: readable by" in token.detail
    assert "OFFICE\\reception" in token.detail


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has ACL calls")
def test_without_acl_calls_the_doctor_reads_the_mode(tmp_path: Path) -> None:
    """Off Windows (no ACL calls): the mode bits, as before."""
    assert winacl.system_api() is None
    data_dir = tmp_path / "agent"
    enroll_into(data_dir, None)
    checks = {c.name: c for c in doctor.run_checks(config_path=data_dir / "config.toml",
                                                   data_dir=None, env={}, timeout=1.0)}
    assert checks["local_token"].detail.endswith("(mode 0600)")


@pytest.mark.skipif(sys.platform == "win32", reason="Windows sets the access list")
async def test_token_reader_is_refused_off_windows_before_the_code_is_spent(
    tmp_path: Path, relay: RelayUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """enroll --token-reader on Linux: exit 2 with one line; the code still enrolls after."""
    _, code = await relay.new_code()
    data_dir = tmp_path / "agent"
    argv = ["enroll", "--relay", relay.url, "--code", code, "--data-dir", str(data_dir),
            "--listen", "127.0.0.1:0"]
    assert await asyncio.to_thread(cli.main, [*argv, "--token-reader", "OFFICE\\app"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Windows access list" in err
    assert await asyncio.to_thread(cli.main, argv) == 0
