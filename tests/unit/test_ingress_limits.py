"""Bounded ingress (README, Ingress limits): what one request may turn into.

Counts, name and value sizes, nesting, the charset allow-list, the params budget that keeps
flattening from amplifying a body, the stored event's size and the link that must carry it,
and the path suffixes a forward target may receive (docs/delivery.md, Forward).
"""

from __future__ import annotations

import json
import posixpath
import urllib.parse
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import EVENT_FRAME_ALLOWANCE, LimitsConfig, LinkConfig, ServerConfig
from shared.errors import ApiError, ConfigError
from shared.events import (
    IngressLimits,
    ParsedIngress,
    RawRequest,
    XonEvent,
    check_event_size,
    confined_suffix,
    event_size,
    parse_ingress,
    plain_suffix,
)
from shared.link import frames

FORM = "application/x-www-form-urlencoded"
SMALL = IngressLimits(max_params=5, max_key_size=16, max_value_size=32, max_depth=3)
PROPERTY = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def raw(
    content_type: str = "", body: bytes = b"", *, query: str = "", path: str = ""
) -> RawRequest:
    return RawRequest(method="POST", path=path, query=query, content_type=content_type, body=body)


def parse(
    content_type: str = "", body: bytes = b"", *, query: str = "", path: str = "",
    limits: IngressLimits | None = None,
) -> ParsedIngress:
    return parse_ingress(raw(content_type, body, query=query, path=path), limits)


def refusal(content_type: str, body: bytes = b"", *, query: str = "",
            limits: IngressLimits | None = None) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        parse(content_type, body, query=query, limits=limits)
    return info.value.http_status, info.value.code


def stored(request: RawRequest, parsed: ParsedIngress) -> XonEvent:
    return XonEvent(
        id="ev_0190e3b1c2d30001a2b3c4d5e6f7", account="acc_0123456789abcdef", type=parsed.type,
        received_at="2026-11-26T15:04:05.123Z", params=parsed.params, request=request,
    )


# -- counts, sizes, nesting --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "query"),
    [
        ("", b"", "a=1&b=2&c=3&d=4&e=5&f=6"),
        (FORM, b"a=1&b=2&c=3&d=4&e=5&f=6", ""),
        (FORM, b"a=1&a=2&a=3&a=4&a=5&a=6", ""),  # repeats count
        (FORM, b"d=4&e=5&f=6", "a=1&b=2&c=3"),  # query and body together
        ("application/json", b'{"a": [1, 2, 3], "b": {"c": 4, "d": 5, "e": 6}}', ""),
        ("text/xml", b"<r><a>1</a><b>2</b><c>3</c><d>4</d><e>5</e><f>6</f></r>", ""),
    ],
    ids=["query", "form", "repeats", "query+form", "json", "xml"],
)
def test_more_params_than_max_params_is_413(content_type: str, body: bytes, query: str) -> None:
    """Six name/value pairs against a limit of five: 413 too_many_params, from any source."""
    assert refusal(content_type, body, query=query, limits=SMALL) == (413, "too_many_params")


def test_max_params_exactly_is_accepted() -> None:
    """Five pairs under a limit of five are all kept."""
    got = parse(FORM, b"a=1&b=2&c=3&d=4&e=5", limits=SMALL)
    assert list(got.params) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (FORM, b"k" * 17 + b"=v"),
        (FORM, b"k=" + b"v" * 33),
        (FORM, "k=".encode() + "é".encode() * 17),  # 34 bytes in 17 characters
        ("application/json", b'{"abcdefgh": {"ijklmnop": 1}}'),  # "abcdefgh.ijklmnop" is 17
        ("text/xml", b"<r><" + b"k" * 17 + b">1</" + b"k" * 17 + b"></r>"),
    ],
    ids=["name", "value", "value-utf8", "dotted-name", "xml-name"],
)
def test_name_or_value_over_its_limit_is_413(content_type: str, body: bytes) -> None:
    """A name over max_key_size or a value over max_value_size (UTF-8 bytes) is 413
    param_too_large."""
    assert refusal(content_type, body, limits=SMALL) == (413, "param_too_large")


def test_long_name_is_refused_before_its_children_are_built() -> None:
    """A name past the limit stops the walk at once: a 200 000-character key over a million
    leaves is refused without building one of them (it would be 200 GB of names)."""
    body = b'{"' + b"k" * 200_000 + b'": [' + b"0," * 1_000_000 + b"0]}"
    assert refusal("application/json", body) == (413, "param_too_large")


@pytest.mark.parametrize(
    ("content_type", "depth"),
    [("application/json", 3), ("text/xml", 3)],
)
def test_nesting_up_to_max_depth_is_accepted(content_type: str, depth: int) -> None:
    """Three levels under a limit of three parse."""
    if content_type == "text/xml":
        body = b"<a>" * depth + b"x" + b"</a>" * depth
    else:
        body = b'{"a":' * depth + b"1" + b"}" * depth
    assert len(parse(content_type, body, limits=SMALL).params) == 1


@pytest.mark.parametrize(
    "body",
    [b'{"a":' * 4 + b"1" + b"}" * 4, b'{"a": [[[1]]]}', b"[" * 100_000, b'{"a":' * 5000],
    ids=["objects", "arrays", "deep-array", "deep-unclosed"],
)
def test_json_deeper_than_max_depth_is_413(body: bytes) -> None:
    """JSON nested past max_depth, however deep, is 413 nesting_too_deep."""
    assert refusal("application/json", body, limits=SMALL) == (413, "nesting_too_deep")


def test_xml_deeper_than_max_depth_is_413() -> None:
    """XML elements nested past max_depth are 413 nesting_too_deep."""
    body = b"<a>" * 4 + b"x" + b"</a>" * 4
    assert refusal("text/xml", body, limits=SMALL) == (413, "nesting_too_deep")


def test_event_type_over_max_key_size_is_413() -> None:
    """An event type longer than max_key_size, from the path or a type param, is 413."""
    with pytest.raises(ApiError) as info:
        parse(path="/" + "t" * 17, limits=SMALL)
    assert info.value.code == "type_too_large"
    assert refusal("", query="type=" + "t" * 17, limits=SMALL) == (413, "type_too_large")


def test_limits_config_defaults_are_the_parsers() -> None:
    """The relay's configured defaults are the parser's own."""
    assert LimitsConfig().ingress == IngressLimits()


# -- amplification -----------------------------------------------------------------------------


def test_long_key_over_many_zeros_is_refused() -> None:
    """{"<200-char key>": [0, 0, … 20 000 zeros]} (40 KB) would be a ~4 MB event: 413."""
    body = json.dumps({"k" * 200: [0] * 20_000}).encode()
    assert 40_000 < len(body) < 61_000
    assert refusal("application/json", body) == (413, "params_too_large")


def test_a_normal_array_is_flattened() -> None:
    """A list of a few hundred numbers under a short name is well inside the budget."""
    got = parse("application/json", json.dumps({"numbers": list(range(300))}).encode())
    assert got.params["numbers.299"] == "299"


_names = st.text(st.characters(codec="utf-8"), min_size=0, max_size=300)
_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=60)
    | st.dictionaries(_names, children, max_size=8),
    max_leaves=400,
)


def _amplifiers() -> st.SearchStrategy[tuple[str, bytes, str]]:
    """Bodies shaped to multiply: long names over many small leaves, nested lists, forms of
    short pairs, and many XML leaves, beside random JSON."""
    long_name = st.integers(1, 400).map(lambda n: "k" * n)
    zeros = st.integers(0, 5000).map(lambda n: [0] * n)
    nested = st.builds(
        lambda name, width, depth: {name: _nest([0] * width, depth)},
        long_name, st.integers(1, 500), st.integers(0, 30),
    )
    json_bodies = st.one_of(
        st.builds(lambda name, value: {name: value}, long_name, zeros),
        nested,
        st.dictionaries(_names, _json, max_size=4),
    ).map(lambda data: ("application/json", json.dumps(data).encode(), ""))
    pairs = st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), max_size=1200)
    forms = pairs.map(
        lambda items: (FORM, urllib.parse.urlencode(items).encode(), "")
    )
    queries = pairs.map(lambda items: ("", b"", urllib.parse.urlencode(items)))
    controls = st.integers(0, 20_000).map(lambda n: (FORM, b"a=" + b"\x01" * n, ""))
    xml = st.builds(
        lambda name, count: (
            "text/xml", (f"<r>{f'<{name}>0</{name}>' * count}</r>").encode(), ""
        ),
        st.integers(1, 300).map(lambda n: "k" * n), st.integers(0, 1200),
    )
    return st.one_of(json_bodies, forms, queries, controls, xml)


def _nest(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


@PROPERTY
@given(case=_amplifiers())
def test_stored_size_is_a_small_multiple_of_the_request(case: tuple[str, bytes, str]) -> None:
    """Whatever the shape, an accepted event's JSON form is at most 4 times the request's
    bytes plus 20 KiB; anything that would be larger is a 413."""
    content_type, body, query = case
    request = raw(content_type, body, query=query, path="/shape")
    try:
        parsed = parse_ingress(request)
    except ApiError as exc:
        assert exc.http_status in (400, 413), exc
        return
    size = event_size(stored(request, parsed))
    assert size <= 4 * (len(body) + len(query) + len(content_type) + 6) + 20 * 1024


# -- charsets and invalid text -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "encoded"),
    [
        ("utf-8", "n=Ren%C3%A9e&t=☎".encode()),
        ("UTF8", "n=Ren%C3%A9e&t=☎".encode()),
        ("us-ascii", b"n=Renee&t=x"),
        ("ISO-8859-1", "n=Ren%E9e&t=é".encode("latin-1")),
        ("latin1", "n=Ren%E9e&t=é".encode("latin-1")),
        ("windows-1252", "n=Ren%E9e&t=€".encode("cp1252")),
        ('"cp1252"', "n=Ren%E9e&t=€".encode("cp1252")),
    ],
)
def test_allowed_form_charsets_decode(charset: str, encoded: bytes) -> None:
    """The allow-list's ASCII-compatible charsets decode a form, escapes included."""
    got = parse(f"{FORM}; charset={charset}", encoded)
    assert got.params["n"] in ("Renée", "Renee")
    assert got.params["t"] in ("☎", "x", "é", "€")


REFUSED = ["punycode", "unicode_escape", "raw_unicode_escape", "idna", "utf-7", "rot13",
           "base64_codec", "zlib_codec", "hex", "uu_codec", "bz2", "cp037", "shift_jis",
           "utf-8-sig", "klingon", ""]


@pytest.mark.parametrize("charset", REFUSED)
def test_charsets_outside_the_allow_list_are_415(charset: str) -> None:
    """Any other charset is 415 unsupported_charset for forms, JSON and XML (parameter or
    declaration), before a byte is decoded."""
    if not charset:
        charset = '"  "'
    assert refusal(f"{FORM}; charset={charset}", b"a=\\ud800") == (415, "unsupported_charset")
    assert refusal(f"application/json; charset={charset}", b'{"a": 1}')[0] == 415
    assert refusal(f"text/xml; charset={charset}", b"<a>x</a>")[0] == 415
    declared = f'<?xml version="1.0" encoding="{charset}"?><a>x</a>'.encode()
    assert refusal("text/xml", declared) == (415, "unsupported_charset")


@pytest.mark.parametrize("charset", ["utf-16", "UTF-16LE", "utf-32be"])
def test_form_in_a_wide_charset_is_415(charset: str) -> None:
    """%XX escapes mean nothing in UTF-16/32: such a form is 415, not guessed at."""
    assert refusal(f"{FORM}; charset={charset}", "a=b".encode("utf-16")) == (
        415, "unsupported_charset")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", '{"a": "é"}'.encode("utf-16")),
        ("application/json", '{"a": "é"}'.encode("utf-16-be")),
        ("application/json", '{"a": "é"}'.encode("utf-32-le")),
        ("application/json; charset=utf-16", '{"a": "é"}'.encode("utf-16-le")),
        ("application/json; charset=iso-8859-1", '{"a": "é"}'.encode("latin-1")),
        ("application/json", b'\xef\xbb\xbf{"a": "\xc3\xa9"}'),
        ("text/xml", '<?xml version="1.0" encoding="utf-16"?><a>é</a>'.encode("utf-16")),
        ("text/xml", '<?xml version="1.0" encoding="UTF-16BE"?><a>é</a>'.encode("utf-16-be")),
        ("text/xml", '<?xml version="1.0" encoding="utf-16-le"?><a>é</a>'.encode("utf-16-le")),
        ("text/xml", '<?xml version="1.0" encoding="utf-32"?><a>é</a>'.encode("utf-32")),
        ("text/xml", '<?xml version="1.0"?><a>é</a>'.encode("utf-32-be")),
        ("text/xml", '<?xml version="1.0" encoding="latin1"?><a>é</a>'.encode("latin-1")),
        ("text/xml; charset=utf-16le", "<a>é</a>".encode("utf-16-le")),
    ],
)
def test_wide_and_declared_charsets_are_handled(content_type: str, body: bytes) -> None:
    """JSON and XML in UTF-16/32 (by BOM, by byte pattern or declared) and in a declared
    8-bit charset decode to the same params."""
    assert parse(content_type, body).params == {"a": "é"}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/xml", b'<?xml version="1.0" encoding="utf-16-be"?><a>x</a>'),
        ("text/xml", b"<a>&#xD800;</a>"),
        ("text/xml; charset=us-ascii", "<a>é</a>".encode()),
        (FORM, b"name=%FF%FE"),
        (FORM, b"name=\xff"),
        (FORM, b"a=%ED%A0%80"),  # a surrogate in UTF-8 is not UTF-8
        (f"{FORM}; charset=us-ascii", b"a=%E9"),
        (f"{FORM}; charset=windows-1252", b"a=\x81"),  # not a Windows-1252 byte
        ("application/json", b'{"a": "\xed\xa0\x80"}'),
        ("application/json; charset=utf-16", b'{"a": 1}'),  # odd length
    ],
    ids=str,
)
def test_invalid_text_is_400(content_type: str, body: bytes) -> None:
    """Text that is not valid in its charset is 400 bad_body, never an exception."""
    assert refusal(content_type, body) == (400, "bad_body")


def test_lone_surrogate_escapes_become_replacement_characters() -> None:
    """JSON's "\\ud800" escapes are accepted; params get U+FFFD, pairs stay whole, and the
    body keeps the escapes."""
    body = b'{"a": "x\\ud800y", "\\udc00k": "\\ud83d\\ude00", "b": ["\\uDBFF"]}'
    got = parse("application/json", body)
    assert got.params == {"a": "x\ufffdy", "\ufffdk": "\U0001f600", "b.0": "\ufffd"}


_TYPES = st.sampled_from([
    FORM, f"{FORM}; charset=latin1", f"{FORM}; charset=windows-1252", "application/json",
    "application/json; charset=utf-16", "text/xml", "text/xml; charset=utf-32",
    "application/soap+xml", "", "text/plain",
])
_TEXTY = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.text(max_size=8), _json, max_size=4).map(
        lambda d: json.dumps(d).encode()),  # escapes, lone surrogates included
    st.text(max_size=60).map(lambda t: f"<a><b>{t}</b></a>".encode("utf-8", "surrogatepass")),
)


@PROPERTY
@given(content_type=_TYPES, body=_TEXTY, query=st.text(max_size=30))
def test_params_never_hold_a_lone_surrogate(content_type: str, body: bytes, query: str) -> None:
    """Any body and query either parse into params that encode as UTF-8, or are refused with
    400, 413 or 415: never another exception."""
    query = urllib.parse.quote(query.encode("utf-8", "surrogatepass"), safe="=&")
    try:
        got = parse(content_type, body, query=query)
    except ApiError as exc:
        assert exc.http_status in (400, 413, 415), exc
        return
    for key, value in got.params.items():
        key.encode("utf-8")
        value.encode("utf-8")
    got.type.encode("utf-8")


# -- event size and the link -------------------------------------------------------------------


def _event_of_size(size: int, fill: str) -> XonEvent:
    """An event whose JSON form is exactly ``size`` bytes, mostly made of ``fill``."""
    def event(value: str, pad: str) -> XonEvent:
        params = {"v": value, "pad": pad}
        return stored(raw(FORM, b"x"), ParsedIngress(type="t", params=params, xon_id=None))

    width = len(json.dumps(fill, ensure_ascii=False).encode()) - 2
    count, extra = divmod(size - event_size(event("", "")), width)
    made = event(fill * count, "p" * extra)
    assert event_size(made) == size
    return made


@pytest.mark.parametrize("fill", ["a", "\x01", "é", "\U0001f600", '"'])
def test_event_size_limit_is_exact(fill: str) -> None:
    """An event of exactly max_event_size bytes passes; one byte more is 413
    event_too_large, whatever its characters take in JSON."""
    limit = 64 * 1024
    check_event_size(_event_of_size(limit, fill), limit)
    with pytest.raises(ApiError) as info:
        check_event_size(_event_of_size(limit + 1, fill), limit)
    assert (info.value.http_status, info.value.code) == (413, "event_too_large")


def test_the_largest_event_fits_the_link_that_must_carry_it() -> None:
    """With max_event_size at the most the link allows, the largest accepted event, sent in
    an events frame with the largest seq, is within link.max_message_size."""
    link = LinkConfig(max_message_size=256 * 1024)
    config = ServerConfig(
        link=link, limits=LimitsConfig(max_event_size=link.max_message_size - EVENT_FRAME_ALLOWANCE)
    )
    event = _event_of_size(config.limits.max_event_size, "\x01")
    check_event_size(event, config.limits.max_event_size)
    item = frames.encode_event_item(2**63 - 1, event.to_json())
    message = frames.encode_events([item]).encode()
    assert len(message) <= link.max_message_size


def test_max_event_size_the_link_cannot_carry_is_a_config_error() -> None:
    """max_event_size plus the frame allowance above link.max_message_size: one clear error."""
    with pytest.raises(ConfigError) as info:
        ServerConfig(link=LinkConfig(max_message_size=64 * 1024), limits=LimitsConfig())
    assert "limits.max_event_size" in str(info.value)
    assert "link.max_message_size" in str(info.value)


def test_default_max_event_size_is_well_under_the_default_link_limit() -> None:
    """1 MiB of event under a 2 MiB link message."""
    config = ServerConfig()
    assert config.limits.max_event_size * 2 <= config.link.max_message_size


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_params", 0), ("max_key_size", 0), ("max_value_size", 0), ("max_event_size", 0),
     ("max_depth", 0), ("max_depth", 101)],
)
def test_ingress_limits_out_of_range_are_config_errors(name: str, value: int) -> None:
    """Each ingress limit is validated where it is configured."""
    fields: dict[str, Any] = {name: value}
    with pytest.raises(ConfigError) as info:
        LimitsConfig(**fields)
    assert f"limits.{name}" in str(info.value)


# -- path suffixes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["", "/", "/sms.received", "/call%20started", "/deep/er", "/a..b", "/...", "/x//y",
     "/caf%C3%A9", "/a;b", "/%25"],
)
def test_plain_suffixes(path: str) -> None:
    """Names with dots, encoded spaces and UTF-8, empty segments: plain."""
    assert plain_suffix(path)


@pytest.mark.parametrize(
    "path",
    ["/..", "/.", "/b/../admin", "/b/..%2f..%2fadmin", "/%2e%2e/admin", "/%2E/x", "/a%2Fb",
     "/a%5cb", "/a\\b", "/..;/admin", "/.;x", "/b/..", "/x%2e"],
)
def test_unplain_suffixes(path: str) -> None:
    """Dot segments (also ``..;x``), backslashes, and encoded dots, slashes or backslashes."""
    assert not plain_suffix(path)


@pytest.mark.parametrize(
    ("path", "confined"),
    [
        ("/b/..%2f..%2fadmin", "/admin"),
        ("/b/../../admin", "/admin"),
        ("/%2e%2e/%2E%2E/admin", "/admin"),
        ("/b\\..\\..\\admin", "/admin"),
        ("/a/..;/..;/admin", "/admin"),
        ("/a/./b/", "/a/b"),
        ("/x%2Fy", "/x/y"),
        ("/call%20started/%25zz", "/call%20started/%25zz"),
        ("/%252e%252e/x", "/%252e%252e/x"),
        ("/..", ""),
    ],
)
def test_confined_suffix(path: str, confined: str) -> None:
    """Decoded, split at / and \\, dot segments resolved without climbing, re-encoded."""
    assert confined_suffix(path) == confined


def _as_a_server_sees_it(path: str) -> str:
    """What a lenient local app makes of a path: decoded, backslashes as slashes, then dot
    segments resolved."""
    text = urllib.parse.unquote(path).replace("\\", "/")
    return posixpath.normpath(text) if text else "/"


_paths = st.lists(
    st.sampled_from(["..", ".", "%2e%2e", "%2E", "..%2f", "%5c..", "\\", "a", "b;c", "..;",
                     "%2f", "%25", "é", "x y", "", "/"]),
    max_size=12,
).map(lambda parts: "/" + "/".join(parts)) | st.text(max_size=30)


@PROPERTY
@given(path=_paths)
def test_a_confined_suffix_never_leaves_the_target_path(path: str) -> None:
    """Whatever the stored suffix, the joined path is plain and, decoded and resolved by the
    app, stays under the target's path; a plain suffix does too, as it is."""
    base = "/hook"
    confined = confined_suffix(path)
    assert plain_suffix(confined)
    for suffix in (confined, path) if plain_suffix(path) else (confined,):
        seen = _as_a_server_sees_it(base + suffix)
        assert seen == base or seen.startswith(base + "/"), (path, suffix, seen)
