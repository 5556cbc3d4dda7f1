"""The status page in a real headless Chromium (issue 4, Acceptance: "the status page renders in
headless Chromium and shows live state").

A real agent local app on 127.0.0.1 with an inbox holding events and a status item; Chromium
opens a one-time login URL, follows the redirect with its session cookie, runs the page's script
(which fetches /v1/health, /v1/status and /page/summary with that cookie) and dumps the DOM.

Chromium comes from the Debian package (``apt-get install -y chromium``). Without it the test
is skipped, except under ``CI=true``, where CI promises it and its absence is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay_agent import page
from relay_agent.enroll import STATE_FILE
from relay_agent.link import LinkState
from tests.helpers.timing import MS
from tests.integration.agent.support import make_event
from tests.integration.agent.test_security import SECRET_PARAM, Guarded, serve_guarded

INSTALL = "apt-get install -y chromium"
BROWSER_TIMEOUT = 60_000 * MS


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = f"headless Chromium is needed for this test: {INSTALL}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Guarded]:
    async with serve_guarded(tmp_path / "agent", events=0) as running:
        events = [make_event(n) for n in range(1, 4)]
        events[0]["type"] = "call.arriving"
        events[1]["type"] = "call.ended"
        events[2]["type"] = "sms.received"
        events[2]["params"]["text"] = SECRET_PARAM
        await running.inbox.commit(list(enumerate(events, start=1)))
        await running.inbox.save_status([{
            "key": "messages.waiting?mailbox=5", "type": "messages.waiting",
            "ids": {"mailbox": "5"}, "params": {"mailbox": "5", "waiting": "7"}, "seq": 1,
            "received_at": "2026-01-01T00:00:01.000Z"}], snapshot=True)
        status, body, _ = await running.request(
            "POST", "/v1/consumers/crm/ack", running.auth(), json={"cursor": "1"})
        assert status == 200, body
        # What the page renders at first (server side) is disconnected; the script must fetch
        # the live state to show the link up.
        running.status.state = LinkState.DISCONNECTED
        running.status.connected_since = None
        yield running


async def fresh_login_url(agent: Guarded) -> str:
    status, body, _ = await agent.request("POST", "/v1/login-codes", agent.auth())
    assert status == 201, body
    return str(json.loads(body)["url"])


async def run_chromium(binary: str, profile: Path, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=3000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
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


async def test_status_page_renders_live_state_in_headless_chromium(
    agent: Guarded, tmp_path: Path
) -> None:
    """Chromium logs in with a one-time URL and shows link state, events and status values."""
    binary = chromium()
    # The link comes up after the page was served: only the script's fetch can show it.
    agent.status.state = LinkState.CONNECTED
    agent.status.connected_since = 1_767_261_600.0
    # The URL `xon-relay-agent open` would print (it finds the agent through agent.json).
    (agent.data_dir / STATE_FILE).write_text(
        json.dumps({"local_url": agent.url, "pid": os.getpid(), "agent_id": "agent-sec"}))
    url = await asyncio.to_thread(page.login_url, agent.data_dir)
    dom = await run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)

    assert 'data-refresh="ok"' in dom, dom
    assert 'class="state state-connected">Connected<' in dom
    for event_type in ("call.arriving", "call.ended", "sms.received"):
        assert f"<td>{event_type}</td>" in dom
    assert "messages.waiting (mailbox=5)" in dom and "waiting=7" in dom
    assert '<dd id="events-today">3</dd>' in dom
    assert '<dd id="last-event">never</dd>' not in dom
    assert "<td>consumers: crm</td><td>lag=2</td>" in dom
    assert SECRET_PARAM not in dom

    shot = tmp_path / "status-page.png"
    url = await fresh_login_url(agent)
    await run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}",
                       "--window-size=1000,1100", url)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank or error image
    keep = os.environ.get("XON_TESTS_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)


async def test_login_page_and_relay_down_text_in_headless_chromium(
    agent: Guarded, tmp_path: Path
) -> None:
    """Without a session Chromium shows the human login page (not JSON); signed in with the
    relay down, the script shows the cause and what to do in words, never the exception."""
    binary = chromium()
    dom = await run_chromium(binary, tmp_path / "profile-login", "--dump-dom", agent.url + "/")
    assert 'id="login-needed"' in dom and "<code>xon-relay-agent open</code>" in dom
    assert '"error"' not in dom and "unauthorized" not in dom

    # The script's refresh rewrites the server's text: had it taken /v1/health's raw
    # last_error, the dumped DOM would hold the exception.
    url = await fresh_login_url(agent)
    agent.status.last_error = ("ConnectionRefusedError: [Errno 111] Connect call failed "
                               "('203.0.113.9', 443)")
    dom = await run_chromium(binary, tmp_path / "profile-down", "--dump-dom", url)
    assert 'data-refresh="ok"' in dom, dom
    assert 'class="state state-disconnected">Disconnected<' in dom
    assert "(relay.example) is not accepting connections" in dom
    assert "keeps retrying by itself" in dom
    for leak in ("Errno", "ConnectionRefusedError", "Connect call failed"):
        assert leak not in dom
