"""Child processes of a bench: the demo's supervisor (shared.sim.procs) raising BenchFailed."""

from __future__ import annotations

from shared.errors import RelayError
from shared.sim import procs as _sim
from shared.sim.procs import STEP, wait_for_json

__all__ = ["BenchFailed", "Children", "run_command", "wait_for_json", "STEP"]


class BenchFailed(RelayError):
    """A bench could not go on; the message is the one line printed."""

    code = "bench_failed"


class Children(_sim.Children):
    """The subprocesses of one bench; :meth:`stop_all` ends every one of them."""

    error = BenchFailed


async def run_command(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 60.0
) -> str:
    """Run a short command and return its stdout; raises :class:`BenchFailed` on failure."""
    return await _sim.run_command(args, env=env, timeout=timeout, error=BenchFailed)
