"""Notifications between relay instances that share one Redis: hints, never data.

Several instances behind a load balancer (DESIGN principle 5, issue 5): X-on's request may land
on instance A while the agent's link is held by instance B. After a commit, A publishes a
*wake-up* for the account; B's hub wakes the senders of that account, which re-read the log
from the store. The message carries no event, so a lost one costs nothing but time, and the
hub's periodic poll (``cluster.poll_interval``) bounds that time (docs/scaling.md).

Every instance publishes on, and subscribes to, one channel ``<prefix>{relay}:bus``. A message
is one JSON object (:class:`Notice`); an instance ignores its own. Kinds:

==============  ===========  ========================================================
kind            subject      meaning
==============  ===========  ========================================================
``wake``        account id   new events committed: senders re-read the log
``status``      account id   status items changed: re-read the status snapshot
``disconnect``  agent id     close every link of the agent with ``code`` (revocation)
``claim``       agent id     a link with ``epoch`` took the agent over from ``previous``
``released``    agent id     ``previous`` stopped its link: the ``epoch`` link may send
==============  ===========  ========================================================

One process on SQLite needs none of this: :class:`Bus` is the in-process no-op, and
:class:`RedisBus` the shared one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:  # the [redis] extra is optional: RedisBus imports redis when it runs
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

__all__ = ["Notice", "NoticeKind", "Bus", "RedisBus", "open_bus"]

log = logging.getLogger(__name__)

NoticeKind = Literal["wake", "status", "disconnect", "claim", "released"]
_KINDS = frozenset(get_args(NoticeKind))

_RETRY_INITIAL = 0.1
_RETRY_MAX = 2.0
_STOP_TIMEOUT = 2.0
"""Seconds a cancelled bus task may take to end (redis-py can sit on a read a little)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """One message between instances."""

    kind: NoticeKind
    subject: str
    """An account id (``wake``, ``status``) or an agent id (the others)."""
    origin: str = ""
    """The publishing instance; set by :meth:`Bus.publish`."""
    epoch: int = 0
    """``claim``/``released``: the epoch of the link that took the agent over."""
    previous: str = ""
    """``claim``/``released``: the instance that held the agent's previous link."""
    code: int = 0
    """``disconnect``: the close code."""
    reason: str = ""
    """``disconnect``: the close reason."""

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> Notice | None:
        """The notice in ``text``, or ``None`` when malformed (a newer instance's kind, say)."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("kind") not in _KINDS:
                return None
            notice = cls(**data)
        except (ValueError, TypeError):
            return None
        # Every field of its declared type: a notice is a hint from another process, and a
        # list where a str belongs would raise in the handler (an unhashable key, say).
        typed = all(
            type(getattr(notice, name)) is (int if name in ("epoch", "code") else str)
            for name in ("subject", "origin", "epoch", "previous", "code", "reason")
        )
        return notice if typed and notice.subject else None


Handler = Callable[[Notice], None]


class Bus:
    """The bus of a relay that runs alone: publishing reaches no one, nothing arrives.

    Args:
        instance_id: this relay process's id, unique among the instances sharing a store.
    """

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    def publish(self, notice: Notice) -> None:
        """Send ``notice`` to the other instances soon; never blocks, never fails."""

    async def start(self, handler: Handler, resync: Callable[[], None]) -> None:
        """Deliver other instances' notices to ``handler``; call ``resync`` whenever some may
        have been missed (after a (re)subscription), so the caller re-reads everything."""

    async def close(self) -> None:
        """Stop delivering and publishing."""


class RedisBus(Bus):
    """Redis pub/sub on one channel; publishing is coalesced and never waits for Redis.

    ``publish`` only records the notice (identical pending notices collapse into one) and one
    task sends what is pending in a pipeline. When Redis is down, pending notices are dropped
    (the poll covers them) and the subscriber re-subscribes with back-off.
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        channel: str,
        instance_id: str,
        *,
        sharded: bool = False,
        max_pending: int = 10_000,
    ) -> None:
        super().__init__(instance_id)
        self._client = client
        self._sharded = sharded
        """SPUBLISH/SSUBSCRIBE (a Redis Cluster): the channel lives on the shard of its
        ``{relay}`` tag, so a wake-up crosses one shard, not the whole cluster bus."""
        self.channel = channel
        self._max_pending = max_pending
        self._pending: dict[str, None] = {}
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._dropped = 0

    def publish(self, notice: Notice) -> None:
        if len(self._pending) >= self._max_pending:
            # A hint, bounded like everything else (STYLE §2 rule 4): the poll catches up.
            self._dropped += 1
            return
        stamped = Notice(**{**asdict(notice), "origin": self.instance_id})
        self._pending[stamped.encode()] = None
        self._ready.set()

    async def start(self, handler: Handler, resync: Callable[[], None]) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="bus-publisher"),
            asyncio.create_task(self._subscribe_loop(handler, resync), name="bus-subscriber"),
        ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)

    async def _publish_loop(self) -> None:
        from redis.exceptions import RedisClusterException, RedisError

        delay = _RETRY_INITIAL
        while True:
            await self._ready.wait()
            self._ready.clear()
            messages, self._pending = list(self._pending), {}
            if self._dropped:
                log.warning("bus.publish_dropped", extra={"notices": self._dropped})
                self._dropped = 0
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for message in messages:
                        if self._sharded:
                            pipe.spublish(self.channel, message)
                        else:
                            pipe.publish(self.channel, message)
                    await pipe.execute()
            except Exception as exc:  # a bug too: logged, and the publisher goes on
                if isinstance(exc, RedisError | RedisClusterException | OSError):
                    log.warning(
                        "bus.publish_failed", extra={"notices": len(messages), "error": str(exc)}
                    )
                else:
                    log.exception("bus.publisher_failed")
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
            else:
                delay = _RETRY_INITIAL

    async def _subscribe_loop(self, handler: Handler, resync: Callable[[], None]) -> None:
        from redis.exceptions import RedisClusterException, RedisError

        delay = _RETRY_INITIAL
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                if self._sharded:
                    await pubsub.ssubscribe(self.channel)
                else:
                    await pubsub.subscribe(self.channel)
                log.info("bus.subscribed", extra={"channel": self.channel})
                delay = _RETRY_INITIAL
                # Whatever was published while we were not listening is lost: re-read all.
                resync()
                while True:
                    if self._sharded:
                        message = await pubsub.get_sharded_message(timeout=1.0)
                    else:
                        message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._deliver(message, handler)
            except (RedisError, RedisClusterException, OSError) as exc:
                log.warning("bus.subscribe_failed", extra={"error": str(exc)})
            except Exception:  # a bug: logged, and the subscriber goes on (never dies silently)
                log.exception("bus.subscriber_failed")
            finally:
                await _quietly_close(pubsub)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def _deliver(self, message: dict[str, Any], handler: Handler) -> None:
        data = message.get("data")
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        notice = Notice.decode(text) if isinstance(text, str) else None
        if notice is None:
            log.warning("bus.bad_notice", extra={"bytes": len(str(data))})
        elif notice.origin != self.instance_id:
            try:
                handler(notice)
            except Exception:  # one notice's fault: the next ones are still delivered
                log.exception("bus.handler_failed", extra={"kind": notice.kind})


async def _quietly_close(pubsub: Any) -> None:
    """Close a pub/sub connection that may already be broken, bounded."""
    from redis.exceptions import RedisClusterException, RedisError

    try:
        async with asyncio.timeout(_STOP_TIMEOUT):
            await pubsub.aclose()
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        log.debug("bus.close_failed", extra={"error": str(exc)})


def open_bus(store: object, instance_id: str) -> Bus:
    """The bus that matches ``store``: Redis pub/sub beside a Redis store, else in-process."""
    try:
        from .store.redis import RedisStore
    except ImportError:  # the [redis] extra is not installed: no Redis store either
        return Bus(instance_id)
    if isinstance(store, RedisStore):
        return RedisBus(store.client, store.channel("bus"), instance_id, sharded=store.is_cluster)
    return Bus(instance_id)
