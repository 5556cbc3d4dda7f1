"""Events the link cannot carry, and the stand-ins sent in their place (pure: no I/O).

docs/delivery.md, Withheld events: an event stored by an older version, or under a limit
lowered since, may be one the link cannot carry: its frame would pass
``link.max_message_size`` (the agent would close with 1009), or a string in it holds a lone
surrogate, which has no UTF-8 form (the write would fail). Sent as it is, it would end the
account's link on every reconnect, forever. It is set aside instead: the agent receives a
small stand-in with the same ``id``, ``account``, ``type`` and ``received_at`` at the same
``seq``, no params and no request body, and a ``withheld`` object saying why, so that the seq
chain stays intact and delivery goes on.

Status frames follow the same rule (docs/ctox.md, Status items): items that do not fit one frame
are split over several, and an item that cannot travel even alone is left out.

The check costs a few additions per event: only an event whose worst-case size could reach the
limit, or with a string that is not ASCII, is encoded to be sure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from shared.events import XonEvent

__all__ = ["Withheld", "withheld", "stand_in", "status_runs", "FRAME_OVERHEAD"]

Reason = Literal["too_large", "not_encodable"]

FRAME_OVERHEAD = 256
"""Bytes kept for the frame around an event (``{"v":1,"type":"event","seq":…,"event":…}``,
or an ``events`` frame's head and tail), with room to spare."""
_WORST_CHAR = 6
"""UTF-8 bytes one character can take in JSON at worst (a control character as ``\\u0000``)."""
_PATH_KEPT = 1024
"""Longest request path a stand-in keeps (characters); a longer one is emptied too."""
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True, slots=True)
class Withheld:
    """Why an event was set aside, and its size on the wire (or as near as it has one)."""

    reason: Reason
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "bytes": self.bytes}


def _strings(event: XonEvent) -> list[str] | None:
    """Every string of the event object; ``None`` when a param is not a string (an older
    version's data: only encoding it tells its size)."""
    request = event.request
    strings = [event.id, event.account, event.type, event.received_at]
    strings += (request.method, request.path, request.query, request.content_type)
    params: dict[Any, Any] = event.params  # typed str → str, but stored by an older version
    for name, value in params.items():
        if not isinstance(name, str) or not isinstance(value, str):
            return None
        strings += (name, value)
    return strings


def withheld(event: XonEvent, max_message_size: int) -> Withheld | None:
    """Why ``event`` cannot travel on a link whose messages are at most
    ``max_message_size`` bytes; ``None`` when it can."""
    strings = _strings(event)
    budget = max_message_size - FRAME_OVERHEAD
    if strings is not None and all(s.isascii() for s in strings):
        body = (len(event.request.body) + 2) // 3 * 4
        if _WORST_CHAR * sum(map(len, strings)) + body + FRAME_OVERHEAD <= budget:
            return None  # the common case: nothing to encode
    text = _dumps(event.to_json())
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return Withheld("not_encodable", len(text.encode("utf-8", "surrogatepass")))
    return Withheld("too_large", size) if size > budget else None


def stand_in(event: XonEvent, why: Withheld) -> dict[str, Any]:
    """The event object sent in place of ``event`` (module docstring)."""
    request = event.request
    path = request.path if len(request.path) <= _PATH_KEPT else ""
    return {
        "id": _text(event.id),
        "account": _text(event.account),
        "type": _text(event.type),
        "received_at": _text(event.received_at),
        "params": {},
        "request": {
            "method": _text(request.method),
            "path": _text(path),
            "query": "",
            "content_type": "",
            "body_b64": "",
        },
        "withheld": why.to_json(),
    }


def _text(value: str) -> str:
    """``value`` with any lone surrogate replaced by ``?``, so the stand-in always encodes."""
    return value.encode("utf-8", "replace").decode("utf-8")


def status_runs(items: list[dict[str, Any]], max_message_size: int) -> tuple[list[list[Any]], int]:
    """``items`` cut into runs that each fit one ``status`` frame, in order, and how many were
    left out (one alone would not fit, or it is not encodable). At least one run, perhaps
    empty: a snapshot with nothing in it still says so."""
    budget = max_message_size - FRAME_OVERHEAD
    runs: list[list[Any]] = [[]]
    size = dropped = 0
    for item in items:
        try:
            length = len(_dumps(item).encode("utf-8")) + 1  # the comma
        except UnicodeEncodeError:
            dropped += 1
            continue
        if length > budget:
            dropped += 1
            continue
        if runs[-1] and size + length > budget:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += length
    return runs, dropped
