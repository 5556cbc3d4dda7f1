"""Logging setup: text or JSON lines, per-connection context, and secret redaction.

Log calls name an event and put the details in ``extra`` (STYLE §6)::

    log.info("agent.connected", extra={"agent_id": agent_id, "resume_after": seq})

Never pass secrets (ingress keys, tokens, signatures, private keys) or event bodies in a log
call. As a second line of defence the formatters redact any field whose name looks secret and
any ingress URL path (``/xon/<key>``) that reaches a message.

Values often come from outside (an agent id in ``hello``, a client's header), so no value can
start a line of its own or change the look of one (docs/operations.md, Logs): the text format
writes each field as ``key=value``, quoted and backslash-escaped when the value holds a space,
a quote, ``=``, a backslash or an unsafe character, and escapes unsafe characters in the event
text; JSON escapes them in every string. Unsafe: C0 and C1 controls and DEL (newline, CR, ESC,
NEL...), the Unicode line and paragraph separators, bidirectional overrides, and lone
surrogates (which no UTF-8 stream can write).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["setup", "bind", "JsonFormatter", "TextFormatter", "redact", "escape"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_NAMES = re.compile(
    r"(key|token|secret|password|signature|authorization|nonce|^code|enrollment_code)$", re.I
)
_INGRESS_PATH = re.compile(r"(/xon/)[A-Za-z0-9_\-]+")
_BEARER = re.compile(r"(Bearer\s+)[^\s\"']+", re.I)
REDACTED = "[redacted]"

_UNSAFE_CHARS = "\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[{_UNSAFE_CHARS}]")
"""Characters no log line shows raw (module docstring)."""
_NEEDS_QUOTES = re.compile(f'[{_UNSAFE_CHARS} "=\\\\]')
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every unsafe character written as a backslash escape (``\\n``,
    ``\\x1b``, ``\\u2028``): it stays on one line and shows what was sent."""
    return _UNSAFE.sub(_escape_char, text)


def _text_value(text: str) -> str:
    """One ``key=value`` value: bare when that is unambiguous, else quoted (logfmt)."""
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def redact(text: str) -> str:
    """Mask ingress keys in URLs and bearer tokens inside free text."""
    return _BEARER.sub(r"\1" + REDACTED, _INGRESS_PATH.sub(r"\1" + REDACTED, text))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(record).items():
        if name in _STANDARD or name.startswith("_"):
            continue
        if _SECRET_NAMES.search(name):
            value = REDACTED
        elif isinstance(value, str | int | float | bool) or value is None:
            value = redact(value) if isinstance(value, str) else value
        else:
            # URLs, dicts, lists: redact their text form, so a yarl.URL or a header dict
            # carrying an ingress key or a bearer token cannot slip through.
            value = redact(str(value))
        out[name] = value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts, level, logger, event`` and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        data.update(_fields(record))
        if record.exc_info:
            data["exc"] = redact(self.formatException(record.exc_info))
        # json.dumps escapes C0 controls only; the rest of the unsafe set can only sit inside a
        # string here, where a \\u escape is valid JSON.
        return _UNSAFE.sub(_json_escape, json.dumps(data, default=str, ensure_ascii=False))


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger event key=value …`` for a console, one line per record.

    A traceback follows on lines of its own, each indented by two spaces: a record's first
    line never starts with a space, so no text inside a traceback can pass for a record.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{escape(k)}={_text_value(str(v))}" for k, v in _fields(record).items()
        )
        line = (
            f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
            f"{record.levelname.lower():7} {escape(record.name)} "
            f"{escape(redact(record.getMessage()))}"
        )
        if fields:
            line += " " + fields
        if record.exc_info:
            trace = redact(self.formatException(record.exc_info))
            line += "".join("\n  " + escape(part) for part in trace.split("\n"))
        return line


def setup(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Configure the root logger once for a CLI process (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log repeats every ingress URL (with its key); ours logs requests instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _Bound(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def bind(logger: logging.Logger, **context: Any) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """A logger that adds ``context`` (conn_id, agent_id, account…) to every record."""
    ctx: Mapping[str, Any] = context
    return _Bound(logger, ctx)
