"""Retention: trim each account's event log by age and size (docs/redis.md, Retention).

DESIGN principle 1 says nothing acknowledged is lost; retention keeps that promise by never
dropping an event an agent of the account has not acked, with one exception an operator sets:

* **soft limits** (``retention.max_age``, ``retention.max_events``, ``retention.max_bytes``):
  events beyond them go only once every enrolled, unrevoked agent of the account acked them
  (the minimum cursor);
* **hard limits** (``retention.hard_max_age``, ``retention.hard_max_events``): events beyond
  them go regardless, so that one agent offline for months cannot grow the store forever. An
  agent whose position they pass is told explicitly: its next ``welcome`` carries
  ``trimmed_through`` (a connected one is first closed with 4012 ``behind_retention``), see
  docs/protocol.md.

The newest event of an account always stays (it holds the log's head). Each pass drops at most
``retention.batch`` events per account, so a pass's work on the store is bounded. Several
instances may run passes at once: trimming is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.config import RetentionConfig
from shared.errors import StoreError

from .store.base import Store

__all__ = ["trim_account", "trim_all", "running_retention"]

log = logging.getLogger(__name__)


async def trim_account(
    store: Store, account_id: str, config: RetentionConfig, *, now: float
) -> int:
    """One retention step for one account; returns how many events were dropped."""
    agents = [
        agent
        for agent in await store.list_agents(account_id)
        if agent.public_key is not None and not agent.revoked
    ]
    head = await store.head_seq(account_id)
    # An agent never seen yet holds everything from seq 1 on (cursor 0).
    cursors = [await store.get_cursor(agent.id) for agent in agents]
    acked_by_all = min(cursors, default=head)
    soft = await store.retention_cut(
        account_id,
        keep_events=config.max_events,
        keep_since=None if config.max_age is None else now - config.max_age,
    )
    if config.max_bytes is not None:
        soft = max(soft, await _bytes_cut(store, account_id, config.max_bytes))
    hard = 0
    if config.hard_max_events is not None or config.hard_max_age is not None:
        hard = await store.retention_cut(
            account_id,
            keep_events=config.hard_max_events,
            keep_since=None if config.hard_max_age is None else now - config.hard_max_age,
        )
    through = max(min(soft, acked_by_all), hard)
    if through <= 0:
        return 0
    dropped = await store.trim_events(account_id, through=through, limit=config.batch)
    if dropped:
        log.info(
            "retention.trimmed",
            extra={
                "account": account_id,
                "events": dropped,
                "through": through,
                "past_unacked": hard > acked_by_all,
            },
        )
    return dropped


async def _bytes_cut(store: Store, account_id: str, max_bytes: int) -> int:
    """The highest seq to drop so the account's log fits ``max_bytes``, 0 when it fits.

    Counted in events of the account's average stored size: a pass may drop a little less
    than needed (older events larger than the average), and the next pass takes the rest.
    """
    usage = await store.account_usage(account_id)
    if usage.bytes <= max_bytes or usage.events < 1:
        return 0
    excess = math.ceil((usage.bytes - max_bytes) * usage.events / usage.bytes)
    keep = max(1, usage.events - excess)
    return await store.retention_cut(account_id, keep_events=keep, keep_since=None)


async def trim_all(store: Store, config: RetentionConfig, *, now: float) -> int:
    """One retention pass over every account; returns how many events were dropped."""
    dropped = 0
    for account in await store.list_accounts():
        dropped += await trim_account(store, account.id, config, now=now)
    return dropped


@asynccontextmanager
async def running_retention(store: Store, config: RetentionConfig) -> AsyncIterator[None]:
    """Run a retention pass every ``config.interval`` seconds while the block runs."""
    if config.interval is None:
        yield
        return
    task = asyncio.create_task(_loop(store, config, config.interval), name="retention")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def _loop(store: Store, config: RetentionConfig, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await trim_all(store, config, now=time.time())
        except StoreError as exc:
            log.warning("retention.failed", extra={"error": str(exc)})
