"""What the delivery modes share: stale events, and the loop that pushes one target's events.

Stale events (issue 4, "Routing and stale events"; docs/delivery.md): a per-type time-to-live,
counted from the relay's ``received_at``. When an event is handed to a local app after its TTL,
it is marked ``"stale": true`` or, for push modes configured with ``stale = "skip"``, passed
over. Either way it stays in the inbox (never silently dropped from the log).

A push target (forward, tcp) walks the inbox from its stored position, one event at a time and
in cursor order (DESIGN principle 1: "a local app ... sees each event once, in order"), retrying
each with exponential back-off until the app takes it. It stores its position in the inbox once
it moved :data:`PAGE` cursors past the stored one, once the inbox has been quiet for
:data:`POSITION_DELAY`, before it starts waiting to retry an event, and when it stops; not after
every event, nor after every read (a target keeping up reads one or two events at a time): each
store is an fsync'd write on the inbox thread that the link's commits wait behind
(docs/performance.md). So after a crash or kill a restart hands over again at most
:data:`PAGE` events; delivery is at least once (DESIGN principle 1) and every request carries
the event id for the app to drop a repeat. The concrete modes only say
how to hand one event over (:meth:`PushTarget.deliver`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.errors import StoreError, UpstreamError
from shared.events import format_time, parse_time
from shared.logs import bind
from shared.subscription import Subscription

from ..inbox import CursorExpired, Inbox, InboxEvent

__all__ = [
    "StalePolicy",
    "PushTarget",
    "TargetStatus",
    "retry_delay",
    "PAGE",
    "PAGE_BYTES",
    "IDLE_WAIT",
    "POSITION_DELAY",
]

log = logging.getLogger(__name__)

PAGE = 100
PAGE_BYTES = 4 * 1024 * 1024
"""A push target reads at most this many bytes of events per page (at least one event), so
large events cannot make a target hold ``PAGE`` of them in memory at once."""
"""Events read from the inbox at a time (memory per target is bounded by one page)."""
IDLE_WAIT = 60.0
"""Longest wait for a new event before the loop looks again (a safety net; commits wake it)."""
POSITION_DELAY = 1.0
"""Seconds without a new event after which a target stores the progress it has not stored."""
_MAX_ATTEMPT = 32

Sleep = Callable[[float], Awaitable[None]]


class StalePolicy:
    """Decides whether an event is past its type's time-to-live (docs/delivery.md).

    Args:
        ttl: event type → seconds after ``received_at``; other types never go stale.
        action: ``"mark"`` or ``"skip"`` (push modes only; pull modes always mark).
        clock: wall clock (Unix seconds).
    """

    def __init__(
        self, ttl: Mapping[str, float], action: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.ttl = dict(ttl)
        self.skip = action == "skip"
        self._clock = clock

    def is_stale(self, event: Mapping[str, Any]) -> bool:
        ttl = self.ttl.get(str(event.get("type")))
        if ttl is None:
            return False
        try:
            received = parse_time(str(event.get("received_at")))
        except ValueError:
            return False  # no usable time: it cannot be judged stale
        return self._clock() - received > ttl

    def present(self, item: InboxEvent) -> dict[str, Any]:
        """The event object for a local app, with ``"stale": true`` when it is stale."""
        body = item.to_json()
        if self.is_stale(item.event):
            body["stale"] = True
        return body


def retry_delay(attempt: int, *, initial: float, cap: float) -> float:
    """``initial · 2^attempt`` seconds, at most ``cap``."""
    delay: float = min(cap, initial * 2.0 ** min(attempt, _MAX_ATTEMPT))
    return delay


@dataclass(slots=True)
class TargetStatus:
    """What ``/v1/health`` reports about one push target (wall-clock times)."""

    cursor: int | None = None
    """Stored position: every event up to here was delivered or passed over."""
    delivered: int = 0
    """Events delivered since the agent started."""
    failures: int = 0
    """Failed attempts on the current event (0: not retrying)."""
    last_status: int | None = None
    """HTTP status of the last forward attempt (forward only)."""
    last_error: str | None = None
    """Why the last attempt failed; None after a success."""
    last_delivered_at: float | None = None
    stale_skipped: int = 0
    """Stale events passed over since the agent started (``stale = "skip"``)."""
    pruned: int = 0
    """Events inbox retention deleted before this target got them (logged as errors)."""
    connected: bool | None = None
    """TCP only: whether a connection to the app is open."""


class PushTarget(ABC):
    """One push target's loop. Subclasses implement :meth:`deliver`.

    Args:
        key: the target's configured name (its progress is stored as ``kind:key``).
        types: event type patterns to deliver; empty: all.
        start: ``"latest"`` or ``"oldest"``, for a target without stored progress.
        retry_initial, retry_max: back-off bounds in seconds.
        inbox: where events and the target's position live.
        stale: the agent's stale policy.
        sleep: waits between retries; tests may inject their own.
        clock: wall clock for the report.
    """

    kind: ClassVar[str]

    def __init__(
        self,
        *,
        key: str,
        types: list[str],
        start: str,
        retry_initial: float,
        retry_max: float,
        inbox: Inbox,
        stale: StalePolicy,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.status = TargetStatus()
        self._types = Subscription(types=tuple(types))
        self._start = start
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._inbox = inbox
        self._stale = stale
        self._sleep = sleep
        self._clock = clock
        self._reached = 0
        """Every event up to this cursor was delivered or passed over (maybe not stored yet)."""
        self.log = bind(log, target=key, kind=self.kind)

    @property
    def position_name(self) -> str:
        return f"{self.kind}:{self.key}"

    @abstractmethod
    async def deliver(self, item: InboxEvent, stale: bool) -> None:
        """Hand one event to the app; return once it acknowledged it.

        Raises:
            UpstreamError: the app did not take it (retried after a delay).
            ValueError: the event cannot be expressed in this mode (logged, passed over).
        """

    async def close(self) -> None:
        """Release connections; the loop is already stopped."""

    def report(self) -> dict[str, Any]:
        """This target's line in ``/v1/health``; subclasses add their address.

        ``cursor`` and ``lag`` are the target's progress, stored or not yet (the stored
        position follows within :data:`POSITION_DELAY` or :data:`PAGE` events).
        """
        status = self.status
        cursor = None if status.cursor is None else max(status.cursor, self._reached)
        return {
            "name": self.key,
            "cursor": None if cursor is None else str(cursor),
            "lag": None if cursor is None else max(0, self._inbox.last_cursor - cursor),
            "delivered": status.delivered,
            "failures": status.failures,
            "last_error": status.last_error,
            "last_delivered_at": (None if status.last_delivered_at is None
                                  else format_time(status.last_delivered_at)),
            "stale_skipped": status.stale_skipped,
            "pruned": status.pruned,
        }

    async def run(self) -> None:
        """Deliver until cancelled, or until the inbox is released (shutdown)."""
        inbox = self._inbox
        start = inbox.last_cursor if self._start == "latest" else inbox.pruned_cursor
        cursor = await inbox.init_position(self.position_name, start)
        self.status.cursor = self._reached = cursor
        try:
            while not inbox.released:
                try:
                    batch = await inbox.read(cursor, PAGE, PAGE_BYTES)
                except CursorExpired as exc:
                    cursor = await self._overtaken(cursor, exc.oldest)
                    continue
                if not batch:
                    await self._wait_beyond(cursor)
                    continue
                for item in batch:
                    await self._handle(item)
                    cursor = self._reached = item.cursor
                    if cursor - (self.status.cursor or 0) >= PAGE:
                        await self._store_reached()
        finally:
            # A stop (or shutdown) keeps what the app took; a crash re-delivers at most PAGE.
            with contextlib.suppress(StoreError):
                await self._store_reached()

    async def _wait_beyond(self, cursor: int) -> None:
        """Wait for an event after ``cursor``; progress not stored yet is stored once no
        event came for :data:`POSITION_DELAY`."""
        inbox = self._inbox
        if self._reached <= (self.status.cursor or 0):
            await inbox.wait_beyond(cursor, IDLE_WAIT)
            return
        await inbox.wait_beyond(cursor, POSITION_DELAY)
        if inbox.last_cursor <= cursor:
            await self._store_reached()

    async def _store_reached(self) -> None:
        if self._reached > (self.status.cursor or 0):
            await self._store(self._reached)

    async def _store(self, cursor: int) -> None:
        self.status.cursor = await self._inbox.advance_position(self.position_name, cursor)
        self._reached = max(self._reached, self.status.cursor)

    async def _overtaken(self, cursor: int, oldest: int) -> int:
        # Retention outran this target (it was failing for long). Nothing can bring the events
        # back; say so loudly rather than skip silently, then go on from the oldest kept.
        lost = oldest - cursor
        self.status.pruned += lost
        self.status.last_error = f"inbox retention deleted {lost} events before delivery"
        self.log.error("delivery.pruned", extra={"events": lost, "cursor": cursor,
                                                 "oldest": oldest})
        await self._store(oldest)
        return oldest

    async def _handle(self, item: InboxEvent) -> bool:
        """Deliver ``item`` with retries; False when it was not for this target or passed over."""
        event = item.event
        if not self._types.matches_type(str(event.get("type"))):
            return False
        attempt = 0
        while True:
            stale = self._stale.is_stale(event)
            if stale and self._stale.skip:
                self.status.stale_skipped += 1
                self.status.failures = 0
                self.log.info("delivery.stale_skipped", extra={"event_id": event.get("id"),
                                                               "cursor": item.cursor})
                return False
            try:
                await self.deliver(item, stale)
            except UpstreamError as exc:
                if not attempt:
                    # The app may stay away for long: keep what it took so far.
                    await self._store_reached()
                delay = retry_delay(attempt, initial=self._retry_initial, cap=self._retry_max)
                attempt += 1
                self.status.failures = attempt
                self.status.last_error = str(exc)
                self.log.warning("delivery.retry", extra={
                    "event_id": event.get("id"), "cursor": item.cursor, "attempt": attempt,
                    "delay": delay, "error": str(exc)})
                await self._sleep(delay)
                continue
            except ValueError as exc:
                self.log.error("delivery.undeliverable", extra={
                    "event_id": event.get("id"), "cursor": item.cursor, "error": str(exc)})
                return False
            if attempt:
                self.log.info("delivery.recovered", extra={"event_id": event.get("id"),
                                                           "attempts": attempt + 1})
            self.status.delivered += 1
            self.status.failures = 0
            self.status.last_error = None
            self.status.last_delivered_at = self._clock()
            return True
