"""shared/logs.py: formatters, bind(), and redaction of secrets (STYLE §6)."""

from __future__ import annotations

import io
import json
import logging
import sys
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


HOSTILE = [
    "agt_1\n12:00:00 info    relay_server.hub agent.revoked agent_id=agt_victim",
    "agt_1\r\n{\"level\": \"error\", \"event\": \"forged\"}",
    "agt_1\rERROR overwritten",
    "\x1b[2J\x1b[31mred\x1b[0m",
    "nel\x85next",
    "csi\x9b31m",
    "ls\u2028ps\u2029end",
    "vt\x0bff\x0cfs\x1cgs\x1drs\x1e",
    "nul\x00del\x7f",
    "bidi\u202egnp.exe",
    "lone\ud800surrogate",
    'quote" level=error agent_id="x',
    "back\\slash\\n",
]
"""Values an unauthenticated peer can put in a logged field (an agent id, a client string)."""

_RAW_UNSAFE = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))] + [
    "\u2028", "\u2029", "\u202e", "\ud800",
]


def _emit_hostile(log: logging.Logger, value: str) -> None:
    log.warning(f"link.{value}", extra={"agent_id": value, "client": [value], "n": 1})


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_cannot_forge_a_line(
    capture: tuple[logging.Logger, io.StringIO], value: str
) -> None:
    """A control character, line separator, bidi override or lone surrogate in a field or the
    event name is escaped: the record stays one line, with nothing raw a terminal acts on."""
    log, buf = capture
    _emit_hostile(log, value)
    out = buf.getvalue()
    assert out.endswith("\n")
    assert len(out.splitlines()) == 1, out  # splitlines knows every Unicode line boundary
    for char in _RAW_UNSAFE:
        assert char not in out[:-1], f"raw {char!r} in {out!r}"


@pytest.mark.parametrize("value", HOSTILE)
def test_json_keeps_hostile_values_exact(value: str) -> None:
    """JSON lines escape the unsafe characters and still give back the value as sent."""
    record = logging.makeLogRecord(
        {"name": "relay.hub", "levelname": "WARNING", "msg": value, "agent_id": value}
    )
    line = logs.JsonFormatter().format(record)
    assert len(line.splitlines()) == 1
    data = json.loads(line)
    assert data["event"] == value and data["agent_id"] == value


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("agt_1", "agent_id=agt_1"),
        ("", 'agent_id=""'),
        ("a b", 'agent_id="a b"'),
        ("a\nb", 'agent_id="a\\nb"'),
        ('x" level=error', 'agent_id="x\\" level=error"'),
        ("C:\\data", 'agent_id="C:\\\\data"'),
        ("\x1b[31m", 'agent_id="\\x1b[31m"'),
        ("ls\u2028", 'agent_id="ls\\u2028"'),
        ("lone\ud800", 'agent_id="lone\\ud800"'),
    ],
)
def test_text_values_are_quoted_and_escaped(value: str, shown: str) -> None:
    """A text value is bare when unambiguous, else quoted with backslash escapes (logfmt): a
    hostile value cannot add a field or end the record."""
    record = logging.makeLogRecord(
        {"name": "relay.hub", "levelname": "INFO", "msg": "agent.hello", "agent_id": value}
    )
    line = logs.TextFormatter().format(record)
    assert line.endswith(" agent.hello " + shown)


def test_text_event_name_is_escaped() -> None:
    """Event text (a third-party library's message too) keeps its spaces, loses raw controls."""
    record = logging.makeLogRecord(
        {"name": "aiohttp.server", "levelname": "ERROR", "msg": "Bad request %r\nx",
         "args": ("GET /\x1b",)}
    )
    line = logs.TextFormatter().format(record)
    assert line.endswith("aiohttp.server Bad request 'GET /\\x1b'\\nx")


def test_text_traceback_lines_are_indented() -> None:
    """A traceback follows the record on lines that all start with two spaces, so an exception
    message carrying a newline cannot pass for a record of its own."""
    try:
        raise ValueError("bad agent\n12:00:00 info    relay_server.hub forged.event")
    except ValueError:
        record = logging.makeLogRecord(
            {"name": "relay.hub", "levelname": "ERROR", "msg": "link.failed",
             "exc_info": sys.exc_info()}
        )
    first, *rest = logs.TextFormatter().format(record).split("\n")
    assert first.endswith("relay.hub link.failed")
    assert rest and all(line.startswith("  ") for line in rest)
    assert any("forged.event" in line for line in rest)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_lone_surrogate_reaches_a_utf8_stream(fmt: str) -> None:
    """A strict UTF-8 stream takes a record whose value holds a lone surrogate (escaped), so
    the record is written, not replaced by a logging error."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    try:
        logs.setup("debug", fmt, stream=stream)
        with pytest.MonkeyPatch.context() as patch:
            failures: list[logging.LogRecord] = []
            patch.setattr(logging.Handler, "handleError", lambda self, rec: failures.append(rec))
            logging.getLogger("tests.surrogate").info("agent.hello", extra={"agent_id": "a\ud800"})
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert failures == []
    assert b"agent.hello" in raw.getvalue() and b"\\ud800" in raw.getvalue()
