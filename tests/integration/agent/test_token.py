"""``token rotate`` and ``open`` against a real ``run`` subprocess (issue 4, Localhost API
security and UX)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from .support import RelayUnderTest, agent_process
from .test_cli import agent, enrolled


@asynccontextmanager
async def running_agent(data_dir: Path) -> AsyncIterator[tuple[int, str]]:
    """``run`` as a subprocess until the block ends: (pid, local URL)."""
    async with agent_process("--data-dir", str(data_dir), data_dir=data_dir) as process:
        state = json.loads((data_dir / "agent.json").read_text())
        yield process.pid, state["local_url"]


async def health(url: str, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/health",
                            headers={"Authorization": f"Bearer {token}"}) as response:
            return response.status


async def test_token_rotate_takes_effect_without_a_restart(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """After ``token rotate`` the running agent refuses the old token (401) and accepts the
    new one (200), with the same process."""
    data_dir = tmp_path / "agent"
    await enrolled(relay, data_dir)
    token_file = data_dir / "local-token"
    old = token_file.read_text().strip()
    async with running_agent(data_dir) as (pid, url):
        assert await health(url, old) == 200
        done = await agent("token", "rotate", "--data-dir", str(data_dir))
        assert done.code == 0, done.err
        assert str(token_file) in done.out
        new = token_file.read_text().strip()
        assert new and new != old and new not in done.out
        assert token_file.stat().st_mode & 0o077 == 0
        assert await health(url, old) == 401
        assert await health(url, new) == 200
        assert json.loads((data_dir / "agent.json").read_text())["pid"] == pid


async def test_token_rotate_failure_is_one_line(tmp_path: Path) -> None:
    """A data dir that cannot be written: one line on stderr, exit 1."""
    done = await agent("token", "rotate", "--data-dir", str(tmp_path / "missing"))
    assert done.code == 1 and done.err.count("\n") == 1 and "Traceback" not in done.err


async def test_open_prints_a_login_url_that_works_once(
    tmp_path: Path, relay: RelayUnderTest
) -> None:
    """``open --no-browser`` prints a one-time URL: it opens the page once, then is refused;
    the token itself is not in the URL."""
    data_dir = tmp_path / "agent"
    await enrolled(relay, data_dir)
    token = (data_dir / "local-token").read_text().strip()
    async with running_agent(data_dir) as (_, url):
        done = await agent("open", "--no-browser", "--data-dir", str(data_dir))
        assert done.code == 0, done.err
        login = done.out.split()[-1]
        assert login.startswith(url + "/login?code=") and token not in login
        jar = aiohttp.CookieJar(unsafe=True)  # the agent's origin is an IP literal
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            async with http.get(login) as response:
                assert response.status == 200
                assert response.url.path == "/"
                assert "text/html" in response.headers["Content-Type"]
        async with aiohttp.ClientSession() as http:
            async with http.get(login, allow_redirects=False) as response:
                assert response.status == 403


async def test_open_without_a_running_agent_is_one_line(tmp_path: Path) -> None:
    """No agent runs for the data dir: one line naming run, exit 1."""
    done = await agent("open", "--no-browser", "--data-dir", str(tmp_path / "agent"))
    assert done.code == 1 and done.err.count("\n") == 1 and "run" in done.err
