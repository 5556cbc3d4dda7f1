"""shared/errors.py: the one hierarchy, its attributes, codes, statuses and messages."""

from __future__ import annotations

import pytest

from shared import errors as e


@pytest.mark.parametrize(
    ("cls", "parents"),
    [
        (e.ConfigError, (e.RelayError,)),
        (e.LocalProtocolError, (e.ProtocolError, e.RelayError)),
        (e.RemoteProtocolError, (e.ProtocolError, e.RelayError)),
        (e.InvalidState, (e.RelayError, AssertionError)),
        (e.LinkClosedOK, (e.LinkClosed, e.RelayError)),
        (e.LinkClosedError, (e.LinkClosed, e.RelayError)),
        (e.Unauthorized, (e.AuthError, e.RelayError)),
        (e.Forbidden, (e.AuthError, e.RelayError)),
        (e.Revoked, (e.Forbidden, e.AuthError, e.RelayError)),
        (e.ApiError, (e.RelayError,)),
        (e.StoreError, (e.RelayError,)),
        (e.UpstreamError, (e.RelayError,)),
        (e.UpstreamTimeout, (e.UpstreamError, e.RelayError, TimeoutError)),
    ],
)
def test_hierarchy(cls: type[Exception], parents: tuple[type[BaseException], ...]) -> None:
    """Every error sits where the tree in the module docstring draws it."""
    for parent in parents:
        assert issubclass(cls, parent)
    assert issubclass(cls, Exception)


def test_every_exported_name_is_a_relay_error() -> None:
    """__all__ lists only members of the one hierarchy."""
    for name in e.__all__:
        assert issubclass(getattr(e, name), e.RelayError)


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (e.RelayError("x"), "error", 500),
        (e.ConfigError("x"), "config_error", 500),
        (e.RemoteProtocolError("x"), "protocol_error", 400),
        (e.InvalidState("x"), "invalid_state", 500),
        (e.LinkClosedError(1006), "link_closed", 503),
        (e.Unauthorized(), "unauthorized", 401),
        (e.Forbidden(), "forbidden", 403),
        (e.Revoked(), "revoked", 403),
        (e.StoreError("x"), "store_unavailable", 503),
        (e.UpstreamError("x"), "upstream_error", 502),
        (e.UpstreamTimeout("x"), "upstream_timeout", 504),
        (e.ApiError(413, "body_too_large", "too big"), "body_too_large", 413),
    ],
)
def test_code_and_http_status(exc: e.RelayError, code: str, status: int) -> None:
    """Each error carries the code and HTTP status the error middleware answers with."""
    assert exc.code == code
    assert exc.http_status == status


def test_protocol_error_keeps_close_code_and_message() -> None:
    """ProtocolError stores its close code (default 4000) and prints its message."""
    default = e.RemoteProtocolError("bad frame")
    assert default.close_code == 4000
    assert str(default) == "bad frame"
    err = e.RemoteProtocolError("unknown frame type 'x'", close_code=4002)
    assert err.close_code == 4002
    assert err.message == "unknown frame type 'x'"
    assert str(err) == "unknown frame type 'x'"


def test_link_closed_attributes_and_str() -> None:
    """LinkClosed keeps code and reason; str names both, or says no reason was given."""
    err = e.LinkClosedError(4403, "revoked")
    assert (err.close_code, err.reason) == (4403, "revoked")
    assert str(err) == "link closed (code 4403): revoked"
    assert str(e.LinkClosedOK(None)) == "link closed (code None): no reason given"


def test_auth_error_default_message() -> None:
    """AuthError and its subclasses have a readable default message."""
    assert str(e.Unauthorized()) == "authentication failed"
    assert str(e.Revoked("agent a1 was revoked")) == "agent a1 was revoked"
    assert e.Revoked("m").message == "m"


def test_api_error_attributes() -> None:
    """ApiError keeps its status, code and message per instance."""
    err = e.ApiError(410, "cursor_expired", "cursor is older than the inbox keeps")
    assert (err.http_status, err.code, err.message) == (
        410, "cursor_expired", "cursor is older than the inbox keeps"
    )
    assert str(err) == "cursor is older than the inbox keeps"
    other = e.ApiError(400, "bad_request", "limit must be 1-1000")
    assert (err.http_status, other.http_status) == (410, 400)
    assert (err.code, other.code) == ("cursor_expired", "bad_request")


def test_invalid_state_is_caught_as_assertion() -> None:
    """InvalidState can be caught as AssertionError (caller misuse), like websockets."""
    with pytest.raises(AssertionError):
        raise e.InvalidState("send before open")


def test_upstream_timeout_is_caught_as_timeout() -> None:
    """UpstreamTimeout is a TimeoutError for code that handles timeouts generically."""
    with pytest.raises(TimeoutError):
        raise e.UpstreamTimeout("X-on did not answer in 10 s")


def test_chained_cause_is_kept() -> None:
    """`raise X from exc` keeps the third-party cause for the logs."""
    cause = OSError("disk full")
    with pytest.raises(e.StoreError) as info:
        try:
            raise cause
        except OSError as exc:
            raise e.StoreError("commit failed") from exc
    assert info.value.__cause__ is cause
    assert str(info.value) == "commit failed"
