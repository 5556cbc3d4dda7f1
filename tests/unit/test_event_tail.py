"""The in-memory tail of committed events (relay_server/store/tail.py): it answers a read only
when it holds every event of the account after the position asked for."""

from __future__ import annotations

from relay_server.store.base import StoredEvent
from relay_server.store.tail import EventTail
from shared.events import RawRequest, XonEvent


def stored(seq: int, account: str = "acc_a", body: bytes = b"x") -> StoredEvent:
    return StoredEvent(
        seq=seq,
        event=XonEvent(
            id=f"ev_{seq}",
            account=account,
            type="sms.received",
            received_at="2026-11-27T00:00:00.000Z",
            params={},
            request=RawRequest(method="POST", path="", query="", content_type="", body=body),
        ),
    )


def seqs(events: list[StoredEvent] | None) -> list[int] | None:
    return None if events is None else [e.seq for e in events]


def test_reads_above_the_floor_come_from_memory_in_order() -> None:
    tail = EventTail(10)
    for seq, account in ((11, "acc_a"), (12, "acc_b"), (14, "acc_a"), (15, "acc_a")):
        tail.add(stored(seq, account))
    assert seqs(tail.read("acc_a", after=10, limit=10)) == [11, 14, 15]
    assert seqs(tail.read("acc_a", after=11, limit=1)) == [14]
    assert seqs(tail.read("acc_a", after=13, limit=10)) == [14, 15]
    assert seqs(tail.read("acc_a", after=15, limit=10)) == []
    assert seqs(tail.read("acc_b", after=10, limit=10)) == [12]
    assert seqs(tail.read("acc_c", after=10, limit=10)) == []  # none appended since opening


def test_a_read_below_the_floor_is_not_answered() -> None:
    tail = EventTail(10)
    tail.add(stored(11))
    assert tail.read("acc_a", after=9, limit=10) is None
    assert tail.read("acc_z", after=0, limit=10) is None


def test_evicting_by_count_raises_that_accounts_floor() -> None:
    tail = EventTail(0, max_events=3)
    for seq, account in ((1, "acc_a"), (2, "acc_b"), (3, "acc_a"), (4, "acc_a")):
        tail.add(stored(seq, account))
    assert len(tail) == 3
    assert tail.read("acc_a", after=0, limit=10) is None  # seq 1 was evicted
    assert seqs(tail.read("acc_a", after=1, limit=10)) == [3, 4]
    assert seqs(tail.read("acc_b", after=0, limit=10)) == [2]
    tail.add(stored(5, "acc_a"))
    assert tail.read("acc_b", after=0, limit=10) is None
    assert seqs(tail.read("acc_b", after=2, limit=10)) == []


def test_evicting_by_body_bytes() -> None:
    tail = EventTail(0, max_bytes=10)
    tail.add(stored(1, body=b"123456"))
    tail.add(stored(2, body=b"123456"))
    assert len(tail) == 1
    assert seqs(tail.read("acc_a", after=1, limit=10)) == [2]
    assert tail.read("acc_a", after=0, limit=10) is None


def test_many_evictions_keep_reads_right() -> None:
    tail = EventTail(0, max_events=5)
    for seq in range(1, 101):
        tail.add(stored(seq, "acc_a" if seq % 3 else "acc_b"))
    assert len(tail) == 5
    assert seqs(tail.read("acc_a", after=95, limit=10)) == [97, 98, 100]
    assert tail.read("acc_a", after=94, limit=10) is None
    assert seqs(tail.read("acc_b", after=96, limit=10)) == [99]


def test_a_head_the_tail_never_took_drops_the_account() -> None:
    """Another writer appended seq 13: reads up to it must go to the store."""
    tail = EventTail(10)
    tail.add(stored(11))
    tail.check_head("acc_a", 11)  # what the tail knows: nothing changes
    assert seqs(tail.read("acc_a", after=10, limit=10)) == [11]
    tail.check_head("acc_a", 13)
    assert tail.read("acc_a", after=11, limit=10) is None
    assert seqs(tail.read("acc_a", after=13, limit=10)) == []
    tail.add(stored(12))  # committed before that head was read: the store serves it
    tail.add(stored(14))
    assert seqs(tail.read("acc_a", after=13, limit=10)) == [14]
    assert len(tail) == 1


def test_forget_through_a_trim_and_whole() -> None:
    tail = EventTail(0)
    for seq in (1, 2, 3):
        tail.add(stored(seq))
    tail.add(stored(4, "acc_b"))
    tail.forget("acc_a", through=2)
    assert tail.read("acc_a", after=1, limit=10) is None
    assert seqs(tail.read("acc_a", after=2, limit=10)) == [3]
    tail.forget("acc_a")
    assert tail.read("acc_a", after=2, limit=10) is None
    assert seqs(tail.read("acc_a", after=3, limit=10)) == []
    assert seqs(tail.read("acc_b", after=0, limit=10)) == [4]
    assert len(tail) == 1
