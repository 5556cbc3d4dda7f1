"""Start, watch and always stop the relay and agent processes the demo (and tests) run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
from pathlib import Path
from typing import IO, Any

from shared.errors import RelayError

__all__ = ["DemoFailed", "script", "Children", "run_command", "wait_for_json", "STEP"]

STEP = 0.05
"""Seconds between two looks at a file another process writes."""


class DemoFailed(RelayError):
    """The demo could not go on; the message is the one line printed to the user."""

    code = "demo_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def script(name: str) -> str:
    """Path of a console script: beside this interpreter (the venv) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DemoFailed(f"cannot find {name}: install the project first (make demo does)")
    return found


class Children:
    """The subprocesses of one run; :meth:`stop_all` ends every one of them.

    ``error`` is the exception raised when a child died on its own; the bench subclasses this
    with its own error type, so the demo and the bench share one process supervisor.
    """

    error: type[RelayError] = DemoFailed

    def __init__(self) -> None:
        self._procs: list[tuple[str, asyncio.subprocess.Process, IO[bytes] | None]] = []

    async def start(
        self,
        name: str,
        args: list[str],
        log_path: Path | None,
        *,
        env: dict[str, str] | None = None,
        pipes: bool = False,
    ) -> asyncio.subprocess.Process:
        """Start ``args``; output to ``log_path`` (stderr too), or stdin/stdout pipes."""
        log = log_path.open("ab") if log_path is not None else None
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipes else log,
                stderr=log,
                env=env,
            )
        except BaseException:
            if log is not None:
                log.close()
            raise
        self._procs.append((name, proc, log))
        return proc

    def check_alive(self) -> None:
        """Raise :attr:`error` naming the first child that exited on its own."""
        for name, proc, log in self._procs:
            if proc.returncode is not None:
                where = f" (log: {log.name})" if log is not None else ""
                raise self.error(f"{name} exited with code {proc.returncode}{where}")

    async def stop(self, proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
        """SIGTERM one child, SIGKILL it after ``grace`` seconds; forget it."""
        for entry in list(self._procs):
            if entry[1] is proc:
                await self._stop(entry, grace)
                self._procs.remove(entry)

    async def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every child, then SIGKILL those still running after ``grace`` seconds."""
        for _, proc, _ in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for entry in self._procs:
            await self._stop(entry, grace)
        self._procs.clear()

    @staticmethod
    async def _stop(
        entry: tuple[str, asyncio.subprocess.Process, IO[bytes] | None], grace: float
    ) -> None:
        _, proc, log = entry
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if log is not None:
            log.close()


async def run_command(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    error: type[RelayError] = DemoFailed,
) -> str:
    """Run a short command and return its stdout.

    Raises:
        error: non-zero exit (with the last line of its stderr) or no end in time.
    """
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    what = " ".join([Path(args[0]).name, *args[1:3]])
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise error(f"{what} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or ["no error output"]
        raise error(f"{what} failed (exit {proc.returncode}): {lines[-1]}")
    return out.decode(errors="replace")


async def wait_for_json(path: Path, children: Children, *, timeout: float) -> dict[str, Any]:
    """Wait until ``path`` holds a JSON object (written by a child) and return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        children.check_alive()
        with contextlib.suppress(FileNotFoundError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        await asyncio.sleep(STEP)
    raise children.error(f"{path} did not appear within {timeout:g} s")
