"""The queue checker of issue 6 (bench/checker.py): each invariant breach is counted."""

from __future__ import annotations

import pytest

from bench.checker import CheckResult, Received, Sent, check, reused_cursors


def _acked(n: int) -> list[Sent]:
    return [Sent(key=f"k{i}", acked=True, event_id=f"e{i}") for i in range(1, n + 1)]


def _reads(*pairs: tuple[int, int], agent: str = "a") -> list[Received]:
    """Receipts of (cursor, n) pairs: event id e<n>, key k<n>."""
    return [Received(agent=agent, cursor=str(c), event_id=f"e{n}", key=f"k{n}") for c, n in pairs]


def _breaches(result: CheckResult) -> dict[str, int]:
    names = ("lost", "duplicated", "unexpected", "mismatched", "out_of_order", "reused", "gaps")
    return {name: getattr(result, name) for name in names if getattr(result, name)}


def test_clean_run_is_ok() -> None:
    """Everything 2xx'd delivered once, in cursor order: no breach, summary says OK."""
    result = check(_acked(3), _reads((1, 1), (2, 2), (3, 3)))
    assert result.ok and _breaches(result) == {}
    assert (result.sent, result.acked, result.received, result.recovered) == (3, 3, 3, 0)
    assert result.summary().endswith(": OK")


def test_missing_acknowledged_event_is_lost() -> None:
    """A 2xx'd send never received counts as lost and fails the run."""
    result = check(_acked(3), _reads((1, 1), (2, 3)))
    assert _breaches(result) == {"lost": 1}
    assert not result.ok
    assert result.examples["lost"] == ["e2"]
    assert "lost 1" in result.summary() and result.summary().endswith("FAIL")


def test_unanswered_send_delivered_is_recovered_not_a_breach() -> None:
    """A send cut without a 2xx that still arrives is recovered; one that never arrives is fine."""
    sent = [*_acked(1), Sent(key="k2", acked=False), Sent(key="k3", acked=False)]
    result = check(sent, _reads((1, 1), (2, 2)))
    assert result.ok
    assert (result.recovered, result.lost) == (1, 0)


def test_same_id_twice_is_duplicated() -> None:
    """The reader getting one id twice (even under a new cursor) is a duplicate."""
    result = check(_acked(2), _reads((1, 1), (2, 2), (3, 2)))
    assert _breaches(result) == {"duplicated": 1}
    # Caught by the id alone, whatever the request looks like the second time.
    again = Received(agent="a", cursor="3", event_id="e2", key="k-other")
    assert check(_acked(2), [*_reads((1, 1), (2, 2)), again]).duplicated == 1


def test_same_request_under_two_ids_is_duplicated() -> None:
    """One send stored twice under different ids cannot be dropped by id: a duplicate."""
    reads = [*_reads((1, 1)), Received(agent="a", cursor="2", event_id="e9", key="k1")]
    result = check(_acked(1), reads)
    assert _breaches(result) == {"duplicated": 1}


def test_receipt_matching_no_send_is_unexpected() -> None:
    """An event nobody sent counts as unexpected."""
    result = check(_acked(1), _reads((1, 1), (2, 7)))
    assert _breaches(result) == {"unexpected": 1}


def test_delivered_id_must_be_the_answered_id() -> None:
    """The relay answered one id and the agent delivered the request under another."""
    reads = [Received(agent="a", cursor="1", event_id="other", key="k1")]
    result = check(_acked(1), reads)
    assert _breaches(result) == {"mismatched": 1}


@pytest.mark.parametrize("cursors", [(1, 3, 2), (1, 2, 2)])
def test_cursor_going_back_or_repeating_is_out_of_order(cursors: tuple[int, int, int]) -> None:
    """A cursor not above the agent's previous one is out of order."""
    result = check(_acked(3), _reads(*zip(cursors, (1, 2, 3), strict=True)))
    assert result.out_of_order == 1
    assert not result.ok


def test_cursor_naming_two_events_is_reused() -> None:
    """The same cursor for two different ids (in one read or across reads) is reuse."""
    live = _reads((1, 1), (2, 2))
    again = _reads((1, 1), (2, 3))
    assert reused_cursors(live, again) == 1
    assert reused_cursors(live, _reads((1, 1), (2, 2))) == 0
    result = check(_acked(2), _reads((1, 1), (2, 2)) + [
        Received(agent="a", cursor="2", event_id="e3", key="k3")])
    assert result.reused == 1


def test_hole_between_integer_cursors_is_a_gap() -> None:
    """Consecutive receipts 1 then 3 leave a hole: counted as a gap."""
    result = check(_acked(2), _reads((1, 1), (3, 2)))
    assert _breaches(result) == {"gaps": 1}


def test_order_is_per_agent() -> None:
    """Two agents' cursors interleaved are each checked on their own, opaque ones by equality."""
    reads = _reads((1, 1), agent="a") + _reads((1, 2), agent="b") + _reads((2, 3), agent="a")
    reads.append(Received(agent="c", cursor="x1", event_id="e4", key="k4"))
    reads.append(Received(agent="c", cursor="x1", event_id="e5", key="k5"))
    result = check(_acked(5), reads)
    assert _breaches(result) == {"out_of_order": 1, "reused": 1}


def test_sends_sharing_a_key_are_refused() -> None:
    """Two sends the checker could not tell apart are a caller error."""
    with pytest.raises(ValueError, match="share the key"):
        check([Sent(key="k", acked=True), Sent(key="k", acked=False)], [])
