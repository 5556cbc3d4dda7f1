"""Fixtures for the agent: an inbox, the local API on a real socket, and a real relay app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay_agent.inbox import Inbox
from relay_agent.link import LinkStatus
from relay_agent.local_api import create_local_app
from shared.config import AgentConfig
from tests.helpers.timing import MS

from .support import TOKEN, LocalApi, RelayUnderTest, serve_relay


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Inbox]:
    box = await Inbox.open(tmp_path / "inbox.db")
    yield box
    await box.close()


@pytest.fixture
async def local_api(tmp_path: Path, inbox: Inbox) -> AsyncIterator[LocalApi]:
    config = AgentConfig(relay_url="https://relay.example", agent_id="agent-1",
                         data_dir=tmp_path, max_wait=5000 * MS)
    status = LinkStatus()
    app = create_local_app(config=config, inbox=inbox, link_status=status, token=TOKEN)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as http:
        yield LocalApi(f"http://127.0.0.1:{port}", http, inbox, status,
                       {"Authorization": f"Bearer {TOKEN}"})
    await runner.cleanup()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayUnderTest]:
    async with serve_relay(tmp_path / "relay") as running:
        yield running
