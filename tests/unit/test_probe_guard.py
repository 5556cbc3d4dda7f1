"""relay_server/probe.py's replay memory (docs/protocol.md, Enrollment probe), on a fake clock."""

from __future__ import annotations

from relay_server.probe import MAX_SEEN, SKEW, ProbeGuard
from tests.helpers.clock import FakeClock


def test_a_probe_is_refused_again_until_it_could_no_longer_pass_the_skew() -> None:
    """Seen once: refused for 2 × SKEW, then forgotten (its time is stale by then anyway)."""
    clock = FakeClock(1_000_000.0)
    guard = ProbeGuard(lockout=None, clock=clock)
    assert guard.first_use("sig-a")
    assert not guard.first_use("sig-a")
    clock.advance(2 * SKEW - 1)
    assert not guard.first_use("sig-a") and guard.first_use("sig-b")
    clock.advance(1)
    assert guard.first_use("sig-a")


def test_the_memory_is_bounded() -> None:
    """At most MAX_SEEN probes are remembered; the oldest go first."""
    guard = ProbeGuard(lockout=None, clock=FakeClock(0.0))
    for n in range(MAX_SEEN + 10):
        assert guard.first_use(f"sig-{n}")
    assert len(guard) == MAX_SEEN
    assert guard.first_use("sig-0") and not guard.first_use(f"sig-{MAX_SEEN + 9}")
