"""relay_server.ingress.new_event_id: the relay's event ids (DESIGN principle 1: dedup by id)."""

from __future__ import annotations

import re

from relay_server.ingress import new_event_id

_ID = re.compile(r"ev_[0-9a-f]{12}[0-9a-f]{4}[0-9a-f]{12}")


def test_ids_have_the_documented_shape_and_carry_their_millisecond() -> None:
    """``ev_`` + 12 hex of milliseconds + 4 hex counter + 12 hex random."""
    event_id = new_event_id(1_800_000_000.1234)
    assert _ID.fullmatch(event_id)
    assert int(event_id[3:15], 16) == 1_800_000_000_123


def test_ids_within_one_millisecond_keep_arrival_order_and_never_repeat() -> None:
    """The counter orders ids of one millisecond; the random part makes each one unique."""
    ids = [new_event_id(1_800_000_000.5) for _ in range(5000)]
    out_of_order = [(a, b) for a, b in zip(ids, ids[1:], strict=False) if a >= b]
    # Only where the 16-bit counter wraps (65,536 ids in one millisecond would be needed to
    # reorder anything real); the process may have used the counter before this test.
    assert len(out_of_order) <= 1
    assert all(a[15:19] == "ffff" and b[15:19] == "0000" for a, b in out_of_order)
    assert len(set(ids)) == len(ids)
    assert len({event_id[-12:] for event_id in ids}) == len(ids)


def test_ids_sort_by_time() -> None:
    stamps = [1_800_000_000.0 + n / 7 for n in range(200)]
    ids = [new_event_id(ts) for ts in stamps]
    assert ids == sorted(ids)
