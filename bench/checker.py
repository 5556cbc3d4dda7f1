"""The queue checker of issue 6: what was sent against what a local reader received by cursor.

Pure functions over plain values, so the fault tests, the soak (``bench.soak``) and its unit
tests share one definition of the invariants:

1. DESIGN principle 1, "nothing acknowledged is lost": every send that got a 2xx is received
   (**lost** counts those that are not).
2. "A local app reading by cursor sees each event once": a reader gets each event id once, and
   one send is stored under one id (**duplicated** counts every extra delivery of either kind).
3. Per agent, cursors handed to a reader strictly increase and a cursor never names two events
   (**out_of_order**, **reused**), with no holes between consecutive integer cursors (**gaps**).

A send without a 2xx (the connection was cut by a crash, a timeout) may still have committed:
receiving it is allowed and counted as **recovered**. A received event that matches no send is
**unexpected**. Sends and receipts are matched on a *key*, the exact request as it went on the
wire (the relay's id is unknown for a send without an answer); when the relay's 2xx answer named
an id, the delivered event must carry that id (**mismatched**).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Sent", "Received", "CheckResult", "check", "reused_cursors"]


@dataclass(frozen=True, slots=True)
class Sent:
    """One request sent to the ingress."""

    key: str
    """What identifies the request at the far end (its method, path, query, type and body)."""
    acked: bool
    """The ingress answered 2xx: the event must be delivered."""
    event_id: str | None = None
    """The relay's id from the 2xx answer, when it named one."""


@dataclass(frozen=True, slots=True)
class Received:
    """One event as a local reader got it, in the order it got them."""

    agent: str
    cursor: str
    event_id: str
    key: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Counts of every invariant breach (all 0 when ``ok``) plus the allowed recoveries."""

    sent: int
    acked: int
    received: int
    lost: int
    duplicated: int
    unexpected: int
    recovered: int
    mismatched: int
    out_of_order: int
    reused: int
    gaps: int
    examples: dict[str, list[str]] = field(default_factory=dict)
    """A few offending keys, ids or cursors per breach, for the failure message."""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected or self.mismatched
                    or self.out_of_order or self.reused or self.gaps)

    def summary(self) -> str:
        """One line: every count, then OK or FAIL."""
        verdict = "OK" if self.ok else "FAIL"
        return (f"sent {self.sent}, 2xx {self.acked}, received {self.received}: "
                f"lost {self.lost}, duplicated {self.duplicated}, unexpected {self.unexpected}, "
                f"recovered {self.recovered}, mismatched {self.mismatched}, "
                f"out_of_order {self.out_of_order}, reused {self.reused}, gaps {self.gaps}: "
                f"{verdict}")


_EXAMPLES = 5
_Note = Callable[[str, str], None]


def check(sent: Iterable[Sent], received: Sequence[Received]) -> CheckResult:
    """Compare the sends with one reader's receipts (several agents may be interleaved).

    Raises:
        ValueError: two sends share a key (the keys could not tell them apart).
    """
    by_key: dict[str, Sent] = {}
    for s in sent:
        if s.key in by_key:
            raise ValueError(f"two sends share the key {s.key!r}")
        by_key[s.key] = s
    examples: dict[str, list[str]] = defaultdict(list)

    def note(kind: str, what: str) -> None:
        if len(examples[kind]) < _EXAMPLES:
            examples[kind].append(what)

    ids_seen: set[str] = set()
    id_of_key: dict[str, str] = {}
    duplicated = unexpected = mismatched = 0
    for r in received:
        if r.event_id in ids_seen:
            duplicated += 1
            note("duplicated", r.event_id)
            continue
        ids_seen.add(r.event_id)
        if r.key in id_of_key:
            # The same request stored twice under two ids: a reader cannot drop it by id.
            duplicated += 1
            note("duplicated", f"{r.event_id} (same request as {id_of_key[r.key]})")
            continue
        id_of_key[r.key] = r.event_id
        match = by_key.get(r.key)
        if match is None:
            unexpected += 1
            note("unexpected", r.event_id)
        elif match.event_id is not None and match.event_id != r.event_id:
            mismatched += 1
            note("mismatched", f"answered {match.event_id}, delivered {r.event_id}")

    lost = recovered = acked = 0
    for s in by_key.values():
        if s.acked:
            acked += 1
            if s.key not in id_of_key:
                lost += 1
                note("lost", s.event_id or s.key)
        elif s.key in id_of_key:
            recovered += 1

    out_of_order, gaps = _order(received, note)
    reused = reused_cursors(received)
    return CheckResult(
        sent=len(by_key), acked=acked, received=len(received), lost=lost,
        duplicated=duplicated, unexpected=unexpected, recovered=recovered,
        mismatched=mismatched, out_of_order=out_of_order, reused=reused, gaps=gaps,
        examples=dict(examples),
    )


def _order(received: Sequence[Received], note: _Note) -> tuple[int, int]:
    """(cursors not above the agent's previous one, holes between consecutive int cursors)."""
    last: dict[str, str] = {}
    out_of_order = gaps = 0
    for r in received:
        prev = last.get(r.agent)
        if prev is not None:
            a, b = _as_int(prev), _as_int(r.cursor)
            if a is None or b is None:
                # Opaque cursors (DESIGN §Agent local API): only "not the same" is checkable.
                if prev == r.cursor:
                    out_of_order += 1
                    note("out_of_order", f"{r.agent}: {prev} then {r.cursor}")
            elif b <= a:
                out_of_order += 1
                note("out_of_order", f"{r.agent}: {prev} then {r.cursor}")
                continue
            elif b != a + 1:
                gaps += 1
                note("gaps", f"{r.agent}: {prev} then {r.cursor}")
        last[r.agent] = r.cursor
    return out_of_order, gaps


def reused_cursors(*reads: Sequence[Received]) -> int:
    """Cursors of one agent that name more than one event id, across every read given.

    A reader that re-reads the inbox after a restart must find each cursor still naming the
    event it named before (DESIGN principle 1: a local app's cursor stays valid).
    """
    ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for read in reads:
        for r in read:
            ids[(r.agent, r.cursor)].add(r.event_id)
    return sum(1 for names in ids.values() if len(names) > 1)


def _as_int(cursor: str) -> int | None:
    return int(cursor) if cursor.isdigit() else None
