"""``run_hosted``: the agent run by a host other than a console (the Windows service's path)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay_agent import cli, winservice

from .support import RelayUnderTest, eventually


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """run_hosted configures the root logger, as a service process should; undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_hosted_agent_runs_until_the_host_stops_it(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """The stop function handed to the host stops the agent from another thread: exit 0."""
    data_dir = tmp_path / "agent"
    _, code = await relay.new_code()
    argv = ["enroll", "--relay", relay.url, "--code", code, "--data-dir", str(data_dir),
            "--listen", "127.0.0.1:0"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    switch = winservice.StopSwitch()
    log_file = data_dir / winservice.LOG_FILE
    result: list[int] = []

    def host() -> None:
        result.append(cli.run_hosted(data_dir, attach_stop=switch.attach, log_file=log_file))

    thread = threading.Thread(target=host)
    thread.start()
    try:
        await eventually((data_dir / "agent.json").exists, what="agent.json")
    finally:
        switch.request()
        await asyncio.to_thread(thread.join)
    assert result == [0]
    assert "agent.started" in log_file.read_text(encoding="utf-8")
    assert not (data_dir / "agent.json").exists()


async def test_hosted_agent_without_enrollment_logs_and_returns_2(tmp_path: Path) -> None:
    """No config: exit 2 (no restart), the reason in the log file, nothing raised."""
    log_file = tmp_path / "agent.log"
    attached: list[Callable[[], None]] = []
    code = await asyncio.to_thread(cli.run_hosted, tmp_path, attach_stop=attached.append,
                                   log_file=log_file)
    assert code == cli.EXIT_CONFIG and attached == []
    assert winservice.service_outcome(code) == "stopped"
    assert "enroll first" in log_file.read_text(encoding="utf-8")
