"""The X-on event model (pure: no I/O).

An event is what X-on sent to an account's ingress URL, kept losslessly (DESIGN principle 2):
the raw request (method, path suffix, query string, content type, body bytes) plus the params
parsed from it as a convenience. Its wire/JSON form is the event object of DESIGN §Agent local
API::

    {"id", "account", "type", "received_at", "params": {...},
     "request": {"method", "path", "query", "content_type", "body_b64"}}

The agent adds ``cursor`` when it hands an event to a local app.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["RawRequest", "XonEvent", "format_time", "parse_time"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RawRequest:
    """X-on's request exactly as it arrived."""

    method: str
    path: str
    """Path suffix after the ingress key, e.g. ``"/sms.received"`` or ``""``."""
    query: str
    """Raw query string, without ``?``, byte-exact as sent (percent-encoding kept)."""
    content_type: str
    body: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "content_type": self.content_type,
            "body_b64": base64.b64encode(self.body).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RawRequest:
        """Raises ``ValueError`` on a malformed object."""
        try:
            return cls(
                method=str(data["method"]),
                path=str(data["path"]),
                query=str(data["query"]),
                content_type=str(data["content_type"]),
                body=base64.b64decode(data["body_b64"], validate=True),
            )
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"malformed request object: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class XonEvent:
    """One stored X-on event."""

    id: str
    """Stable id assigned by the relay; every hop drops duplicates by it."""
    account: str
    type: str
    received_at: str
    """ISO 8601 UTC time the relay committed the event, e.g. ``2026-11-26T15:04:05.123Z``."""
    params: dict[str, str] = field(default_factory=dict)
    request: RawRequest

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "account": self.account,
            "type": self.type,
            "received_at": self.received_at,
            "params": dict(self.params),
            "request": self.request.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> XonEvent:
        """Raises ``ValueError`` on a malformed object."""
        try:
            params = data["params"]
            if not isinstance(params, dict):
                raise TypeError("params must be an object")
            return cls(
                id=str(data["id"]),
                account=str(data["account"]),
                type=str(data["type"]),
                received_at=str(data["received_at"]),
                params={str(k): str(v) for k, v in params.items()},
                request=RawRequest.from_json(data["request"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed event object: {exc}") from exc


def format_time(ts: float) -> str:
    """Unix time → ISO 8601 UTC with milliseconds and a ``Z``."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float:
    """ISO 8601 → Unix time. Raises ``ValueError``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
