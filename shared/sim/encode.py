"""Build the HTTP requests X-on would send for an event, in each transport encoding (pure).

DESIGN §What it is: "The event type and parameter list stay the same whatever the transport."
The simulator sends the same event five ways, covering every way the ingress accepts params
(DESIGN §Relay server endpoints: query string, form body, JSON object, XML/SOAP body) and both
ways of naming the type (path suffix or a type parameter):

============  ======  ==========================  ================================================
encoding      method  type carried in             body
============  ======  ==========================  ================================================
``query``     GET     path suffix ``/<type>``     none; params in the query string
``form``      POST    path suffix ``/<type>``     ``application/x-www-form-urlencoded``
``json``      POST    ``"type"`` member           a flat JSON object of params
``envelope``  POST    ``event.type``              ``{"event": {"id", "createdAt", "type", …}}``
``xml``       POST    ``<EventType>`` element     a SOAP 1.1 envelope; leaf elements are params
============  ======  ==========================  ================================================
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import urlencode
from xml.sax.saxutils import escape

__all__ = [
    "Encoding", "ENCODINGS", "SimRequest", "build_request", "params_as_sent", "SOAP_NS", "XON_NS"
]

Encoding = Literal["query", "form", "json", "envelope", "xml"]
ENCODINGS: tuple[Encoding, ...] = get_args(Encoding)

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
XON_NS = "urn:x-on:xtoc:v1"
"""An example namespace: X-on's real SOAP schema is not public."""

_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimRequest:
    """One request to send to an ingress URL, exactly as it goes on the wire."""

    method: str
    path_suffix: str
    """Appended to the ingress URL: ``"/sms.received"`` or ``""``."""
    query: str
    """Encoded query string without ``?`` (``""``: none)."""
    content_type: str
    """``""`` for a request without a body."""
    body: bytes


def build_request(
    event_type: str,
    params: dict[str, str],
    encoding: Encoding,
    *,
    event_id: str | None = None,
    created_at: str | None = None,
) -> SimRequest:
    """The request X-on would send for one event.

    Args:
        event_type: e.g. ``"sms.received"``; any type is accepted (the relay passes unknown
            types through).
        params: parameter name → value.
        encoding: one of :data:`ENCODINGS`.
        event_id: X-on's own id for the event; only the ``envelope`` encoding carries one.
        created_at: ISO 8601 time for the ``envelope`` encoding.

    Raises:
        ValueError: a parameter name the encoding reserves (``type``; ``id``/``createdAt`` in
            an envelope; ``EventType`` in XML) or, in XML, one that is not an XML name.
    """
    match encoding:
        case "query":
            return SimRequest(
                method="GET",
                path_suffix=f"/{event_type}",
                query=urlencode(params),
                content_type="",
                body=b"",
            )
        case "form":
            return SimRequest(
                method="POST",
                path_suffix=f"/{event_type}",
                query="",
                content_type="application/x-www-form-urlencoded",
                body=urlencode(params).encode("ascii"),
            )
        case "json":
            _reject(params, ("type",), encoding)
            return _json_request({"type": event_type, **params})
        case "envelope":
            _reject(params, ("type", "id", "createdAt"), encoding)
            head = {"id": event_id, "createdAt": created_at, "type": event_type}
            event = {k: v for k, v in head.items() if v is not None}
            return _json_request({"event": {**event, **params}})
        case "xml":
            _reject(params, ("EventType",), encoding)
            return SimRequest(
                method="POST",
                path_suffix="",
                query="",
                content_type="text/xml; charset=utf-8",
                body=_soap(event_type, params),
            )
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


def params_as_sent(params: dict[str, str], encoding: str) -> dict[str, str]:
    """``params`` as an event in ``encoding`` carries them: in an envelope an item ``id``
    travels as ``itemId``, since the envelope's own ``id`` is X-on's event id (docs/delivery.md,
    Duplicates). What :func:`build_request` takes, and what a receiver then sees."""
    if encoding == "envelope" and "id" in params:
        return {("itemId" if k == "id" else k): v for k, v in params.items()}
    return params


def _reject(params: dict[str, str], reserved: tuple[str, ...], encoding: str) -> None:
    for name in reserved:
        if name in params:
            raise ValueError(f"param name {name!r} is reserved in the {encoding} encoding")


def _json_request(obj: dict[str, object]) -> SimRequest:
    # ensure_ascii=False: X-on sends UTF-8, and non-ASCII bytes test byte-exact pass-through.
    return SimRequest(
        method="POST",
        path_suffix="",
        query="",
        content_type="application/json",
        body=json.dumps(obj, ensure_ascii=False).encode("utf-8"),
    )


def _soap(event_type: str, params: dict[str, str]) -> bytes:
    leaves = [f"<EventType>{escape(event_type)}</EventType>"]
    for name, value in params.items():
        if not _XML_NAME.match(name) or name.lower().startswith("xml"):
            raise ValueError(f"param name {name!r} is not usable as an XML element name")
        leaves.append(f"<{name}>{escape(value)}</{name}>")
    inner = "".join(f"\n      {leaf}" for leaf in leaves)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<soap:Envelope xmlns:soap="{SOAP_NS}">\n'
        "  <soap:Body>\n"
        f'    <XtocEvent xmlns="{XON_NS}">{inner}\n'
        "    </XtocEvent>\n"
        "  </soap:Body>\n"
        "</soap:Envelope>\n"
    ).encode("utf-8")
