"""The shared Redis store, for several relay instances behind a load balancer.

DESIGN principle 5 / §Storage: streams and hashes on one Redis, the same contract as SQLite.
The layout (``P`` is the key prefix, ``xon:`` by default)::

    P{relay}:relay_id              string   this relay's identity, shared by all instances
    P{relay}:account_names         hash     account name -> account id
    P{relay}:ingress               hash     ingress key hash -> account id
    P{relay}:accounts              zset     account ids, scored by created_at
    P{relay}:agent_account         hash     agent id -> account id
    P{relay}:agents                zset     agent ids, scored by created_at
    P{relay}:code:<code_hash>      string   "<agent id> <account id> <expires_at>", TTL = expiry
    P{acct:<id>}:account           hash     the AccountRecord fields
    P{acct:<id>}:agents            zset     the account's agent ids, scored by created_at
    P{acct:<id>}:agent:<agent id>  hash     the AgentRecord fields, plus cursor, code_hash,
                                            link_epoch and link_owner (docs/scaling.md),
                                            replay_after (docs/operations.md, Replay)
    P{acct:<id>}:seq               string   last seq given out in this account's log
    P{acct:<id>}:events            stream   entry id "<seq>-0", fields seq, event (JSON)
    P{relay}:schema                string   layout version of this data (docs/deployment.md)
    P{acct:<id>}:dedup             hash     "<digest> <X-on id>" -> seq (docs/delivery.md)
    P{acct:<id>}:dedup_seqs        zset     the dedup fields scored by seq (retention drops them)
    P{acct:<id>}:dedup_ids         hash     X-on id -> newest seq stored with it
    P{acct:<id>}:trimmed           string   highest seq retention dropped from the stream
    P{acct:<id>}:cmd:<key>         hash     CTOX idempotency record, TTL = expiry + a margin
    P{acct:<id>}:commands          zset     the account's command keys, scored by expires_at
    P{relay}:command_accounts      set      accounts that have command records (for purging)
    P{acct:<id>}:status            hash     status item key -> StatusItem JSON
    P{acct:<id>}:status_seq        hash     status item key -> seq of the stored value
    P{relay}:ready_probe           string   readiness' probe write after a failed append (TTL)

Everything about one account shares the hash tag ``{acct:<id>}``, so a Redis Cluster keeps it in
one slot and every hot-path step (append, read, cursor) is a single-slot command or Lua script.
Global lookups share the tag ``{relay}``. Admin writes that touch both are split into single-slot
steps, ordered so a failure between them leaves only an inert record (a pointer to nothing, or a
record nothing points to), never a half-visible one.

Events: the stream entry id is ``<seq>-0``, so ``XRANGE key (<after>-0 + COUNT n`` reads by seq.
One Lua script per append reads the dedup hash, assigns ``seq`` (last + 1), XADDs and records the
X-on id with its digest: all or nothing, so seq is strictly increasing per account, never reused,
and a repeat returns the first copy (docs/delivery.md, Duplicates).
Concurrent appends are sent in one pipeline by a single writer task; each caller's coroutine
returns only after Redis answered its script.

The writer task serves every tenant (docs/operations.md, Readiness): a pipeline that fails, in
any way, fails its own appends and the next one is sent; readiness fails while the last one
failed (a probe write in :meth:`RedisStore.ping` clears it once Redis takes writes again).
Only a bug that escapes the writer's own loop stops it for good, logged once with its
traceback; every call raises ``StoreError`` from then on and :meth:`RedisStore.wait_failed`
returns, so the process can exit and be restarted.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from shared.errors import ApiError, ConfigError, StoreError
from shared.events import XonEvent, XonId, parse_time
from shared.link.frames import CommandResult
from shared.redis_url import DEFAULT_PREFIX, RedisTarget, parse_redis_url

from .base import (
    AccountRecord,
    AccountUsage,
    AgentRecord,
    AppendResult,
    CommandRecord,
    LinkCheck,
    LinkClaim,
    QuotaExceeded,
    StatusItem,
    StoredEvent,
    check_int,
    result_from_json,
    result_to_json,
    stored_xon_id,
)

__all__ = ["RedisStore", "DEFAULT_PREFIX"]

log = logging.getLogger(__name__)

RedisClient = aioredis.Redis | RedisCluster
"""One server or a Sentinel-managed primary (``Redis``), or a Cluster."""

P = ParamSpec("P")
T = TypeVar("T")

_ENTRY_OVERHEAD = 64
"""Bytes counted per stored event besides its JSON (stream entry, seq field, roughly)."""

SCHEMA_VERSION = 2
"""``P{relay}:schema`` of this layout. 1 (no such key): the layout before request digests,
whose dedup hash ``xon_ids`` (X-on id -> seq) and zset ``xon_seqs`` are upgraded at open."""
_OLD_DEDUP = ("xon_ids", "xon_seqs")
_UPGRADE_CHUNK = 500

# KEYS: seq counter, events stream, dedup hash, dedup fields by seq, X-on id -> newest seq,
# usage hash (events, bytes) (one account's slot). ARGV: dedup field "<digest> <X-on id>" ('' =
# no X-on id), the X-on id, event JSON, the account's byte quota ('' = none). Returns {1, seq,
# 1 if the X-on id was seen with another request else 0} when stored, {0, first seq, first
# event JSON} for a repeat, {2, bytes used, this event's bytes} when the quota refuses it
# (docs/redis.md, Quotas). seq is computed first and written after the XADD, so a failed XADD
# consumes no seq.
_APPEND = """
local reused = 0
if ARGV[1] ~= '' then
  local first = redis.call('HGET', KEYS[3], ARGV[1])
  if first then
    local entry = redis.call('XRANGE', KEYS[2], first .. '-0', first .. '-0')[1]
    if entry then
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'event' then return {0, tonumber(first), fields[i + 1]} end
      end
    end
    return {0, tonumber(first)}
  end
  reused = redis.call('HEXISTS', KEYS[5], ARGV[2])
end
local size = string.len(ARGV[3]) + {_ENTRY_OVERHEAD}
if ARGV[4] ~= '' then
  local used = tonumber(redis.call('HGET', KEYS[6], 'bytes') or '0')
  if used + size > tonumber(ARGV[4]) then return {2, used, size} end
end
local seq = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
redis.call('XADD', KEYS[2], seq .. '-0', 'seq', seq, 'event', ARGV[3])
redis.call('SET', KEYS[1], seq)
redis.call('HINCRBY', KEYS[6], 'events', 1)
redis.call('HINCRBY', KEYS[6], 'bytes', size)
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], seq)
  redis.call('ZADD', KEYS[4], seq, ARGV[1])
  redis.call('HSET', KEYS[5], ARGV[2], seq)
end
return {1, seq, reused}
""".replace("{_ENTRY_OVERHEAD}", str(_ENTRY_OVERHEAD))

# The upgrade of one account's dedup entries from the layout before request digests (docs/
# deployment.md, Upgrading). KEYS: old hash (X-on id -> seq), old zset, dedup hash, dedup
# fields by seq, X-on id -> newest seq. ARGV: triples (X-on id, seq, new field; '' = its
# event is gone). An entry moves only while it still holds that seq, so instances upgrading
# at once agree. The old keys go when empty.
_UPGRADE_DEDUP = """
for i = 1, #ARGV, 3 do
  local id, seq, field = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HGET', KEYS[1], id) == seq then
    if field ~= '' then
      redis.call('HSET', KEYS[3], field, seq)
      redis.call('ZADD', KEYS[4], seq, field)
      local newest = redis.call('HGET', KEYS[5], id)
      if not newest or tonumber(newest) < tonumber(seq) then
        redis.call('HSET', KEYS[5], id, seq)
      end
    end
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
return 0
"""

# KEYS: account names, ingress, accounts zset (global slot). ARGV: name, id, key hash, created.
_INDEX_ACCOUNT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return 1
"""

# KEYS: account record, account's agents zset, agent hash. ARGV: agent id, created, then the
# agent hash's field/value pairs. An agent only joins an existing account.
_CREATE_AGENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: agent hash. ARGV: code hash, public key, now. The code must still be the agent's own
# (revocation removes it) and the agent not yet enrolled.
_ENROLL = """
if redis.call('HGET', KEYS[1], 'code_hash') ~= ARGV[1] then return false end
if redis.call('HEXISTS', KEYS[1], 'public_key') == 1 then return false end
if redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then return false end
redis.call('HSET', KEYS[1], 'public_key', ARGV[2], 'enrolled_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'code_hash')
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: agent hash. ARGV: now. Returns {spent code hash or '', agent fields}.
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1])
local code = redis.call('HGET', KEYS[1], 'code_hash') or ''
redis.call('HDEL', KEYS[1], 'code_hash')
return {code, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: account record. ARGV: field/value pairs to set (may be none). Returns the record.
_UPDATE_ACCOUNT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return redis.call('HGETALL', KEYS[1])
"""

# CTOX records. KEYS: command record, the account's command index, the claim's lease. Times
# compare with the caller's ``now`` (docs/ctox.md); the Redis TTL is only a backstop for records
# nothing purges. ARGV: request hash, now, claim deadline, expires_at, ttl ms, key. An unexpired
# record wins. A new claim also sets the lease to expire, by Redis's clock, after the claim's
# duration (deadline - now): whether a claim is overdue never depends on which instance's
# clock reads it (docs/scaling.md, Clocks).
_CLAIM_COMMAND = """
local expires = redis.call('HGET', KEYS[1], 'expires_at')
if expires and tonumber(expires) > tonumber(ARGV[2]) then
  return redis.call('HGETALL', KEYS[1])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'request_hash', ARGV[1], 'claimed_at', ARGV[2],
  'claim_deadline', ARGV[3], 'expires_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
local lease = math.floor((tonumber(ARGV[3]) - tonumber(ARGV[2])) * 1000)
redis.call('SET', KEYS[3], ARGV[1], 'PX', math.max(lease, 1))
return false
"""

# ARGV: request hash, result JSON, now, expires_at, ttl ms, key. The first result wins.
_FINISH_COMMAND = """
local expires = redis.call('HGET', KEYS[1], 'expires_at')
if expires and tonumber(expires) > tonumber(ARGV[3]) then
  if redis.call('HEXISTS', KEYS[1], 'result') == 1 then return redis.call('HGETALL', KEYS[1]) end
  redis.call('HSET', KEYS[1], 'result', ARGV[2], 'expires_at', ARGV[4])
else
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'request_hash', ARGV[1], 'claimed_at', ARGV[3],
    'claim_deadline', ARGV[3], 'expires_at', ARGV[4], 'result', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
return redis.call('HGETALL', KEYS[1])
"""

# ARGV: key. Only an unfinished claim is released.
_RELEASE_COMMAND = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'result') == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 0
"""

# KEYS: the account's command index, then one record per candidate. ARGV: now, then the
# candidates' keys. Re-checks each record (it may have been claimed afresh since it was listed);
# a record already gone (its TTL fired) counts as purged. Returns how many went.
_PURGE_COMMANDS = """
local now = tonumber(ARGV[1])
local purged = 0
for i = 2, #KEYS do
  local expires = redis.call('HGET', KEYS[i], 'expires_at')
  if not expires or tonumber(expires) <= now then
    redis.call('DEL', KEYS[i])
    purged = purged + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return purged
"""

# KEYS: status JSON hash, status seq hash. ARGV: item key, seq, item JSON. Newer seq wins.
_PUT_STATUS = """
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current and tonumber(current) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: a record hash. ARGV: field, value. Updates never resurrect a missing record.
# KEYS: account names (global slot). ARGV: old name, new name, account id. 0: name taken.
_RENAME_ACCOUNT = """
local owner = redis.call('HGET', KEYS[1], ARGV[2])
if owner and owner ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if ARGV[1] ~= ARGV[2] and redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[3] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""

# KEYS: ingress, previous ingress keys (global slot). ARGV: old hash, new hash, account id,
# old key's deadline, now. Previous keys map to "<account id> <deadline>"; expired ones go.
_ROTATE_INGRESS = """
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[3] then redis.call('HDEL', KEYS[1], ARGV[1]) end
local previous = redis.call('HGETALL', KEYS[2])
for i = 1, #previous, 2 do
  local deadline = tonumber(string.match(previous[i + 1], ' (%S+)$'))
  if deadline <= tonumber(ARGV[5]) then redis.call('HDEL', KEYS[2], previous[i]) end
end
if tonumber(ARGV[4]) > tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. ' ' .. ARGV[4])
end
return 1
"""

_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""


# KEYS: agent hash. ARGV: owner. Returns {new epoch, previous owner or ''}; false: no agent.
_CLAIM_LINK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local previous = redis.call('HGET', KEYS[1], 'link_owner') or ''
local epoch = redis.call('HINCRBY', KEYS[1], 'link_epoch', 1)
redis.call('HSET', KEYS[1], 'link_owner', ARGV[1])
return {epoch, previous}
"""

# KEYS: agent hash. ARGV: epoch. Only the current link's end clears the owner.
_RELEASE_LINK = """
if redis.call('HGET', KEYS[1], 'link_epoch') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'link_owner', '')
end
return 0
"""

# KEYS: agent hash. ARGV: the replay point a link read, the point it got the agent to ('':
# done). Compare and set in one step (Store.settle_replay).
_SETTLE_REPLAY = """
local now = redis.call('HGET', KEYS[1], 'replay_after')
if not now then return 0 end
if ARGV[2] == '' then
  if now == ARGV[1] then redis.call('HDEL', KEYS[1], 'replay_after') end
elseif now == ARGV[1] or tonumber(ARGV[2]) < tonumber(now) then
  redis.call('HSET', KEYS[1], 'replay_after', ARGV[2])
end
return 0
"""

# KEYS: events stream, dedup hash, dedup fields by seq, trimmed-through counter, X-on id ->
# newest seq, usage hash (the append script's counters, taken back). ARGV: through, limit.
# Seqs of one account are contiguous (the append script), so the oldest ``limit`` entries end
# at first + limit - 1. The newest entry always stays: it holds the head. An X-on id leaves
# the newest-seq hash once its newest event is gone.
_TRIM = """
local head = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if not head then return 0 end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local head_seq = tonumber(string.match(head[1], '^%d+'))
local first_seq = tonumber(string.match(first[1], '^%d+'))
local through = math.min(tonumber(ARGV[1]), head_seq - 1, first_seq + tonumber(ARGV[2]) - 1)
if through < first_seq then return 0 end
local gone = redis.call('XRANGE', KEYS[1], '-', through .. '-0')
local size = 0
for i = 1, #gone do
  local fields = gone[i][2]
  for j = 1, #fields, 2 do
    if fields[j] == 'event' then size = size + string.len(fields[j + 1]) + {_ENTRY_OVERHEAD} end
  end
end
local dropped = redis.call('XTRIM', KEYS[1], 'MINID', (through + 1) .. '-0')
-- What the appends added for these entries (never below 0: a log kept before the counters
-- existed holds more than they counted).
local left = tonumber(redis.call('HGET', KEYS[6], 'bytes') or '0') - size
local count = tonumber(redis.call('HGET', KEYS[6], 'events') or '0') - dropped
redis.call('HSET', KEYS[6], 'bytes', math.max(left, 0), 'events', math.max(count, 0))
local fields = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', through)
for i = 1, #fields do
  redis.call('HDEL', KEYS[2], fields[i])
  local id = string.match(fields[i], '^%S+ (.*)$')
  local newest = redis.call('HGET', KEYS[5], id)
  if newest and tonumber(newest) <= through then redis.call('HDEL', KEYS[5], id) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', through)
if through > tonumber(redis.call('GET', KEYS[4]) or '0') then
  redis.call('SET', KEYS[4], through)
end
return dropped
""".replace("{_ENTRY_OVERHEAD}", str(_ENTRY_OVERHEAD))


def _finish_uncancelled(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Run the store call in its own task, shielded from the caller's cancellation.

    redis-py (8.1 on Python 3.11) can lose a cancellation that lands while a command is in
    flight, leaving the cancelled task hung on the socket; the relay cancels its senders on
    every disconnect and shutdown. Shielded, the command always completes (bounded by the
    socket timeout) while the caller is cancelled at once.
    """

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.ensure_future(method(*args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Nobody awaits the orphan now: retrieve its outcome so none is reported as lost.
            task.add_done_callback(_discard_outcome)
            raise

    return call


def _discard_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass(slots=True)
class _Pending:
    event: XonEvent
    xon_id: XonId | None
    done: asyncio.Future[AppendResult]
    max_bytes: int | None = None


class RedisStore:
    """:class:`~relay_server.store.base.Store` on a shared Redis (streams and hashes).

    Open it with :meth:`open`; ``pipeline_count`` counts append pipelines (tests, metrics).
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        address: str,
        prefix: str = DEFAULT_PREFIX,
        batch_size: int = 256,
        queue_size: int = 4096,
        wait_replicas: int = 0,
        wait_aof: bool = False,
        wait_timeout: float = 1.0,
    ) -> None:
        self._r = client
        self.address = address
        """``redis://host:port/db`` (or the sentinels or cluster nodes), safe to print (never
        the password)."""
        self.prefix = prefix
        self._batch_size = batch_size
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._append_error: StoreError | None = None
        """Why the last append pipeline failed; ``None`` once one succeeded (readiness)."""
        self._failed_appends = 0
        self._failure: StoreError | None = None
        """Set when the writer cannot go on: every call raises it from then on."""
        self._failed = asyncio.Event()
        self._agent_accounts: dict[str, str] = {}
        """agent id -> account id; an agent never changes account, so this never goes stale."""
        self._append = client.register_script(_APPEND)
        self._index_account = client.register_script(_INDEX_ACCOUNT)
        self._create_agent = client.register_script(_CREATE_AGENT)
        self._enroll = client.register_script(_ENROLL)
        self._revoke = client.register_script(_REVOKE)
        self._set_if_exists = client.register_script(_SET_IF_EXISTS)
        self._update_account = client.register_script(_UPDATE_ACCOUNT)
        self._claim_command = client.register_script(_CLAIM_COMMAND)
        self._finish_command = client.register_script(_FINISH_COMMAND)
        self._release_command = client.register_script(_RELEASE_COMMAND)
        self._purge_commands = client.register_script(_PURGE_COMMANDS)
        self._put_status = client.register_script(_PUT_STATUS)
        self._claim_link = client.register_script(_CLAIM_LINK)
        self._release_link = client.register_script(_RELEASE_LINK)
        self._settle_replay = client.register_script(_SETTLE_REPLAY)
        self._trim = client.register_script(_TRIM)
        self._upgrade_dedup_script = client.register_script(_UPGRADE_DEDUP)
        self._rename_account = client.register_script(_RENAME_ACCOUNT)
        self._rotate_ingress = client.register_script(_ROTATE_INGRESS)
        self._wait_replicas = wait_replicas
        self._wait_aof = wait_aof
        self._wait_ms = max(1, int(wait_timeout * 1000))
        self.pipeline_count = 0
        """Append pipelines Redis answered so far."""
        self._sentinel: Sentinel | None = None
        """The sentinels behind ``client`` (a ``redis+sentinel`` URL), closed with it."""

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        prefix: str | None = None,
        socket_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        **kwargs: Any,
    ) -> RedisStore:
        """Connect to ``redis://[:password@]host:port/db[?prefix=P]`` and ping it.

        ``prefix`` (argument, else the URL's ``prefix`` query parameter, else ``xon:``) starts
        every key, so several relays or test runs can share one database.

        Raises:
            StoreError: the URL is malformed or the server does not answer; the message names
                the address, never the password.
        """
        try:
            target = parse_redis_url(url)
        except ConfigError as exc:
            raise StoreError(str(exc)) from None
        address = target.address
        key_prefix = prefix if prefix is not None else target.prefix
        if "{" in key_prefix or "}" in key_prefix:
            raise StoreError("redis key prefix must not contain { or } (they mark hash tags)")
        if target.kind == "cluster" and (kwargs.get("wait_replicas") or kwargs.get("wait_aof")):
            # WAIT/WAITAOF count the replicas of the connection that wrote; a cluster pipeline
            # spreads an append batch over several primaries (docs/redis.md, Cluster).
            raise StoreError(
                "redis_wait_replicas and redis_wait_aof are not supported on a Redis Cluster"
                " store; use redis+sentinel:// for acknowledged replication"
            )
        try:
            client, sentinel = _client(url, target, socket_timeout, connect_timeout)
        except (ValueError, RedisError) as exc:
            raise StoreError(f"invalid redis URL for {address}: {exc}") from None
        store = cls(client, address=address, prefix=key_prefix, **kwargs)
        store._sentinel = sentinel
        try:
            await store.ping()
        except StoreError as exc:
            await store._disconnect()
            raise StoreError(f"cannot reach redis at {address}: {exc.__cause__}") from exc
        try:
            if store.is_cluster:
                await store._load_scripts()
            if store._wait_aof:
                await store._check_waitaof()
            await store._upgrade()
        except StoreError:
            await store._disconnect()
            raise
        store._writer = asyncio.create_task(store._write_loop(), name="redis-store-writer")
        log.info("store.opened", extra={"backend": "redis", "address": address})
        return store

    # -- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _calls(self) -> Iterator[None]:
        """Translate Redis failures into ``StoreError`` (ingress answers 503)."""
        if self._failure is not None:
            raise _as_store_error(self._failure, self.address)
        if self._closed:
            raise StoreError("store is closed")
        try:
            yield
        except (RedisError, RedisClusterException, OSError) as exc:
            # RedisClusterException (no node reachable, slot not covered) is not a RedisError.
            raise StoreError(f"redis at {self.address}: {exc}") from exc

    def _global(self, name: str) -> str:
        return f"{self.prefix}{{relay}}:{name}"

    def _acct(self, account_id: str, name: str) -> str:
        return f"{self.prefix}{{acct:{account_id}}}:{name}"

    def _agent_key(self, account_id: str, agent_id: str) -> str:
        return self._acct(account_id, f"agent:{agent_id}")

    async def close(self) -> None:
        """Send what is queued, then disconnect. Idempotent."""
        if self._closed:
            return
        self._closing = True
        if self._writer is not None and not self._writer.done():
            await self._queue.join()
            self._writer.cancel()  # now idle in queue.get()
            await asyncio.gather(self._writer, return_exceptions=True)
        self._closed = True
        await self._disconnect()

    async def _disconnect(self) -> None:
        await self._r.aclose()
        if self._sentinel is not None:  # its own connections to the sentinels
            for client in self._sentinel.sentinels:
                await client.aclose()

    @property
    def client(self) -> RedisClient:
        """The connection pool, for the instances' notification bus (relay_server/bus.py)."""
        return self._r

    @property
    def is_cluster(self) -> bool:
        """A Redis Cluster: the bus uses sharded pub/sub (relay_server/bus.py)."""
        return isinstance(self._r, RedisCluster)

    def channel(self, name: str) -> str:
        """A pub/sub channel name under this store's prefix and the ``{relay}`` tag."""
        return self._global(name)

    async def _load_scripts(self) -> None:
        """SCRIPT LOAD every script on every primary: redis-py loads a plain pipeline's
        scripts before it runs, never a cluster pipeline's (see also :meth:`_send_appends`)."""
        with self._calls():
            for value in vars(self).values():
                if isinstance(value, AsyncScript):
                    await self._r.script_load(value.script)

    async def _check_waitaof(self) -> None:
        """Refuse ``redis_wait_aof`` before the first append when the server lacks WAITAOF."""
        with self._calls():
            info = await self._r.info("server")
        version = str(info.get("redis_version", "0"))
        numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
        if numbers < (7, 2):
            raise StoreError(
                f"cluster.redis_wait_aof needs Redis 7.2 or newer; {self.address} runs {version}"
            )

    async def _upgrade(self) -> None:
        """Bring data of an older layout up to :data:`SCHEMA_VERSION` (docs/deployment.md,
        Upgrading). Every step may run twice or in several instances at once."""
        key = self._global("schema")
        with self._calls():
            found = await self._r.get(key)
            if found is not None and not str(found).isdigit():
                raise StoreError(f"redis at {self.address} holds an unreadable layout {found!r}")
            version = 1 if found is None else int(found)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"redis at {self.address} holds layout {version}, written by a newer"
                    f" release; this one reads layout {SCHEMA_VERSION}"
                )
            if version == SCHEMA_VERSION:
                return
            accounts = _texts(await self._r.zrange(self._global("accounts"), 0, -1))
            for account_id in accounts:
                await self._upgrade_dedup(account_id)
            await self._r.set(key, str(SCHEMA_VERSION))
        if accounts:
            log.info("store.upgraded", extra={"backend": "redis", "accounts": len(accounts)})

    async def _upgrade_dedup(self, account_id: str) -> None:
        """Give each old dedup entry of the account the digest of its own stored request (or
        the envelope marker), so only a true repeat matches it (docs/delivery.md)."""
        old_ids, _ = (self._acct(account_id, name) for name in _OLD_DEDUP)
        events = self._acct(account_id, "events")
        keys = [
            *(self._acct(account_id, name) for name in _OLD_DEDUP),
            self._acct(account_id, "dedup"),
            self._acct(account_id, "dedup_seqs"),
            self._acct(account_id, "dedup_ids"),
        ]
        cursor = 0
        while True:  # HSCAN ends with cursor 0; the hash only shrinks meanwhile
            cursor, chunk = await self._r.hscan(old_ids, cursor, count=_UPGRADE_CHUNK)
            entries = list(_pairs(chunk).items())
            if entries:
                async with self._r.pipeline(transaction=False) as pipe:
                    for _, seq in entries:
                        pipe.xrange(events, min=f"{seq}-0", max=f"{seq}-0")
                    found = await pipe.execute()
                args: list[str] = []
                for (xon_id, seq), rows in zip(entries, found, strict=True):
                    field = ""
                    try:
                        if rows:
                            request = _stored(*rows[0]).event.request
                            field = stored_xon_id(xon_id, request).key
                    except ValueError:
                        # No reader can decode it, so no retry could be matched against it.
                        log.warning(
                            "store.upgrade_dropped_dedup",
                            extra={"account": account_id, "seq": seq},
                        )
                    args += [xon_id, seq, field]
                await self._upgrade_dedup_script(keys=keys, args=args)
            if int(cursor) == 0:
                break
        await self._upgrade_dedup_script(keys=keys, args=[])

    @_finish_uncancelled
    async def ping(self) -> None:
        if self._failure is not None:
            raise _as_store_error(self._failure, self.address)
        # open() pings before it starts the writer.
        if self._closing or (self._writer is not None and self._writer.done()):
            raise StoreError("store is closed")
        if self._append_error is None:
            with self._calls():
                await self._r.ping()
            return
        # The last append failed: only a write, as durable as an append's, shows that one
        # can succeed now (Redis out of memory, replicas gone), traffic or not.
        with self._calls():
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.set(self._global("ready_probe"), repr(time.time()), px=60_000)
                self._wait_durable(pipe)
                replies = list(await pipe.execute(raise_on_error=False))
        if isinstance(replies[0], BaseException):
            raise _as_store_error(replies[0], self.address)
        shortfall = self._durability_shortfall(replies[1:])
        if shortfall:
            raise StoreError(f"redis at {self.address}: {shortfall}")
        self._append_succeeded()

    async def wait_failed(self) -> BaseException:
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    @_finish_uncancelled
    async def relay_id(self) -> str:
        key = self._global("relay_id")
        with self._calls():
            # SET NX: the first instance to ask makes the id; every other one reads it.
            await self._r.set(key, "rly_" + secrets.token_urlsafe(12), nx=True)
            value = await self._r.get(key)
        if value is None:  # pragma: no cover - deleted between the two calls
            raise StoreError("relay id vanished from redis")
        return str(value)

    # -- accounts ------------------------------------------------------------------------------

    @_finish_uncancelled
    async def create_account(
        self, *, name: str, ingress_key_hash: str, xon_api_url: str = "", xon_api_key: str = ""
    ) -> AccountRecord:
        record = AccountRecord(
            id="acc_" + secrets.token_urlsafe(9),
            name=name,
            created_at=time.time(),
            ingress_key_hash=ingress_key_hash,
            xon_api_url=xon_api_url,
            xon_api_key=xon_api_key,
        )
        record_key = self._acct(record.id, "account")
        with self._calls():
            # The record first: until the index script points to it, nothing can find it.
            await self._r.hset(record_key, items=_flatten(_account_fields(record)))
            indexed = await self._index_account(
                keys=[
                    self._global("account_names"),
                    self._global("ingress"),
                    self._global("accounts"),
                ],
                args=[name, record.id, ingress_key_hash, repr(record.created_at)],
            )
            if indexed != 1:
                await self._r.delete(record_key)
        if indexed == 0:
            raise ApiError(409, "account_exists", f"an account named {name!r} exists")
        if indexed != 1:
            raise StoreError("ingress key hash already belongs to another account")
        return record

    @_finish_uncancelled
    async def get_account(self, id_or_name: str) -> AccountRecord | None:
        with self._calls():
            record = await self._account(id_or_name)
            if record is not None:
                return record
            account_id = await self._r.hget(self._global("account_names"), id_or_name)
            return None if account_id is None else await self._account(_text(account_id))

    @_finish_uncancelled
    async def account_by_ingress_hash(self, key_hash: str) -> AccountRecord | None:
        with self._calls():
            account_id = await self._r.hget(self._global("ingress"), key_hash)
            if account_id is not None:
                record = await self._account(_text(account_id))
                # A pointer the record does not confirm is a rotation that did not finish.
                if record is not None and record.ingress_key_hash == key_hash:
                    return record
            previous = await self._r.hget(self._global("ingress_previous"), key_hash)
            if previous is None:
                return None
            owner, deadline = _text(previous).rsplit(" ", 1)
            if float(deadline) <= time.time():
                return None
            found = await self._account(owner)
        return None if found is None else replace(found, ingress_key_hash=key_hash)

    @_finish_uncancelled
    async def list_accounts(self) -> list[AccountRecord]:
        with self._calls():
            # A zset orders equal scores by member, matching SQLite's ORDER BY created_at, id.
            ids = _texts(await self._r.zrange(self._global("accounts"), 0, -1))
            rows = await self._hgetall_many([self._acct(i, "account") for i in ids])
        return [_account(row) for row in rows if row]

    @_finish_uncancelled
    async def update_account(
        self, account_id: str, *, xon_api_url: str | None = None, xon_api_key: str | None = None
    ) -> AccountRecord | None:
        changes = {"xon_api_url": xon_api_url, "xon_api_key": xon_api_key}
        fields = {name: value for name, value in changes.items() if value is not None}
        with self._calls():
            row = await self._update_account(
                keys=[self._acct(account_id, "account")], args=_flatten(fields)
            )
        return _account(_pairs(row)) if row else None

    async def _account(self, account_id: str) -> AccountRecord | None:
        row = await self._r.hgetall(self._acct(account_id, "account"))
        return _account(_pairs(row)) if row else None

    async def _hgetall_many(self, keys: Sequence[str]) -> list[dict[str, str]]:
        if not keys:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            return [_pairs(row) for row in await pipe.execute()]

    # -- agents --------------------------------------------------------------------------------

    @_finish_uncancelled
    async def create_agent(
        self, *, account_id: str, name: str, code_hash: str, code_expires_at: float
    ) -> AgentRecord:
        record = AgentRecord(
            id="agt_" + secrets.token_urlsafe(9),
            account_id=account_id,
            name=name,
            created_at=time.time(),
        )
        fields = {**_agent_fields(record), "code_hash": code_hash, "cursor": "0"}
        code_value = f"{record.id} {account_id} {code_expires_at!r}"
        ttl_ms = max(1, int((code_expires_at - time.time()) * 1000))
        with self._calls():
            # Pointer first: it leads nowhere until the record exists.
            await self._r.hset(self._global("agent_account"), record.id, account_id)
            created = await self._create_agent(
                keys=[
                    self._acct(account_id, "account"),
                    self._acct(account_id, "agents"),
                    self._agent_key(account_id, record.id),
                ],
                args=[record.id, repr(record.created_at), *_flatten(fields)],
            )
            if created != 1:
                await self._r.hdel(self._global("agent_account"), record.id)
                raise StoreError(f"unknown account {account_id!r}")
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.zadd(self._global("agents"), {record.id: record.created_at})
                # The code lives exactly as long as it is valid (one-time, DESIGN §CLI agent add).
                pipe.set(self._global(f"code:{code_hash}"), code_value, px=ttl_ms)
                await pipe.execute()
        self._agent_accounts[record.id] = account_id
        return record

    @_finish_uncancelled
    async def enroll_agent(self, *, code_hash: str, public_key: str, now: float) -> AgentRecord:
        with self._calls():
            # GETDEL spends the code atomically: of racing requests exactly one gets it.
            value = await self._r.getdel(self._global(f"code:{code_hash}"))
            agent: AgentRecord | None = None
            if value is not None:
                agent_id, account_id, expires_at = str(value).split(" ")
                if float(expires_at) > now:
                    row = await self._enroll(
                        keys=[self._agent_key(account_id, agent_id)],
                        args=[code_hash, public_key, repr(now)],
                    )
                    agent = _agent(_pairs(row)) if row else None
        if agent is None:
            raise ApiError(400, "invalid_code", "enrollment code is invalid, used or expired")
        return agent

    @_finish_uncancelled
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        with self._calls():
            account_id = await self._account_of(agent_id)
            if account_id is None:
                return None
            row = await self._r.hgetall(self._agent_key(account_id, agent_id))
        return _agent(_pairs(row)) if row else None

    @_finish_uncancelled
    async def list_agents(self, account_id: str | None = None) -> list[AgentRecord]:
        with self._calls():
            if account_id is not None:
                ids = _texts(await self._r.zrange(self._acct(account_id, "agents"), 0, -1))
                keys = [self._agent_key(account_id, i) for i in ids]
            else:
                ids = _texts(await self._r.zrange(self._global("agents"), 0, -1))
                owners = await self._r.hmget(self._global("agent_account"), ids) if ids else []
                keys = [
                    self._agent_key(_text(owner), i)
                    for i, owner in zip(ids, owners, strict=True)
                    if owner is not None
                ]
            rows = await self._hgetall_many(keys)
        return [_agent(row) for row in rows if row]

    @_finish_uncancelled
    async def revoke_agent(self, agent_id: str, *, now: float) -> AgentRecord | None:
        with self._calls():
            account_id = await self._account_of(agent_id)
            if account_id is None:
                return None
            reply = await self._revoke(
                keys=[self._agent_key(account_id, agent_id)], args=[repr(now)]
            )
            if not reply:
                return None
            code_hash, row = reply
            # An unused enrollment code dies with the agent (the enroll script checks too).
            if code_hash:
                await self._r.delete(self._global(f"code:{code_hash}"))
        return _agent(_pairs(row))

    @_finish_uncancelled
    async def touch_agent(self, agent_id: str, *, now: float) -> None:
        await self._set_agent_field(agent_id, "last_seen", repr(now))

    async def _set_agent_field(self, agent_id: str, field: str, value: str) -> None:
        with self._calls():
            account_id = await self._account_of(agent_id)
            if account_id is not None:
                await self._set_if_exists(
                    keys=[self._agent_key(account_id, agent_id)], args=[field, value]
                )

    async def _account_of(self, agent_id: str) -> str | None:
        account_id = self._agent_accounts.get(agent_id)
        if account_id is None:
            found = await self._r.hget(self._global("agent_account"), agent_id)
            if found is None:
                return None
            account_id = self._agent_accounts[agent_id] = str(found)
        return account_id

    # -- events and cursors --------------------------------------------------------------------

    async def append_event(
        self, event: XonEvent, *, xon_id: XonId | None, max_bytes: int | None = None
    ) -> AppendResult:
        check_int("max_bytes", max_bytes)
        if self._failure is not None:
            raise _as_store_error(self._failure, self.address)
        if self._closing or self._writer is None or self._writer.done():
            raise StoreError("store is closed")
        done: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        # A bounded queue: when Redis falls behind, ingress handlers wait here.
        await self._queue.put(_Pending(event, xon_id, done, max_bytes))
        return await done

    async def _write_loop(self) -> None:
        """Send what is queued, batch after batch, until :meth:`close` cancels it.

        A failure of one pipeline is that batch's (:meth:`_send_batch`); anything escaping
        here is a bug in the writer itself, which then fails every later append.
        """
        try:
            while True:
                batch = [await self._queue.get()]
                try:
                    while len(batch) < self._batch_size and not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    await self._send_batch(batch)
                finally:
                    for _ in batch:
                        self._queue.task_done()
        except Exception as exc:
            self._fail(exc)
        while True:  # failed for good: answer whatever is queued, now and later
            pending = await self._queue.get()
            if not pending.done.done():
                pending.done.set_exception(StoreError(str(self._failure)))  # one per caller
            self._queue.task_done()

    async def _send_batch(self, batch: list[_Pending]) -> None:
        """Send one batch of appends and answer each caller; whatever fails, fails this batch
        (or one append of it) only."""
        try:
            replies = await self._send_appends(batch)
        except Exception as exc:
            replies = [self._append_failed(exc, len(batch))] * len(batch)
        else:
            if any(isinstance(reply, BaseException) for reply in replies):
                first = next(r for r in replies if isinstance(r, BaseException))
                self._append_failed(first, len(batch))
            else:
                self._append_succeeded()
        for pending, reply in zip(batch, replies, strict=True):
            if pending.done.done():  # the caller was cancelled
                continue
            if isinstance(reply, BaseException):
                pending.done.set_exception(_as_store_error(reply, self.address))
                continue
            try:
                result = _append_result(pending.event, reply, pending.max_bytes)
            except QuotaExceeded as exc:  # this tenant's refusal; the store is fine
                pending.done.set_exception(exc)
            except Exception as exc:  # a reply this version cannot read: this append's fault
                log.error("store.bad_reply", extra={"event_id": pending.event.id}, exc_info=exc)
                pending.done.set_exception(StoreError(f"redis at {self.address}: bad reply"))
            else:
                pending.done.set_result(result)

    def _append_succeeded(self) -> None:
        if self._failed_appends:
            log.info("store.append_recovered", extra={"failed_appends": self._failed_appends})
        self._append_error, self._failed_appends = None, 0

    def _append_failed(self, exc: BaseException, events: int) -> StoreError:
        """Note a failed append pipeline (readiness fails until one succeeds); logged once per
        run of failures. Returns the error for the batch's callers."""
        error = _as_store_error(exc, self.address)
        self._append_error = error
        self._failed_appends += 1
        if self._failed_appends == 1:
            # Redis errors are expected (a restart, memory); anything else is a bug here or in
            # redis-py, so its traceback is kept.
            expected = isinstance(exc, StoreError | RedisError | RedisClusterException | OSError)
            log.log(
                logging.WARNING if expected else logging.ERROR,
                "store.append_failed",
                extra={"events": events, "error": str(error)},
                exc_info=None if expected else exc,
            )
        return error

    def _fail(self, exc: BaseException) -> None:
        """The writer cannot go on: log the cause once with its traceback, fail readiness and
        every later call, and wake :meth:`wait_failed`."""
        self._failure = StoreError(
            f"redis at {self.address}: the store writer failed: {type(exc).__name__}: {exc}"
        )
        self._failure.__cause__ = exc
        log.critical("store.failed", extra={"error": str(self._failure)}, exc_info=exc)
        self._failed.set()

    async def _send_appends(self, batch: list[_Pending]) -> list[Any]:
        """One pipeline of append scripts; Redis runs them in order, each atomically."""
        replies = await self._append_pipeline(batch)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing and self.is_cluster:
            # redis-py loads a plain pipeline's scripts first, not a cluster pipeline's: a
            # node that lacks the script (new, or promoted) ran none of these appends, so they
            # are sent once more after SCRIPT LOAD on every primary, in their order.
            with self._calls():
                await self._r.script_load(_APPEND)
            again = await self._append_pipeline([batch[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _append_pipeline(self, batch: list[_Pending]) -> list[Any]:
        with self._calls():
            async with self._r.pipeline(transaction=False) as pipe:
                for pending in batch:
                    account = pending.event.account
                    await self._append(
                        keys=[
                            self._acct(account, "seq"),
                            self._acct(account, "events"),
                            self._acct(account, "dedup"),
                            self._acct(account, "dedup_seqs"),
                            self._acct(account, "dedup_ids"),
                            self._acct(account, "usage"),
                        ],
                        args=[
                            "" if pending.xon_id is None else pending.xon_id.key,
                            "" if pending.xon_id is None else pending.xon_id.value,
                            json.dumps(pending.event.to_json()),
                            "" if pending.max_bytes is None else str(pending.max_bytes),
                        ],
                        client=_queue_on(pipe),
                    )
                self._wait_durable(pipe)
                replies = list(await pipe.execute(raise_on_error=False))
        self.pipeline_count += 1
        shortfall = self._durability_shortfall(replies[len(batch) :])
        if shortfall:
            # Stored on the primary but not as durable as configured: no 2xx (X-on retries;
            # the retry is a repeat that X-on's own id, when given, folds into this one).
            return [StoreError(f"redis at {self.address}: {shortfall}")] * len(batch)
        return replies[: len(batch)]

    def _wait_durable(self, pipe: Any) -> None:
        """Queue WAIT/WAITAOF as configured: they cover every earlier write on this connection,
        so the whole pipeline."""
        if self._wait_replicas:
            pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms)
        if self._wait_aof:
            pipe.execute_command("WAITAOF", 1, self._wait_replicas, self._wait_ms)

    def _durability_shortfall(self, replies: list[Any]) -> str:
        """Why the WAIT/WAITAOF replies fall short of the configuration ("" when they do not)."""
        replies = list(replies)
        if self._wait_replicas:
            acked = replies.pop(0)
            if isinstance(acked, BaseException):
                return f"WAIT failed: {acked}"
            if int(acked) < self._wait_replicas:
                return f"only {acked} of {self._wait_replicas} replicas acknowledged the write"
        if self._wait_aof:
            reply = replies.pop(0)
            if isinstance(reply, BaseException):
                return f"WAITAOF failed: {reply}"
            local, remote = (int(n) for n in reply)
            if local < 1 or remote < self._wait_replicas:
                return f"the write reached the AOF of {local} primary and {remote} replicas"
        return ""

    @_finish_uncancelled
    async def read_events(self, account_id: str, *, after: int, limit: int) -> list[StoredEvent]:
        check_int("after", after)
        check_int("limit", limit)
        with self._calls():
            # Entry ids are "<seq>-0": an exclusive range start reads seq > after.
            entries = await self._r.xrange(
                self._acct(account_id, "events"), min=f"({after}-0", max="+", count=limit
            )
        return [_stored(entry_id, fields) for entry_id, fields in entries or ()]

    @_finish_uncancelled
    async def head_seq(self, account_id: str) -> int:
        with self._calls():
            last = await self._r.xrevrange(self._acct(account_id, "events"), count=1)
        return _seq_of(last[0][0]) if last else 0

    @_finish_uncancelled
    async def get_cursor(self, agent_id: str) -> int:
        with self._calls():
            account_id = await self._account_of(agent_id)
            if account_id is None:
                return 0
            value = await self._r.hget(self._agent_key(account_id, agent_id), "cursor")
        return 0 if value is None else int(value)

    @_finish_uncancelled
    async def set_cursor(self, agent_id: str, seq: int) -> None:
        check_int("seq", seq)
        await self._set_agent_field(agent_id, "cursor", str(seq))

    # -- link ownership (docs/scaling.md) ------------------------------------------------------

    @_finish_uncancelled
    async def claim_link(self, agent_id: str, *, owner: str) -> LinkClaim:
        with self._calls():
            account_id = await self._account_of(agent_id)
            reply = None
            if account_id is not None:
                reply = await self._claim_link(
                    keys=[self._agent_key(account_id, agent_id)], args=[owner]
                )
        if not reply:
            raise StoreError(f"unknown agent {agent_id!r}")
        return LinkClaim(epoch=int(reply[0]), previous_owner=_text(reply[1]))

    @_finish_uncancelled
    async def release_link(self, agent_id: str, *, epoch: int) -> None:
        check_int("epoch", epoch)
        with self._calls():
            account_id = await self._account_of(agent_id)
            if account_id is not None:
                await self._release_link(
                    keys=[self._agent_key(account_id, agent_id)], args=[str(epoch)]
                )

    @_finish_uncancelled
    async def check_links(self, agent_ids: Sequence[str]) -> dict[str, LinkCheck]:
        with self._calls():
            owners = {agent_id: await self._account_of(agent_id) for agent_id in agent_ids}
            known = [(a, acct) for a, acct in owners.items() if acct is not None]
            if not known:
                return {}
            async with self._r.pipeline(transaction=False) as pipe:
                for agent_id, account_id in known:
                    pipe.hmget(
                        self._agent_key(account_id, agent_id), ["id", "link_epoch", "revoked_at"]
                    )
                rows = await pipe.execute()
        return {
            agent_id: LinkCheck(epoch=int(epoch or 0), revoked=revoked is not None)
            for (agent_id, _), (found, epoch, revoked) in zip(known, rows, strict=True)
            if found is not None
        }

    # -- retention (docs/redis.md, Retention) ---------------------------------------------------

    @_finish_uncancelled
    async def retention_cut(
        self, account_id: str, *, keep_events: int | None, keep_since: float | None
    ) -> int:
        key = self._acct(account_id, "events")
        with self._calls():
            first = await self._r.xrange(key, count=1)
            last = await self._r.xrevrange(key, count=1)
            if not first or not last:
                return 0
            low, head = _seq_of(first[0][0]), _seq_of(last[0][0])
            cut = 0
            if keep_events is not None:
                # Seqs are contiguous (the append script), so position is arithmetic.
                cut = max(0, head - keep_events)
            if keep_since is not None and cut < head:
                cut = max(cut, await self._older_than(key, max(low, cut), head, keep_since))
        return cut

    async def _older_than(self, key: str, low: int, high: int, since: float) -> int:
        """The highest seq in [low, high] received before ``since`` (0 when none), by binary
        search on point reads: about log2(n) reads of one entry each. ``received_at`` grows
        with seq up to the few milliseconds between receipt and commit."""
        found = 0
        while low <= high:
            middle = (low + high) // 2
            entries = await self._r.xrange(key, min=f"{middle}-0", max="+", count=1)
            if not entries:
                high = middle - 1
                continue
            stored = _stored(*entries[0])
            if parse_time(stored.event.received_at) < since:
                found, low = stored.seq, stored.seq + 1
            else:
                high = middle - 1
        return found

    @_finish_uncancelled
    async def trim_events(self, account_id: str, *, through: int, limit: int) -> int:
        with self._calls():
            dropped = await self._trim(
                keys=[
                    self._acct(account_id, "events"),
                    self._acct(account_id, "dedup"),
                    self._acct(account_id, "dedup_seqs"),
                    self._acct(account_id, "trimmed"),
                    self._acct(account_id, "dedup_ids"),
                    self._acct(account_id, "usage"),
                ],
                args=[str(through), str(limit)],
            )
        return int(dropped)

    @_finish_uncancelled
    async def account_usage(self, account_id: str) -> AccountUsage:
        with self._calls():
            row = _pairs(await self._r.hgetall(self._acct(account_id, "usage")))
        return AccountUsage(events=int(row.get("events", 0)), bytes=int(row.get("bytes", 0)))

    @_finish_uncancelled
    async def trimmed_through(self, account_id: str) -> int:
        with self._calls():
            value = await self._r.get(self._acct(account_id, "trimmed"))
        return 0 if value is None else int(value)

    # -- CTOX idempotency (docs/ctox.md) --------------------------------------------------------

    def _command_keys(self, account_id: str, key: str) -> list[str]:
        return [
            self._acct(account_id, f"cmd:{key}"),
            self._acct(account_id, "commands"),
            self._acct(account_id, f"claim:{key}"),
        ]

    @_finish_uncancelled
    async def claim_command(
        self,
        account_id: str,
        key: str,
        *,
        request_hash: str,
        now: float,
        claim_deadline: float,
        expires_at: float,
    ) -> CommandRecord | None:
        with self._calls():
            async with self._r.pipeline(transaction=False) as pipe:
                # The account joins the purge list before its record exists, so nothing is
                # ever stored that purge_commands cannot find.
                pipe.sadd(self._global("command_accounts"), account_id)
                await self._claim_command(
                    keys=self._command_keys(account_id, key),
                    args=[
                        request_hash,
                        repr(now),
                        repr(claim_deadline),
                        repr(expires_at),
                        _backstop_ttl_ms(now, expires_at),
                        key,
                    ],
                    client=_queue_on(pipe),
                )
                _, row = await pipe.execute()
        return _command(account_id, key, _pairs(row)) if row else None

    @_finish_uncancelled
    async def get_command(self, account_id: str, key: str, *, now: float) -> CommandRecord | None:
        with self._calls():
            row = await self._r.hgetall(self._command_keys(account_id, key)[0])
        if not row:
            return None
        record = _command(account_id, key, _pairs(row))
        return record if record.expires_at > now else None

    @_finish_uncancelled
    async def claim_overdue(self, record: CommandRecord, *, now: float) -> bool:
        # Overdue once the lease expired by Redis's clock; the caller's clock must agree too,
        # which only makes a caller whose clock runs behind wait longer (never shorter), and
        # decides alone for a claim taken before leases existed.
        if now < record.claim_deadline:
            return False
        with self._calls():
            lease = self._command_keys(record.account_id, record.key)[2]
            return not await self._r.exists(lease)

    @_finish_uncancelled
    async def finish_command(
        self,
        account_id: str,
        key: str,
        *,
        request_hash: str,
        result: CommandResult,
        now: float,
        expires_at: float,
    ) -> CommandRecord:
        with self._calls():
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.sadd(self._global("command_accounts"), account_id)
                await self._finish_command(
                    keys=self._command_keys(account_id, key),
                    args=[
                        request_hash,
                        result_to_json(result),
                        repr(now),
                        repr(expires_at),
                        _backstop_ttl_ms(now, expires_at),
                        key,
                    ],
                    client=_queue_on(pipe),
                )
                _, row = await pipe.execute()
        return _command(account_id, key, _pairs(row))

    @_finish_uncancelled
    async def release_command(self, account_id: str, key: str) -> None:
        with self._calls():
            await self._release_command(keys=self._command_keys(account_id, key), args=[key])

    @_finish_uncancelled
    async def purge_commands(self, *, now: float) -> int:
        purged = 0
        with self._calls():
            accounts = _texts(await self._r.smembers(self._global("command_accounts")))
            for account_id in sorted(accounts):
                index = self._acct(account_id, "commands")
                due = _texts(await self._r.zrangebyscore(index, "-inf", now))
                if due:
                    records = [self._acct(account_id, f"cmd:{key}") for key in due]
                    purged += int(
                        await self._purge_commands(keys=[index, *records], args=[repr(now), *due])
                    )
        return purged

    # -- status cache (DESIGN §Link protocol, Status) -------------------------------------------

    @_finish_uncancelled
    async def put_status(self, item: StatusItem) -> bool:
        check_int("seq", item.seq)
        with self._calls():
            stored = await self._put_status(
                keys=[
                    self._acct(item.account_id, "status"),
                    self._acct(item.account_id, "status_seq"),
                ],
                args=[item.key, str(item.seq), json.dumps(item.to_json())],
            )
        return int(stored) == 1

    @_finish_uncancelled
    async def status_snapshot(self, account_id: str) -> list[StatusItem]:
        with self._calls():
            rows = _pairs(await self._r.hgetall(self._acct(account_id, "status")))
        # Sorted by key like SQLite's ORDER BY key: code point order is UTF-8 byte order.
        return [StatusItem.from_json(account_id, json.loads(rows[key])) for key in sorted(rows)]

    # -- operations (docs/operations.md) -------------------------------------------------------

    @_finish_uncancelled
    async def rename_account(self, account_id: str, name: str) -> AccountRecord | None:
        with self._calls():
            record = await self._account(account_id)
            if record is None:
                return None
            # The name index first: until the record follows, the old name finds nothing and
            # the new one finds the account.
            renamed = await self._rename_account(
                keys=[self._global("account_names")], args=[record.name, name, account_id]
            )
            if renamed != 1:
                raise ApiError(409, "account_exists", f"an account named {name!r} exists")
            row = await self._update_account(
                keys=[self._acct(account_id, "account")], args=["name", name]
            )
        return _account(_pairs(row)) if row else None

    @_finish_uncancelled
    async def rotate_ingress_key(
        self, account_id: str, *, new_hash: str, old_valid_until: float
    ) -> AccountRecord | None:
        with self._calls():
            record = await self._account(account_id)
            if record is None:
                return None
            # Index first: the new key finds nothing until the record names it (see
            # account_by_ingress_hash); the old one already works as a previous key.
            await self._rotate_ingress(
                keys=[self._global("ingress"), self._global("ingress_previous")],
                args=[
                    record.ingress_key_hash,
                    new_hash,
                    account_id,
                    repr(old_valid_until),
                    repr(time.time()),
                ],
            )
            row = await self._update_account(
                keys=[self._acct(account_id, "account")], args=["ingress_key_hash", new_hash]
            )
        return _account(_pairs(row)) if row else None

    @_finish_uncancelled
    async def previous_ingress_keys(self, account_id: str, *, now: float) -> list[float]:
        with self._calls():
            rows = _pairs(await self._r.hgetall(self._global("ingress_previous")))
        deadlines = []
        for value in rows.values():
            owner, deadline = value.rsplit(" ", 1)
            if owner == account_id and float(deadline) > now:
                deadlines.append(float(deadline))
        return sorted(deadlines)

    @_finish_uncancelled
    async def delete_account(self, account_id: str) -> bool:
        with self._calls():
            record = await self._account(account_id)
            if record is None:
                return False
            agent_ids = _texts(await self._r.zrange(self._acct(account_id, "agents"), 0, -1))
            agent_keys = [self._agent_key(account_id, agent_id) for agent_id in agent_ids]
            agents = await self._hgetall_many(agent_keys)
            commands = _texts(await self._r.zrange(self._acct(account_id, "commands"), 0, -1))
            previous = _pairs(await self._r.hgetall(self._global("ingress_previous")))
            # The global indexes first (one slot, one transaction): once they are gone nothing
            # finds the account, and what is left in its own slot is inert.
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hdel(self._global("account_names"), record.name)
                pipe.hdel(self._global("ingress"), record.ingress_key_hash)
                stale = [h for h, v in previous.items() if v.rsplit(" ", 1)[0] == account_id]
                if stale:
                    pipe.hdel(self._global("ingress_previous"), *stale)
                pipe.zrem(self._global("accounts"), account_id)
                if agent_ids:
                    pipe.hdel(self._global("agent_account"), *agent_ids)
                    pipe.zrem(self._global("agents"), *agent_ids)
                for row in agents:
                    if row.get("code_hash"):
                        pipe.delete(self._global(f"code:{row['code_hash']}"))
                pipe.srem(self._global("command_accounts"), account_id)
                await pipe.execute()
            names = ["account", "agents", "seq", "events", "dedup", "dedup_seqs", "dedup_ids"]
            names += ["trimmed", "usage", *_OLD_DEDUP]
            names += ["status", "status_seq", "commands"]
            await self._r.delete(
                *(self._acct(account_id, name) for name in names),
                *agent_keys,
                *(self._acct(account_id, f"cmd:{key}") for key in commands),
            )
        for agent_id in agent_ids:
            self._agent_accounts.pop(agent_id, None)
        return True

    @_finish_uncancelled
    async def rename_agent(self, agent_id: str, name: str) -> AgentRecord | None:
        with self._calls():
            account_id = await self._account_of(agent_id)
            if account_id is None:
                return None
            key = self._agent_key(account_id, agent_id)
            await self._set_if_exists(keys=[key], args=["name", name])
            row = await self._r.hgetall(key)
        return _agent(_pairs(row)) if row else None

    @_finish_uncancelled
    async def get_event(
        self, event_id: str, *, account_id: str | None = None
    ) -> StoredEvent | None:
        with self._calls():
            if account_id is not None:
                accounts = [account_id]
            else:
                accounts = _texts(await self._r.zrange(self._global("accounts"), 0, -1))
            for account in accounts:
                found = await self._find_event(account, event_id)
                if found is not None:
                    return found
        return None

    async def _find_event(self, account_id: str, event_id: str) -> StoredEvent | None:
        """Scan the account's stream from the newest entry back. A relay event id starts with
        its receive time (ingress.new_event_id), so the scan stops once it is past that time
        by more than any commit can lag; other ids are looked for in the whole log."""
        key = self._acct(account_id, "events")
        received = _event_id_time(event_id)
        high = "+"
        while True:
            entries = await self._r.xrevrange(key, max=high, min="-", count=_SCAN_CHUNK)
            if not entries:
                return None
            for entry_id, fields in entries:
                stored = _stored(entry_id, fields)
                if stored.event.id == event_id:
                    return stored
            oldest = _stored(*entries[-1])
            if received is not None and parse_time(oldest.event.received_at) < (
                received - _COMMIT_LAG
            ):
                return None
            high = f"({oldest.seq}-0"

    @_finish_uncancelled
    async def recent_events(
        self, account_id: str, *, limit: int, before: int | None = None
    ) -> list[StoredEvent]:
        check_int("limit", limit)
        check_int("before", before)
        with self._calls():
            entries = await self._r.xrevrange(
                self._acct(account_id, "events"),
                max="+" if before is None else f"({before}-0",
                min="-",
                count=limit,
            )
        return [_stored(entry_id, fields) for entry_id, fields in entries or ()]

    @_finish_uncancelled
    async def count_after(self, account_id: str, after: int) -> int:
        check_int("after", after)
        key = self._acct(account_id, "events")
        with self._calls():
            first = await self._r.xrange(key, min=f"({after}-0", max="+", count=1)
            last = await self._r.xrevrange(key, count=1) if first else []
        # Seqs of one account are contiguous (the append script): position is arithmetic.
        return _seq_of(last[0][0]) - _seq_of(first[0][0]) + 1 if first and last else 0

    # -- replay (docs/operations.md, Replay) ----------------------------------------------------

    @_finish_uncancelled
    async def request_replay(self, agent_id: str, after_seq: int) -> None:
        check_int("after_seq", after_seq)
        await self._set_agent_field(agent_id, "replay_after", str(after_seq))

    @_finish_uncancelled
    async def pending_replay(self, agent_id: str) -> int | None:
        with self._calls():
            account_id = await self._account_of(agent_id)
            if account_id is None:
                return None
            value = await self._r.hget(self._agent_key(account_id, agent_id), "replay_after")
        return None if value is None else int(value)

    @_finish_uncancelled
    async def settle_replay(self, agent_id: str, taken: int, rest: int | None) -> None:
        check_int("taken", taken)
        check_int("rest", rest)
        with self._calls():
            account_id = await self._account_of(agent_id)
            if account_id is not None:
                await self._settle_replay(
                    keys=[self._agent_key(account_id, agent_id)],
                    args=[str(taken), "" if rest is None else str(rest)],
                )


# -- URL and (de)serialisation -------------------------------------------------------------------


def _client(
    url: str, target: RedisTarget, socket_timeout: float, connect_timeout: float
) -> tuple[Any, Sentinel | None]:
    """The redis-py client for ``target``: redis-py's own Sentinel and Cluster clients do the
    discovery and failover (docs/redis.md, Deployments); the store only sees errors, which
    answer 503 until the new primary takes writes."""
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        # One immediate retry replaces a pooled connection that died (Redis restarted);
        # more would only delay the 503 that tells X-on to retry.
        "retry": Retry(NoBackoff(), 1),
    }
    if target.kind == "single":
        parts = urllib.parse.urlsplit(url)
        rest = urllib.parse.urlencode(target.options)
        return aioredis.Redis.from_url(
            urllib.parse.urlunsplit(parts._replace(query=rest)), **common
        ), None
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    tls: dict[str, Any] = {"ssl": target.tls, **dict(target.options)} if target.tls else {}
    if target.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            **tls,
            **auth,
            **common,
        )
        return cluster, None
    # Sentinels: TLS like the servers; they are asked only who the primary is. The URL's
    # credentials are the data servers' (docs/redis.md, Sentinel).
    sentinel = Sentinel(
        list(target.nodes),
        sentinel_kwargs={
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            **tls,
        },
        **tls,
        **auth,
    )
    master = sentinel.master_for(target.service, redis_class=aioredis.Redis, db=target.db, **common)
    return master, sentinel


def _queue_on(pipe: Any) -> Any:
    """``pipe`` as a script's client: redis-py queues a script on a cluster pipeline as on a
    plain one, though its type hints name only the plain client."""
    return pipe


def _as_store_error(exc: BaseException, address: str) -> StoreError:
    """A fresh error per caller: one exception object raised in many tasks would tangle their
    tracebacks."""
    if isinstance(exc, StoreError):
        return StoreError(str(exc))
    return StoreError(f"redis at {address}: {exc}")


def _flatten(fields: Mapping[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _text(value: Any) -> str:
    """A reply value as text (the client decodes replies; bytes would mean a raw client)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _texts(values: Any) -> list[str]:
    return [_text(value) for value in values]


def _pairs(reply: Any) -> dict[str, str]:
    """A hash reply as a dict: HGETALL's dict, or a Lua script's flat [field, value, ...] list."""
    if isinstance(reply, Mapping):
        return {_text(k): _text(v) for k, v in reply.items()}
    return {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply), 2)}


def _account_fields(record: AccountRecord) -> dict[str, str]:
    return {
        "id": record.id,
        "name": record.name,
        "created_at": repr(record.created_at),
        "ingress_key_hash": record.ingress_key_hash,
        "xon_api_url": record.xon_api_url,
        "xon_api_key": record.xon_api_key,
    }


def _account(row: Mapping[str, str]) -> AccountRecord:
    return AccountRecord(
        id=row["id"],
        name=row["name"],
        created_at=float(row["created_at"]),
        ingress_key_hash=row["ingress_key_hash"],
        xon_api_url=row.get("xon_api_url", ""),
        xon_api_key=row.get("xon_api_key", ""),
    )


_OPTIONAL_AGENT_TIMES = ("enrolled_at", "revoked_at", "last_seen")


def _agent_fields(record: AgentRecord) -> dict[str, str]:
    fields = {
        "id": record.id,
        "account_id": record.account_id,
        "name": record.name,
        "created_at": repr(record.created_at),
    }
    if record.public_key is not None:
        fields["public_key"] = record.public_key
    for name in _OPTIONAL_AGENT_TIMES:
        value = getattr(record, name)
        if value is not None:
            fields[name] = repr(value)
    return fields


def _agent(row: Mapping[str, str]) -> AgentRecord:
    def when(name: str) -> float | None:
        value = row.get(name)
        return None if value is None else float(value)

    return AgentRecord(
        id=row["id"],
        account_id=row["account_id"],
        name=row["name"],
        created_at=float(row["created_at"]),
        public_key=row.get("public_key"),
        enrolled_at=when("enrolled_at"),
        revoked_at=when("revoked_at"),
        last_seen=when("last_seen"),
    )


_COMMAND_TTL_MARGIN = 60.0
"""Seconds a command record outlives its expires_at in Redis, so the TTL backstop never
races the logical expiry the callers decide with their own ``now``."""


def _backstop_ttl_ms(now: float, expires_at: float) -> int:
    return int((max(0.0, expires_at - now) + _COMMAND_TTL_MARGIN) * 1000)


def _command(account_id: str, key: str, row: Mapping[str, str]) -> CommandRecord:
    result = row.get("result")
    return CommandRecord(
        account_id=account_id,
        key=key,
        request_hash=row["request_hash"],
        claimed_at=float(row["claimed_at"]),
        claim_deadline=float(row["claim_deadline"]),
        expires_at=float(row["expires_at"]),
        result=None if result is None else result_from_json(result),
    )


def _seq_of(entry_id: Any) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def _stored(entry_id: Any, fields: Any) -> StoredEvent:
    event = XonEvent.from_json(json.loads(_pairs(fields)["event"]))
    return StoredEvent(seq=_seq_of(entry_id), event=event)


def _append_result(
    event: XonEvent, reply: Sequence[Any], max_bytes: int | None = None
) -> AppendResult:
    """The append script's reply as a result.

    Raises:
        QuotaExceeded: the script refused the event for the account's byte quota.
    """
    if int(reply[0]) == 2 and max_bytes is not None:
        raise QuotaExceeded(event.account, used=int(reply[1]), size=int(reply[2]),
                            limit=max_bytes)
    if int(reply[0]) == 1:
        return AppendResult(
            stored=StoredEvent(seq=int(reply[1]), event=event),
            duplicate=False,
            xon_id_reused=int(reply[2]) == 1,
        )
    first = event if len(reply) < 3 else XonEvent.from_json(json.loads(reply[2]))
    # len < 3: the first copy was trimmed away; its seq still identifies it.
    return AppendResult(stored=StoredEvent(seq=int(reply[1]), event=first), duplicate=True)


_SCAN_CHUNK = 200
_COMMIT_LAG = 300.0
"""Seconds an event's commit may follow its receive time, with a wide margin."""
_EVENT_ID = re.compile(r"ev_([0-9a-f]{12})[0-9a-f]{16}")


def _event_id_time(event_id: str) -> float | None:
    """The receive time a relay event id carries (``ev_`` + 12 hex digits of ms + 16 more)."""
    match = _EVENT_ID.fullmatch(event_id)
    return None if match is None else int(match.group(1), 16) / 1000
