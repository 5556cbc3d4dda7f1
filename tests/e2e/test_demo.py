"""End to end: `xon-sim demo --once`, the same command `make demo` runs, succeeds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .conftest import BIN, DELIVERY_LIMIT, child_env

pytestmark = pytest.mark.slow


async def test_demo_once_delivers_every_event(tmp_path: Path) -> None:
    """The demo starts relay and agent, every example event arrives, it exits 0 and cleans up."""
    data_dir = tmp_path / "demo"
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "xon-sim"),
        "demo",
        "--once",
        "--data-dir",
        str(data_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 2 * DELIVERY_LIMIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, f"{text}\n{err.decode()}"
    assert "all 20 events arrived" in text
    assert text.count("  received ") == 20
    # Children were stopped cleanly: each removed its state file on the way out.
    assert not (data_dir / "relay" / "admin.json").exists()
    assert not (data_dir / "agent" / "agent.json").exists()
