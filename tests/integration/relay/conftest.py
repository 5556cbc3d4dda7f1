"""Fixtures for the relay's tests: real SQLite in tmp_path, real Redis, real aiohttp servers.

``store_backend`` / ``store`` are parametrized over every store backend, so a test that takes
them is a contract test run against SQLite and Redis alike (DESIGN principle 5).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relay_server.app import create_admin_app, create_public_app
from relay_server.services import Services, open_services
from relay_server.store import Store, open_store
from shared.config import ServerConfig

ADMIN_TOKEN = "test-admin-token-0123456789"
MAX_BODY = 4096

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@dataclass(slots=True)
class Account:
    id: str
    name: str
    ingress_url: str

    @property
    def path(self) -> str:
        """The ingress path (``/xon/KEY``) to use with the public test client."""
        return "/xon/" + self.ingress_url.rsplit("/xon/", 1)[1]


@dataclass(slots=True)
class StoreBackend:
    """One backend's store URL; every :meth:`open` is another instance on the same data."""

    name: str
    url: str

    async def open(self) -> Store:
        return await open_store(self.url)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    if request.param == "redis":
        # A fresh key prefix, deleted before and after (tests/conftest.py).
        return StoreBackend("redis", request.getfixturevalue("redis_store_url"))
    return StoreBackend("sqlite", f"sqlite:///{tmp_path / 'relay.db'}")


@pytest.fixture
async def store(store_backend: StoreBackend) -> AsyncIterator[Store]:
    opened = await store_backend.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        data_dir=tmp_path,
        public_url="http://relay.test",
        max_body_size=MAX_BODY,
        enrollment_ttl=3600.0,
    )


@pytest.fixture
async def services(server_config: ServerConfig) -> AsyncIterator[Services]:
    async with open_services(server_config, admin_token=ADMIN_TOKEN) as built:
        yield built


@pytest.fixture
async def public(
    services: Services, aiohttp_client: ClientFactory
) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(create_public_app(services))


@pytest.fixture
async def admin(
    services: Services, aiohttp_client: ClientFactory
) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(
        create_admin_app(services), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )


@pytest.fixture
async def account(admin: TestClient[web.Request, web.Application]) -> Account:
    return await create_account(admin, "acme")


async def create_account(
    admin: TestClient[web.Request, web.Application], name: str, **extra: Any
) -> Account:
    resp = await admin.post("/v1/accounts", json={"name": name, **extra})
    assert resp.status == 201, await resp.text()
    data = await resp.json()
    return Account(id=data["id"], name=data["name"], ingress_url=data["ingress_url"])
