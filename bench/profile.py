"""Sampling profiles of the bench's processes with py-spy (``--profile DIR``).

py-spy attaches to a running process by pid and samples its Python stacks without changing
it; only threads that are running are sampled, so sample counts stand for CPU time. The raw
collapsed stacks are kept in DIR (open them with speedscope or inferno), and a summary of the
functions with the most self and inclusive samples is printed.

py-spy is not a dependency of the product: ``pip install py-spy`` (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

from .procs import Children

__all__ = ["Profiler", "summarize"]

_LINE = re.compile(r":\d+\)$")
_PLUMBING = re.compile(
    r"\((asyncio/|threading\.py|concurrent/|selectors\.py|xon-relay-|relay_server/cli\.py"
    r"|relay_agent/cli\.py)|^<module>"
)
"""Frames on every stack (event loop, worker threads, entry points): left out of the
inclusive list, where they would only say 100 %."""


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """Attach py-spy to processes; :meth:`finish` stops it and prints the summaries.

    With ``out_dir=None`` every call is a no-op, so benches call it unconditionally.
    """

    def __init__(self, out_dir: Path | None, children: Children, *, rate: int = 250) -> None:
        self.out_dir = out_dir
        self._children = children
        self._rate = rate
        self._running: list[tuple[str, asyncio.subprocess.Process, Path]] = []

    async def attach(self, name: str, pid: int) -> None:
        if self.out_dir is None:
            return
        exe = _py_spy()
        if exe is None:
            print(f"   (profile: py-spy not found; pip install py-spy to profile {name})")
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{name}.collapsed.txt"
        proc = await self._children.start(
            "py-spy",
            [exe, "record", "--pid", str(pid), "--rate", str(self._rate), "--format", "raw",
             "--nonblocking", "--output", str(out)],
            self.out_dir / f"{name}.py-spy.log",
        )
        self._running.append((name, proc, out))

    async def finish(self, top: int = 12) -> None:
        """Stop every recording (SIGINT makes py-spy write its file) and print summaries."""
        for name, proc, out in self._running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            await self._children.stop(proc)  # forgets it (and kills it if still running)
            if out.exists():
                print(summarize(name, out, top=top))
                (out.parent / f"{name}.summary.txt").write_text(summarize(name, out, top=40))
        self._running.clear()


def summarize(name: str, path: Path, *, top: int) -> str:
    """Top functions by self and by inclusive samples from a py-spy raw (collapsed) file."""
    self_count: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE.sub(")", f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += count
        self_count[frames[-1]] += count
        for frame in set(frames):
            if not _PLUMBING.search(frame):
                incl[frame] += count
    lines = [f"\n-- profile of {name}: {total} samples (CPU-active only) in {path}"]
    for title, counter in (("self", self_count), ("inclusive", incl)):
        lines.append(f"   top {top} by {title}:")
        for frame, count in counter.most_common(top):
            share = 100 * count / total if total else 0
            lines.append(f"   {share:5.1f}%  {frame}")
    return "\n".join(lines)
