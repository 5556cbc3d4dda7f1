"""Fixtures for the relay's tests: real SQLite in tmp_path, real Redis, real aiohttp servers.

``store_backend`` / ``store`` are parametrized over every store backend, so a test that takes
them is a contract test run against SQLite and Redis alike (DESIGN principle 5).
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from relay_server.app import create_admin_app, create_public_app
from relay_server.services import Services, open_services
from relay_server.store import Store, open_store
from shared import crypto
from shared.config import ServerConfig
from tests.conftest import redis_missing
from tests.helpers.redis_ha import Cluster, running_cluster
from tests.helpers.timing import MS

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
    return backend_for(request, tmp_path)


CONTRACT_BACKENDS = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", marks=pytest.mark.redis),
]
"""The store contract suites (test_store.py, test_store_dedup.py) also run on a Redis Cluster
(docs/redis.md, Cluster): they override ``store_backend`` with these params."""


def backend_for(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    if request.param == "redis":
        # A fresh key prefix, deleted before and after (tests/conftest.py).
        return StoreBackend("redis", request.getfixturevalue("redis_store_url"))
    if request.param == "redis-cluster":
        # One cluster per session; a fresh prefix per test keeps tests apart.
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        prefix = f"xontest:{crypto.new_token(6).lower()}:"
        return StoreBackend("redis-cluster", f"{cluster.url}?prefix={prefix}")
    return StoreBackend("sqlite", f"sqlite:///{tmp_path / 'relay.db'}")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three cluster primaries on loopback, started by the first test that needs them."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
async def store(store_backend: StoreBackend) -> AsyncIterator[Store]:
    opened = await store_backend.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(autouse=True)
def _collect_cluster_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """redis-py's cluster client can leave a node connection in a reference cycle after
    ``aclose()``; collected later, its ResourceWarning fails whichever test runs then. After a
    test on the Cluster backend (its stores closed by then), collect it there, without the
    warning."""
    yield
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "redis-cluster" in callspec.params.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


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


# -- a private Redis that tests may stop ------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OwnRedis:
    """A private redis-server (AOF, fsync always) on a free port: tests may kill this one,
    never the shared server."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen([self.binary, *args], stdout=subprocess.DEVNULL)
        client = aioredis.Redis(host="127.0.0.1", port=self.port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5000 * MS
        try:
            while loop.time() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.proc.returncode}")
                try:
                    await client.ping()
                    return
                except aioredis.RedisError:
                    await asyncio.sleep(10 * MS)
            pytest.fail(f"redis-server on port {self.port} did not start")
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    yield from private_redis(tmp_path)


def private_redis(data_dir: Path) -> Iterator[OwnRedis]:
    """An :class:`OwnRedis` (not started yet), killed when the generator ends."""
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("redis-server")
    if binary is None:
        redis_missing("redis-server not found on PATH; install it (the outage test starts its own)")
    server = OwnRedis(binary, data_dir)
    try:
        yield server
    finally:
        server.kill()


# -- in-process relay instances sharing one store (issue 5) ------------------------------------


@dataclass(slots=True)
class Instance:
    """One relay instance (both listeners) served on 127.0.0.1; a ``LinkTarget`` for the test
    agent of tests/helpers/relay_app.py."""

    services: Services
    base_url: str
    """``http://127.0.0.1:PORT`` of the public listener."""
    admin_url: str

    @property
    def url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/v1/agent"

    @property
    def relay_id(self) -> str:
        return self.services.relay_id

    @property
    def store(self) -> Store:
        return self.services.store


@asynccontextmanager
async def running_instance(
    config: ServerConfig, *, store: Store | None = None
) -> AsyncIterator[Instance]:
    """Serve one relay instance until the block ends, then drain it like ``run`` does
    (``store``: an open store to serve instead of ``config.store_url``'s)."""
    async with open_services(config, admin_token=ADMIN_TOKEN, store=store) as services:
        runners = [
            web.AppRunner(create_public_app(services)),
            web.AppRunner(create_admin_app(services)),
        ]
        urls = []
        try:
            for runner in runners:
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
            yield Instance(services=services, base_url=urls[0], admin_url=urls[1])
            await services.drain()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()


@dataclass(slots=True)
class Tenant:
    """An account with a known ingress key and one enrolled agent."""

    account_id: str
    ingress_key: str
    agent_id: str
    private_key: crypto.Ed25519PrivateKey


async def new_tenant(store: Store, name: str = "acme") -> Tenant:
    """Create an account and enroll one agent in it, straight in the store."""
    key = crypto.new_token()
    account = await store.create_account(name=name, ingress_key_hash=crypto.hash_secret(key))
    code = crypto.new_token()
    pending = await store.create_agent(
        account_id=account.id,
        name="pc",
        code_hash=crypto.hash_secret(code),
        code_expires_at=time.time() + 3600,
    )
    private_key = crypto.generate_private_key()
    await store.enroll_agent(
        code_hash=crypto.hash_secret(code),
        public_key=crypto.public_key_b64(private_key),
        now=time.time(),
    )
    return Tenant(account.id, key, pending.id, private_key)
