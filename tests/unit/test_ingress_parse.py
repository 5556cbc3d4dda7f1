"""parse_ingress: params, event type and X-on id from every encoding (DESIGN §Relay server
endpoints: query string, form body, JSON object, XML/SOAP body)."""

from __future__ import annotations

import pytest

from shared.errors import ApiError
from shared.events import ENVELOPE_DIGEST, ParsedIngress, RawRequest, XonId, parse_ingress


def parse(
    content_type: str = "", body: bytes = b"", *, query: str = "", path: str = ""
) -> ParsedIngress:
    return parse_ingress(
        RawRequest(method="POST", path=path, query=query, content_type=content_type, body=body)
    )


def refused(content_type: str, body: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(content_type, body)
    assert info.value.http_status == 400
    assert info.value.code == "bad_body"
    return info.value


# -- query string ----------------------------------------------------------------------------


def test_query_params_are_decoded() -> None:
    """Query params are percent-decoded, '+' is a space, blank values are kept."""
    got = parse(query="From=%2B441234&text=hello+world&empty=")
    assert got.params == {"From": "+441234", "text": "hello world", "empty": ""}


def test_repeated_query_param_keeps_the_first_value() -> None:
    """A repeated key keeps its first value (the raw query keeps them all)."""
    assert parse(query="a=1&a=2").params == {"a": "1"}


def test_odd_query_encoding_never_fails() -> None:
    """Invalid percent escapes and non-UTF-8 bytes are replaced, not refused."""
    got = parse(query="a=%zz&b=%FF&c")
    assert got.params == {"a": "%zz", "b": "\ufffd", "c": ""}


# -- form bodies -----------------------------------------------------------------------------


def test_form_body_params() -> None:
    """An urlencoded form body gives params, decoded as UTF-8."""
    got = parse("application/x-www-form-urlencoded", b"caller=0123&name=Ren%C3%A9e")
    assert got.params == {"caller": "0123", "name": "Renée"}


def test_form_body_charset_is_honoured() -> None:
    """The content type's charset decodes percent escapes."""
    got = parse("application/x-www-form-urlencoded; charset=ISO-8859-1", b"name=Ren%E9e")
    assert got.params == {"name": "Renée"}


def test_form_body_overrides_query() -> None:
    """Body params win over query params of the same name; the others are merged."""
    got = parse("application/x-www-form-urlencoded", b"a=body&c=3", query="a=query&b=2")
    assert got.params == {"a": "body", "b": "2", "c": "3"}


def test_form_body_with_bad_utf8_is_refused() -> None:
    """A form whose escapes are not valid UTF-8 is a 400 bad_body."""
    refused("application/x-www-form-urlencoded", b"name=%FF%FE")


def test_form_body_with_unknown_charset_is_refused() -> None:
    """A charset outside the allow-list is 415 unsupported_charset."""
    with pytest.raises(ApiError) as info:
        parse("application/x-www-form-urlencoded; charset=klingon", b"a=1")
    assert (info.value.http_status, info.value.code) == (415, "unsupported_charset")


# -- JSON ------------------------------------------------------------------------------------


def test_json_object_is_flattened_to_dotted_keys() -> None:
    """Nested objects and lists become dotted keys; scalars are strings as JSON spells them."""
    body = b'{"a": "x", "n": 1.5, "ok": true, "none": null, "b": {"c": {"d": 2}}, "l": [1, "z"]}'
    got = parse("application/json", body)
    assert got.params == {
        "a": "x",
        "n": "1.5",
        "ok": "true",
        "none": "",
        "b.c.d": "2",
        "l.0": "1",
        "l.1": "z",
    }


def test_json_envelope_gives_type_id_and_params() -> None:
    """The X-on webhook envelope {"event": {...}} gives the type, the X-on id and the params."""
    body = (
        b'{"event": {"id": "evt-9", "createdAt": "2026-01-02T03:04:05Z", "type": "sms.received",'
        b' "data": {"from": "+44", "text": "hi"}}, "webhook": "w1"}'
    )
    got = parse("application/json; charset=utf-8", body)
    assert got.type == "sms.received"
    assert got.xon_id == XonId("evt-9", ENVELOPE_DIGEST)
    assert got.params == {
        "webhook": "w1",
        "id": "evt-9",
        "createdAt": "2026-01-02T03:04:05Z",
        "type": "sms.received",
        "data.from": "+44",
        "data.text": "hi",
    }


def test_json_event_string_is_a_type_param() -> None:
    """A plain "event" string (no envelope) names the type."""
    assert parse("application/json", b'{"event": "call.ended"}').type == "call.ended"


@pytest.mark.parametrize("body", [b"{", b"[1, 2]", b'"text"', b"\xff\xfe{"], ids=str)
def test_undecodable_json_is_refused(body: bytes) -> None:
    """Bad JSON, JSON that is not an object and bad UTF-8 are 400 bad_body."""
    refused("application/json", body)


def test_empty_body_gives_query_params_only() -> None:
    """An empty body is no params, whatever the content type says."""
    got = parse("application/json", b"  ", query="type=ping")
    assert got.params == {"type": "ping"}


# -- XML and SOAP ----------------------------------------------------------------------------


def test_xml_leaf_elements_are_params() -> None:
    """Leaf elements' local names map to their text; namespaces disappear."""
    body = (
        b'<?xml version="1.0" encoding="utf-8"?>'
        b'<x:Event xmlns:x="urn:xon"><x:Type>call.started</x:Type>'
        b"<x:Caller><x:Number>0123</x:Number></x:Caller><x:Note/></x:Event>"
    )
    got = parse("application/xml", body)
    assert got.params == {"Type": "call.started", "Number": "0123", "Note": ""}


def test_soap_envelope_and_header_are_stripped() -> None:
    """A SOAP 1.1 body gives its leaves; Envelope, Body and Header contents are not params."""
    body = (
        b'<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">'
        b"<soap:Header><Auth><User>x</User></Auth></soap:Header>"
        b'<soap:Body><m:CallEnded xmlns:m="urn:xon"><m:EventType>call.ended</m:EventType>'
        b"<m:id>77</m:id><m:Duration>42</m:Duration></m:CallEnded></soap:Body></soap:Envelope>"
    )
    got = parse("text/xml; charset=utf-8", body)
    assert got.params == {"EventType": "call.ended", "id": "77", "Duration": "42"}
    assert got.type == "call.ended"
    assert got.xon_id is not None and got.xon_id.value == "77"


def test_soap12_content_type_is_parsed() -> None:
    """application/soap+xml (SOAP 1.2) is parsed like text/xml."""
    body = (
        b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"><env:Body>'
        b"<Sms><type>sms.received</type></Sms></env:Body></env:Envelope>"
    )
    assert parse('application/soap+xml; action="x"', body).type == "sms.received"


@pytest.mark.parametrize(
    "body",
    [
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',
        b'<!doctype a SYSTEM "file:///etc/passwd"><a/>',
        '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE a><a/>'.encode("utf-16"),
    ],
    ids=["entity", "external", "utf16-doctype"],
)
def test_xml_with_dtd_is_refused(body: bytes) -> None:
    """DTDs and entity declarations are refused (XML bomb and XXE defence)."""
    refused("text/xml", body)


@pytest.mark.parametrize("body", [b"<a>", b"<a></b>", b"not xml", b"<a>&undefined;</a>"], ids=str)
def test_malformed_xml_is_refused(body: bytes) -> None:
    """Malformed XML is a 400 bad_body."""
    refused("application/xml", body)


# -- other content types, type and id ----------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/octet-stream", "text/plain", "multipart/form-data; b=x", ""]
)
def test_unknown_content_type_takes_params_from_query_only(content_type: str) -> None:
    """Bodies of unknown types are not parsed (they stay in the raw request)."""
    got = parse(content_type, b"\x00\xff{not=parsed}", query="a=1")
    assert got.params == {"a": "1"}


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/sms.received", "type=ignored", "sms.received"),
        ("/call%20started", "", "call started"),
        ("/deep/er", "", "deep/er"),
        ("", "type=t&event=e&EventType=et", "t"),
        ("", "event=e&EventType=et", "e"),
        ("", "EventType=et", "et"),
        ("/", "type=", "unknown"),
        ("", "", "unknown"),
    ],
)
def test_event_type_precedence(path: str, query: str, expected: str) -> None:
    """Type: path suffix, else type, event, EventType params, else "unknown"."""
    assert parse(query=query, path=path).type == expected


def test_xon_id_comes_from_id_param() -> None:
    """An ``id`` param is X-on's id, with the request's digest; without one there is none."""
    got = parse(query="id=abc")
    assert got.xon_id == XonId("abc", RawRequest(
        method="POST", path="", query="id=abc", content_type="", body=b""
    ).digest())
    assert parse(query="ID=abc&idx=1").xon_id is None


def test_unknown_params_pass_through() -> None:
    """Params nobody knows are kept as they are (DESIGN principle 2)."""
    got = parse("application/json", b'{"FutureField": "v", "x-y": "z"}')
    assert got.params == {"FutureField": "v", "x-y": "z"}
