"""An example catalogue of X-on XTOC event types for the simulator.

X-on's real v1 event catalogue is not public. These types and parameter names are plausible
examples, chosen to exercise the relay the way X-on would (DESIGN §What it is): real-time events
(an SMS, a call arriving, a call ending) and one *status* event that a client orders at regular
intervals (Messages Waiting). The relay itself knows no catalogue: unknown types and parameters
pass through untouched (DESIGN principle 2).

Example values deliberately contain characters that break naive encoders (``&``, ``=``, ``+``,
``<``, quotes, non-ASCII), so that the end-to-end tests check byte-exact pass-through.

Item ids are shared the way a platform shares them: the ``n``-th call's ``call.arriving`` and
``call.ended`` carry one call ``id``, and status events repeat their mailbox's ``id`` at every
interval. None of them is a repeat of another (docs/delivery.md, Duplicates): the relay must
store and deliver each one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EventSpec", "CATALOGUE", "EVENT_TYPES", "example_params"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EventSpec:
    """One example event type: its name, parameter names and a description."""

    type: str
    params: tuple[str, ...]
    description: str
    status: bool = False
    """A status event (ordered at intervals) rather than a real-time one."""
    example: Callable[[int], dict[str, str]]
    """Plausible parameters for the ``n``-th simulated event of its type; unique per ``n``.
    Events of another type with the same ``n`` may share an item id (the same call)."""


def _sms(n: int) -> dict[str, str]:
    return {
        "from": f"+4477009{n % 100000:05d}",
        "to": "+441632960000",
        "message": f"Hello #{n} & welcome: a+b=c <ok> \"quoted\" café ☎",
        "messageId": f"sms-{n:06d}",
    }


MAILBOXES = 3
"""Mailboxes the status example cycles through, so that their ids repeat."""


def _call_arriving(n: int) -> dict[str, str]:
    return {
        "id": f"call-{n:06d}",
        "caller": f"+4420794{n % 100000:05d}",
        "dialled": "+441632960001",
        "extension": str(200 + n % 50),
    }


def _call_ended(n: int) -> dict[str, str]:
    return {
        "id": f"call-{n:06d}",
        "duration": str(30 + n % 600),
        "reason": ("caller hung up", "answered elsewhere", "voicemail")[n % 3],
    }


def _messages_waiting(n: int) -> dict[str, str]:
    mailbox = f"{201 + n % MAILBOXES}"
    # The interval number keeps two polls of one mailbox with the same count distinct.
    return {"id": f"mbx-{mailbox}", "mailbox": mailbox, "count": str(n % 7), "interval": str(n)}


CATALOGUE: dict[str, EventSpec] = {
    spec.type: spec
    for spec in (
        EventSpec(
            type="sms.received",
            params=("from", "to", "message", "messageId"),
            description="an inbound SMS to one of the account's X-on numbers",
            example=_sms,
        ),
        EventSpec(
            type="call.arriving",
            params=("id", "caller", "dialled", "extension"),
            description="a call arriving on an X-on number, before it is answered",
            example=_call_arriving,
        ),
        EventSpec(
            type="call.ended",
            params=("id", "duration", "reason"),
            description="a call ended; duration in seconds",
            example=_call_ended,
        ),
        EventSpec(
            type="messages.waiting",
            params=("id", "mailbox", "count", "interval"),
            description="status event: voicemail messages waiting in a mailbox",
            status=True,
            example=_messages_waiting,
        ),
    )
}

EVENT_TYPES: tuple[str, ...] = tuple(CATALOGUE)


def example_params(event_type: str, n: int = 1) -> dict[str, str]:
    """Example parameters of ``event_type`` for the ``n``-th event.

    Raises:
        KeyError: the type is not in the example catalogue.
    """
    return CATALOGUE[event_type].example(n)
