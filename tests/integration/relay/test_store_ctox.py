"""Store contract for CTOX idempotency records, the status cache and account updates.

Runs on every backend (DESIGN principle 5): SQLite, and Redis under the ``redis`` marker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay_server.store import open_store
from relay_server.store.base import StatusItem, Store
from shared.link.frames import CommandResult

NOW = 1_800_000_000.0


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_store_url"))
    return f"sqlite:///{tmp_path / 'relay.db'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url)
    try:
        yield opened
    finally:
        await opened.close()


def result(status: int = 202, request_id: str = "r1") -> CommandResult:
    return CommandResult(
        request_id=request_id,
        status=status,
        content_type="application/json",
        body_b64="e30=",
        headers={"Retry-After": "3"},
    )


async def claim(store: Store, key: str = "k", *, now: float = NOW, digest: str = "h1") -> object:
    return await store.claim_command(
        "acc", key, request_hash=digest, now=now, claim_deadline=now + 15, expires_at=now + 100
    )


async def test_first_claim_wins_and_later_ones_see_it(store: Store) -> None:
    """claim_command stores a claim once; a second claim returns the pending record."""
    assert await claim(store) is None
    record = await store.claim_command(
        "acc", "k", request_hash="h2", now=NOW + 1, claim_deadline=NOW + 16, expires_at=NOW + 101
    )
    assert record is not None
    assert (record.request_hash, record.result, record.claim_deadline) == ("h1", None, NOW + 15)
    assert await claim(store, "other") is None


async def test_finished_result_is_returned_to_every_later_claim(store: Store) -> None:
    """finish_command stores the result; claims and gets return it unchanged."""
    await claim(store)
    stored = await store.finish_command(
        "acc", "k", request_hash="h1", result=result(), now=NOW + 1, expires_at=NOW + 500
    )
    assert (stored.result, stored.expires_at) == (result(), NOW + 500)
    again = await claim(store, now=NOW + 2)
    assert again is not None and again.result == result()
    got = await store.get_command("acc", "k", now=NOW + 2)
    assert got == stored


async def test_first_result_wins(store: Store) -> None:
    """A second finish_command keeps the first result."""
    await claim(store)
    await store.finish_command(
        "acc", "k", request_hash="h1", result=result(202), now=NOW, expires_at=NOW + 500
    )
    second = await store.finish_command(
        "acc", "k", request_hash="h1", result=result(502), now=NOW, expires_at=NOW + 900
    )
    assert second.result is not None and second.result.status == 202
    assert second.expires_at == NOW + 500


async def test_finish_without_claim_creates_the_record(store: Store) -> None:
    """finish_command on a missing key stores the result anyway."""
    stored = await store.finish_command(
        "acc", "k", request_hash="h1", result=result(), now=NOW, expires_at=NOW + 10
    )
    assert (stored.request_hash, stored.claimed_at, stored.result) == ("h1", NOW, result())


async def test_release_frees_only_unfinished_claims(store: Store) -> None:
    """release_command deletes a pending claim but never a stored result."""
    await claim(store)
    await store.release_command("acc", "k")
    assert await store.get_command("acc", "k", now=NOW) is None
    assert await claim(store) is None
    await store.finish_command(
        "acc", "k", request_hash="h1", result=result(), now=NOW, expires_at=NOW + 10
    )
    await store.release_command("acc", "k")
    assert await store.get_command("acc", "k", now=NOW) is not None


async def test_expired_records_are_forgotten_and_purged(store: Store) -> None:
    """Past expires_at a record is absent for get and claim; purge deletes it."""
    await claim(store)
    await claim(store, "keep", now=NOW + 50)
    assert await store.get_command("acc", "k", now=NOW + 100) is None
    assert await claim(store, now=NOW + 100, digest="h9") is None
    assert await store.purge_commands(now=NOW + 149) == 0
    assert await store.purge_commands(now=NOW + 200) == 2
    assert await store.get_command("acc", "keep", now=NOW) is None


async def test_records_are_per_account(store: Store) -> None:
    """The same key in two accounts is two records."""
    assert await claim(store) is None
    assert (
        await store.claim_command(
            "acc2", "k", request_hash="h1", now=NOW, claim_deadline=NOW, expires_at=NOW + 9
        )
        is None
    )


def item(key: str, seq: int, count: str, account: str = "acc") -> StatusItem:
    return StatusItem(
        account_id=account,
        key=key,
        type="messages.waiting",
        ids={"mailbox": key[-3:]},
        params={"mailbox": key[-3:], "count": count},
        event_id=f"ev{seq}",
        seq=seq,
        received_at="2026-11-26T10:00:00.000Z",
    )


async def test_newer_status_replaces_older(store: Store) -> None:
    """put_status keeps the item with the highest seq and says whether it stored."""
    assert await store.put_status(item("m?mailbox=201", 5, "1"))
    assert await store.put_status(item("m?mailbox=201", 7, "2"))
    assert not await store.put_status(item("m?mailbox=201", 6, "9"))
    assert not await store.put_status(item("m?mailbox=201", 7, "9"))
    assert await store.status_snapshot("acc") == [item("m?mailbox=201", 7, "2")]


async def test_snapshot_lists_one_accounts_items_by_key(store: Store) -> None:
    """status_snapshot returns the account's items, ordered by key, and only them."""
    for value in (item("m?mailbox=202", 2, "1"), item("m?mailbox=201", 3, "1")):
        await store.put_status(value)
    await store.put_status(item("m?mailbox=200", 4, "1", account="other"))
    assert [i.key for i in await store.status_snapshot("acc")] == [
        "m?mailbox=201",
        "m?mailbox=202",
    ]
    assert await store.status_snapshot("nobody") == []


async def test_update_account_changes_only_given_fields(store: Store) -> None:
    """update_account sets the URL and/or key; None leaves a field as it was."""
    account = await store.create_account(
        name="acme", ingress_key_hash="h", xon_api_url="http://a", xon_api_key="k1"
    )
    updated = await store.update_account(account.id, xon_api_url="http://b")
    assert updated is not None
    assert (updated.xon_api_url, updated.xon_api_key) == ("http://b", "k1")
    updated = await store.update_account(account.id, xon_api_key="k2")
    assert updated is not None and (updated.xon_api_url, updated.xon_api_key) == ("http://b", "k2")
    assert await store.get_account("acme") == updated
    assert await store.update_account("acc_missing", xon_api_key="x") is None
