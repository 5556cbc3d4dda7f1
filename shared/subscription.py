"""Which events one agent receives: its subscription (pure: no I/O).

Issue 4, "Routing": an agent may subscribe to a subset of its account's events, by event type
and/or by parameter values (the dialled number or the extension a reception PC handles). The
agent sends its subscription in ``hello`` (docs/protocol.md, Routing); the relay sends that
agent only the events :meth:`Subscription.matches` accepts. No subscription, or an empty one,
means every event.

Wire form, the optional ``subscription`` object of ``hello``::

    {"types": ["call.arriving", "sms.*"], "params": {"dialled": ["0201234567"]}}

Matching rules (docs/protocol.md, Routing, is the reference):

* ``types``: the event's type must equal one entry, or start with the part before ``*`` of an
  entry ending in ``.*`` (``"call.*"`` matches ``call.arriving`` and ``call.ended``). Absent or
  empty: any type.
* ``params``: for *every* name listed, the event must carry that parameter with a value equal
  (exact, case-sensitive string comparison) to one of the listed values. An event without the
  parameter does not match. Absent or empty: no parameter constraint.
* Both together: the event must pass both.

The same type patterns serve the agent's own per-target ``types`` filters (forward, tcp), so
that one rule reads the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Subscription",
    "EVERYTHING",
    "MAX_ENTRIES",
    "MAX_LENGTH",
    "MAX_PARAMS",
    "MAX_VALUES",
    "MAX_CHARS",
]

MAX_ENTRIES = 256
"""Most types, or values of one parameter, one subscription may list."""
MAX_PARAMS = 16
"""Most parameter names one subscription may constrain (each costs a lookup per event)."""
MAX_VALUES = 1024
"""Most parameter values one subscription may list in all."""
MAX_LENGTH = 256
"""Longest type pattern, parameter name or value, in characters."""
MAX_CHARS = 64 * 1024
"""Most characters of all its types, names and values together."""

_KEYS = frozenset({"types", "params"})


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of strings")
    if len(value) > MAX_ENTRIES:
        raise ValueError(f"{what} lists more than {MAX_ENTRIES} entries")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > MAX_LENGTH:
            raise ValueError(f"{what} entries must be strings of 1 to {MAX_LENGTH} characters")
    return tuple(dict.fromkeys(value))  # duplicates dropped, order kept


def _prefix_ends(event_type: str, longest: int) -> list[int]:
    """Offsets just after each dot of ``event_type`` within its first ``longest`` characters:
    the candidate ``<prefix>.`` of every ``<prefix>.*`` pattern that could match it."""
    ends = []
    dot = event_type.find(".", 0, longest)
    while dot >= 0:
        ends.append(dot + 1)
        dot = event_type.find(".", dot + 1, longest)
    return ends


@dataclass(frozen=True, slots=True)
class Subscription:
    """An agent's subscription; the default instance matches everything.

    Build one from the wire with :meth:`from_wire`, which validates; the constructor trusts
    its arguments.
    """

    types: tuple[str, ...] = ()
    """Exact types and ``prefix.*`` patterns; empty: any type."""
    params: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(parameter name, accepted values) pairs; every pair must match."""
    # Compiled once, so that matching one event costs a few set lookups whatever the size of
    # the subscription: the relay matches every event of the account's log it scans.
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _prefixes: frozenset[str] = field(init=False, repr=False, compare=False)
    _longest: int = field(init=False, repr=False, compare=False)
    _accepted: tuple[tuple[str, frozenset[str]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        prefixes = frozenset(p[:-1] for p in self.types if p.endswith(".*"))
        object.__setattr__(self, "_exact", frozenset(self.types) - {p + "*" for p in prefixes})
        object.__setattr__(self, "_prefixes", prefixes)
        object.__setattr__(self, "_longest", max(map(len, prefixes), default=0))
        accepted = tuple((name, frozenset(values)) for name, values in self.params)
        object.__setattr__(self, "_accepted", accepted)

    @classmethod
    def from_wire(cls, data: Any) -> Subscription:
        """Validate the ``subscription`` object of a ``hello``.

        Unknown keys are refused rather than ignored: a constraint the relay does not know
        would otherwise silently widen what the agent receives.

        Raises:
            ValueError: not an object of the documented shape, or over the size limits.
        """
        if not isinstance(data, Mapping):
            raise ValueError("subscription must be an object")
        unknown = sorted(str(key) for key in data if key not in _KEYS)
        if unknown:
            raise ValueError(f"subscription has unknown keys: {', '.join(unknown)}")
        types = _strings(data.get("types", []), "subscription.types")
        for pattern in types:
            if "*" in pattern and (not pattern.endswith(".*") or "*" in pattern[:-1]):
                raise ValueError(
                    f"subscription type {pattern!r}: '*' may only end a pattern, as in 'call.*'"
                )
        raw_params = data.get("params", {})
        if not isinstance(raw_params, Mapping):
            raise ValueError("subscription.params must be an object")
        if len(raw_params) > MAX_PARAMS:
            raise ValueError(f"subscription.params names more than {MAX_PARAMS} parameters")
        params = []
        chars = sum(map(len, types))
        values_in_all = 0
        for name, values in raw_params.items():
            if not isinstance(name, str) or not name or len(name) > MAX_LENGTH:
                raise ValueError(f"subscription.params names must be 1 to {MAX_LENGTH} characters")
            accepted = _strings(values, f"subscription.params.{name[:32]}")
            if not accepted:
                raise ValueError(f"subscription.params.{name[:32]} needs at least one value")
            values_in_all += len(accepted)
            chars += len(name) + sum(map(len, accepted))
            params.append((name, accepted))
        if values_in_all > MAX_VALUES:
            raise ValueError(f"subscription.params lists more than {MAX_VALUES} values in all")
        if chars > MAX_CHARS:
            raise ValueError(f"subscription is longer than {MAX_CHARS} characters in all")
        return cls(types, tuple(params))

    def digest(self) -> bytes:
        """A fingerprint of what this subscription matches (equal subscriptions, equal
        digests), to recognise it again on a later link without keeping it whole."""
        wire = json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(wire.encode("utf-8", "surrogatepass")).digest()

    @property
    def is_everything(self) -> bool:
        return not self.types and not self.params

    def to_wire(self) -> dict[str, Any] | None:
        """The ``hello`` field: ``None`` (leave it out) when this matches everything."""
        if self.is_everything:
            return None
        wire: dict[str, Any] = {}
        if self.types:
            wire["types"] = list(self.types)
        if self.params:
            wire["params"] = {name: list(values) for name, values in self.params}
        return wire

    def matches_type(self, event_type: str) -> bool:
        if not self.types or event_type in self._exact:
            return True
        if not self._prefixes:
            return False
        prefixes = self._prefixes
        return any(
            event_type[:end] in prefixes for end in _prefix_ends(event_type, self._longest)
        )

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Whether an event object (DESIGN §Agent local API shape) is for this subscriber.

        Reads ``type`` and ``params``; a malformed event (no string type, params not an
        object) matches only the everything-subscription.
        """
        if self.is_everything:
            return True
        event_type = event.get("type")
        params = event.get("params")
        if not isinstance(event_type, str) or not isinstance(params, Mapping):
            return False
        if not self.matches_type(event_type):
            return False
        for name, accepted in self._accepted:
            value = params.get(name)
            if not isinstance(value, str) or value not in accepted:
                return False
        return True


EVERYTHING = Subscription()
