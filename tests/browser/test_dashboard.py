"""The relay dashboard in a real headless Chromium (issue 8, Relay operations: "Dashboard ...
tested in headless Chromium with a screenshot").

A relay instance on 127.0.0.1 with an account, a connected agent, events and a command result;
Chromium opens the one-time login URL that ``xon-relay-server dashboard`` prints, follows the
redirect with its session cookie and dumps the DOM; a second login takes a screenshot.

Chromium comes from the Debian package (``apt-get install -y chromium``). Without it the test
is skipped, except under ``CI=true``, where CI promises it and its absence is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import pytest

from shared.config import ServerConfig
from shared.link.frames import Command, CommandResult
from tests.helpers.relay_app import Agent, eventually
from tests.helpers.timing import MS
from tests.integration.relay.conftest import ADMIN_TOKEN, Instance, new_tenant, running_instance

INSTALL = "apt-get install -y chromium"
BROWSER_TIMEOUT = 60_000 * MS
SECRET = "SECRET-SMS-TEXT"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = f"headless Chromium is needed for this test: {INSTALL}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


async def run_chromium(binary: str, profile: Path, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(BROWSER_TIMEOUT):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def login_url(instance: Instance) -> str:
    """What ``xon-relay-server dashboard`` prints."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{instance.admin_url}/v1/dashboard/login-codes", json={}, headers=headers
        ) as resp:
            assert resp.status == 201
            return str((await resp.json())["url"])


async def test_dashboard_renders_in_headless_chromium(tmp_path: Path) -> None:
    """Chromium logs in once and sees agents, backlog, events, ingress and command results."""
    binary = chromium()
    config = ServerConfig(data_dir=tmp_path, public_url="http://relay.test")
    async with running_instance(config) as instance:
        tenant = await new_tenant(instance.store, "acme")
        await new_tenant(instance.store, "globex")
        async with aiohttp.ClientSession() as http:
            for kind in ("call.started", "call.ended", "sms.received"):
                url = f"{instance.base_url}/xon/{tenant.ingress_key}/{kind}"
                async with http.get(url, params={"text": SECRET}) as resp:
                    assert resp.status == 200
            async with http.get(f"{instance.base_url}/xon/wrong-key") as resp:
                assert resp.status == 404
        agent = await Agent(instance, tenant.agent_id, tenant.private_key).connect()
        await agent.welcome()
        seqs = await agent.events(3)
        await agent.ack(seqs[0])

        async def acked() -> bool:
            return await instance.store.get_cursor(tenant.agent_id) == seqs[0]

        await eventually(acked)
        command = Command(request_id="req-42", ctox_type="sms.send", params={"text": SECRET})
        result = CommandResult(
            request_id="req-42", status=200, content_type="", body_b64="", headers={}, error=""
        )
        instance.services.hub.metrics.command_finished(tenant.account_id, command, result, 0.08)

        dom = await run_chromium(
            binary, tmp_path / "profile-dom", "--dump-dom", await login_url(instance)
        )
        assert "<h1>X-on relay</h1>" in dom, dom[:2000]
        assert 'class="online">online<' in dom
        assert "Agents online<b>1 / 2</b>" in dom
        assert "Backlog (events)<b>2</b>" in dom
        for kind in ("call.started", "call.ended", "sms.received"):
            assert f"<td>{kind}</td>" in dom
        assert "<h3>acme " in dom and "<h3>globex " in dom
        assert "<td>sms.send</td><td>req-42</td>" in dom
        assert '<td>last 5 min</td><td class="num">4</td><td class="num">1</td>' in dom
        assert SECRET not in dom and ADMIN_TOKEN not in dom

        shot = tmp_path / "dashboard.png"
        await run_chromium(
            binary,
            tmp_path / "profile-shot",
            f"--screenshot={shot}",
            "--window-size=1200,1400",
            await login_url(instance),
        )
        await agent.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank or error image
    keep = os.environ.get("XON_TESTS_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)
