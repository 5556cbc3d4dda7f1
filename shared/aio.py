"""Which event loop the relay and the agent run on (issue 7).

The relay runs on uvloop (the ``fast`` extra) when it is installed, else on asyncio's own
loop: on its throughput path most of the CPU is the loop and its socket transports, which
uvloop does in C (docs/performance.md). The agent runs on asyncio's loop by default: it does
little work per event, and uvloop's library would add ~2 MB to its idle RSS (issue 7, bench
5: ≤ 50 MB). ``XON_RELAY_EVENT_LOOP`` chooses explicitly, for either process:

- ``auto`` (default): the process's own default (:data:`UVLOOP` for the relay when
  importable, :data:`ASYNCIO` for the agent);
- ``asyncio``: always asyncio's loop (to rule uvloop out when chasing a problem);
- ``uvloop``: uvloop, and refuse to start without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, Literal, TypeVar

from .errors import ConfigError

__all__ = ["LOOP_ENV", "LOOP_CHOICES", "ASYNCIO", "UVLOOP", "loop_factory", "loop_name", "run"]

LOOP_ENV = "XON_RELAY_EVENT_LOOP"
ASYNCIO: Final = "asyncio"
UVLOOP: Final = "uvloop"
LOOP_CHOICES = ("auto", ASYNCIO, UVLOOP)

Default = Literal["asyncio", "uvloop"]
"""What ``auto`` means for a process."""

T = TypeVar("T")

log = logging.getLogger(__name__)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(
    env: Mapping[str, str] = os.environ, *, auto: Default = UVLOOP
) -> LoopFactory | None:
    """The factory ``asyncio.Runner`` should use; ``None`` means asyncio's default loop.

    Args:
        env: where ``XON_RELAY_EVENT_LOOP`` is read.
        auto: what ``auto`` (or unset) means for this process: :data:`UVLOOP` (when
            installed, else asyncio) or :data:`ASYNCIO`.

    Raises:
        ConfigError: an unknown ``XON_RELAY_EVENT_LOOP``, or ``uvloop`` asked for but not
            installed.
    """
    choice = env.get(LOOP_ENV, "").strip().lower() or "auto"
    if choice not in LOOP_CHOICES:
        raise ConfigError(
            f"environment {LOOP_ENV}: {choice!r} is not one of {', '.join(LOOP_CHOICES)}"
        )
    if (auto if choice == "auto" else choice) == ASYNCIO:
        return None
    try:
        import uvloop
    except ImportError as exc:
        if choice == UVLOOP:
            raise ConfigError(
                f"environment {LOOP_ENV}=uvloop, but uvloop is not installed"
                " (pip install 'xon-relay[fast]')"
            ) from exc
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``, for the start-up log line (at DEBUG)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(
    main: Coroutine[Any, Any, T], *, env: Mapping[str, str] = os.environ, auto: Default = UVLOOP
) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks (``auto`` as there).

    Raises:
        ConfigError: as :func:`loop_factory` (``main`` is then closed, never started).
    """
    try:
        factory = loop_factory(env, auto=auto)
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        # DEBUG: at INFO this line would precede a start-up error's one line on stderr.
        log.debug("event_loop.selected", extra={"loop": loop_name(runner.get_loop())})
        return runner.run(main)
