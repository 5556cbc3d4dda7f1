"""When the relay refuses this agent: what to say, and the record ``status`` reads afterwards.

A revoked agent (close 4403) or one the relay does not know (4401, HTTP 401/403 at the upgrade)
cannot fix itself: ``run`` exits 3 and only a new enrollment helps (docs/deployment.md, Check).
Every place that reports it (``run``'s log, ``status``, ``doctor``) says so in the same words,
built here. ``run`` leaves ``refused.json`` in the data dir so that ``status`` can still tell
why the agent is not running; ``run`` and ``enroll`` remove it.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.files import write_private_file

__all__ = ["Refusal", "Kind", "REFUSED_FILE", "message", "record", "read", "clear"]

REFUSED_FILE = "refused.json"

Kind = Literal["revoked", "unauthorized"]


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: Kind
    reason: str
    """What the relay said (its close reason or HTTP status)."""
    at: float
    """Unix time of the refusal."""


def message(kind: Kind, *, agent_id: str, relay_url: str, data_dir: Path) -> str:
    """One line: ``re-enroll: <cause>; <what to do>``."""
    if kind == "revoked":
        cause = f"the relay's operator revoked agent {agent_id}"
    else:
        cause = (f"the relay at {relay_url or 'the configured URL'} does not know agent "
                 f"{agent_id} (removed, never fully enrolled, or another relay answers there)")
    return (f"re-enroll: {cause}; ask the operator for a new enrollment code, then run "
            f"xon-relay-agent enroll --force --relay {relay_url or 'URL'} --code CODE "
            f"--data-dir {data_dir}")


def record(data_dir: Path, kind: Kind, reason: str, *, now: float | None = None) -> None:
    """Leave the refusal for ``status`` (best effort: a read-only disk must not hide the exit
    code)."""
    text = json.dumps({"kind": kind, "reason": reason[:300],
                       "at": time.time() if now is None else now})
    with contextlib.suppress(OSError):
        write_private_file(data_dir / REFUSED_FILE, text + "\n")


def read(data_dir: Path) -> Refusal | None:
    """The refusal ``run`` recorded, or None (none, or unreadable)."""
    try:
        data = json.loads((data_dir / REFUSED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in ("revoked", "unauthorized"):
        return None
    at = data.get("at")
    return Refusal(kind=data["kind"], reason=str(data.get("reason", "")),
                   at=float(at) if isinstance(at, int | float) else 0.0)


def clear(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / REFUSED_FILE).unlink()
