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
DESIGN §Relay server endpoints: params come from the query string, a form body, a JSON object or
an XML/SOAP body; the event type is the path suffix or a type parameter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
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
    "ParsedIngress",
    "parse_ingress",
    "envelope_id",
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
_XML_BOMB_MARKERS = (b"<!doctype", b"<!entity")


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


def parse_ingress(raw: RawRequest, *, id_params: Sequence[str] = ("id",)) -> ParsedIngress:
    """Parse an X-on ingress request (pure).

    Unknown content types keep their body untouched and take params from the query only;
    unknown params and event types pass through (DESIGN principle 2). ``id_params`` are the
    bare param names that carry X-on's id (``ServerConfig.xon_id_params``).

    Raises:
        ApiError: 400 ``bad_body`` when the body cannot be decoded as its content type says.
    """
    params = _parse_query(raw.query)
    mime, _, ct_params = raw.content_type.partition(";")
    mime = mime.strip().lower()
    if raw.body.strip():
        if mime in _FORM_TYPES:
            params.update(_parse_form(raw.body, _charset(ct_params)))
        elif mime in _JSON_TYPES or mime.endswith("+json"):
            params.update(_parse_json(raw.body))
        elif mime in _XML_TYPES:
            params.update(_parse_xml(raw.body))
    return ParsedIngress(
        type=_event_type(raw.path, params),
        params=params,
        xon_id=_xon_id(raw, mime, params, id_params),
    )


def _xon_id(
    raw: RawRequest, mime: str, params: dict[str, str], id_params: Sequence[str]
) -> XonId | None:
    # docs/delivery.md, Duplicates: X-on documents the envelope's event.id as its duplicate
    # protection, so it alone decides; a bare id param names a call, a mailbox, a message...
    # shared by several events, so only the same request with it is a repeat.
    if mime in _JSON_TYPES or mime.endswith("+json"):
        value = envelope_id(raw.body)
        if value:
            return XonId(value, ENVELOPE_DIGEST)
    for name in id_params:
        value = params.get(name)
        if value:
            return XonId(value, raw.digest())
    return None


def envelope_id(body: bytes) -> str | None:
    """The ``event.id`` of a JSON envelope body ``{"event": {"id": …}}``, spelled as its param
    (a number as JSON writes it), or ``None``: not an envelope, no id, or not JSON at all."""
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


def _first_wins(pairs: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _parse_query(query: str) -> dict[str, str]:
    # The query is never refused: odd encodings are replaced here, and kept byte-exact in
    # RawRequest.query for anyone who needs them.
    if not query:
        return {}  # the usual case for a POST; parse_qsl's own set-up is not free
    return _first_wins(urllib.parse.parse_qsl(query, keep_blank_values=True, errors="replace"))


def _charset(ct_params: str) -> str:
    for part in ct_params.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return "utf-8"


def _parse_form(body: bytes, charset: str) -> dict[str, str]:
    try:
        text = body.decode(charset)
        pairs = urllib.parse.parse_qsl(
            text, keep_blank_values=True, encoding=charset, errors="strict"
        )
    except (UnicodeDecodeError, LookupError) as exc:
        raise ApiError(400, "bad_body", f"form body is not valid {charset}") from exc
    return _first_wins(pairs)


def _parse_json(body: bytes) -> dict[str, str]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, "bad_body", "body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "bad_body", "JSON body must be an object")
    envelope = data.get("event")
    if isinstance(envelope, dict):
        # X-on webhook envelope {"event": {"id", "createdAt", "type", ...}}: the event's own
        # fields become the params, like the same event sent by GET or form.
        rest = {k: v for k, v in data.items() if k != "event"}
        out = _flatten(rest, "")
        out.update(_flatten(envelope, ""))
        return out
    return _flatten(data, "")


def _flatten(value: Any, prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: _scalar(value)}
    for key, item in items:
        out.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value)  # true/false and numbers as JSON spells them


class _XmlRefused(Exception):
    """Raised from the parser target to stop at a DTD (entity expansion bombs)."""


class _LeafCollector:
    """ElementTree parser target: leaf element local name -> text, SOAP Header skipped.

    Namespaces and the SOAP Envelope/Body wrappers disappear because only leaves count.
    """

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
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
            self.params.setdefault(local, "".join(self._text))
        self._text = []

    def data(self, text: str) -> None:
        self._text.append(text)

    def close(self) -> None:
        pass


def _parse_xml(body: bytes) -> dict[str, str]:
    lowered = body.lower()
    if any(marker in lowered for marker in _XML_BOMB_MARKERS):
        raise ApiError(400, "bad_body", "XML with a DTD or entity declarations is refused")
    # Imported here, not at the top: the agent imports this module (format_time) but never
    # parses XML, and ElementTree with pyexpat is ~0.5 MB of its idle RSS (issue 7).
    import xml.etree.ElementTree as ET

    target = _LeafCollector()
    parser = ET.XMLParser(target=target)
    try:
        parser.feed(body)
        parser.close()
    except (ET.ParseError, _XmlRefused) as exc:
        raise ApiError(400, "bad_body", "body is not valid XML") from exc
    return target.params
