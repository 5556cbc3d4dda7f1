"""The operations commands of ``xon-relay-server`` (docs/operations.md) against a relay served
on 127.0.0.1: most run ``cli.main`` in a worker thread, a few as real processes."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay_server.cli import main
from shared.config import ServerConfig
from tests.helpers.timing import MS

from .conftest import ADMIN_TOKEN, Instance, Tenant, new_tenant, running_instance

SECRET = "SECRET-TEXT"
EXIT = 30_000 * MS


@dataclass(slots=True)
class Cli:
    instance: Instance
    tenant: Tenant
    flags: list[str]
    capsys: pytest.CaptureFixture[str]

    async def run(self, *args: str) -> tuple[int, str, str]:
        """Run one command in a thread (the relay keeps serving on this loop)."""

        def call() -> int:
            try:
                main([*args, *self.flags])
            except SystemExit as exc:
                return int(exc.code or 0)
            raise AssertionError("main() always exits")

        self.capsys.readouterr()
        code = await asyncio.to_thread(call)
        out, err = self.capsys.readouterr()
        return code, out, err

    async def json(self, *args: str) -> Any:
        code, out, err = await self.run(*args, "--json")
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == 1, out
        return json.loads(lines[0])

    async def fails(self, *args: str) -> str:
        """The one stderr line of a failing command."""
        code, out, err = await self.run(*args)
        assert code != 0 and out == ""
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err


@pytest.fixture
async def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> AsyncIterator[Cli]:
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN)
    (tmp_path / "relay").mkdir()
    config = ServerConfig(data_dir=tmp_path / "relay", public_url="http://relay.test")
    async with running_instance(config) as instance:
        tenant = await new_tenant(instance.store, "acme")
        flags = ["--data-dir", str(tmp_path), "--admin-url", instance.admin_url]
        flags += ["--admin-token-file", str(token_file)]
        yield Cli(instance, tenant, flags, capsys)


async def post(instance: Instance, tenant: Tenant, count: int) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as http:
        for n in range(count):
            url = f"{instance.base_url}/xon/{tenant.ingress_key}/sms.received"
            async with http.get(url, params={"n": str(n), "text": SECRET}) as resp:
                assert resp.status == 200
                ids.append((await resp.json())["id"])
    return ids


async def test_account_commands(cli: Cli) -> None:
    """account list/show/rename/rotate-key print one JSON object each with --json."""
    listing = await cli.json("account", "list")
    assert [a["name"] for a in listing["accounts"]] == ["acme"]
    shown = await cli.json("account", "show", "acme")
    assert shown["id"] == cli.tenant.account_id and shown["active_agents"] == 1
    assert await cli.json("account", "rename", "acme", "acme-ltd") == {
        "id": cli.tenant.account_id,
        "name": "acme-ltd",
    }
    rotated = await cli.json("account", "rotate-key", "acme-ltd", "--overlap", "2h")
    assert rotated["ingress_url"].startswith("http://relay.test/xon/")
    assert rotated["previous_key_valid_until"] is not None
    code, out, _ = await cli.run("account", "show", "acme-ltd")
    assert code == 0 and "a previous ingress URL works until" in out
    code, out, _ = await cli.run("account", "list")
    assert code == 0 and "acme-ltd" in out


async def test_account_remove_needs_force(cli: Cli) -> None:
    """remove refuses an account with live agents in one line; --force removes it."""
    err = await cli.fails("account", "remove", "acme")
    assert "agent(s) not revoked" in err and "(agents_active)" in err
    code, out, _ = await cli.run("account", "remove", "acme", "--force")
    assert code == 0 and "removed with its event log; 1 agent(s) revoked" in out
    assert "no account" in await cli.fails("account", "show", "acme")


async def test_agent_commands(cli: Cli) -> None:
    """agent show/rename, and agent list with the backlog."""
    await post(cli.instance, cli.tenant, 2)
    agent_id = cli.tenant.agent_id
    shown = await cli.json("agent", "show", agent_id)
    assert (shown["state"], shown["backlog"]) == ("offline", 2)
    renamed = await cli.json("agent", "rename", agent_id, "front desk")
    assert renamed["name"] == "front desk"
    code, out, _ = await cli.run("agent", "list")
    assert code == 0 and "front desk" in out and "backlog=2" in out
    code, out, _ = await cli.run("agent", "show", agent_id)
    assert code == 0 and "backlog: 2 event(s)" in out
    assert "no agent" in await cli.fails("agent", "rename", "agt_nope", "x")


async def test_event_commands_hide_bodies_in_text(cli: Cli) -> None:
    """events list/show print no param values as text; --json carries the event."""
    ids = await post(cli.instance, cli.tenant, 3)
    code, out, _ = await cli.run("events", "list", "acme", "--limit", "2")
    assert code == 0 and SECRET not in out
    assert ids[2] in out and ids[1] in out and ids[0] not in out and "--before" in out
    listing = await cli.json("events", "list", "acme")
    assert [e["id"] for e in listing["events"]] == ids[::-1]
    assert listing["events"][0]["event"]["params"]["text"] == SECRET
    code, out, _ = await cli.run("events", "show", ids[0])
    assert code == 0 and ids[0] in out and SECRET not in out and "text" in out
    shown = await cli.json("events", "show", ids[0], "--account", "acme")
    assert shown["event"]["params"]["text"] == SECRET
    assert "no event" in await cli.fails("events", "show", "ev_nope")
    assert "--limit" in await cli.fails("events", "list", "acme", "--limit", "0")


async def test_event_export_writes_json_lines(cli: Cli, tmp_path: Path) -> None:
    """export writes every event as one JSON line and reports progress on stderr."""
    ids = await post(cli.instance, cli.tenant, 3)
    output = tmp_path / "export.jsonl"
    summary = await cli.json("events", "export", "acme", "--since", "1h", "--output", str(output))
    assert summary == {"exported": 3, "output": str(output)}
    lines = output.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ids
    code, out, err = await cli.run("events", "export", "acme")
    assert code == 0 and [json.loads(line)["id"] for line in out.splitlines()] == ids
    assert "exported 3 event(s), 0 to go" in err
    assert "give --output" in await cli.fails("events", "export", "acme", "--json")
    assert "bad time" in await cli.fails("events", "export", "acme", "--since", "yesterday")


async def test_dashboard_command_prints_a_login_url(cli: Cli) -> None:
    """dashboard prints a one-time URL that opens a cookie session."""
    url = (await cli.json("dashboard"))["url"]
    assert url.startswith(cli.instance.admin_url + "/dashboard/login?code=")
    assert ADMIN_TOKEN not in url
    # unsafe: keep cookies of an IP-address host, as a browser does.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(url) as resp:
            assert resp.status == 200 and "Agents online" in await resp.text()


async def test_bad_durations_are_one_line(cli: Cli) -> None:
    """A malformed --overlap is refused before any call."""
    assert "bad duration" in await cli.fails("account", "rotate-key", "acme", "--overlap", "1w")


# -- real processes --------------------------------------------------------------------------


async def run_process(cli: Cli, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay_server.cli",
        *args,
        *cli.flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(EXIT):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_process_rotate_and_export(cli: Cli, tmp_path: Path) -> None:
    """As a real process: rotate-key --json, export with progress, a refusal in one line."""
    ids = await post(cli.instance, cli.tenant, 2)
    code, out, err = await run_process(cli, "account", "rotate-key", "acme", "--json")
    assert code == 0, err
    assert set(json.loads(out)) == {"id", "name", "ingress_url", "previous_key_valid_until"}
    output = tmp_path / "out.jsonl"
    code, out, err = await run_process(cli, "events", "export", "acme", "--output", str(output))
    assert code == 0 and f"exported 2 event(s) to {output}" in out
    assert "exported 2 event(s), 0 to go" in err
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ids
    code, out, err = await run_process(cli, "account", "remove", "acme")
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("xon-relay-server: error:")
