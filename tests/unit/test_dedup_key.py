"""X-on's id for an event and what a repeat must match (docs/delivery.md, Duplicates): the
request digest, the envelope rule, the configured id params, and the key of old stored data."""

from __future__ import annotations

import itertools

import pytest

from relay_server.store.base import stored_xon_id
from shared.config import ServerConfig, load
from shared.errors import ConfigError
from shared.events import ENVELOPE_DIGEST, RawRequest, XonId, envelope_id, parse_ingress


def raw(
    method: str = "POST", path: str = "/sms", query: str = "", content_type: str = "",
    body: bytes = b"",
) -> RawRequest:
    return RawRequest(
        method=method, path=path, query=query, content_type=content_type, body=body
    )


def test_the_digest_covers_each_field_and_their_boundaries() -> None:
    """Changing any one of the five fields changes the digest, and so does moving bytes from
    one field to the next (the fields are length-prefixed)."""
    base = raw(query="a=1", content_type="text/plain", body=b"x")
    variants = [
        raw(method="PUT", query="a=1", content_type="text/plain", body=b"x"),
        raw(path="/sms2", query="a=1", content_type="text/plain", body=b"x"),
        raw(query="a=2", content_type="text/plain", body=b"x"),
        raw(query="a=1", content_type="text/html", body=b"x"),
        raw(query="a=1", content_type="text/plain", body=b"y"),
        raw(query="a=1t", content_type="ext/plain", body=b"x"),
        raw(path="", query="/sms", content_type="", body=b""),
    ]
    digests = [r.digest() for r in [base, *variants]]
    assert len(set(digests)) == len(digests)
    assert base.digest() == raw(query="a=1", content_type="text/plain", body=b"x").digest()
    assert len(base.digest()) == 64 and " " not in base.digest()


def test_a_lone_surrogate_in_the_query_still_digests() -> None:
    """Text fields are encoded losslessly, never raising (a peer's odd bytes cost it nothing)."""
    assert raw(query="a=\udcff").digest() != raw(query="a=\udcfe").digest()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"event": {"id": "e1"}}', "e1"),
        (b'{"event": {"id": 7}}', "7"),
        (b'{"event": {"id": 1.5}}', "1.5"),
        (b'{"event": {"id": ""}}', None),
        (b'{"event": {"id": true}}', None),
        (b'{"event": {"id": null}}', None),
        (b'{"event": {"id": {"a": 1}}}', None),
        (b'{"event": "e1"}', None),
        (b'{"id": "e1"}', None),
        (b'["event"]', None),
        (b'{"event": ', None),
    ],
)
def test_envelope_id(body: bytes, expected: str | None) -> None:
    """Only a JSON object's ``event.id`` string or number is an envelope id."""
    assert envelope_id(body) == expected


def test_an_envelope_id_alone_decides() -> None:
    """Two deliveries of one envelope id that differ elsewhere have equal X-on ids."""
    first = parse_ingress(raw(content_type="application/json", body=b'{"event": {"id": "e1"}}'))
    again = parse_ingress(
        raw(query="retry=1", content_type="application/json; charset=utf-8",
            body=b'{"event": {"id": "e1", "n": 2}}')
    )
    assert first.xon_id == again.xon_id == XonId("e1", ENVELOPE_DIGEST)


def test_a_bare_id_needs_the_same_request() -> None:
    """Two requests with the same id param but other content have different X-on ids; the same
    request has the same one."""
    keys = {
        parse_ingress(raw(query=f"id=c1&n={n}")).xon_id for n, _ in itertools.product("12", "ab")
    }
    assert len(keys) == 2 and all(k is not None and k.value == "c1" for k in keys)


def test_an_envelope_without_id_falls_back_to_bare_params() -> None:
    """No ``event.id``: a bare id param (here in the query) counts, with the digest."""
    got = parse_ingress(
        raw(query="id=q1", content_type="application/json", body=b'{"event": {"n": 1}}')
    )
    assert got.xon_id is not None and got.xon_id.value == "q1"
    assert got.xon_id.digest != ENVELOPE_DIGEST


def test_id_params_are_configured_in_order() -> None:
    """The first configured name present counts; unlisted names never do; none: no bare id."""
    request = raw(query="id=a&callId=b")
    assert parse_ingress(request, id_params=("callId", "id")).xon_id == XonId(
        "b", request.digest()
    )
    assert parse_ingress(request, id_params=("mailbox",)).xon_id is None
    assert parse_ingress(request, id_params=()).xon_id is None
    assert parse_ingress(raw(query="id=&callId=b"), id_params=("id",)).xon_id is None


def test_xon_id_params_config() -> None:
    """``xon_id_params`` defaults to ``["id"]``, comes from TOML or the environment as a
    list, and refuses an empty name."""
    assert ServerConfig().xon_id_params == ["id"]
    env = {"XON_RELAY_XON_ID_PARAMS": "id, callId"}
    config = load(ServerConfig, path=None, env=env, flags={}, env_prefix="XON_RELAY_")
    assert config.xon_id_params == ["id", "callId"]
    with pytest.raises(ConfigError, match="xon_id_params"):
        ServerConfig(xon_id_params=["id", ""])


def test_old_stored_ids_match_only_their_true_repeat() -> None:
    """Data of the release before digests: an envelope's id keeps the envelope rule; any other
    id gets its own stored request's digest."""
    envelope = raw(content_type="application/json", body=b'{"event": {"id": "e1"}}')
    assert stored_xon_id("e1", envelope) == XonId("e1", ENVELOPE_DIGEST)
    form = raw(content_type="application/x-www-form-urlencoded", body=b"id=m9&text=first")
    assert stored_xon_id("m9", form) == parse_ingress(form).xon_id
    # The id came from the query, not from the envelope: a bare id of that request.
    mixed = raw(query="id=q1", content_type="application/json", body=b'{"event": {"id": "e1"}}')
    assert stored_xon_id("q1", mixed) == XonId("q1", mixed.digest())
