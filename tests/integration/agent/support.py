"""Helpers for the agent tests: polling, sample events, and the real relay app on a socket."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from relay_agent.inbox import Inbox
from relay_agent.link import LinkStatus
from relay_server.app import create_public_app
from relay_server.services import Services, open_services
from shared import crypto
from shared.config import LinkConfig, ServerConfig
from shared.events import RawRequest, XonEvent, format_time
from tests.helpers.timing import MS

REPO = Path(__file__).resolve().parents[3]
TOKEN = "local-test-token"


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, what: str, limit: float = 5000 * MS
) -> None:
    """Poll ``check`` every 10 MS until it holds; fail after ``limit``."""
    step = 10 * MS
    for _ in range(int(limit / step)):
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        await asyncio.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def make_event(n: int, *, event_id: str | None = None) -> dict[str, Any]:
    return XonEvent(
        id=event_id or f"ev-{n}",
        account="acct-1",
        type="sms.received",
        received_at=format_time(1_700_000_000 + n),
        params={"n": str(n)},
        request=RawRequest(
            method="GET", path="/sms.received", query=f"n={n}", content_type="", body=b""
        ),
    ).to_json()


@dataclass
class LocalApi:
    url: str
    http: aiohttp.ClientSession
    inbox: Inbox
    status: LinkStatus
    headers: dict[str, str]

    async def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.http.get(self.url + path, headers=headers, **kwargs) as response:
            return response.status, await response.json()


# -- a real relay (the public app) ---------------------------------------------------------------


@dataclass
class RelayUnderTest:
    port: int
    services: Services
    account_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def new_code(self) -> tuple[str, str]:
        """A pending agent of the test account: (agent id, one-time code)."""
        code = crypto.new_token()
        agent = await self.services.store.create_agent(
            account_id=self.account_id,
            name="pc",
            code_hash=crypto.hash_secret(code),
            code_expires_at=time.time() + 3600,
        )
        return agent.id, code

    async def add_agent(self) -> tuple[str, crypto.Ed25519PrivateKey]:
        """An enrolled agent and its key."""
        _, code = await self.new_code()
        key = crypto.generate_private_key()
        agent = await self.services.store.enroll_agent(
            code_hash=crypto.hash_secret(code),
            public_key=crypto.public_key_b64(key),
            now=time.time(),
        )
        return agent.id, key

    async def append(self, count: int) -> list[int]:
        """Commit ``count`` events to the account's log and wake the links; their seqs."""
        seqs = []
        for _ in range(count):
            event = XonEvent.from_json(
                {**make_event(0, event_id=f"ev-{crypto.new_token(6)}"), "account": self.account_id}
            )
            result = await self.services.store.append_event(event, xon_id=None)
            seqs.append(result.stored.seq)
        self.services.hub.notify(self.account_id)
        return seqs

    async def cursor(self, agent_id: str) -> int:
        return await self.services.store.get_cursor(agent_id)


@asynccontextmanager
async def serve_relay(data_dir: Path, *, port: int = 0) -> AsyncIterator[RelayUnderTest]:
    """The relay's real public app on 127.0.0.1:``port``; its store lives in ``data_dir``, so a
    second call with the same directory and port is the same relay restarted."""
    data_dir.mkdir(exist_ok=True)
    config = ServerConfig(
        listen=f"127.0.0.1:{port}", data_dir=data_dir, link=LinkConfig(auth_timeout=5000 * MS)
    )
    async with open_services(config, admin_token="admin-test-token") as services:
        accounts = await services.store.list_accounts()
        account = (
            accounts[0]
            if accounts
            else await services.store.create_account(
                name="acme", ingress_key_hash=crypto.hash_secret(crypto.new_token())
            )
        )
        runner = web.AppRunner(create_public_app(services), shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            yield RelayUnderTest(runner.addresses[0][1], services, account.id)
        finally:
            await services.drain()
            await runner.cleanup()


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay_agent", *args]


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XON_RELAY_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@asynccontextmanager
async def agent_process(
    *args: str, data_dir: Path, env: dict[str, str] | None = None, stderr: int | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``run ARGS`` as a subprocess, yielded once it wrote agent.json; when the block ends it
    must still run and exit 0 on SIGTERM. ``stderr=asyncio.subprocess.PIPE`` keeps its log
    for the caller to read after the block (keep such a run short: nobody drains the pipe)."""
    proc = await asyncio.create_subprocess_exec(
        *agent_command("run", *args),
        cwd=REPO,
        env=agent_env() if env is None else env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if stderr is None else stderr,
    )
    try:
        await eventually((data_dir / "agent.json").exists, what="agent.json", limit=20_000 * MS)
        yield proc
        assert proc.returncode is None, "the agent restarted or died"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20_000 * MS) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
