"""shared/logs.py: formatters, bind(), and redaction of secrets (STYLE §6)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from yarl import URL

from shared import logs

SECRET = "sEcReT0123456789abcdefghij_-kl"
"""Looks like crypto.new_token(): URL-safe base64 characters."""

FORMATTERS = [logs.JsonFormatter, logs.TextFormatter]


@pytest.fixture(params=FORMATTERS, ids=lambda f: f.__name__)
def capture(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger writing through one formatter into a buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(request.param())
    logger = logging.getLogger(f"tests.logs.{request.param.__name__}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, buf
    logger.handlers.clear()


def test_secret_in_message_is_redacted(capture: tuple[logging.Logger, io.StringIO]) -> None:
    """An ingress URL or a bearer token inside the message text never reaches the output."""
    log, buf = capture
    log.info(f"ingress.request http://relay.example/xon/{SECRET}/sms.received")
    log.warning("local.auth header=%s", f"Authorization: Bearer {SECRET}")
    log.info("ingress.path %s", f"/xon/{SECRET}")
    out = buf.getvalue()
    assert SECRET not in out
    assert "/xon/[redacted]" in out


@pytest.mark.parametrize(
    "name",
    ["token", "local_token", "key", "ingress_key", "private_key", "xon_api_key", "signature",
     "secret", "password", "authorization", "code"],
)
def test_secret_named_fields_are_redacted(
    capture: tuple[logging.Logger, io.StringIO], name: str
) -> None:
    """An extra field whose name looks secret is masked whatever its value."""
    log, buf = capture
    log.info("agent.enrolled", extra={name: SECRET, "agent_id": "a-1"})
    out = buf.getvalue()
    assert SECRET not in out
    assert "a-1" in out


def test_ingress_url_in_a_field_is_redacted(capture: tuple[logging.Logger, io.StringIO]) -> None:
    """A string field holding an ingress URL is masked (the key is in the path)."""
    log, buf = capture
    log.info("ingress.stored", extra={"url": f"http://relay.example/xon/{SECRET}?a=1",
                                      "path": f"/xon/{SECRET}/call.ended"})
    assert SECRET not in buf.getvalue()


def test_exception_text_is_redacted(capture: tuple[logging.Logger, io.StringIO]) -> None:
    """A traceback mentioning an ingress URL is masked too."""
    log, buf = capture
    try:
        raise ValueError(f"cannot parse http://relay/xon/{SECRET}/x")
    except ValueError:
        log.exception("ingress.failed")
    out = buf.getvalue()
    assert SECRET not in out
    assert "ValueError" in out


def test_bound_context_is_redacted(capture: tuple[logging.Logger, io.StringIO]) -> None:
    """bind() context is merged into every record, and secret names in it are masked."""
    log, buf = capture
    bound = logs.bind(log, conn_id="c-7", token=SECRET)
    bound.info("link.opened", extra={"agent_id": "a-9"})
    out = buf.getvalue()
    assert SECRET not in out
    assert "c-7" in out and "a-9" in out


def test_non_string_fields_are_redacted(capture: tuple[logging.Logger, io.StringIO]) -> None:
    """A URL object, dict or list in extra is redacted like a string (aiohttp's request.url)."""
    log, buf = capture
    log.info("ingress.request", extra={
        "url": URL(f"http://relay.example/xon/{SECRET}"),
        "headers": {"Authorization": f"Bearer {SECRET}"},
        "paths": [f"/xon/{SECRET}"],
    })
    assert SECRET not in buf.getvalue()


def test_status_and_close_codes_are_not_masked(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    """Non-secret numeric codes stay readable in the logs."""
    log, buf = capture
    log.info("link.closed", extra={"close_code": 4403, "status_code": 503})
    out = buf.getvalue()
    assert "4403" in out and "503" in out


def test_json_formatter_shape() -> None:
    """JSON lines carry ts, level, logger, event and the extra fields."""
    record = logging.LogRecord("relay.hub", logging.INFO, __file__, 1, "agent.connected", None,
                               None)
    record.agent_id = "a-1"
    record.resume_after = 42
    data = json.loads(logs.JsonFormatter().format(record))
    assert data["level"] == "info"
    assert data["logger"] == "relay.hub"
    assert data["event"] == "agent.connected"
    assert data["agent_id"] == "a-1"
    assert data["resume_after"] == 42
    assert data["ts"].endswith("Z")


def test_text_formatter_shape() -> None:
    """Text lines read `time level logger event key=value`."""
    record = logging.LogRecord("relay.hub", logging.WARNING, __file__, 1, "agent.slow", None,
                               None)
    record.agent_id = "a-1"
    line = logs.TextFormatter().format(record)
    assert "warning relay.hub agent.slow agent_id=a-1" in line


def test_redact_helper() -> None:
    """redact() masks ingress paths and bearer tokens and leaves other text alone."""
    assert logs.redact(f"GET /xon/{SECRET}/sms") == "GET /xon/[redacted]/sms"
    assert logs.redact(f"Bearer {SECRET}") == "Bearer [redacted]"
    assert logs.redact("GET /v1/events?after=5") == "GET /v1/events?after=5"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_installs_one_redacting_handler(fmt: str) -> None:
    """setup() writes the chosen format to the given stream, redacted."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buf = io.StringIO()
    try:
        logs.setup("debug", fmt, stream=buf)
        logging.getLogger("tests.setup").info("ingress.key", extra={"ingress_key": SECRET})
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    out = buf.getvalue()
    assert "ingress.key" in out
    assert SECRET not in out
    if fmt == "json":
        assert json.loads(out.splitlines()[0])["event"] == "ingress.key"
