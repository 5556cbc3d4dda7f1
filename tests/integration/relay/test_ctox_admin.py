"""Changing an account's X-on API settings: admin PATCH and ``account set`` (never echo the key)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay_server import cli
from shared.sim.xon_api import FakeXonApi

from .test_ctox import (
    ADMIN_TOKEN,
    CALL,
    XON_KEY,
    RunningRelay,
    command,
    relay_config,
    running_relay,
)


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    async with running_relay(relay_config(tmp_path)) as running:
        yield running


@pytest.fixture
async def admin(relay: RunningRelay) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(relay.admin_url, headers=headers) as http:
        yield http


async def test_patch_sets_url_and_key_and_commands_use_them(
    relay: RunningRelay, admin: aiohttp.ClientSession
) -> None:
    """PATCH /v1/accounts/{name} changes URL and key; the answer never contains the key."""
    async with admin.post("/v1/accounts", json={"name": "acme"}) as resp:
        account_id = (await resp.json())["id"]
    agent = await relay.add_agent(account_id)
    assert (await command(agent, "make_call", CALL)).error == "xon_api_not_configured"
    async with FakeXonApi(api_key=XON_KEY) as xon:
        body = {"xon_api_url": xon.url, "xon_api_key": XON_KEY}
        async with admin.patch("/v1/accounts/acme", json=body) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert XON_KEY not in text
        assert json.loads(text) == {
            **json.loads(text),
            "id": account_id,
            "xon_api_url": xon.url,
            "xon_api_key_set": True,
        }
        assert (await command(agent, "make_call", CALL)).status == 202
        assert xon.requests[0].authorization == f"Bearer {XON_KEY}"
    await agent.close()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"name": "x"}, 400),
        ({"xon_api_url": "ftp://x"}, 400),
        ({"xon_api_url": "http://x/?k=1"}, 400),
        ({"xon_api_key": 5}, 400),
        ({"xon_api_key": "k\r\nX-Injected: 1"}, 400),
        ({"xon_api_key": "two words"}, 400),
        ({"xon_api_key": "k" * 4097}, 400),
    ],
)
async def test_patch_refuses_bad_bodies(
    admin: aiohttp.ClientSession, body: dict[str, object], status: int
) -> None:
    """Unknown fields, non-http URLs and keys that are not strings of visible ASCII (a line
    break would inject a header into every X-on call) are 400 bad_request."""
    async with admin.post("/v1/accounts", json={"name": "acme"}) as resp:
        assert resp.status == 201
    async with admin.patch("/v1/accounts/acme", json=body) as resp:
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == "bad_request"


async def test_patch_unknown_account_is_404(admin: aiohttp.ClientSession) -> None:
    """PATCH on an account that does not exist is 404 unknown_account."""
    async with admin.patch("/v1/accounts/nobody", json={"xon_api_key": "k"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_account"


async def run_cli(*argv: str) -> int:
    """Run the CLI in a thread (it uses blocking urllib) against the test relay."""

    def main() -> int:
        try:
            cli.main(list(argv))
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    return await asyncio.to_thread(main)


async def test_account_set_cli_changes_settings_without_printing_the_key(
    relay: RunningRelay,
    admin: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`account set ACCOUNT --xon-api-url --xon-api-key --json` updates and prints no key."""
    async with admin.post("/v1/accounts", json={"name": "acme"}) as resp:
        account_id = (await resp.json())["id"]
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN, encoding="utf-8")
    common = ["--admin-url", relay.admin_url, "--admin-token-file", str(token)]
    common += ["--data-dir", str(tmp_path)]
    code = await run_cli(
        "account",
        "set",
        "acme",
        "--xon-api-url",
        "http://xon.test",
        "--xon-api-key",
        "cli-secret",
        "--json",
        *common,
    )
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "id": account_id,
        "name": "acme",
        "xon_api_url": "http://xon.test",
        "xon_api_key_set": True,
    }
    stored = await relay.services.store.get_account(account_id)
    assert stored is not None and stored.xon_api_key == "cli-secret"
    assert await run_cli("account", "set", account_id, "--xon-api-url", "", *common) == 0
    out, _ = capsys.readouterr()
    assert "cli-secret" not in out and "updated" in out
    assert await run_cli("account", "set", "acme", *common) == 1
    assert "nothing to change" in capsys.readouterr().err
