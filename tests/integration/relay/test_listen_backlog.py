"""``xon-relay-server run`` listens with the largest accept queue the system allows.

aiohttp's ``SockSite`` calls ``listen()`` again on the socket it is given, with its own default
backlog (128) unless told otherwise; a reconnect storm of thousands of agents then overflows
the queue and their SYNs are dropped (docs/performance.md, reconnect storm). ``ss`` shows a
listening socket's backlog as its Send-Q.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .test_cli import EXIT, Server

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")

pytestmark = pytest.mark.skipif(
    shutil.which("ss") is None or not SOMAXCONN.exists(), reason="needs Linux and ss"
)


def _backlog(port: int) -> int:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"],
        capture_output=True,
        text=True,
        timeout=EXIT,
        check=True,
    ).stdout.split()
    return int(out[2])  # State, Recv-Q, Send-Q (the backlog), ...


@pytest.mark.parametrize(
    "loop",
    [
        "asyncio",
        pytest.param(
            "uvloop",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
            ),
        ),
    ],
)
def test_public_and_admin_sockets_keep_the_system_backlog(tmp_path: Path, loop: str) -> None:
    expected = min(socket.SOMAXCONN, int(SOMAXCONN.read_text()))
    assert expected > 128  # else this test could not tell the backlogs apart
    env = {k: v for k, v in os.environ.items() if not k.startswith("XON_RELAY_")}
    env["XON_RELAY_EVENT_LOOP"] = loop
    server = Server(tmp_path / "data", tmp_path / "server.log", env=env)
    try:
        info = server.wait_ready()
        for url in (info["public_url"], info["admin_url"]):
            port = urlsplit(url).port
            assert port is not None, url
            assert _backlog(port) == expected, url
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()
