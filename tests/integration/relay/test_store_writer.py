"""The store writer serves every tenant: nothing one request does stops it, readiness tells
whether an event can be committed now, and a writer that cannot go on stops the relay
(docs/operations.md, Readiness; relay_server/store/sqlite.py and redis.py, module docstrings).

Faults come from real SQLite and Redis where they can be made (a cursor SQLite cannot hold,
Redis out of memory, a full tmpfs when the tests run as root); the rest through the SQLite
store's fault seam (``SqliteStore(faults=...)``), never by patching the store's methods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from relay_server import cli
from relay_server.bus import Notice, RedisBus, open_bus
from relay_server.store import Store
from relay_server.store.base import MAX_INT, StatusItem, StoreArgumentError
from relay_server.store.redis import RedisStore
from relay_server.store.sqlite import SqliteStore
from shared.config import ServerConfig
from shared.errors import LocalProtocolError, StoreError
from tests.helpers.relay_app import Agent
from tests.helpers.timing import MS

from .conftest import Instance, OwnRedis, StoreBackend, Tenant, new_tenant, running_instance
from .test_store import make_event, new_account, new_agent

WAIT = 5000 * MS

TOO_BIG = [2**64, MAX_INT + 1, -1]


# -- helpers ----------------------------------------------------------------------------------


class Faults:
    """A fault plan for ``SqliteStore(faults=...)``: raise ``error`` at ``step`` while armed
    (``times`` more commits, or for ever when ``None``)."""

    def __init__(self) -> None:
        self.error: Callable[[], BaseException] | None = None
        self.step = "commit"
        self.times: int | None = None
        self._lock = threading.Lock()

    def arm(self, error: Callable[[], BaseException], *, times: int | None = None) -> None:
        with self._lock:
            self.error, self.times = error, times

    def disarm(self) -> None:
        with self._lock:
            self.error = None

    def __call__(self, step: str, conn: sqlite3.Connection) -> None:
        with self._lock:
            if self.error is None or step != self.step:
                return
            error = self.error()
            if self.times is not None:
                self.times -= 1
                if self.times <= 0:
                    self.error = None
        raise error


def sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    """An error as SQLite raises it, with its result code."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


def disk_full() -> BaseException:
    return sqlite_error("database or disk is full", sqlite3.SQLITE_FULL)


def io_error() -> BaseException:
    return sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR_WRITE)


async def ingress(instance: Instance, tenant: Tenant, n: int) -> int:
    async with aiohttp.ClientSession() as http:
        url = f"{instance.base_url}/xon/{tenant.ingress_key}/sms.received"
        async with http.post(url, params={"n": str(n)}) as resp:
            return resp.status


async def readyz(instance: Instance) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(instance.base_url + "/readyz") as resp:
            body = await resp.json()
            return resp.status, body.get("error", {}).get("code", body.get("status"))


@asynccontextmanager
async def faulty_instance(tmp_path: Path, faults: Faults, **kwargs: Any) -> AsyncIterator[Instance]:
    store = await SqliteStore.open(tmp_path / "relay.db", exclusive=True, faults=faults, **kwargs)
    config = ServerConfig(data_dir=tmp_path)
    async with running_instance(config, store=store) as instance:
        yield instance


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


# -- the Store API edge (both backends) -------------------------------------------------------


@pytest.mark.parametrize("value", TOO_BIG)
async def test_out_of_range_integers_are_refused_at_once(store: Store, value: int) -> None:
    """A seq, cursor, epoch or limit outside 0..2**63-1 raises StoreArgumentError (a local
    protocol error and a store error alike) at the call, before it can reach a transaction
    shared with other tenants; the store goes on."""
    account_id = await new_account(store)
    agent_id, _ = await new_agent(store, account_id)
    status = StatusItem(
        account_id=account_id, key="k", type="t", ids={}, params={}, event_id="e", seq=value,
        received_at="2026-11-26T10:00:00.000Z",
    )
    calls = [
        store.set_cursor(agent_id, value),
        store.request_replay(agent_id, value),
        store.settle_replay(agent_id, value, None),
        store.settle_replay(agent_id, 1, value),
        store.release_link(agent_id, epoch=value),
        store.read_events(account_id, after=value, limit=10),
        store.read_events(account_id, after=0, limit=value),
        store.count_after(account_id, value),
        store.recent_events(account_id, limit=10, before=value),
        store.put_status(status),
    ]
    for call in calls:
        with pytest.raises(StoreArgumentError, match="0..2\\*\\*63-1") as refused:
            await call
        assert isinstance(refused.value, LocalProtocolError | StoreError)
    other = await new_account(store, "other")
    appended = await store.append_event(make_event(other, 1), xon_id=None)
    await store.set_cursor(agent_id, MAX_INT)
    assert await store.get_cursor(agent_id) == MAX_INT
    assert await store.read_events(other, after=0, limit=10) == [appended.stored]
    await store.ping()


async def test_a_huge_resume_point_stops_no_other_tenant(
    store_backend: StoreBackend, tmp_path: Path
) -> None:
    """An enrolled agent says hello with resume_after = 2**64 and signs: whatever becomes of
    its own link, another tenant's ingress and link keep working and the relay stays ready."""
    store = await store_backend.open()
    config = ServerConfig(data_dir=tmp_path, store=store_backend.url)
    async with running_instance(config, store=store) as instance:
        hostile, victim = await new_tenant(store, "hostile"), await new_tenant(store, "victim")
        attacker = Agent(instance, hostile.agent_id, hostile.private_key, resume_after=2**64)
        await attacker.connect()
        agent = await Agent(instance, victim.agent_id, victim.private_key).connect()
        await agent.welcome()
        await attacker.read()  # the relay answered the attacker's hello
        for n in range(3):
            assert await ingress(instance, hostile, n) == 200
            assert await ingress(instance, victim, n) == 200
        seqs = await agent.events(3)
        await agent.ack(seqs[-1])
        assert await readyz(instance) == (200, "ok")
        assert await store.get_cursor(hostile.agent_id) <= MAX_INT
        await agent.close()
        await attacker.close()


# -- SQLite: one request's failure stays its own -----------------------------------------------


async def test_an_unbindable_written_behind_value_is_dropped_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A written-behind cursor SQLite cannot bind is left out of the transaction, logged once
    with its agent id and forgotten; the other values and writes of that batch commit, and so
    does every later one."""
    store = await SqliteStore.open(tmp_path / "relay.db")
    try:
        account_id = await new_account(store)
        bad, _ = await new_agent(store, account_id)
        good, _ = await new_agent(store, account_id)
        # set_cursor refuses such a value now; this stands for a caller that slipped one in.
        store._cursors[bad] = 2**64
        await store.set_cursor(good, 7)
        before = store.commit_count
        appended = await store.append_event(make_event(account_id, 1), xon_id=None)
        assert store.commit_count == before + 1
        assert await store.get_cursor(bad) == 0
        assert await store.get_cursor(good) == 7
        dropped = records(caplog, "store.value_dropped")
        assert [(r.agent_id, r.column) for r in dropped] == [(bad, "cursor")]  # type: ignore[attr-defined]
        await store.set_cursor(bad, 3)
        again = await store.append_event(make_event(account_id, 2), xon_id=None)
        assert again.stored.seq == appended.stored.seq + 1
        assert await store.get_cursor(bad) == 3
        assert len(records(caplog, "store.value_dropped")) == 1
        assert records(caplog, "store.commit_failed") == []
    finally:
        await store.close()


async def test_a_write_that_raises_anything_fails_alone(tmp_path: Path) -> None:
    """A write whose own statement raises a non-SQLite error (a value too big to bind) gets
    its exception; the batch's other writes commit and the writer goes on."""
    store = await SqliteStore.open(tmp_path / "relay.db")
    try:
        account_id = await new_account(store)
        results = await asyncio.gather(
            store._tx(lambda conn: conn.execute("SELECT ?", (2**64,))),
            store.append_event(make_event(account_id, 1), xon_id=None),
            return_exceptions=True,
        )
        assert isinstance(results[0], OverflowError)
        assert not isinstance(results[1], BaseException)
        await store.append_event(make_event(account_id, 2), xon_id=None)
        await store.ping()
    finally:
        await store.close()


async def test_an_unexpected_error_fails_its_batch_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception of any type that ends a transaction fails that batch with StoreError and
    is logged once with its traceback; the next batch commits and readiness comes back."""
    faults = Faults()
    store = await SqliteStore.open(tmp_path / "relay.db", faults=faults)
    try:
        account_id = await new_account(store)
        faults.arm(lambda: RuntimeError("a bug in one batch"), times=1)
        with pytest.raises(StoreError, match="RuntimeError: a bug in one batch"):
            await store.append_event(make_event(account_id, 1), xon_id=None)
        failed = records(caplog, "store.commit_failed")
        assert len(failed) == 1 and failed[0].levelno == logging.ERROR and failed[0].exc_info
        appended = await store.append_event(make_event(account_id, 2), xon_id=None)
        assert [e.event.id for e in await store.read_events(account_id, after=0, limit=9)] == [
            appended.stored.event.id
        ]
        await store.ping()
        assert records(caplog, "store.failed") == []
    finally:
        await store.close()


# -- readiness --------------------------------------------------------------------------------


async def test_a_full_disk_fails_readiness_until_a_commit_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While commits fail (a full disk) ingress answers 503 and /readyz 503 store_unavailable;
    once the disk has room, /readyz's own probe commit brings readiness back with no other
    traffic, and ingress works. The failure is logged once, the recovery once."""
    caplog.set_level(logging.INFO, logger="relay_server.store")
    faults = Faults()
    async with faulty_instance(tmp_path, faults) as instance:
        tenant, other = await new_tenant(instance.store, "a"), await new_tenant(instance.store, "b")
        assert await readyz(instance) == (200, "ok")
        faults.arm(disk_full)
        assert await ingress(instance, tenant, 1) == 503
        assert await ingress(instance, other, 1) == 503
        assert await readyz(instance) == (503, "store_unavailable")
        assert await readyz(instance) == (503, "store_unavailable")
        faults.disarm()
        assert await readyz(instance) == (200, "ok")
        assert await ingress(instance, other, 2) == 200
        assert len(records(caplog, "store.commit_failed")) == 1
        assert len(records(caplog, "store.commit_recovered")) == 1
        assert records(caplog, "store.failed") == []


async def test_a_quiet_store_checks_readiness_with_a_commit(tmp_path: Path) -> None:
    """With no commit lately, ping() commits a probe: a disk that filled up while nothing was
    written fails readiness before any ingress fails; right after a commit it only reads."""
    faults = Faults()
    store = await SqliteStore.open(tmp_path / "relay.db", faults=faults)
    try:
        faults.arm(disk_full)
        with pytest.raises(StoreError, match="disk is full"):
            await store.ping()
        faults.disarm()
        await store.ping()
        committed = store.commit_count
        await store.ping()
        assert store.commit_count == committed
    finally:
        await store.close()


async def test_persistent_disk_faults_fail_the_store_for_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Commits failing with I/O errors, again and again past the grace: the store fails for
    good. The cause is logged once with its traceback, wait_failed() returns, /readyz answers
    503 store_unavailable, and every write, queued or new, is answered at once."""
    faults = Faults()
    async with faulty_instance(tmp_path, faults, disk_fault_grace=0.0) as instance:
        store = instance.store
        tenant = await new_tenant(store)
        failed = asyncio.ensure_future(store.wait_failed())
        faults.arm(io_error)
        for n in range(3):
            assert await ingress(instance, tenant, n) == 503
        cause = await asyncio.wait_for(failed, WAIT)
        assert isinstance(cause, StoreError) and "disk I/O error" in str(cause)
        fatal = records(caplog, "store.failed")
        assert len(fatal) == 1 and fatal[0].levelno == logging.CRITICAL and fatal[0].exc_info
        assert await readyz(instance) == (503, "store_unavailable")
        assert await ingress(instance, tenant, 9) == 503
        with pytest.raises(StoreError, match="disk faults"):
            await asyncio.wait_for(store.set_cursor(tenant.agent_id, 1), WAIT)
        assert len(records(caplog, "store.failed")) == 1


async def test_a_failed_store_stops_the_relay_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``run`` serving a store that fails for good drains and stops by itself with a
    CliFailure (exit 1: the supervisor restarts it), never half alive."""
    caplog.set_level(logging.INFO, logger="relay_server.cli")
    faults = Faults()
    store = await SqliteStore.open(
        tmp_path / "relay.db", exclusive=True, faults=faults, disk_fault_grace=0.0
    )
    config = ServerConfig(
        data_dir=tmp_path / "data", listen="127.0.0.1:0", admin_listen="127.0.0.1:0"
    )
    serving = asyncio.ensure_future(cli._serve(config, store=store))
    try:
        admin_file = config.data_dir / cli.ADMIN_FILE
        for _ in range(int(WAIT / (10 * MS))):  # bounded: the relay writes it once it listens
            if admin_file.exists() or serving.done():
                break
            await asyncio.sleep(10 * MS)
        assert admin_file.exists()
        faults.arm(io_error)
        for _ in range(3):
            with pytest.raises(StoreError):
                await store.relay_id()  # any write: each fails with an I/O error
        with pytest.raises(cli.CliFailure, match="stopped: sqlite: commits keep failing"):
            await asyncio.wait_for(serving, WAIT)
        assert not admin_file.exists()
        stopping = records(caplog, "server.stopping")
        assert [r.reason for r in stopping] == ["store failed"]  # type: ignore[attr-defined]
    finally:
        serving.cancel()
        await store.close()


# -- Redis ------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_writer_survives_an_append_that_raises(
    redis_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An append that fails in an unexpected way (its event cannot be encoded) fails its own
    caller with StoreError, logged once with its traceback; the writer sends the next ones."""
    store = await RedisStore.open(redis_store_url)
    try:
        account_id = await new_account(store)
        odd = dataclasses.replace(make_event(account_id, 1), params={"n": {1, 2}})  # type: ignore[dict-item]
        with pytest.raises(StoreError):
            await store.append_event(odd, xon_id=None)
        failed = records(caplog, "store.append_failed")
        assert len(failed) == 1 and failed[0].levelno == logging.ERROR and failed[0].exc_info
        appended = await store.append_event(make_event(account_id, 2), xon_id=None)
        assert await store.read_events(account_id, after=0, limit=9) == [appended.stored]
        await store.ping()
        assert records(caplog, "store.failed") == []
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_out_of_memory_fails_readiness_until_it_takes_writes(
    own_redis: OwnRedis,
) -> None:
    """Redis refusing writes (maxmemory reached): appends fail with StoreError and ping() (the
    readiness check) fails though Redis answers PING; once it takes writes again, ping()'s
    probe write restores readiness without any append."""
    await own_redis.start()
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    admin = aioredis.Redis.from_url(url)
    store = await RedisStore.open(url)
    try:
        account_id = await new_account(store)
        await store.append_event(make_event(account_id, 1), xon_id=None)
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        with pytest.raises(StoreError, match="maxmemory"):
            await store.append_event(make_event(account_id, 2), xon_id=None)
        with pytest.raises(StoreError, match="maxmemory"):
            await store.ping()
        await admin.config_set("maxmemory", "0")
        await store.ping()
        await store.append_event(make_event(account_id, 3), xon_id=None)
    finally:
        await store.close()
        await admin.aclose()


@pytest.mark.redis
async def test_the_bus_subscriber_outlives_bad_notices_and_a_failing_handler(
    redis_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Notices of the wrong shape and a handler that raises are each logged and the same
    subscription delivers the next notice; bytes that are not UTF-8 (redis-py fails to read
    them) are logged and the bus subscribes again, re-syncing, instead of dying silently."""
    store = await RedisStore.open(redis_store_url)
    bus = open_bus(store, "inst-me")
    assert isinstance(bus, RedisBus)
    delivered: list[str] = []
    arrived = asyncio.Event()
    subscriptions = 0

    def handle(notice: Notice) -> None:
        if notice.subject == "boom":
            raise RuntimeError("a bug in the handler")
        delivered.append(notice.subject)
        arrived.set()

    def resync() -> None:
        nonlocal subscriptions
        subscriptions += 1
        arrived.set()

    async def publish(*messages: str | bytes) -> None:
        arrived.clear()
        for message in messages:
            await store.client.publish(bus.channel, message)
        await asyncio.wait_for(arrived.wait(), WAIT)

    def wake(subject: str) -> str:
        return Notice(kind="wake", subject=subject, origin="inst-other").encode()

    try:
        arrived.clear()
        await bus.start(handle, resync)
        await asyncio.wait_for(arrived.wait(), WAIT)  # subscribed
        await publish(
            '{"kind": "released", "subject": "agt_1", "epoch": [1]}',
            '{"kind": "wake", "subject": "acc_1", "code": "4403"}',
            wake("boom"),
            wake("acc_ok"),
        )
        assert (delivered, subscriptions) == (["acc_ok"], 1)
        assert len(records(caplog, "bus.bad_notice")) == 2
        assert len(records(caplog, "bus.handler_failed")) == 1
        await publish(b"\xff\xfe")  # wakes on the re-subscription's resync
        assert subscriptions == 2
        assert len(records(caplog, "bus.subscriber_failed")) == 1
        await publish(wake("acc_after"))
        assert delivered == ["acc_ok", "acc_after"]
    finally:
        await bus.close()
        await store.close()
