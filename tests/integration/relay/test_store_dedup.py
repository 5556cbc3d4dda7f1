"""Dedup and per-account seqs, one contract run on every store backend (docs/delivery.md,
Duplicates; docs/protocol.md, Sequence numbers), and the upgrade of data written by the release
before them (docs/deployment.md, Upgrading).

A request is a repeat only with the same X-on id and the same request (method, path, query,
content type, body); an envelope's ``event.id`` alone decides. Requests here go through
:func:`shared.events.parse_ingress`, as ingress sends them to the store.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from relay_server.store import AppendResult, Store
from relay_server.store.redis import RedisStore
from relay_server.store.sqlite import SCHEMA_VERSION, SqliteStore
from shared import crypto
from shared.errors import StoreError
from shared.events import RawRequest, XonEvent, format_time, parse_ingress

from .conftest import CONTRACT_BACKENDS, StoreBackend, backend_for
from .test_store import new_account


@pytest.fixture(params=CONTRACT_BACKENDS)
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    """Every backend of the contract, a Redis Cluster included (docs/redis.md, Cluster)."""
    return backend_for(request, tmp_path)


FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Req:
    method: str
    path: str
    query: str = ""
    content_type: str = ""
    body: bytes = b""

    def raw(self) -> RawRequest:
        return RawRequest(
            method=self.method,
            path=self.path,
            query=self.query,
            content_type=self.content_type,
            body=self.body,
        )


def envelope(event_id: str, **fields: object) -> bytes:
    return json.dumps({"event": {"id": event_id, "type": "sms.received", **fields}}).encode()


async def send(
    store: Store, account_id: str, req: Req, *, id_params: tuple[str, ...] = ("id",)
) -> AppendResult:
    """What ingress does with one request: parse it, then append it with its X-on id."""
    raw = req.raw()
    parsed = parse_ingress(raw, id_params=id_params)
    event = XonEvent(
        id=f"ev_{crypto.new_token(9)}",
        account=account_id,
        type=parsed.type,
        received_at=format_time(time.time()),
        params=parsed.params,
        request=raw,
    )
    return await store.append_event(event, xon_id=parsed.xon_id)


# One row per request, in order: (name, request, expected). Expected: "new", "new, id reused"
# (an id seen with another request) or the name of the row whose first copy it repeats.
TABLE: list[tuple[str, Req, str]] = [
    ("arriving", Req("GET", "/call.arriving", "id=c1&caller=0123"), "new"),
    ("ended", Req("GET", "/call.ended", "id=c1&caller=0123&duration=30"), "new, id reused"),
    ("waiting 5", Req("GET", "/messages.waiting", "id=201&count=5"), "new"),
    ("waiting 6", Req("GET", "/messages.waiting", "id=201&count=6"), "new, id reused"),
    ("sms", Req("POST", "/sms", "", FORM, b"id=m9&text=first"), "new"),
    ("sms retry", Req("POST", "/sms", "", FORM, b"id=m9&text=first"), "sms"),
    ("arriving retry", Req("GET", "/call.arriving", "id=c1&caller=0123"), "arriving"),
    # The same bytes by another method, path, query or content type are other requests.
    ("sms as PUT", Req("PUT", "/sms", "", FORM, b"id=m9&text=first"), "new, id reused"),
    ("sms elsewhere", Req("POST", "/sms2", "", FORM, b"id=m9&text=first"), "new, id reused"),
    ("sms + query", Req("POST", "/sms", "x=1", FORM, b"id=m9&text=first"), "new, id reused"),
    ("sms as text", Req("POST", "/sms", "", "text/plain", b"id=m9&text=first"), "new"),
    # The envelope's event.id alone decides: a redelivery may differ in other fields.
    ("env", Req("POST", "", "", JSON, envelope("e1", n=1)), "new"),
    ("env again", Req("POST", "", "", JSON, envelope("e1", n=2, at="later")), "env"),
    ("env numeric", Req("POST", "", "", JSON, b'{"event": {"id": 7, "type": "x"}}'), "new"),
    ("env numeric again", Req("POST", "", "", JSON, b'{"event": {"id": 7}}'), "env numeric"),
    # A flat JSON body's id is a bare param: content decides.
    ("flat", Req("POST", "", "", JSON, b'{"id": "f1", "n": 1}'), "new"),
    ("flat 2", Req("POST", "", "", JSON, b'{"id": "f1", "n": 2}'), "new, id reused"),
    ("flat retry", Req("POST", "", "", JSON, b'{"id": "f1", "n": 1}'), "flat"),
    # Without an X-on id nothing is a repeat, however alike.
    ("no id", Req("GET", "/tick", "n=1"), "new"),
    ("no id again", Req("GET", "/tick", "n=1"), "new"),
]


async def test_the_dedup_table(store: Store) -> None:
    """Every genuine event of the table is stored, in order; only true repeats fold into their
    first copy; an id seen with another request is counted; another account is untouched."""
    account_id = await new_account(store)
    first: dict[str, AppendResult] = {}
    stored: list[str] = []
    for name, req, expected in TABLE:
        result = await send(store, account_id, req)
        if expected.startswith("new"):
            assert not result.duplicate, name
            assert result.xon_id_reused == expected.endswith("id reused"), name
            first[name] = result
            stored.append(result.stored.event.id)
        else:
            assert result.duplicate and not result.xon_id_reused, name
            assert result.stored == first[expected].stored, name
    log = await store.read_events(account_id, after=0, limit=100)
    assert [e.event.id for e in log] == stored
    assert [e.seq for e in log] == sorted({e.seq for e in log})

    other = await new_account(store, "other")
    for name, req, _ in TABLE[:6]:
        result = await send(store, other, req)
        assert not result.duplicate or name == "sms retry", name


async def test_the_id_params_are_configurable(store: Store) -> None:
    """Only the configured bare param names carry an X-on id (here ``callId``, not ``id``)."""
    account_id = await new_account(store)
    names = ("callId",)
    by_id = Req("GET", "/call.ended", "id=c1")
    assert not (await send(store, account_id, by_id, id_params=names)).duplicate
    assert not (await send(store, account_id, by_id, id_params=names)).duplicate
    by_call = Req("GET", "/call.ended", "callId=c1")
    stored = await send(store, account_id, by_call, id_params=names)
    again = await send(store, account_id, by_call, id_params=names)
    assert again.duplicate and again.stored == stored.stored


async def test_repeats_within_one_batch_fold_into_the_first(store: Store) -> None:
    """Concurrent requests in one commit: each true repeat resolves to its first copy, and each
    different request with the same id is stored."""
    account_id = await new_account(store)
    reqs = [Req("GET", "/messages.waiting", f"id=201&count={n % 3}") for n in range(9)]
    results = await asyncio.gather(*(send(store, account_id, r) for r in reqs))
    assert sum(not r.duplicate for r in results) == 3
    for n, result in enumerate(results):
        assert result.stored == results[n % 3].stored
    assert [r.xon_id_reused for r in results[:3]] == [False, True, True]
    assert len(await store.read_events(account_id, after=0, limit=100)) == 3


async def test_trimmed_events_stop_deduplicating_and_stop_counting(store: Store) -> None:
    """Retention drops an event's dedup entry with it: its retry is stored afresh, and its id
    no longer counts as seen; a retained event still folds its retries."""
    account_id = await new_account(store)
    old = Req("GET", "/messages.waiting", "id=201&count=1")
    kept = Req("GET", "/messages.waiting", "id=202&count=1")
    first = await send(store, account_id, old)
    head = await send(store, account_id, kept)
    assert await store.trim_events(account_id, through=first.stored.seq, limit=10) == 1
    again = await send(store, account_id, old)
    assert not again.duplicate and not again.xon_id_reused
    assert again.stored.seq > head.stored.seq
    assert (await send(store, account_id, kept)).stored == head.stored


async def test_seqs_are_per_account(store: Store) -> None:
    """An account's seqs count its own events only: a busy neighbour changes nothing."""
    busy, quiet = await new_account(store, "busy"), await new_account(store, "quiet")
    for n in range(5):
        await send(store, busy, Req("GET", "/x", f"n={n}"))
    first = await send(store, quiet, Req("GET", "/x", "n=0"))
    assert first.stored.seq == 1
    assert await store.head_seq(busy) == 5


async def test_sqlite_seqs_never_go_back_when_the_newest_event_is_gone(tmp_path: Path) -> None:
    """SQLite keeps each account's last seq apart from its events: with the newest event gone
    (a tool deleting rows), the next append still gets a new seq, also after a reopen."""
    path = tmp_path / "relay.db"
    store = await SqliteStore.open(path)
    try:
        account_id = await new_account(store)
        results = [await send(store, account_id, Req("GET", "/x", f"n={n}")) for n in range(3)]
    finally:
        await store.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DELETE FROM events WHERE account_id = ?", (account_id,))
        conn.commit()
    store = await SqliteStore.open(path, exclusive=True)
    try:
        later = await send(store, account_id, Req("GET", "/x", "n=9"))
        assert later.stored.seq == results[-1].stored.seq + 1
        assert await store.read_events(account_id, after=0, limit=10) == [later.stored]
    finally:
        await store.close()


# -- upgrading data written by the release before (docs/deployment.md, Upgrading) -------------

# The SQLite tables of that release, as its code created them (relay_server/store/sqlite.py
# before per-account seqs): only the tables this upgrade changes or reads.
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    ingress_key_hash TEXT NOT NULL UNIQUE,
    xon_api_url TEXT NOT NULL DEFAULT '',
    xon_api_key TEXT NOT NULL DEFAULT ''
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    xon_id TEXT,
    type TEXT NOT NULL,
    received_at TEXT NOT NULL,
    params TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    query TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX events_account_seq ON events(account_id, seq);
CREATE UNIQUE INDEX events_account_xon_id ON events(account_id, xon_id);
"""

# What the old release stored: (account, request, the X-on id it keyed dedup on). Seqs were one
# counter for both accounts, so they interleave.
OLD_ROWS: list[tuple[str, Req, str | None]] = [
    ("a", Req("GET", "/call.arriving", "id=c1&caller=0123"), "c1"),
    ("b", Req("GET", "/x", "n=1"), None),
    ("a", Req("POST", "/sms", "", FORM, b"id=m9&text=first"), "m9"),
    ("b", Req("POST", "", "", JSON, envelope("e1", n=1)), "e1"),
    ("a", Req("GET", "/x", "n=2"), None),
]
OLD_HIGH_MARK = 7
"""The old global counter: two events above the last kept one were deleted (it never goes
back), so the upgrade must start every account above 7, not above 5."""


@dataclass(slots=True)
class OldData:
    accounts: dict[str, str]
    """"a"/"b" -> account id."""
    seqs: list[int]
    ids: list[str]


async def write_old_sqlite(path: Path) -> OldData:
    accounts = {"a": "acc_a", "b": "acc_b"}
    ids = [f"ev_old_{n}" for n in range(len(OLD_ROWS))]
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(V1_SCHEMA)
        for name, account_id in accounts.items():
            conn.execute(
                "INSERT INTO accounts (id, name, created_at, ingress_key_hash) VALUES (?, ?, 1, ?)",
                (account_id, name, f"hash-{name}"),
            )
        for event_id, (who, req, xon_id) in zip(ids, OLD_ROWS, strict=True):
            conn.execute(
                "INSERT INTO events (id, account_id, xon_id, type, received_at, params, method,"
                " path, query, content_type, body) VALUES (?, ?, ?, 't', ?, '{}', ?, ?, ?, ?, ?)",
                (event_id, accounts[who], xon_id, format_time(time.time()), req.method, req.path,
                 req.query, req.content_type, req.body),
            )
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'", (OLD_HIGH_MARK,))
        conn.commit()
    return OldData(accounts=accounts, seqs=list(range(1, len(OLD_ROWS) + 1)), ids=ids)


async def write_old_redis(url: str) -> OldData:
    """The old Redis layout: the same stream, seq and account keys as now (written through the
    store), the dedup hash ``xon_ids`` (X-on id -> seq) and zset ``xon_seqs``, no schema key."""
    store = await RedisStore.open(url)
    try:
        accounts = {name: await new_account(store, name) for name in ("a", "b")}
        results = [
            await send(store, accounts[who], req, id_params=()) for who, req, _ in OLD_ROWS
        ]
        prefix = store.prefix
        raw = store.client  # a Cluster client on a Cluster store: each write finds its slot
        await raw.delete(f"{prefix}{{relay}}:schema")
        for account_id in accounts.values():
            names = ("dedup", "dedup_seqs", "dedup_ids")
            await raw.delete(*(f"{prefix}{{acct:{account_id}}}:{k}" for k in names))
        for (who, _, xon_id), result in zip(OLD_ROWS, results, strict=True):
            if xon_id is not None:
                acct = f"{prefix}{{acct:{accounts[who]}}}"
                await raw.hset(f"{acct}:xon_ids", xon_id, result.stored.seq)
                await raw.zadd(f"{acct}:xon_seqs", {xon_id: result.stored.seq})
    finally:
        await store.close()
    return OldData(
        accounts=accounts,
        seqs=[r.stored.seq for r in results],
        ids=[r.stored.event.id for r in results],
    )


async def write_old(backend: StoreBackend, tmp_path: Path) -> OldData:
    if backend.name == "sqlite":
        return await write_old_sqlite(tmp_path / "relay.db")
    return await write_old_redis(backend.url)


async def test_data_of_the_previous_release_is_upgraded_in_place(
    store_backend: StoreBackend, tmp_path: Path
) -> None:
    """Opening old data keeps every event and seq; an old X-on id now folds only its true
    retry (an envelope's id: any redelivery), and other requests with it are new events; new
    seqs continue above every seq the old release handed out."""
    old = await write_old(store_backend, tmp_path)
    store = await store_backend.open()
    try:
        a, b = old.accounts["a"], old.accounts["b"]
        for who, account_id in old.accounts.items():
            log = await store.read_events(account_id, after=0, limit=10)
            expected = [
                (seq, event_id)
                for seq, event_id, (owner, _, _) in zip(old.seqs, old.ids, OLD_ROWS, strict=True)
                if owner == who
            ]
            assert [(e.seq, e.event.id) for e in log] == expected

        retry = await send(store, a, OLD_ROWS[2][1])
        assert retry.duplicate and retry.stored.event.id == old.ids[2]
        redelivery = await send(store, b, Req("POST", "", "", JSON, envelope("e1", n=9)))
        assert redelivery.duplicate and redelivery.stored.event.id == old.ids[3]
        ended = await send(store, a, Req("GET", "/call.ended", "id=c1&caller=0123&duration=30"))
        assert not ended.duplicate and ended.xon_id_reused
        floor = OLD_HIGH_MARK if store_backend.name == "sqlite" else old.seqs[-1]
        assert ended.stored.seq > floor
        fresh = await send(store, b, Req("GET", "/x", "n=3"))
        assert fresh.stored.seq > old.seqs[3]
    finally:
        await store.close()
    again = await store_backend.open()  # the upgrade ran once; reopening changes nothing
    try:
        assert (await send(again, a, OLD_ROWS[0][1])).stored.event.id == old.ids[0]
    finally:
        await again.close()


async def test_sqlite_upgrade_serves_reads_from_the_tail_at_once(tmp_path: Path) -> None:
    """The relay's own (exclusive) open of an upgraded file: each account's tail starts above
    its old seqs, so new events are served from memory and old ones from the file."""
    old = await write_old_sqlite(tmp_path / "relay.db")
    store = await SqliteStore.open(tmp_path / "relay.db", exclusive=True)
    try:
        a = old.accounts["a"]
        new = await send(store, a, Req("GET", "/x", "n=3"))
        assert new.stored.seq == OLD_HIGH_MARK + 1
        read = await store.read_events(a, after=0, limit=10)
        assert [e.seq for e in read] == [1, 3, 5, OLD_HIGH_MARK + 1]
        assert await store.read_events(a, after=5, limit=10) == [new.stored]  # from the file
        assert (await store.read_events(a, after=OLD_HIGH_MARK, limit=10))[0] is new.stored
    finally:
        await store.close()
    with closing(sqlite3.connect(tmp_path / "relay.db")) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)


async def test_sqlite_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    """A file written by a newer schema is not opened (no downgrade): one clear StoreError."""
    path = tmp_path / "relay.db"
    store = await SqliteStore.open(path)
    await store.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        conn.commit()
    with pytest.raises(StoreError, match="schema 99, written by a newer release"):
        await SqliteStore.open(path)


async def test_sqlite_failed_upgrade_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """The upgrade is one transaction: when it fails midway the old tables stay untouched, and
    the next start upgrades them."""
    path = tmp_path / "relay.db"
    old = await write_old_sqlite(path)
    with closing(sqlite3.connect(path)) as conn:
        # A name the upgrade needs is taken: it fails after having changed things.
        conn.execute("CREATE TABLE events_v1 (x)")
        conn.commit()
    with pytest.raises(StoreError):
        await SqliteStore.open(path)
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT seq, id FROM events ORDER BY seq").fetchall()
        assert rows == list(zip(old.seqs, old.ids, strict=True))
        conn.execute("DROP TABLE events_v1")
        conn.commit()
    store = await SqliteStore.open(path)
    try:
        assert len(await store.read_events(old.accounts["a"], after=0, limit=10)) == 3
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_upgrade_drops_the_old_dedup_keys_and_refuses_a_newer_layout(
    redis_store_url: str,
) -> None:
    """After the upgrade no old-layout key is left and the layout is marked; a layout from a
    newer release is refused at open with one clear StoreError."""
    old = await write_old_redis(redis_store_url)
    store = await RedisStore.open(redis_store_url)
    prefix = store.prefix
    await store.close()
    raw = aioredis.Redis.from_url(redis_store_url.split("?", 1)[0], decode_responses=True)
    try:
        for account_id in old.accounts.values():
            acct = f"{prefix}{{acct:{account_id}}}"
            assert await raw.exists(f"{acct}:xon_ids", f"{acct}:xon_seqs") == 0
        assert await raw.get(f"{prefix}{{relay}}:schema") == "2"
        await raw.set(f"{prefix}{{relay}}:schema", "99")
        with pytest.raises(StoreError, match="layout 99, written by a newer release"):
            await RedisStore.open(redis_store_url)
    finally:
        await raw.aclose()
