"""CTOX commands from local apps, carried over the link to the relay (DESIGN §Link, Commands).

A local app's ``POST /v1/ctox/{type}`` becomes one :class:`frames.Command` with a fresh request
id and an idempotency key (the app's, or one made here). :meth:`Commands.call` sends it on the
open link and waits for the :class:`frames.CommandResult` with the same request id.

Three rules shape this module:

* **Refuse at once when offline.** With no open link the call fails with 503
  ``relay_unreachable`` immediately. Nothing is queued: a "make a call" that fires hours later
  is worse than one that fails now (DESIGN §Agent local API).
* **Resend, never duplicate.** If the link drops after the command went out, the same frame
  (same request id, same idempotency key) is sent again on the next link while the request's
  deadline allows. The relay performs each idempotency key once per account and answers a
  repeat with the stored result (DESIGN §Link, Commands), so the resend cannot reach X-on twice.
* **Bounded.** At most ``max_in_flight`` commands wait at a time (429 beyond), and each waits at
  most ``timeout`` seconds (504 ``command_timeout`` after that).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import ApiError, InvalidState
from shared.link import frames

__all__ = [
    "Commands",
    "CommandSender",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_IN_FLIGHT",
    "relay_unreachable",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 15.0
"""Seconds a command may wait for its result: a little above the relay's X-on timeout (10 s),
so that the relay's own 504 ``upstream_timeout`` normally arrives first."""
DEFAULT_MAX_IN_FLIGHT = 32
"""Commands of this agent waiting for a result at once; more get 429."""


class CommandSender(Protocol):
    """One open link, as the link module hands it over on ``welcome``."""

    async def send_command(self, command: frames.Command) -> None:
        """Queue and write the frame; raises :class:`InvalidState` if the link is not open."""


def relay_unreachable(detail: str = "the agent is not connected to the relay") -> ApiError:
    return ApiError(503, "relay_unreachable", f"{detail}; the command was not sent")


@dataclass(slots=True)
class _Pending:
    command: frames.Command
    future: asyncio.Future[frames.CommandResult]


class Commands:
    """The agent's commands in flight, and the link they travel on.

    Args:
        timeout: seconds from the app's request to 504 ``command_timeout``.
        max_in_flight: most commands waiting at once (429 ``too_many_commands`` beyond).
        new_id: request id factory (also the idempotency key when the app gives none).
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._new_id = new_id
        self._sender: CommandSender | None = None
        self._pending: dict[str, _Pending] = {}
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- called by the link ---------------------------------------------------------------------

    async def attach(self, sender: CommandSender) -> None:
        """A link was welcomed: use it, and resend every command still waiting for a result."""
        self._sender = sender
        waiting = [p.command for p in self._pending.values() if not p.future.done()]
        for command in waiting:
            try:
                await sender.send_command(command)
            except InvalidState:
                return  # this link ended already; the next one resends them
            log.info("ctox.resent", extra={"request_id": command.request_id})

    def detach(self, sender: CommandSender) -> None:
        """That link ended; new calls are refused until the next ``attach``."""
        if self._sender is sender:
            self._sender = None

    def deliver(self, result: frames.CommandResult) -> None:
        """A result arrived; a result nobody waits for (timed out, or a repeat) is dropped."""
        pending = self._pending.get(result.request_id)
        if pending is None or pending.future.done():
            log.debug("ctox.result_dropped", extra={"request_id": result.request_id})
            return
        pending.future.set_result(result)

    def close(self) -> None:
        """The agent is stopping: fail every waiting call and refuse new ones."""
        self._closed = True
        self._sender = None
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ApiError(
                    503, "agent_stopping",
                    "the agent stopped before the relay answered; the command may have been "
                    "performed: retry with the same Idempotency-Key",
                ))

    # -- called by the local API ----------------------------------------------------------------

    def new_command(
        self, ctox_type: str, params: dict[str, Any], idempotency_key: str | None
    ) -> frames.Command:
        """The frame for one app request; the request id is fresh on every call."""
        request_id = self._new_id()
        return frames.Command(
            request_id=request_id,
            ctox_type=ctox_type,
            params=params,
            # DESIGN §Link, Commands: without a key from the app, one per request, so that a
            # frame resent after a reconnect is still performed once.
            idempotency_key=idempotency_key or self._new_id(),
        )

    async def call(self, command: frames.Command) -> frames.CommandResult:
        """Send ``command`` and wait for its result.

        Raises:
            ApiError: 503 ``relay_unreachable`` (no open link: nothing was sent), 429
                ``too_many_commands``, 504 ``command_timeout``, 503 ``agent_stopping``.
        """
        sender = self._sender
        if sender is None or self._closed:
            raise relay_unreachable()
        if len(self._pending) >= self.max_in_flight:
            raise ApiError(
                429, "too_many_commands",
                f"{self.max_in_flight} commands are already waiting for the relay; retry later",
            )
        future: asyncio.Future[frames.CommandResult] = asyncio.get_running_loop().create_future()
        self._pending[command.request_id] = _Pending(command, future)
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    await sender.send_command(command)
                except InvalidState:
                    raise relay_unreachable("the link to the relay just closed") from None
                return await future
        except TimeoutError:
            log.warning("ctox.timeout", extra={"request_id": command.request_id,
                                               "ctox_type": command.ctox_type})
            raise ApiError(
                504, "command_timeout",
                f"no answer from the relay within {self.timeout:g} s; the command may have "
                "reached X-on: retry with the same Idempotency-Key",
            ) from None
        finally:
            del self._pending[command.request_id]
