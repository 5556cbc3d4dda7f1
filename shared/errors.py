"""The one exception hierarchy of the relay, the agent and the link core.

::

    RelayError                      code, http_status (a hint for HTTP boundaries)
    ├── ConfigError                 bad configuration: names the key and its source
    ├── ProtocolError               close_code
    │   ├── LocalProtocolError      we misused the protocol (a bug on our side)
    │   └── RemoteProtocolError     the peer broke it: close the link with close_code
    ├── InvalidState                an operation in the wrong state (also an AssertionError)
    ├── LinkClosed(code, reason)
    │   ├── LinkClosedOK
    │   └── LinkClosedError
    ├── AuthError
    │   ├── Unauthorized            401: missing or wrong credentials
    │   ├── Forbidden               403: known caller, not allowed
    │   └── Revoked                 403: the agent was revoked
    ├── ApiError(status, code, message)   a clear refusal on one of our HTTP APIs
    ├── StoreError                  the store failed (503: retry later)
    └── UpstreamError               X-on (or another upstream) failed
        └── UpstreamTimeout         also a TimeoutError

Every error keeps its data in attributes and builds ``str()`` from them, so the HTTP error
middleware can answer ``{"error": {"code": e.code, "message": str(e)}}`` with ``e.http_status``.
"""

from __future__ import annotations

__all__ = [
    "RelayError",
    "ConfigError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "InvalidState",
    "LinkClosed",
    "LinkClosedOK",
    "LinkClosedError",
    "AuthError",
    "Unauthorized",
    "Forbidden",
    "Revoked",
    "ApiError",
    "StoreError",
    "UpstreamError",
    "UpstreamTimeout",
]


class RelayError(Exception):
    """Root of every error raised on purpose by this project."""

    # Plain class attributes, not ClassVar: ApiError sets them per instance.
    code: str = "error"
    http_status: int = 500


class ConfigError(RelayError):
    """Configuration that cannot be used; the message names the key and where it came from."""

    code = "config_error"
    http_status = 500


class ProtocolError(RelayError):
    """The link protocol was broken; ``close_code`` is what the link must close with."""

    code = "protocol_error"
    http_status = 400

    def __init__(self, message: str, *, close_code: int = 4000) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code

    def __str__(self) -> str:
        return self.message


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug in our code."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids: fail the link."""


class InvalidState(RelayError, AssertionError):
    """An operation was attempted in a state that does not allow it."""

    code = "invalid_state"


class LinkClosed(RelayError):
    """The link is closed; ``code`` and ``reason`` are the WebSocket close code and reason."""

    code = "link_closed"
    http_status = 503

    def __init__(self, close_code: int | None, reason: str = "") -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason

    def __str__(self) -> str:
        return f"link closed (code {self.close_code}): {self.reason or 'no reason given'}"


class LinkClosedOK(LinkClosed):
    """The link closed normally (1000/1001)."""


class LinkClosedError(LinkClosed):
    """The link closed with an error."""


class AuthError(RelayError):
    """Authentication or authorisation failed."""

    code = "unauthorized"
    http_status = 401

    def __init__(self, message: str = "authentication failed") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Unauthorized(AuthError):
    """Missing or wrong credentials."""


class Forbidden(AuthError):
    """The caller is known but not allowed to do this."""

    code = "forbidden"
    http_status = 403


class Revoked(Forbidden):
    """The agent was revoked by an operator."""

    code = "revoked"


class ApiError(RelayError):
    """A clear refusal on one of our HTTP APIs, with its own status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.http_status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class StoreError(RelayError):
    """The store (SQLite or Redis) could not complete an operation."""

    code = "store_unavailable"
    http_status = 503


class UpstreamError(RelayError):
    """An upstream (X-on's API, a forward target) failed."""

    code = "upstream_error"
    http_status = 502


class UpstreamTimeout(UpstreamError, TimeoutError):
    """An upstream did not answer in time."""

    code = "upstream_timeout"
    http_status = 504
