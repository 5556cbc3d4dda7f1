"""shared/aio.py: which event loop the relay and the agent run on (issue 7)."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys

import pytest

from shared import aio
from shared.errors import ConfigError

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_uvloop = pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")


async def _running_loop() -> str:
    return aio.loop_name(asyncio.get_running_loop())


def test_asyncio_choice_runs_the_standard_loop() -> None:
    """XON_RELAY_EVENT_LOOP=asyncio never uses uvloop, installed or not."""
    env = {aio.LOOP_ENV: "asyncio"}
    assert aio.loop_factory(env) is None
    assert aio.run(_running_loop(), env=env) == "asyncio"


@needs_uvloop
@pytest.mark.parametrize("value", ["", "auto", " Auto ", "uvloop", "UVLOOP"])
def test_auto_and_uvloop_choices_run_uvloop_when_installed(value: str) -> None:
    """Unset, ``auto`` or ``uvloop`` (any case, spaces ignored) run on uvloop."""
    env = {aio.LOOP_ENV: value} if value else {}
    assert aio.run(_running_loop(), env=env) == "uvloop"


@needs_uvloop
@pytest.mark.parametrize("value", ["", "auto", "asyncio"])
def test_a_process_whose_auto_is_asyncio_runs_asyncio(value: str) -> None:
    """The agent's default (auto=ASYNCIO): asyncio's loop, uvloop installed or not."""
    env = {aio.LOOP_ENV: value} if value else {}
    assert aio.loop_factory(env, auto=aio.ASYNCIO) is None
    assert aio.run(_running_loop(), env=env, auto=aio.ASYNCIO) == "asyncio"


@needs_uvloop
def test_uvloop_asked_for_overrides_a_process_default_of_asyncio() -> None:
    """XON_RELAY_EVENT_LOOP=uvloop runs the agent on uvloop too."""
    env = {aio.LOOP_ENV: "uvloop"}
    assert aio.run(_running_loop(), env=env, auto=aio.ASYNCIO) == "uvloop"


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without uvloop, the default runs on asyncio's loop; asking for uvloop is refused."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes ``import uvloop`` fail
    assert aio.loop_factory({}) is None
    assert aio.run(_running_loop(), env={}) == "asyncio"
    with pytest.raises(ConfigError, match=f"{aio.LOOP_ENV}=uvloop.*not installed"):
        aio.loop_factory({aio.LOOP_ENV: "uvloop"})


def test_unknown_choice_is_a_config_error_and_nothing_runs() -> None:
    """A typo names the variable and the choices; the coroutine is closed, never started."""
    started = []

    async def main() -> None:
        started.append(True)

    coro = main()
    with pytest.raises(ConfigError, match=f"{aio.LOOP_ENV}.*'fastest'.*auto, asyncio, uvloop"):
        aio.run(coro, env={aio.LOOP_ENV: "fastest"})
    assert started == []
    # Closed: no "coroutine was never awaited" warning either.
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_run_returns_the_result_and_closes_the_loop() -> None:
    """Like asyncio.run: the coroutine's value comes back, and its loop is closed after."""
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        loops.append(asyncio.get_running_loop())
        return 42

    assert aio.run(main(), env={}) == 42
    assert loops[0].is_closed()
