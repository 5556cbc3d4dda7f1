"""The relay's real public app on 127.0.0.1 with the production runner options.

Abuse, fuzz and network-fault tests need what ``xon-relay-server run`` serves: the public app
of ``relay_server.app`` behind an ``AppRunner`` built with ``server_options`` (header deadline,
no auto-decompression, redacting access log). This runs it in-process on an ephemeral port,
with a real SQLite store in a temporary directory and one account whose ingress key is known.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from relay_server.app import create_public_app, server_options
from relay_server.services import Services, open_services
from shared import crypto
from shared.config import LimitsConfig, LinkConfig, ServerConfig
from shared.events import RawRequest, XonEvent, format_time


@dataclass(slots=True)
class PublicRelay:
    """A running relay: address, services, and the test account with its ingress key."""

    port: int
    services: Services
    app: web.Application
    account_id: str
    ingress_key: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """What tests.helpers.relay_app.Agent connects to (``LinkTarget.url``)."""
        return f"ws://127.0.0.1:{self.port}/v1/agent"

    @property
    def url(self) -> str:
        return self.ws_url

    @property
    def relay_id(self) -> str:
        return self.services.relay_id

    @property
    def ingress_path(self) -> str:
        return f"/xon/{self.ingress_key}"

    async def add_account(self, name: str) -> tuple[str, str]:
        """Another account: (id, ingress key)."""
        key = crypto.new_token()
        account = await self.services.store.create_account(
            name=name, ingress_key_hash=crypto.hash_secret(key)
        )
        return account.id, key

    async def new_code(self) -> tuple[str, str]:
        """A pending agent of the test account: (agent id, one-time code)."""
        code = crypto.new_token()
        agent = await self.services.store.create_agent(
            account_id=self.account_id, name="pc", code_hash=crypto.hash_secret(code),
            code_expires_at=time.time() + 3600,
        )
        return agent.id, code

    async def add_agent(self) -> tuple[str, crypto.Ed25519PrivateKey]:
        """An enrolled agent of the test account and its key."""
        _, code = await self.new_code()
        key = crypto.generate_private_key()
        agent = await self.services.store.enroll_agent(
            code_hash=crypto.hash_secret(code), public_key=crypto.public_key_b64(key),
            now=time.time(),
        )
        return agent.id, key

    async def append(self, count: int, *, tag: str = "") -> list[str]:
        """Commit ``count`` events to the account's log, wake the links; their event ids."""
        ids = []
        for n in range(count):
            event = XonEvent(
                id=f"ev-{tag}{n}-{crypto.new_token(6)}",
                account=self.account_id,
                type="sms.received",
                received_at=format_time(time.time()),
                params={"n": str(n)},
                request=RawRequest(method="GET", path="/sms.received", query=f"n={n}",
                                   content_type="", body=b""),
            )
            result = await self.services.store.append_event(event, xon_id=None)
            ids.append(result.stored.event.id)
        self.services.hub.notify(self.account_id)
        return ids

    async def event_ids(self) -> list[str]:
        """Every event id in the account's log, oldest first."""
        stored = await self.services.store.read_events(self.account_id, after=0, limit=1_000_000)
        return [s.event.id for s in stored]


def relay_config(
    data_dir: Path, *, limits: LimitsConfig | None = None, link: LinkConfig | None = None,
    **fields: Any,
) -> ServerConfig:
    return ServerConfig(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        limits=limits if limits is not None else LimitsConfig(),
        link=link if link is not None else LinkConfig(),
        **fields,
    )


@asynccontextmanager
async def serve_public(config: ServerConfig, *, port: int = 0) -> AsyncIterator[PublicRelay]:
    """Serve the public app on 127.0.0.1:``port`` until the block exits (then drain)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    async with open_services(config, admin_token="admin-test-token") as services:
        accounts = await services.store.list_accounts()
        key = crypto.new_token()
        if accounts:
            account = accounts[0]
            # The same relay restarted: give its account a key this run knows.
            key = (config.data_dir / "ingress-key").read_text()
        else:
            account = await services.store.create_account(
                name="acme", ingress_key_hash=crypto.hash_secret(key)
            )
            (config.data_dir / "ingress-key").write_text(key)
        app = create_public_app(services)
        runner = web.AppRunner(app, shutdown_timeout=1.0, **server_options(config))
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            bound = int(runner.addresses[0][1])
            yield PublicRelay(bound, services, app, account.id, key)
        finally:
            await services.drain()
            await runner.cleanup()


def with_limits(config: ServerConfig, **limits: Any) -> ServerConfig:
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **limits))
