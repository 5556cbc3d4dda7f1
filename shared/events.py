"""The X-on event model (pure: no I/O).

An event is what X-on sent to an account's ingress URL, kept losslessly (DESIGN principle 2):
the raw request (method, path suffix, query string, content type, body bytes) plus the params
parsed from it as a convenience. Its wire/JSON form is the event object of DESIGN §Agent local
API::

    {"id", "account", "type", "received_at", "params": {...},
     "request": {"method", "path", "query", "content_type", "body_b64"}}

The agent adds ``cursor`` when it hands an event to a local app.

:func:`parse_ingress` turns a raw ingress request into the event type, the flat ``params`` and
X-on's own id for the event with what a repeat must match (docs/delivery.md, Duplicates).
README, The event object: params come from the query string, a form body, a JSON object or
an XML/SOAP body; the event type is the path suffix or a type parameter.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import json
import math
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import ApiError

__all__ = [
    "RawRequest",
    "XonEvent",
    "XonId",
    "ENVELOPE_DIGEST",
    "IngressLimits",
    "ParsedIngress",
    "parse_ingress",
    "envelope_id",
    "event_size",
    "check_event_size",
    "plain_suffix",
    "confined_suffix",
    "format_time",
    "parse_time",
]


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

    def digest(self) -> str:
        """SHA-256 hex of the five fields, each length-prefixed, so that no two different
        requests share an encoding (docs/delivery.md, Duplicates)."""
        h = hashlib.sha256()
        for part in (self.method, self.path, self.query, self.content_type):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
        h.update(len(self.body).to_bytes(8, "big"))
        h.update(self.body)
        return h.hexdigest()

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


_second_text: tuple[int, str] = (0, "1970-01-01T00:00:00.")
"""The last whole second :func:`format_time` spelled, and its text up to the milliseconds."""


def format_time(ts: float) -> str:
    """Unix time → ISO 8601 UTC with milliseconds and a ``Z``."""
    global _second_text
    # Split and round as datetime.fromtimestamp does (microseconds, half to even), so the
    # text is the same; datetime builds only the date and time of a new second, since every
    # event stamps its receive time and strftime per call was a visible share of ingress CPU.
    fraction, whole = math.modf(ts)
    second, micro = int(whole), round(fraction * 1e6)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    elif micro < 0:
        second, micro = second - 1, micro + 1_000_000
    cached = _second_text
    if cached[0] != second:
        text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        cached = _second_text = (second, text)
    return f"{cached[1]}{micro // 1000:03d}Z"


def parse_time(text: str) -> float:
    """ISO 8601 → Unix time. Raises ``ValueError``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- ingress parsing -------------------------------------------------------------------------

_FORM_TYPES = frozenset({"application/x-www-form-urlencoded"})
_JSON_TYPES = frozenset({"application/json", "text/json"})
_XML_TYPES = frozenset({"text/xml", "application/xml", "application/soap+xml"})
_TYPE_PARAMS = ("type", "event", "EventType")
_XML_BOMB = re.compile(r"<!(?:doctype|entity)", re.IGNORECASE)

_PARAMS_FACTOR = 2
_PARAMS_ALLOWANCE = 16 * 1024
"""Flattening must not amplify (README, Ingress limits): the params, as JSON, may take at most
``_PARAMS_FACTOR`` times the request's query and body bytes plus ``_PARAMS_ALLOWANCE``."""

_CHARSETS = {
    "utf-8": "utf-8", "utf8": "utf-8",
    "us-ascii": "ascii", "ascii": "ascii",
    "iso-8859-1": "latin-1", "iso8859-1": "latin-1", "latin1": "latin-1", "latin-1": "latin-1",
    "windows-1252": "cp1252", "cp1252": "cp1252",
    "utf-16": "utf-16", "utf-16le": "utf-16-le", "utf-16-le": "utf-16-le",
    "utf-16be": "utf-16-be", "utf-16-be": "utf-16-be",
    "utf-32": "utf-32", "utf-32le": "utf-32-le", "utf-32-le": "utf-32-le",
    "utf-32be": "utf-32-be", "utf-32-be": "utf-32-be",
}
"""The charset allow-list: label (lower case, ``_`` read as ``-``) → Python codec. Only codecs
whose decoding is linear and strict about invalid input; any other label is refused before a
byte is decoded (a codec such as ``punycode`` costs seconds of CPU, ``unicode_escape`` makes
lone surrogates)."""
_WIDE = frozenset({"utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"})
"""Codecs that are not ASCII-compatible: a form's ``%XX`` escapes mean nothing in them."""
_BOMS = (  # UTF-32 first: its little-endian BOM begins with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
_XML_DECLARED = re.compile(r"""^\s*<\?xml[^>]*?\sencoding\s*=\s*["']([^"']{0,40})["']""")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True, kw_only=True)
class IngressLimits:
    """What one ingress request may turn into (README, Ingress limits). The relay builds it
    from ``LimitsConfig``; these defaults are the same."""

    max_params: int = 1000
    """Name/value pairs one request may carry (query, form fields, JSON leaves, XML leaves;
    repeats count)."""
    max_key_size: int = 512
    """Longest param name (a flattened JSON name with its dots included) and event type, in
    UTF-8 bytes."""
    max_value_size: int = 64 * 1024
    """Longest param value, in UTF-8 bytes."""
    max_depth: int = 32
    """Deepest nesting of JSON objects and arrays, or of XML elements."""
    max_event_size: int = 1024 * 1024
    """Largest stored event, measured as its JSON form (:func:`event_size`)."""


_DEFAULT_LIMITS = IngressLimits()


ENVELOPE_DIGEST = "envelope"
"""The :attr:`XonId.digest` of an envelope's ``event.id``: any request with that id repeats it."""


@dataclass(frozen=True, slots=True)
class XonId:
    """X-on's own id for an event, and what a repeat of it must match (docs/delivery.md,
    Duplicates)."""

    value: str
    digest: str
    """:data:`ENVELOPE_DIGEST` for an envelope's ``event.id``, which alone decides; else the
    request's :meth:`RawRequest.digest`: only the same request with the same id repeats it."""

    @property
    def key(self) -> str:
        """One string for the pair (a hex digest and the marker hold no space)."""
        return f"{self.digest} {self.value}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedIngress:
    """What :func:`parse_ingress` read from an ingress request."""

    type: str
    """Event type: the path suffix, else a type parameter, else ``"unknown"``."""
    params: dict[str, str]
    """Query params, overridden by body params; nested JSON keys are dotted (``a.b``)."""
    xon_id: XonId | None
    """X-on's own id for the event, for dedup (docs/delivery.md, Duplicates): a JSON
    envelope's ``event.id``, else the first of ``id_params`` present, with the request digest."""


def parse_ingress(
    raw: RawRequest, limits: IngressLimits | None = None, *, id_params: Sequence[str] = ("id",)
) -> ParsedIngress:
    """Parse an X-on ingress request (pure).

    Unknown content types keep their body untouched and take params from the query only;
    unknown params and event types pass through (the raw request is kept as it arrived).
    Params never hold a lone surrogate, so an accepted event always encodes as JSON.
    ``id_params`` are the bare param names that carry X-on's id
    (``ServerConfig.xon_id_params``).

    Raises:
        ApiError: 400 ``bad_body`` when the body cannot be decoded as its content type says;
            415 ``unsupported_charset`` for a charset outside the allow-list; 413 when a limit
            of ``limits`` is passed (``too_many_params``, ``param_too_large``,
            ``params_too_large``, ``nesting_too_deep``, ``type_too_large``).
    """
    limits = limits or _DEFAULT_LIMITS
    budget = _Budget(limits, len(raw.query) + len(raw.body))
    params = _parse_query(raw.query, budget)
    mime, _, ct_params = raw.content_type.partition(";")
    mime = mime.strip().lower()
    envelope: str | None = None
    if raw.body.strip():
        if mime in _FORM_TYPES:
            params.update(_parse_form(raw.body, _charset(ct_params), budget))
        elif mime in _JSON_TYPES or mime.endswith("+json"):
            body_params, envelope = _parse_json(raw.body, _charset(ct_params), budget)
            params.update(body_params)
        elif mime in _XML_TYPES:
            params.update(_parse_xml(raw.body, _charset(ct_params), budget))
    budget.settle(params)
    event_type = _event_type(raw.path, params)
    if _utf8_over(event_type, limits.max_key_size):
        raise ApiError(413, "type_too_large", f"event type exceeds {limits.max_key_size} bytes")
    return ParsedIngress(
        type=event_type,
        params=params,
        xon_id=_xon_id(raw, envelope, params, id_params),
    )


def _xon_id(
    raw: RawRequest, envelope: str | None, params: dict[str, str], id_params: Sequence[str]
) -> XonId | None:
    # docs/delivery.md, Duplicates: X-on documents the envelope's event.id as its duplicate
    # protection, so it alone decides; a bare id param names a call, a mailbox, a message...
    # shared by several events, so only the same request with it is a repeat.
    if envelope:
        return XonId(envelope, ENVELOPE_DIGEST)
    for name in id_params:
        value = params.get(name)
        if value:
            return XonId(value, raw.digest())
    return None


def envelope_id(body: bytes) -> str | None:
    """The ``event.id`` of a JSON envelope body ``{"event": {"id": …}}`` as a release before
    request digests spelled it (a number as ``json.dumps`` writes it), or ``None``: not an
    envelope, no id, or not JSON at all. For upgrading stored data only; ingress takes the id
    from its own parse."""
    if b'"event"' not in body:
        return None  # most bodies: no second parse (an escaped key spelling is not seen,
        # which only makes its retries new events, never a lost one)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    envelope = data.get("event") if isinstance(data, dict) else None
    value = envelope.get("id") if isinstance(envelope, dict) else None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return json.dumps(value)
    return None


def _event_type(path: str, params: dict[str, str]) -> str:
    suffix = urllib.parse.unquote(path.strip("/"))
    if suffix:
        return suffix
    for name in _TYPE_PARAMS:
        if params.get(name):
            return params[name]
    return "unknown"


def _utf8_over(text: str, limit: int) -> bool:
    """True if ``text`` takes more than ``limit`` bytes in UTF-8 (no copy for short text)."""
    if len(text) * 4 <= limit:
        return False
    return len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit


class _Budget:
    """Counts every name/value pair a request yields against the :class:`IngressLimits`.

    The running size is the pairs' characters plus the 6 characters of JSON punctuation each
    takes (``"k":"v",``): never more than the params' JSON form, so passing it refuses at once,
    before a flattening can build more. :meth:`settle` measures the JSON form itself only when
    escapes could have taken it past the budget (6 bytes is the most one character takes).
    """

    __slots__ = ("limits", "allowed", "count", "size")

    def __init__(self, limits: IngressLimits, raw_size: int) -> None:
        self.limits = limits
        self.allowed = _PARAMS_FACTOR * raw_size + _PARAMS_ALLOWANCE
        self.count = 0
        self.size = 0

    def charge(self, key: str, value: str) -> None:
        limits = self.limits
        self.count += 1
        if self.count > limits.max_params:
            raise ApiError(413, "too_many_params", f"more than {limits.max_params} params")
        # The usual short pair is settled by its length alone (4 bytes per character at most).
        if len(key) * 4 > limits.max_key_size and _utf8_over(key, limits.max_key_size):
            raise ApiError(
                413, "param_too_large", f"a param name exceeds {limits.max_key_size} bytes"
            )
        if len(value) * 4 > limits.max_value_size and _utf8_over(value, limits.max_value_size):
            raise ApiError(
                413, "param_too_large", f"a param value exceeds {limits.max_value_size} bytes"
            )
        self.size += len(key) + len(value) + 6
        if self.size > self.allowed:
            raise self._amplified()

    def settle(self, params: dict[str, str]) -> None:
        if self.size * 6 > self.allowed and _json_size(params) > self.allowed:
            raise self._amplified()

    def _amplified(self) -> ApiError:
        return ApiError(
            413, "params_too_large",
            f"the params would take more than {_PARAMS_FACTOR} times the request's size"
            f" plus {_PARAMS_ALLOWANCE} bytes",
        )


def _parse_query(query: str, budget: _Budget) -> dict[str, str]:
    # The query's encoding is never refused: odd escapes are replaced here (never a lone
    # surrogate), and kept byte-exact in RawRequest.query for anyone who needs them.
    if not query:
        return {}  # the usual case for a POST; parse_qsl's own set-up is not free
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, errors="replace",
            max_num_fields=budget.limits.max_params,
        )
    except ValueError as exc:  # more fields than max_num_fields
        raise ApiError(
            413, "too_many_params", f"more than {budget.limits.max_params} params"
        ) from exc
    return _first_wins(pairs, budget)


def _first_wins(pairs: list[tuple[str, str]], budget: _Budget) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs:
        budget.charge(key, value)
        out.setdefault(key, value)
    return out


def _charset(ct_params: str) -> str | None:
    """The ``charset`` parameter of a content type, as written; ``None`` if there is none."""
    for part in ct_params.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return None


def _codec(charset: str) -> str:
    """The Python codec of an allowed charset label.

    Raises:
        ApiError: 415 ``unsupported_charset`` for any other label.
    """
    codec = _CHARSETS.get(charset.strip().lower().replace("_", "-"))
    if codec is None:
        raise ApiError(
            415, "unsupported_charset",
            f"charset {charset[:40]!r} is not supported; send UTF-8, US-ASCII, ISO-8859-1,"
            " Windows-1252, UTF-16 or UTF-32",
        )
    return codec


def _decode(body: bytes, codec: str, what: str) -> str:
    """``body`` decoded strictly (never a lone surrogate: the UTF codecs refuse them).

    Raises:
        ApiError: 400 ``bad_body`` when it is not valid in ``codec``.
    """
    if codec in ("utf-16", "utf-32") and not body.startswith(
        (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)
    ):
        # No BOM: the byte order shows in where the first character's zero bytes are (the
        # body starts with ASCII, "{" or "<" or a space); RFC 2781 §4.3 assumes big-endian.
        codec += "-le" if body[:1] != b"\0" else "-be"
    try:
        return body.decode(codec)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_body", f"{what} is not valid {codec}") from exc


def _parse_form(body: bytes, charset: str | None, budget: _Budget) -> dict[str, str]:
    codec = _codec(charset) if charset is not None else "utf-8"
    if codec in _WIDE:
        raise ApiError(
            415, "unsupported_charset", f"a form body cannot be {codec}; send UTF-8"
        )
    text = _decode(body, codec, "form body")
    try:
        pairs = urllib.parse.parse_qsl(
            text, keep_blank_values=True, encoding=codec, errors="strict",
            max_num_fields=budget.limits.max_params,
        )
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_body", f"form body is not valid {codec}") from exc
    except ValueError as exc:  # more fields than max_num_fields
        raise ApiError(
            413, "too_many_params", f"more than {budget.limits.max_params} params"
        ) from exc
    return _first_wins(pairs, budget)


def _parse_json(
    body: bytes, charset: str | None, budget: _Budget
) -> tuple[dict[str, str], str | None]:
    """The params of a JSON body, and its envelope's ``event.id`` (as its param spells it)
    when it is an envelope with a scalar id."""
    if charset is not None:
        codec = _codec(charset)
    else:
        # RFC 8259 §8.1: UTF-8; the UTF-16 and UTF-32 forms of RFC 4627 are still recognised.
        codec = json.detect_encoding(body)
    text = _decode(body, codec, "JSON body")
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 BOM (RFC 8259 §8.1: a parser may ignore it)
    try:
        data = _json_decode(text)
    except RecursionError as exc:
        raise _too_deep(budget.limits) from exc
    except ValueError as exc:
        raise ApiError(400, "bad_body", "body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "bad_body", "JSON body must be an object")
    # "\ud800" escapes decode to lone surrogates, which no UTF-8 encoder can write; each
    # becomes U+FFFD in params (the body keeps them). Looked for only when the text has one.
    flat = _Flattener(budget, clean=_SURROGATE_ESCAPE.search(text) is not None)
    envelope = data.get("event")
    if isinstance(envelope, dict):
        # X-on webhook envelope {"event": {"id", "createdAt", "type", ...}}: the event's own
        # fields become the params, like the same event sent by GET or form.
        rest = {k: v for k, v in data.items() if k != "event"}
        flat.walk(rest, "", 1)
        flat.walk(envelope, "", 2)
        if isinstance(envelope.get("id"), str) and envelope["id"] != "":
            # Numbers decode as their own spelling (str) too; the param holds the id as
            # cleaned of lone surrogates, so it can be stored.
            return flat.out, flat.out.get("id")
        return flat.out, None
    flat.walk(data, "", 1)
    return flat.out, None


# Numbers keep their own spelling, as strings: no float or big-integer conversion (whose cost
# grows faster than the digits) and no respelling ("1e5", not "100000.0").
_json_decode = json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=str).decode


def _too_deep(limits: IngressLimits) -> ApiError:
    return ApiError(413, "nesting_too_deep", f"nesting deeper than {limits.max_depth} levels")


class _Flattener:
    """Nested JSON → flat params with dotted names (``a.b``, ``l.0``); later names win.

    A name is checked against ``max_key_size`` before anything is built under it, so that a
    long prefix is never copied into many children; and every leaf is charged to the budget
    as it is made, so the walk stops as soon as the params would amplify the request.
    """

    __slots__ = ("budget", "clean", "out")

    def __init__(self, budget: _Budget, *, clean: bool) -> None:
        self.budget = budget
        self.clean = clean
        self.out: dict[str, str] = {}

    def walk(self, value: dict[str, Any] | list[Any], prefix: str, depth: int) -> None:
        limits = self.budget.limits
        if depth > limits.max_depth:
            raise _too_deep(limits)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            name = f"{prefix}.{key}" if prefix else str(key)
            if self.clean:
                name = _SURROGATE.sub("\ufffd", name)
            if isinstance(item, (dict, list)):
                if _utf8_over(name, limits.max_key_size):
                    raise ApiError(
                        413, "param_too_large", f"a param name exceeds {limits.max_key_size} bytes"
                    )
                self.walk(item, name, depth + 1)
                continue
            text = _scalar(item)
            if self.clean:
                text = _SURROGATE.sub("\ufffd", text)
            self.budget.charge(name, text)
            self.out[name] = text


def _scalar(value: str | bool | None) -> str:
    if isinstance(value, str):
        return value  # numbers too: they were kept as spelled
    if value is None:
        return ""
    return "true" if value else "false"


class _XmlRefused(Exception):
    """Raised from the parser target to stop at a DTD (entity expansion bombs)."""


class _LeafCollector:
    """ElementTree parser target: leaf element local name -> text, SOAP Header skipped.

    Namespaces and the SOAP Envelope/Body wrappers disappear because only leaves count. The
    first leaf of a name wins; every leaf counts against the budget.
    """

    def __init__(self, budget: _Budget) -> None:
        self.params: dict[str, str] = {}
        self._budget = budget
        self._max_depth = budget.limits.max_depth
        self._stack: list[str] = []
        self._has_child: list[bool] = []
        self._text: list[str] = []
        self._skip_depth: int | None = None

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise _XmlRefused("DTDs are not accepted")

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        local = tag.rpartition("}")[2]
        if self._has_child:
            self._has_child[-1] = True
        if len(self._stack) >= self._max_depth:
            raise _too_deep(self._budget.limits)
        if self._skip_depth is None and local == "Header" and self._stack == ["Envelope"]:
            self._skip_depth = len(self._stack)
        self._stack.append(local)
        self._has_child.append(False)
        self._text = []

    def end(self, tag: str) -> None:
        local = self._stack.pop()
        had_child = self._has_child.pop()
        if self._skip_depth is not None:
            if len(self._stack) == self._skip_depth:
                self._skip_depth = None
        elif not had_child:
            text = "".join(self._text)
            self._budget.charge(local, text)
            self.params.setdefault(local, text)
        self._text = []

    def data(self, text: str) -> None:
        self._text.append(text)

    def close(self) -> None:
        pass


def _xml_codec(body: bytes, charset: str | None) -> tuple[str, bytes]:
    """The codec of an XML body and the body without its BOM (RFC 7303 §3: a BOM, else the
    ``charset`` parameter, else the XML declaration, else UTF-8).

    Raises:
        ApiError: 415 ``unsupported_charset`` for a charset outside the allow-list.
    """
    for bom, codec in _BOMS:
        if body.startswith(bom):
            return codec, body  # the utf-8-sig, utf-16 and utf-32 codecs drop the BOM
    if charset is not None:
        return _codec(charset), body
    # Without a BOM, the first character "<" shows the width and byte order (XML 1.0,
    # Appendix F); the declaration, in that width, names the charset.
    head = body[:4]
    family = {
        b"\0\0\0<": "utf-32-be", b"<\0\0\0": "utf-32-le",
        b"\0<\0?": "utf-16-be", b"<\0?\0": "utf-16-le",
    }.get(head, "utf-8")
    width = 4 if "32" in family else 2 if "16" in family else 1
    declared = _XML_DECLARED.match(body[: 200 * width].decode(family, "replace"))
    if declared is None:
        return family, body
    codec = _codec(declared.group(1))
    return (family if family != "utf-8" else codec), body


def _parse_xml(body: bytes, charset: str | None, budget: _Budget) -> dict[str, str]:
    codec, body = _xml_codec(body, charset)
    text = _decode(body, codec, "XML body")
    if _XML_BOMB.search(text):
        raise ApiError(400, "bad_body", "XML with a DTD or entity declarations is refused")
    # Imported here, not at the top: the agent imports this module (format_time) but never
    # parses XML, and ElementTree with pyexpat is ~0.5 MB of its idle RSS (issue 7).
    import xml.etree.ElementTree as ET

    target = _LeafCollector(budget)
    parser = ET.XMLParser(target=target)
    try:
        # Fed as text, expat reads it as UTF-8 whatever the declaration says: the charset
        # was settled above, from the allow-list.
        parser.feed(text)
        parser.close()
    except (ET.ParseError, _XmlRefused) as exc:
        raise ApiError(400, "bad_body", "body is not valid XML") from exc
    return target.params


# -- event size --------------------------------------------------------------------------------

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _json_size(value: Any) -> int:
    return len(_compact(value).encode("utf-8"))


def event_size(event: XonEvent) -> int:
    """Bytes of the event's JSON form: what the store keeps and an ``events`` frame carries
    for it (docs/protocol.md), body in base64 included."""
    return _json_size(event.to_json())


_EVENT_FRAME = _json_size(
    XonEvent(
        id="", account="", type="", received_at="",
        request=RawRequest(method="", path="", query="", content_type="", body=b""),
    ).to_json()
)
"""Bytes of an event's JSON form with every string empty: its names and punctuation."""


def check_event_size(event: XonEvent, limit: int) -> None:
    """Refuse an event whose JSON form would exceed ``limit`` bytes.

    An upper bound from lengths alone settles the usual small event (no character takes more
    than 6 bytes in JSON, 4 in UTF-8 or ``\\u00XX`` for a control character); only a large one
    is measured.

    Raises:
        ApiError: 413 ``event_too_large``.
    """
    raw = event.request
    chars = (
        sum(len(k) + len(v) + 6 for k, v in event.params.items())
        + len(event.id) + len(event.account) + len(event.type) + len(event.received_at)
        + len(raw.method) + len(raw.path) + len(raw.query) + len(raw.content_type)
    )
    bound = _EVENT_FRAME + 6 * chars + (len(raw.body) + 2) // 3 * 4
    if bound > limit and event_size(event) > limit:
        raise ApiError(413, "event_too_large", f"the event would take more than {limit} bytes")


# -- path suffix -------------------------------------------------------------------------------

_UNPLAIN = re.compile(r"\\|%(?:2[eEfF]|5[cC])")
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"
"""RFC 3986 ``pchar`` besides unreserved letters and digits: kept as they are in a segment."""


def plain_suffix(path: str) -> bool:
    """True if an ingress path suffix, appended to a forward target's path, stays under it
    (docs/delivery.md, Forward): empty or starting with ``/``, no backslash, no ``%2F``,
    ``%5C`` or ``%2E``, and no ``.`` or ``..`` segment (nor ``..;x``, which some servers read
    as ``..``).

    The relay refuses any other suffix; the agent re-encodes one from an older relay with
    :func:`confined_suffix`.
    """
    if path and not path.startswith("/") or _UNPLAIN.search(path):
        return False
    return not any(
        segment.partition(";")[0] in (".", "..") for segment in path.split("/")
    )


def confined_suffix(path: str) -> str:
    """Any path suffix made plain: decoded, split at ``/`` and ``\\``, its dot segments
    resolved without ever climbing above the start (RFC 3986 §5.2.4, clamped), and each
    segment percent-encoded again, so that ``/b/..%2f..%2fadmin`` becomes ``/admin``."""
    segments: list[str] = []
    for segment in re.split(r"[/\\]", urllib.parse.unquote(path)):
        name = segment.partition(";")[0]
        if name in ("", "."):
            continue
        if name == "..":
            if segments:
                segments.pop()
            continue
        segments.append(urllib.parse.quote(segment, safe=_SEGMENT_SAFE))
    return "".join("/" + segment for segment in segments)
