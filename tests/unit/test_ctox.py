"""relay_server/ctox.py and status.py pure parts: catalogue, raw paths, hashes, limits, items."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from relay_server.ctox import (
    DEFAULT_CATALOGUE,
    AccountLimits,
    CommandRefused,
    build_request,
    catalogue_for,
    refusal,
    request_hash,
)
from relay_server.status import item_key, status_item
from relay_server.store.base import (
    AccountRecord,
    StoredEvent,
    result_from_json,
    result_to_json,
)
from shared.config import (
    SERVER_ENV_PREFIX,
    CtoxConfig,
    CtoxTypeConfig,
    ServerConfig,
    load,
)
from shared.errors import ConfigError
from shared.events import RawRequest, XonEvent

ACCOUNT = AccountRecord(
    id="acc_1",
    name="acme",
    created_at=0.0,
    ingress_key_hash="h",
    xon_api_url="https://api.xon.test/tenant",
    xon_api_key="k",
)


def refused(ctox_type: str, params: dict[str, object], account: AccountRecord = ACCOUNT) -> str:
    with pytest.raises(CommandRefused) as info:
        build_request(DEFAULT_CATALOGUE, account, ctox_type, params)
    return info.value.code


# -- catalogue and requests ----------------------------------------------------------------------


def test_make_call_maps_to_clicktocall_under_the_base_path() -> None:
    """make_call is a form POST to <base>/api/v1/clicktocall."""
    req = build_request(
        DEFAULT_CATALOGUE, ACCOUNT, "make_call", {"destination": "1", "target": "2"}
    )
    assert (req.method, str(req.url), req.encoding) == (
        "POST",
        "https://api.xon.test/tenant/api/v1/clicktocall",
        "form",
    )
    assert req.params == {"destination": "1", "target": "2"}


def test_every_default_type_has_a_path() -> None:
    """The built-in catalogue covers the issue's five command kinds."""
    assert set(DEFAULT_CATALOGUE) == {
        "make_call",
        "send_sms",
        "send_recorded_message",
        "conference",
        "order_status",
    }


def test_catalogue_layers_global_then_account_name_then_id() -> None:
    """ctox.types overrides the defaults; an account entry (name, then id) overrides both."""
    config = CtoxConfig(
        types={"make_call": CtoxTypeConfig(path="/v2/call"), "x": CtoxTypeConfig(path="/x")},
        accounts={
            "acme": {"x": CtoxTypeConfig(path="/by-name")},
            "acc_1": {"x": CtoxTypeConfig(path="/by-id")},
            "other": {"y": CtoxTypeConfig(path="/y")},
        },
    )
    merged = catalogue_for(config, ACCOUNT)
    assert merged["make_call"].path == "/v2/call"
    assert merged["x"].path == "/by-id"
    assert "y" not in merged and "send_sms" in merged


@pytest.mark.parametrize(
    ("ctox_type", "params", "code"),
    [
        ("nope", {}, "unknown_ctox_type"),
        ("make_call", {"destination": "1"}, "missing_params"),
        ("make_call", {"destination": "1", "target": ""}, "missing_params"),
        ("make_call", {"destination": "1", "target": {"a": 1}}, "bad_params"),
        ("raw", {"method": "TRACE", "path": "/x"}, "bad_params"),
        ("raw", {"path": 3}, "bad_params"),
        ("raw", {"path": "/x", "encoding": "xml"}, "bad_params"),
        ("raw", {"path": "/x", "params": []}, "bad_params"),
        ("raw", {"path": "/a/../../b"}, "bad_raw_path"),
        ("raw", {"path": "/a b"}, "bad_raw_path"),
        ("raw", {"path": "/a\\b"}, "bad_raw_path"),
        ("raw", {"path": "/x#frag"}, "bad_raw_path"),
    ],
)
def test_bad_commands_are_refused(ctox_type: str, params: dict[str, object], code: str) -> None:
    """Each malformed command gets its precise refusal code."""
    assert refused(ctox_type, params) == code


def test_raw_defaults_query_for_get_and_form_for_post() -> None:
    """A raw GET sends params in the query, a raw POST as a form; lists repeat their name."""
    get = build_request(DEFAULT_CATALOGUE, ACCOUNT, "raw", {"method": "get", "path": "/q"})
    post = build_request(DEFAULT_CATALOGUE, ACCOUNT, "raw", {"path": "/q", "params": {"a": [1, 2]}})
    assert (get.method, get.encoding) == ("GET", "query")
    assert (post.method, post.encoding, post.params) == ("POST", "form", {"a": [1, 2]})
    assert str(post.url) == "https://api.xon.test/tenant/q"


def test_account_without_a_usable_url_is_not_configured() -> None:
    """No URL, or a non-http one, is 503 xon_api_not_configured."""
    for url in ("", "ftp://x/", "not a url"):
        account = AccountRecord(
            id="a", name="a", created_at=0.0, ingress_key_hash="h", xon_api_url=url
        )
        assert refused("make_call", {"destination": "1", "target": "2"}, account) == (
            "xon_api_not_configured"
        )


def test_request_hash_ignores_key_order_but_not_values() -> None:
    """The same params in another order hash the same; another value or type does not."""
    base = request_hash("make_call", {"a": "1", "b": "2"})
    assert base == request_hash("make_call", {"b": "2", "a": "1"})
    assert base != request_hash("make_call", {"a": "1", "b": "3"})
    assert base != request_hash("send_sms", {"a": "1", "b": "2"})


def test_refusal_carries_the_json_error_and_retry_after() -> None:
    """A relay refusal has our JSON error body, its code in error, Retry-After when given."""
    result = refusal(429, "rate_limited", "slow down", request_id="r", retry_after=4)
    assert json.loads(base64.b64decode(result.body_b64)) == {
        "error": {"code": "rate_limited", "message": "slow down"}
    }
    assert (result.status, result.error, result.headers) == (
        429,
        "rate_limited",
        {"Retry-After": "4"},
    )
    assert result_from_json(result_to_json(result)) == result


# -- limits --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_in_flight_limit_frees_on_release() -> None:
    """max_in_flight refuses with 1 s until a running call is released."""
    limits = AccountLimits(max_in_flight=1, per_minute=None, clock=Clock())
    assert limits.acquire("a") is None
    assert limits.acquire("a") == 1
    assert limits.acquire("b") is None
    limits.release("a")
    assert limits.acquire("a") is None


def test_per_minute_limit_slides() -> None:
    """per_minute refuses until the oldest start is a minute old, and says how long."""
    clock = Clock()
    limits = AccountLimits(max_in_flight=None, per_minute=2, clock=clock)
    for _ in range(2):
        assert limits.acquire("a") is None
        limits.release("a")
    clock.now += 20.5
    assert limits.acquire("a") == 40
    clock.now += 39.5
    assert limits.acquire("a") is None


# -- status items ------------------------------------------------------------------------------


def stored(event_type: str, params: dict[str, str], seq: int = 3) -> StoredEvent:
    event = XonEvent(
        id="ev1",
        account="acc",
        type=event_type,
        received_at="2026-11-26T10:00:00.000Z",
        params=params,
        request=RawRequest(method="GET", path="", query="", content_type="", body=b""),
    )
    return StoredEvent(seq=seq, event=event)


def test_status_item_is_keyed_by_type_and_identifying_params() -> None:
    """A configured status event becomes an item keyed by its identifying params."""
    types = {"messages.waiting": ["mailbox"], "queue.size": ["queue", "site"]}
    item = status_item(stored("messages.waiting", {"mailbox": "201", "count": "2"}), types)
    assert item is not None
    assert (item.key, item.ids, item.seq, item.event_id) == (
        "messages.waiting?mailbox=201",
        {"mailbox": "201"},
        3,
        "ev1",
    )
    queue = status_item(stored("queue.size", {"site": "a&b", "queue": "q 1"}), types)
    assert queue is not None and queue.key == "queue.size?queue=q+1&site=a%26b"
    missing = status_item(stored("queue.size", {}), types)
    assert missing is not None and missing.ids == {"queue": "", "site": ""}
    assert status_item(stored("sms.received", {}), types) is None


def test_item_key_without_ids_is_the_type() -> None:
    """A type with no identifying params is one item."""
    assert item_key("line.state", {}) == "line.state"


# -- config ----------------------------------------------------------------------------------------


def test_catalogue_and_status_come_from_toml_tables(tmp_path: Path) -> None:
    """[ctox.types.X], [ctox.accounts.A.X] and [status] tables load into typed config."""
    path = tmp_path / "relay.toml"
    path.write_text(
        """
[ctox]
timeout = 2.5
per_minute = "none"
[ctox.types.hangup]
path = "/api/v1/hangup"
required = ["callId"]
[ctox.accounts.acme.presence]
method = "GET"
path = "/api/v1/presence"
encoding = "query"
[status.types]
"queue.size" = ["queue"]
""",
        encoding="utf-8",
    )
    config = load(ServerConfig, path=path, env={}, flags={}, env_prefix=SERVER_ENV_PREFIX)
    assert (config.ctox.timeout, config.ctox.per_minute) == (2.5, None)
    assert config.ctox.types["hangup"] == CtoxTypeConfig(path="/api/v1/hangup", required=["callId"])
    assert config.ctox.accounts["acme"]["presence"].encoding == "query"
    assert config.status.types == {"queue.size": ["queue"]}


def test_tables_come_from_json_in_the_environment() -> None:
    """XON_RELAY_STATUS_TYPES and XON_RELAY_CTOX_TYPES take JSON objects."""
    env = {
        "XON_RELAY_STATUS_TYPES": '{"line.state": []}',
        "XON_RELAY_CTOX_TYPES": '{"hangup": {"path": "/h"}}',
    }
    config = load(ServerConfig, path=None, env=env, flags={}, env_prefix=SERVER_ENV_PREFIX)
    assert config.status.types == {"line.state": []}
    assert config.ctox.types["hangup"].path == "/h"


def test_default_status_type_is_the_simulators() -> None:
    """Without configuration, messages.waiting per mailbox is the status event."""
    assert ServerConfig().status.types == {"messages.waiting": ["mailbox"]}


@pytest.mark.parametrize(
    "toml",
    [
        '[ctox.types.x]\npath = "/x"\nverb = "GET"\n',
        '[ctox.types.x]\npath = "x"\n',
        '[ctox.types.x]\npath = "/x"\nmethod = "TRACE"\n',
        '[ctox.types.x]\npath = "/x"\nencoding = "xml"\n',
        "[ctox]\ntypes = 3\n",
        '[status]\ntypes = {"a" = 3}\n',
        "[ctox]\ntimeout = 0\n",
        "[ctox]\nmax_in_flight = 0\n",
    ],
)
def test_bad_ctox_or_status_config_is_refused(tmp_path: Path, toml: str) -> None:
    """Unknown keys, bad paths, methods, encodings and shapes raise ConfigError."""
    path = tmp_path / "relay.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError):
        load(ServerConfig, path=path, env={}, flags={}, env_prefix=SERVER_ENV_PREFIX)
