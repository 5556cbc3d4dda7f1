"""The newest events one relay process committed, kept in memory for its links to read.

A link wakes after each commit and reads what was just appended (docs/performance.md, bench
1). Serving that read from memory skips a hop to the store's read thread, a query and the
decoding of every row it returns, and hands each link the very objects ingress built.

The tail is only an answer when it is sure to hold *every* event of the account after the
position asked for; otherwise the caller reads the store. Per account it keeps a *floor*: all
of the account's events with a seq above the floor that were committed are here, in seq order.
That holds because the store keeping a tail is the only one with its SQLite file open (it holds
an exclusive lock: :meth:`SqliteStore.open <relay_server.store.sqlite.SqliteStore.open>`;
several instances share Redis, not SQLite: docs/scaling.md), every append joins the writer's
batches, and the tail takes each committed event before its caller hears of the commit.

* A new tail's floor for each account is the highest seq the account was ever assigned when
  it was opened (seqs are per account: docs/protocol.md, Sequence numbers); 0 for accounts
  with none.
* Making room for newer events (the bounds below) moves the evicted account's floor up.
* Retention trimming and deleting an account move the floor past what they removed.
* :meth:`EventTail.check_head` is the net under the lock, which is advisory (a tool writing
  the file with sqlite3 directly bypasses it): a log head above what the tail knows drops the
  account's tail, so such an event is read from the file after the hub's next poll
  (``cluster.poll_interval``) instead of being missed.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Mapping

from .base import StoredEvent

__all__ = ["EventTail"]

MAX_EVENTS = 2048
"""Events held at most, across accounts: enough for a burst to reach links that keep up."""
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Request bodies held at most, in bytes: large bodies must not multiply the relay's memory."""


class _Account:
    """One account's held events, oldest first; ``start`` skips the evicted ones."""

    __slots__ = ("floor", "seqs", "events", "start")

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.seqs: list[int] = []
        self.events: list[StoredEvent] = []
        self.start = 0

    def newest(self) -> int:
        return self.seqs[-1] if len(self.seqs) > self.start else self.floor

    def drop_oldest(self) -> StoredEvent:
        stored = self.events[self.start]
        self.floor = stored.seq
        self.start += 1
        if self.start * 2 >= len(self.seqs):  # compact now and then: amortised O(1)
            del self.seqs[: self.start], self.events[: self.start]
            self.start = 0
        return stored


class EventTail:
    """Recently committed events per account (module docstring). Used on the event loop only."""

    def __init__(
        self,
        floor: int = 0,
        *,
        floors: Mapping[str, int] | None = None,
        max_events: int = MAX_EVENTS,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._floor = floor
        """The floor of an account not in ``floors``."""
        self._floors = dict(floors or {})
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._accounts: dict[str, _Account] = {}
        self._order: deque[str] = deque()
        """The account of each held event, oldest first: which account to evict next."""
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, stored: StoredEvent) -> None:
        """Take an event that just committed; events arrive in seq order."""
        account_id = stored.event.account
        tail = self._accounts.get(account_id)
        if tail is None:
            tail = self._accounts[account_id] = _Account(self._floor_of(account_id))
        if stored.seq <= tail.newest():
            return  # below a floor that check_head raised past it: the store has it
        tail.seqs.append(stored.seq)
        tail.events.append(stored)
        self._order.append(account_id)
        self._bytes += len(stored.event.request.body)
        while self._order and (
            len(self._order) > self._max_events or self._bytes > self._max_bytes
        ):
            self._evict_oldest()

    def read(self, account_id: str, *, after: int, limit: int) -> list[StoredEvent] | None:
        """Up to ``limit`` of the account's events after ``after``, or ``None`` when the tail
        cannot tell (``after`` is below its floor): then read the store."""
        tail = self._accounts.get(account_id)
        floor = self._floor_of(account_id) if tail is None else tail.floor
        if after < floor:
            return None
        if tail is None:
            return []
        first = bisect.bisect_right(tail.seqs, after, lo=tail.start)
        return tail.events[first : first + limit]

    def check_head(self, account_id: str, head: int) -> None:
        """The store says the account's newest seq is ``head``; one the tail never took means
        another writer appended: forget the account, which the store then serves."""
        tail = self._accounts.get(account_id)
        newest = self._floor_of(account_id) if tail is None else tail.newest()
        if head > newest:
            self.forget(account_id, through=head)

    def forget(self, account_id: str, *, through: int | None = None) -> None:
        """Events up to ``through`` (default: all) are gone from the store, or must be read
        from it: drop them and raise the account's floor past them."""
        tail = self._accounts.get(account_id)
        if tail is None:
            tail = self._accounts[account_id] = _Account(self._floor_of(account_id))
        if through is None:
            through = tail.newest()
        while len(tail.seqs) > tail.start and tail.seqs[tail.start] <= through:
            self._bytes -= len(tail.drop_oldest().event.request.body)
            self._order.remove(account_id)  # rare: retention, deletion, a foreign writer
        tail.floor = max(tail.floor, through)

    def _floor_of(self, account_id: str) -> int:
        return self._floors.get(account_id, self._floor)

    def _evict_oldest(self) -> None:
        account_id = self._order.popleft()
        self._bytes -= len(self._accounts[account_id].drop_oldest().event.request.body)
