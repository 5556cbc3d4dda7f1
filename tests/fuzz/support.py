"""Fuzzing settings shared by tests/fuzz (issue 6, fuzzing).

The short variant runs in CI: ``EXAMPLES`` hypothesis examples per test (300 by default). The
long variant sets ``XON_FUZZ_EXAMPLES`` (e.g. 10000) and prints, per test, the example count
and memory before and after (RSS and tracemalloc, which only runs in the long variant):

    XON_FUZZ_EXAMPLES=10000 .venv/bin/pytest tests/fuzz -s -p no:logging --timeout 1800
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys
import tracemalloc
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("XON_FUZZ_EXAMPLES", "300"))
LONG = "XON_FUZZ_EXAMPLES" in os.environ

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timing is not what these tests check
    database=None,  # no .hypothesis directory in the checkout
    derandomize=not LONG,  # CI runs are reproducible; long runs explore
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


def _rss_kib() -> int:
    """Current resident set size in KiB (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak


@dataclass(slots=True)
class Counter:
    examples: int = 0


@contextmanager
def measured(name: str) -> Iterator[Counter]:
    """Count the examples run inside; in the long variant print count and memory growth."""
    counter = Counter()
    if LONG:
        gc.collect()
        tracemalloc.start()
        rss_before = _rss_kib()
        traced_before = tracemalloc.get_traced_memory()[0]
        snapshot = tracemalloc.take_snapshot()
    try:
        yield counter
    finally:
        if LONG:
            gc.collect()
            traced_after = tracemalloc.get_traced_memory()[0]
            growth = tracemalloc.take_snapshot().compare_to(snapshot, "filename")[:TOP]
            tracemalloc.stop()
            rss_after = _rss_kib()
            print(
                f"\n{name}: {counter.examples} examples; RSS {rss_before} -> {rss_after} KiB "
                f"({rss_after - rss_before:+d}); traced {traced_before // 1024} -> "
                f"{traced_after // 1024} KiB ({(traced_after - traced_before) // 1024:+d})"
            )
            for stat in growth:
                print(f"  {stat}")


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on the test's event loop from the hypothesis thread, and wait for it.

    Hypothesis drives synchronous functions; the async tests run ``given`` in a worker thread
    (``asyncio.to_thread``) and hand each example to the loop that serves the relay.
    """
    asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=EXAMPLE_TIMEOUT)


TOP = 5
"""Files whose allocations grew most, printed in the long variant."""
EXAMPLE_TIMEOUT = 30.0
"""Seconds one example may take before the test fails (never reached when things work)."""
