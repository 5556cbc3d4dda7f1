"""The Store contract (relay_server/store/base.py), run against every backend.

DESIGN principle 5: the same tests run against SQLite and Redis. Tests taking ``store`` or
``store_backend`` (tests/integration/relay/conftest.py) run once per backend; the few that check
one backend's own mechanics (SQLite's WAL and commit count, Redis's key layout) say so in their
name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from relay_server.store import AppendResult, Store, open_store
from relay_server.store.redis import RedisStore
from relay_server.store.sqlite import SqliteStore
from shared import crypto
from shared.errors import ApiError, StoreError
from shared.events import ENVELOPE_DIGEST, RawRequest, XonEvent, XonId, format_time
from tests.conftest import delete_prefix
from tests.helpers.timing import MS

from .conftest import CONTRACT_BACKENDS, OwnRedis, StoreBackend, backend_for, free_port


@pytest.fixture(params=CONTRACT_BACKENDS)
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    """Every backend of the contract, a Redis Cluster included (docs/redis.md, Cluster)."""
    return backend_for(request, tmp_path)



def make_event(account: str, n: int | str, *, body: bytes = b"") -> XonEvent:
    return XonEvent(
        id=f"ev_{n}_{crypto.new_token(6)}",
        account=account,
        type="sms.received",
        received_at=format_time(time.time()),
        params={"n": str(n), "ü": "ß"},
        request=RawRequest(
            method="POST",
            path="/sms.received",
            query=f"n={n}&x=%FF+",
            content_type="a/b",
            body=body,
        ),
    )


def env_id(value: str) -> XonId:
    """An envelope's ``event.id``: the id alone decides a repeat (docs/delivery.md)."""
    return XonId(value, ENVELOPE_DIGEST)


async def new_account(store: Store, name: str = "acme") -> str:
    record = await store.create_account(
        name=name, ingress_key_hash=crypto.hash_secret(crypto.new_token())
    )
    return record.id


async def new_agent(store: Store, account_id: str, *, ttl: float = 3600.0) -> tuple[str, str]:
    code = crypto.new_token(16)
    agent = await store.create_agent(
        account_id=account_id,
        name="pc",
        code_hash=crypto.hash_secret(code),
        code_expires_at=time.time() + ttl,
    )
    return agent.id, code


# -- identity and health -----------------------------------------------------------------------


async def test_relay_id_is_stable_and_shared(store_backend: StoreBackend) -> None:
    """The relay id is made once, shared by concurrent instances and survives a restart."""
    first, second = await store_backend.open(), await store_backend.open()
    try:
        ids = await asyncio.gather(first.relay_id(), second.relay_id(), first.relay_id())
        assert len(set(ids)) == 1 and ids[0].startswith("rly_")
    finally:
        await first.close()
        await second.close()
    third = await store_backend.open()
    try:
        assert await third.relay_id() == ids[0]
    finally:
        await third.close()


async def test_ping_fails_after_close(store_backend: StoreBackend) -> None:
    """A closed store raises StoreError, never a raw backend error; close is idempotent."""
    closed = await store_backend.open()
    await closed.ping()
    await closed.close()
    await closed.close()
    with pytest.raises(StoreError):
        await closed.ping()
    with pytest.raises(StoreError):
        await closed.append_event(make_event("acc", 1), xon_id=None)
    with pytest.raises(StoreError):
        await closed.get_account("acme")


async def test_unknown_store_urls_are_refused() -> None:
    """A URL scheme that names no backend is a StoreError."""
    with pytest.raises(StoreError, match="unknown store URL"):
        await open_store("mysql://x")


async def test_unopenable_sqlite_path_is_a_store_error(tmp_path: Path) -> None:
    """A database path in a missing directory is a StoreError."""
    path = tmp_path / "missing" / "relay.db"
    with pytest.raises(StoreError, match=f"cannot open {path}"):
        await open_store(f"sqlite:///{path}")


async def test_sqlite_uses_wal_and_full_sync(tmp_path: Path) -> None:
    """The SQLite database is in WAL mode (DESIGN §Storage)."""
    path = tmp_path / "relay.db"
    opened = await open_store(f"sqlite:///{path}")
    try:
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await opened.close()


async def test_unreachable_redis_names_the_address_not_the_password() -> None:
    """Nothing listening: a StoreError naming host:port/db, without the URL's password."""
    port = free_port()
    with pytest.raises(StoreError) as info:
        await open_store(f"redis://:hunter2secret@127.0.0.1:{port}/3")
    message = str(info.value)
    assert f"127.0.0.1:{port}/3" in message and "cannot reach redis" in message
    assert "hunter2secret" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw-secret@127.0.0.1:notaport/0",
        "redis://:pw-secret@127.0.0.1:6379/abc",
        "redis://:pw-secret@127.0.0.1:6379/0?prefix=a{b}",
    ],
)
async def test_malformed_redis_urls_are_refused(url: str) -> None:
    """A bad port, database number or key prefix is a StoreError that never echoes secrets."""
    with pytest.raises(StoreError) as info:
        await open_store(url)
    assert "pw-secret" not in str(info.value)


# -- accounts ----------------------------------------------------------------------------------


async def test_accounts_are_found_by_id_name_and_ingress_hash(store: Store) -> None:
    """An account can be fetched by id, by name and by its ingress key hash."""
    key_hash = crypto.hash_secret("k")
    created = await store.create_account(
        name="acme", ingress_key_hash=key_hash, xon_api_url="https://x", xon_api_key="s"
    )
    assert await store.get_account(created.id) == created
    assert await store.get_account("acme") == created
    assert await store.account_by_ingress_hash(key_hash) == created
    assert await store.account_by_ingress_hash(crypto.hash_secret("other")) is None
    assert await store.get_account("nobody") is None
    assert created.xon_api_url == "https://x" and created.xon_api_key == "s"


async def test_account_names_are_unique(store: Store) -> None:
    """A second account with a taken name is a 409 account_exists."""
    await new_account(store, "acme")
    with pytest.raises(ApiError) as info:
        await new_account(store, "acme")
    assert (info.value.http_status, info.value.code) == (409, "account_exists")


async def test_list_accounts_in_creation_order(store: Store) -> None:
    """list_accounts returns every account, oldest first."""
    ids = [await new_account(store, name) for name in ("a", "b", "c")]
    assert [a.id for a in await store.list_accounts()] == ids


# -- agents and enrollment -----------------------------------------------------------------------


async def test_enrollment_binds_key_and_spends_code(store: Store) -> None:
    """A valid code enrolls once; the agent then has its public key."""
    account_id = await new_account(store)
    agent_id, code = await new_agent(store, account_id)
    pending = await store.get_agent(agent_id)
    assert pending is not None and pending.public_key is None and pending.enrolled_at is None
    enrolled = await store.enroll_agent(
        code_hash=crypto.hash_secret(code), public_key="PK", now=time.time()
    )
    assert (enrolled.id, enrolled.account_id, enrolled.public_key) == (agent_id, account_id, "PK")
    assert enrolled.enrolled_at is not None
    with pytest.raises(ApiError) as info:
        await store.enroll_agent(
            code_hash=crypto.hash_secret(code), public_key="PK2", now=time.time()
        )
    assert (info.value.http_status, info.value.code) == (400, "invalid_code")
    again = await store.get_agent(agent_id)
    assert again is not None and again.public_key == "PK"


async def test_expired_and_unknown_codes_are_invalid(store: Store) -> None:
    """An expired or unknown code gets the same invalid_code answer."""
    account_id = await new_account(store)
    _, code = await new_agent(store, account_id, ttl=60.0)
    for code_hash, now in (
        (crypto.hash_secret(code), time.time() + 61.0),
        (crypto.hash_secret("guess"), time.time()),
    ):
        with pytest.raises(ApiError, match="invalid") as info:
            await store.enroll_agent(code_hash=code_hash, public_key="PK", now=now)
        assert info.value.code == "invalid_code"


async def test_concurrent_enrollments_spend_a_code_once(store: Store) -> None:
    """Racing uses of one code: exactly one succeeds."""
    account_id = await new_account(store)
    _, code = await new_agent(store, account_id)
    results = await asyncio.gather(
        *(
            store.enroll_agent(
                code_hash=crypto.hash_secret(code), public_key=f"PK{i}", now=time.time()
            )
            for i in range(5)
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, ApiError) for r in results if isinstance(r, BaseException))


async def test_revoke_marks_agent_and_kills_its_code(store: Store) -> None:
    """A revoked agent stays revoked, and its unused code no longer enrolls."""
    account_id = await new_account(store)
    agent_id, code = await new_agent(store, account_id)
    revoked = await store.revoke_agent(agent_id, now=123.0)
    assert revoked is not None and revoked.revoked and revoked.revoked_at == 123.0
    again = await store.revoke_agent(agent_id, now=456.0)
    assert again is not None and again.revoked_at == 123.0
    with pytest.raises(ApiError):
        await store.enroll_agent(
            code_hash=crypto.hash_secret(code), public_key="PK", now=time.time()
        )
    assert await store.revoke_agent("agt_unknown", now=1.0) is None


async def test_list_agents_filters_by_account(store: Store) -> None:
    """list_agents lists all agents, or one account's."""
    acc_a, acc_b = await new_account(store, "a"), await new_account(store, "b")
    a1, _ = await new_agent(store, acc_a)
    b1, _ = await new_agent(store, acc_b)
    a2, _ = await new_agent(store, acc_a)
    assert [a.id for a in await store.list_agents()] == [a1, b1, a2]
    assert [a.id for a in await store.list_agents(acc_a)] == [a1, a2]
    assert await store.list_agents("acc_none") == []


async def test_touch_agent_records_last_seen(store: Store) -> None:
    """touch_agent sets last_seen; unknown agents are ignored."""
    agent_id, _ = await new_agent(store, await new_account(store))
    await store.touch_agent(agent_id, now=99.5)
    await store.touch_agent("agt_unknown", now=1.0)
    agent = await store.get_agent(agent_id)
    assert agent is not None and agent.last_seen == 99.5
    assert await store.get_agent("agt_unknown") is None


# -- events and cursors ------------------------------------------------------------------------


async def test_events_round_trip_byte_exact(store: Store) -> None:
    """A stored event reads back equal, binary body included."""
    account_id = await new_account(store)
    event = make_event(account_id, 1, body=bytes(range(256)) * 3)
    result = await store.append_event(event, xon_id=None)
    assert not result.duplicate and result.stored.event == event
    [read] = await store.read_events(account_id, after=0, limit=10)
    assert read == result.stored
    assert read.event.request.body == bytes(range(256)) * 3


async def test_read_events_after_and_limit(store: Store) -> None:
    """read_events returns seq > after, oldest first, at most limit; head_seq is the last."""
    acc_a, acc_b = await new_account(store, "a"), await new_account(store, "b")
    seqs = []
    for n in range(6):
        seqs.append((await store.append_event(make_event(acc_a, n), xon_id=None)).stored.seq)
        await store.append_event(make_event(acc_b, n), xon_id=None)
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert [e.seq for e in await store.read_events(acc_a, after=0, limit=100)] == seqs
    assert [e.seq for e in await store.read_events(acc_a, after=seqs[1], limit=3)] == seqs[2:5]
    assert await store.read_events(acc_a, after=seqs[-1], limit=10) == []
    assert await store.head_seq(acc_a) == seqs[-1]
    assert await store.head_seq("acc_empty") == 0


async def test_dedup_by_xon_id_only(store: Store) -> None:
    """Same X-on id → the first copy, duplicate=True; identical events without id are both kept."""
    account_id = await new_account(store)
    first = await store.append_event(make_event(account_id, 1), xon_id=env_id("x-1"))
    again = await store.append_event(make_event(account_id, 2), xon_id=env_id("x-1"))
    assert again.duplicate and again.stored == first.stored
    other_account = await new_account(store, "other")
    elsewhere = await store.append_event(make_event(other_account, 3), xon_id=env_id("x-1"))
    assert not elsewhere.duplicate
    e1 = await store.append_event(make_event(account_id, 4), xon_id=None)
    e2 = await store.append_event(make_event(account_id, 4), xon_id=None)
    assert not e1.duplicate and not e2.duplicate and e1.stored.seq < e2.stored.seq
    assert len(await store.read_events(account_id, after=0, limit=10)) == 3


async def test_dedup_within_one_batch(store: Store) -> None:
    """Duplicates committed in the same batch still resolve to the first copy."""
    account_id = await new_account(store)
    results = await asyncio.gather(
        *(store.append_event(make_event(account_id, n), xon_id=env_id("same")) for n in range(5))
    )
    assert [r.duplicate for r in results] == [False, True, True, True, True]
    assert {r.stored.event.id for r in results} == {results[0].stored.event.id}
    assert len(await store.read_events(account_id, after=0, limit=10)) == 1


async def test_seq_is_never_reused(store_backend: StoreBackend) -> None:
    """Seqs keep increasing across a reopen."""
    first = await store_backend.open()
    account_id = await new_account(first)
    last = (await first.append_event(make_event(account_id, 1), xon_id=None)).stored.seq
    await first.close()
    second = await store_backend.open()
    try:
        seq = (await second.append_event(make_event(account_id, 2), xon_id=None)).stored.seq
        assert seq > last
    finally:
        await second.close()


async def test_instances_sharing_a_store_get_distinct_ordered_seqs(
    store_backend: StoreBackend,
) -> None:
    """Two instances appending concurrently to one account: distinct seqs, one order, one log."""
    first, second = await store_backend.open(), await store_backend.open()
    try:
        account_id = await new_account(first)
        results = await asyncio.gather(
            *(
                (first if n % 2 else second).append_event(make_event(account_id, n), xon_id=None)
                for n in range(60)
            )
        )
        seqs = sorted(r.stored.seq for r in results)
        assert len(set(seqs)) == 60
        read = await second.read_events(account_id, after=0, limit=1000)
        assert [e.seq for e in read] == seqs
        assert {e.event.id for e in read} == {r.stored.event.id for r in results}
        assert await first.head_seq(account_id) == seqs[-1]
    finally:
        await first.close()
        await second.close()


async def test_dedup_across_instances(store_backend: StoreBackend) -> None:
    """The same X-on id arriving on two instances at once is stored once."""
    first, second = await store_backend.open(), await store_backend.open()
    try:
        account_id = await new_account(first)
        results = await asyncio.gather(
            *(
                (first if n % 2 else second).append_event(
                    make_event(account_id, n), xon_id=env_id("dup")
                )
                for n in range(10)
            )
        )
        assert sum(not r.duplicate for r in results) == 1
        assert all(r.stored == results[0].stored for r in results)
        assert len(await first.read_events(account_id, after=0, limit=100)) == 1
    finally:
        await first.close()
        await second.close()


async def test_sqlite_concurrent_appends_share_commits(tmp_path: Path) -> None:
    """SQLite group commit: many concurrent appends take fewer commits than events."""
    store = await SqliteStore.open(tmp_path / "relay.db")
    try:
        account_id = await new_account(store)
        before = store.commit_count
        results = await asyncio.gather(
            *(store.append_event(make_event(account_id, n), xon_id=None) for n in range(100))
        )
        commits = store.commit_count - before
        assert 1 <= commits < 100
        seqs = [r.stored.seq for r in results]
        assert len(set(seqs)) == 100
        assert len(await store.read_events(account_id, after=0, limit=1000)) == 100
    finally:
        await store.close()


async def test_close_commits_queued_appends(store_backend: StoreBackend) -> None:
    """Appends already queued when close starts are committed, not dropped."""
    store = await store_backend.open()
    account_id = await new_account(store)
    # gather starts the appends first (FIFO), so all are queued when close() begins.
    *results, _ = await asyncio.gather(
        *(store.append_event(make_event(account_id, n), xon_id=None) for n in range(20)),
        store.close(),
    )
    reopened = await store_backend.open()
    try:
        stored = await reopened.read_events(account_id, after=0, limit=100)
        assert [e.seq for e in stored] == [
            r.stored.seq for r in results if isinstance(r, AppendResult)
        ]
        assert len(stored) == 20
    finally:
        await reopened.close()


async def test_cancelled_calls_end_at_once_and_leave_the_store_usable(store: Store) -> None:
    """Cancelling a caller mid-call ends it promptly; later calls get their own answers."""
    account_id = await new_account(store)
    stored = (await store.append_event(make_event(account_id, 1), xon_id=None)).stored

    async def reader() -> None:
        while True:
            await store.read_events(account_id, after=0, limit=10)

    for steps in range(30):
        task = asyncio.create_task(reader())
        for _ in range(steps % 7):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2000 * MS)
        assert done, f"cancelled store call still running (after {steps} loop steps)"
        assert task.cancelled()
    assert await store.read_events(account_id, after=0, limit=10) == [stored]
    assert await store.head_seq(account_id) == stored.seq


async def test_cursors_default_to_zero_and_persist(store: Store) -> None:
    """get_cursor is 0 until set_cursor; unknown agents read 0."""
    agent_id, _ = await new_agent(store, await new_account(store))
    assert await store.get_cursor(agent_id) == 0
    await store.set_cursor(agent_id, 42)
    assert await store.get_cursor(agent_id) == 42
    assert await store.get_cursor("agt_unknown") == 0


# -- link ownership (docs/scaling.md, "One link per agent") ----------------------------------------


async def test_link_claims_count_epochs_and_name_the_previous_holder(
    store_backend: StoreBackend,
) -> None:
    """Each claim gets a higher epoch, seen by every instance; the holder is named until it
    releases, and a stale release changes nothing."""
    first, second = await store_backend.open(), await store_backend.open()
    try:
        agent_id, _ = await new_agent(first, await new_account(first))
        one = await first.claim_link(agent_id, owner="inst-a")
        assert one.epoch == 1 and one.previous_owner == ""
        two = await second.claim_link(agent_id, owner="inst-b")
        assert two.epoch == 2 and two.previous_owner == "inst-a"
        await first.release_link(agent_id, epoch=1)  # stale: epoch 2 holds the agent now
        three = await first.claim_link(agent_id, owner="inst-a")
        assert three.epoch == 3 and three.previous_owner == "inst-b"
        await first.release_link(agent_id, epoch=3)
        four = await second.claim_link(agent_id, owner="inst-b")
        assert four.epoch == 4 and four.previous_owner == ""
        checks = await second.check_links([agent_id])
        assert checks[agent_id].epoch == 4 and not checks[agent_id].revoked
    finally:
        await first.close()
        await second.close()


async def test_check_links_reports_revocation_and_skips_unknown_agents(store: Store) -> None:
    """check_links: revoked flag per agent, epoch 0 before any claim, unknown ids left out."""
    account_id = await new_account(store)
    kept, _ = await new_agent(store, account_id)
    gone, _ = await new_agent(store, account_id)
    await store.revoke_agent(gone, now=time.time())
    checks = await store.check_links([kept, gone, "agt_unknown"])
    assert set(checks) == {kept, gone}
    assert checks[kept].epoch == 0 and not checks[kept].revoked
    assert checks[gone].revoked
    assert await store.check_links([]) == {}


async def test_claiming_an_unknown_agent_is_a_store_error(store: Store) -> None:
    """claim_link refuses an agent that does not exist."""
    with pytest.raises(StoreError):
        await store.claim_link("agt_unknown", owner="inst-a")


# -- retention (docs/redis.md, Retention) -------------------------------------------------------


async def append_many(store: Store, account_id: str, count: int) -> list[int]:
    return [
        (await store.append_event(make_event(account_id, n), xon_id=env_id(f"x{n}"))).stored.seq
        for n in range(count)
    ]


async def test_retention_cut_by_count(store: Store) -> None:
    """retention_cut: the newest seq outside the newest N events (0 when all fit)."""
    account_id = await new_account(store)
    seqs = await append_many(store, account_id, 10)
    assert await store.retention_cut(account_id, keep_events=3, keep_since=None) == seqs[6]
    assert await store.retention_cut(account_id, keep_events=10, keep_since=None) == 0
    assert await store.retention_cut(account_id, keep_events=None, keep_since=None) == 0
    assert await store.retention_cut("acc_empty", keep_events=1, keep_since=None) == 0


async def test_retention_cut_by_age(store: Store) -> None:
    """retention_cut: the newest seq received before a time; the larger of both limits wins."""
    account_id = await new_account(store)
    old = [
        (await store.append_event(_aged(make_event(account_id, n), 3600.0), xon_id=None)).stored.seq
        for n in range(5)
    ]
    new = await append_many(store, account_id, 4)
    since = time.time() - 60.0
    assert await store.retention_cut(account_id, keep_events=None, keep_since=since) == old[-1]
    assert await store.retention_cut(account_id, keep_events=2, keep_since=since) == new[1]
    assert await store.retention_cut(account_id, keep_events=100, keep_since=since) == old[-1]
    assert await store.retention_cut(account_id, keep_events=None, keep_since=0.0) == 0


def _aged(event: XonEvent, age: float) -> XonEvent:
    return dataclasses.replace(event, received_at=format_time(time.time() - age))


async def test_trim_drops_oldest_within_limit_and_keeps_the_head(
    store_backend: StoreBackend,
) -> None:
    """trim_events drops at most ``limit`` of the oldest events up to ``through``, never the
    newest one; trimmed_through records the highest dropped seq for every instance."""
    store, other = await store_backend.open(), await store_backend.open()
    try:
        account_id = await new_account(store)
        seqs = await append_many(store, account_id, 10)
        assert await store.trimmed_through(account_id) == 0
        assert await store.trim_events(account_id, through=seqs[5], limit=4) == 4
        assert await other.trimmed_through(account_id) == seqs[3]
        assert [e.seq for e in await other.read_events(account_id, after=0, limit=20)] == seqs[4:]
        assert await store.trim_events(account_id, through=seqs[-1], limit=100) == 5
        assert [e.seq for e in await store.read_events(account_id, after=0, limit=20)] == [seqs[-1]]
        assert await store.head_seq(account_id) == seqs[-1]
        assert await store.trimmed_through(account_id) == seqs[-2]
        assert await store.trim_events(account_id, through=seqs[-1], limit=100) == 0
        assert await store.trim_events("acc_empty", through=100, limit=100) == 0
        following = await store.append_event(make_event(account_id, 99), xon_id=None)
        assert following.stored.seq > seqs[-1]
    finally:
        await store.close()
        await other.close()


async def test_trimmed_events_stop_deduplicating(store: Store) -> None:
    """An X-on id whose event retention dropped is stored afresh; retained ids still dedup."""
    account_id = await new_account(store)
    seqs = await append_many(store, account_id, 4)
    await store.trim_events(account_id, through=seqs[1], limit=100)
    again = await store.append_event(make_event(account_id, 0), xon_id=env_id("x0"))
    assert not again.duplicate and again.stored.seq > seqs[-1]
    kept = await store.append_event(make_event(account_id, 3), xon_id=env_id("x3"))
    assert kept.duplicate and kept.stored.seq == seqs[3]


# -- Redis mechanics (docs/redis.md) -------------------------------------------------------------


@pytest.mark.redis
async def test_redis_layout_stream_ids_are_seqs_and_keys_are_hash_tagged(
    redis_store_url: str,
) -> None:
    """Events live in the account's stream under id "<seq>-0"; all its keys share one tag."""
    store = await RedisStore.open(redis_store_url)
    raw = aioredis.Redis.from_url(redis_store_url.split("?", 1)[0], decode_responses=True)
    try:
        account_id = await new_account(store)
        agent_id, _ = await new_agent(store, account_id)
        await store.set_cursor(agent_id, 1)
        results = [
            await store.append_event(make_event(account_id, n), xon_id=env_id(f"x{n}"))
            for n in range(3)
        ]
        stream = f"{store.prefix}{{acct:{account_id}}}:events"
        entries = await raw.xrange(stream) or []
        assert [entry_id for entry_id, _ in entries] == [f"{r.stored.seq}-0" for r in results]
        assert [(fields or {}).get("seq") for _, fields in entries] == [
            str(r.stored.seq) for r in results
        ]
        keys = [key async for key in raw.scan_iter(match=store.prefix + "*")]
        tags = {key[len(store.prefix) :].split("}", 1)[0] + "}" for key in keys}
        assert tags == {"{relay}", f"{{acct:{account_id}}}"}
        assert all(key.startswith(store.prefix + "{") for key in keys)
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.redis
async def test_redis_concurrent_appends_share_pipelines(redis_store_url: str) -> None:
    """Concurrent appends go to Redis in fewer pipelines than events, in one order."""
    store = await RedisStore.open(redis_store_url)
    try:
        account_id = await new_account(store)
        before = store.pipeline_count
        results = await asyncio.gather(
            *(store.append_event(make_event(account_id, n), xon_id=None) for n in range(100))
        )
        assert 1 <= store.pipeline_count - before < 100
        assert sorted(r.stored.seq for r in results) == list(range(1, 101))
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_prefixes_isolate_relays(redis_url: str) -> None:
    """Two key prefixes on one database are two separate relays."""
    tag = crypto.new_token(6).replace("-", "").replace("_", "").lower()
    urls = [f"{redis_url}?prefix=xontest:{tag}{side}:" for side in "ab"]
    a, b = await RedisStore.open(urls[0]), await RedisStore.open(urls[1])
    try:
        await new_account(a, "acme")
        await new_account(b, "acme")
        assert [x.name for x in await a.list_accounts()] == ["acme"]
        assert await a.relay_id() != await b.relay_id()
    finally:
        await a.close()
        await b.close()
        await delete_prefix(redis_url, f"xontest:{tag}")


@pytest.mark.redis
async def test_redis_outage_is_a_store_error_and_recovers(own_redis: OwnRedis) -> None:
    """Redis down: StoreError naming the address, never a false success; back up: appends
    resume on the same store and the seq continues (AOF kept the acknowledged event)."""
    await own_redis.start()
    store = await RedisStore.open(f"redis://127.0.0.1:{own_redis.port}/0")
    try:
        account_id = await new_account(store)
        first = await store.append_event(make_event(account_id, 1), xon_id=env_id("x1"))
        own_redis.kill()
        with pytest.raises(StoreError, match=f"127.0.0.1:{own_redis.port}/0"):
            await store.append_event(make_event(account_id, 2), xon_id=env_id("x2"))
        with pytest.raises(StoreError):
            await store.read_events(account_id, after=0, limit=10)
        with pytest.raises(StoreError):
            await store.ping()
        await own_redis.start()
        await store.ping()
        second = await store.append_event(make_event(account_id, 3), xon_id=env_id("x3"))
        assert second.stored.seq == first.stored.seq + 1
        stored = await store.read_events(account_id, after=0, limit=10)
        assert stored == [first.stored, second.stored]
    finally:
        await store.close()
