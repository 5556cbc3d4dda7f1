"""What every bench needs: process figures from /proc, the fd limit, tables, the machine."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Row",
    "print_table",
    "raise_nofile",
    "rss_kib",
    "cpu_seconds",
    "context_switches",
    "own_cpu_seconds",
    "machine",
    "percentile",
    "rate",
    "ms",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    value: str
    target: str = ""


def print_table(title: str, params: dict[str, object], rows: Sequence[Row]) -> None:
    """One bench's result: a title, its parameters on one line, then figure / value / target."""
    print(f"\n== {title}")
    print("   " + ", ".join(f"{k}={v}" for k, v in params.items()))
    width = max([len(r.figure) for r in rows] + [6])
    vwidth = max([len(r.value) for r in rows] + [5])
    print(f"   {'figure':<{width}}  {'value':>{vwidth}}  target")
    for r in rows:
        print(f"   {r.figure:<{width}}  {r.value:>{vwidth}}  {r.target}")
    sys.stdout.flush()


def raise_nofile(want: int) -> int:
    """Raise this process's soft fd limit towards ``want`` (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of ``pid`` in KiB: ``VmRSS`` (all), ``RssAnon`` (heap, stacks: the
    process's own) or ``RssFile`` (mapped files: code and libraries, shared with others)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` used so far (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def own_cpu_seconds() -> float:
    """User + system CPU seconds this process (the load generator) used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of ``pid`` so far (wake-ups)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if "ctxt_switches" in line:
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue  # the thread ended while we looked
    return total


def machine() -> str:
    """nproc, CPU model and Python version, for the tables and docs/performance.md."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, load average {load}"
    )


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0–100, step 0.1), interpolated; 0 for no values."""
    if not values:
        return 0.0
    if p >= 100:
        return max(values)
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, int(p * 10) - 1)]


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f} ev/s" if seconds > 0 else "n/a"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"
