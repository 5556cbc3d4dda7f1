"""Routing (docs/protocol.md, Routing): the subscription model, its hello field, its config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_server.hub import PassedOver
from shared import crypto
from shared.config import (
    AGENT_ENV_PREFIX,
    AgentConfig,
    ForwardTarget,
    SubscriptionConfig,
    TcpTarget,
    load,
)
from shared.errors import ConfigError, RemoteProtocolError
from shared.link import frames
from shared.link.frames import CloseCode, Hello
from shared.link.session import (
    CLOSING,
    AgentSession,
    HelloReceived,
    RelaySession,
)
from shared.subscription import EVERYTHING, MAX_ENTRIES, MAX_PARAMS, Subscription


def _event(event_type: Any = "call.arriving", **params: Any) -> dict[str, Any]:
    return {"id": "e1", "type": event_type, "params": params}


# -- the model -----------------------------------------------------------------------------


def test_no_subscription_matches_every_event() -> None:
    """The empty subscription matches everything, malformed events included."""
    assert EVERYTHING.is_everything
    assert EVERYTHING.matches(_event("sms.received"))
    assert EVERYTHING.matches({"id": "odd"})
    assert EVERYTHING.to_wire() is None
    assert Subscription.from_wire({}) == EVERYTHING
    assert Subscription.from_wire({"types": [], "params": {}}) == EVERYTHING


def test_types_match_exactly_or_by_dotted_prefix() -> None:
    """'call.*' matches every call.… type; other entries match only themselves."""
    sub = Subscription.from_wire({"types": ["call.*", "sms.received"]})
    assert sub.matches(_event("call.arriving"))
    assert sub.matches(_event("call.ended"))
    assert sub.matches(_event("sms.received"))
    assert not sub.matches(_event("sms.received.v2"))
    assert not sub.matches(_event("callx.arriving"))
    assert not sub.matches(_event("call"))
    assert not sub.matches(_event("messages.waiting"))


def test_params_must_all_match_one_of_their_values() -> None:
    """Every listed param must be present with an accepted value (AND of ORs)."""
    sub = Subscription.from_wire(
        {"params": {"dialled": ["0201", "0202"], "extension": ["200"]}}
    )
    assert sub.matches(_event(dialled="0202", extension="200"))
    assert not sub.matches(_event(dialled="0203", extension="200"))
    assert not sub.matches(_event(dialled="0201", extension="201"))
    assert not sub.matches(_event(dialled="0201"))  # a missing param does not match
    assert not sub.matches(_event(dialled="0201 ", extension="200"))  # exact comparison


def test_types_and_params_combine() -> None:
    """With both, an event must pass the type filter and the param filter."""
    sub = Subscription.from_wire({"types": ["call.arriving"], "params": {"dialled": ["0201"]}})
    assert sub.matches(_event("call.arriving", dialled="0201"))
    assert not sub.matches(_event("sms.received", dialled="0201"))
    assert not sub.matches(_event("call.arriving", dialled="0999"))


@pytest.mark.parametrize(
    "event", [{"type": 5, "params": {}}, {"type": "call.arriving", "params": []}, {}],
    ids=["type-not-str", "params-not-object", "empty"],
)
def test_malformed_events_match_only_everything(event: dict[str, Any]) -> None:
    """An event without a string type or a params object matches no real filter."""
    assert not Subscription.from_wire({"types": ["call.*"]}).matches(event)


def test_wire_form_round_trips_and_drops_duplicates() -> None:
    """to_wire gives back what from_wire read, duplicates removed, order kept."""
    wire = {"types": ["b", "a", "b"], "params": {"x": ["2", "1", "2"]}}
    sub = Subscription.from_wire(wire)
    assert sub.to_wire() == {"types": ["b", "a"], "params": {"x": ["2", "1"]}}
    assert Subscription.from_wire(sub.to_wire()) == sub
    assert Subscription.from_wire({"types": ["a"]}).to_wire() == {"types": ["a"]}
    assert Subscription.from_wire({"params": {"x": ["1"]}}).to_wire() == {"params": {"x": ["1"]}}


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ([], "must be an object"),
        ({"type": ["a"]}, "unknown keys: type"),
        ({"types": "call.arriving"}, "list of strings"),
        ({"types": [""]}, "1 to 256 characters"),
        ({"types": [3]}, "1 to 256 characters"),
        ({"types": ["x" * 257]}, "1 to 256 characters"),
        ({"types": ["*"]}, "'*' may only end"),
        ({"types": ["call*"]}, "'*' may only end"),
        ({"types": ["*.call.*"]}, "'*' may only end"),
        ({"types": ["t"] * (MAX_ENTRIES + 1)}, "more than"),
        ({"params": ["dialled"]}, "must be an object"),
        ({"params": {"dialled": "0201"}}, "list of strings"),
        ({"params": {"dialled": []}}, "at least one value"),
        ({"params": {"": ["1"]}}, "names must be"),
        ({"params": {f"p{i}": ["1"] for i in range(MAX_PARAMS + 1)}}, "more than 16 param"),
        (
            {"params": {f"p{i}": [str(v) for v in range(MAX_ENTRIES)] for i in range(5)}},
            "more than 1024 values in all",
        ),
        (
            {"types": [f"{i:03}" + "t" * 253 for i in range(MAX_ENTRIES)], "params": {"p": ["v"]}},
            "longer than 65536 characters",
        ),
    ],
)
def test_malformed_subscriptions_are_refused(wire: Any, message: str) -> None:
    """from_wire refuses anything but the documented shape, naming the fault."""
    with pytest.raises(ValueError, match=message):
        Subscription.from_wire(wire)


def _reference_match(sub: Subscription, event_type: str, params: dict[str, Any]) -> bool:
    """The rules of docs/protocol.md, Routing, read literally."""
    type_ok = not sub.types or any(
        event_type.startswith(p[:-1]) if p.endswith(".*") else event_type == p for p in sub.types
    )
    return type_ok and all(params.get(name) in values for name, values in sub.params)


_words = st.sampled_from(["a", "b", "call", "sms", "", "x.y"])
_types = st.lists(_words, min_size=1, max_size=4).map(".".join)


@given(
    types=st.lists(st.one_of(_types, _types.map(lambda t: t + ".*")), max_size=5),
    params=st.dictionaries(st.sampled_from(["n", "m"]), st.lists(_words, min_size=1, max_size=3)),
    event_type=_types,
    event_params=st.dictionaries(
        st.sampled_from(["n", "m", "o"]), st.one_of(_words, st.integers(0, 2))
    ),
)
def test_compiled_matching_agrees_with_the_rules(
    types: list[str], params: dict[str, list[str]], event_type: str, event_params: dict[str, Any]
) -> None:
    """Set and prefix lookups decide exactly as the documented rules do."""
    try:
        sub = Subscription.from_wire({"types": types, "params": params})
    except ValueError:
        return  # an empty word makes an empty string or a bad pattern: refused, not matched
    event = {"type": event_type, "params": event_params}
    assert sub.matches(event) == _reference_match(sub, event_type, event_params)


# -- the hello field -------------------------------------------------------------------------


def test_hello_carries_the_subscription_and_leaves_it_out_when_none() -> None:
    """An unset subscription is not on the wire; a set one round-trips."""
    plain = frames.encode(Hello(agent_id="a"))
    assert "subscription" not in json.loads(plain)
    assert frames.decode(plain) == Hello(agent_id="a")
    routed = Hello(agent_id="a", subscription={"types": ["sms.*"]})
    assert frames.decode(frames.encode(routed)) == routed


@pytest.mark.parametrize("value", [None, ["sms.*"], "sms.*", 1])
def test_hello_subscription_of_the_wrong_type_is_a_protocol_error(value: Any) -> None:
    """subscription must be an object when present; null counts as the wrong type."""
    text = json.dumps({"v": 1, "type": "hello", "agent_id": "a", "subscription": value})
    with pytest.raises(RemoteProtocolError) as info:
        frames.decode(text)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert "must be object" in str(info.value)


def _agent(subscription: dict[str, Any] | None) -> AgentSession:
    return AgentSession(
        agent_id="agent-1", relay_id="relay-1", private_key=crypto.generate_private_key(),
        resume_after=4, auth_timeout=10.0, now=0.0, client="t/1", subscription=subscription,
    )


def _relay() -> RelaySession:
    return RelaySession(relay_id="relay-1", nonce="n1", window=8, auth_timeout=10.0, now=0.0)


def test_subscription_reaches_hello_received_parsed() -> None:
    """The agent's subscription arrives at the relay as a validated Subscription."""
    wire = {"types": ["call.*"], "params": {"dialled": ["0201234567"]}}
    agent, relay = _agent(wire), _relay()
    [hello] = agent.data_to_send()
    relay.receive_message(hello, 1.0)
    assert relay.events_received() == [
        HelloReceived("agent-1", 4, "t/1", Subscription.from_wire(wire))
    ]


def test_hello_without_subscription_means_every_event() -> None:
    """No subscription: HelloReceived.subscription is None."""
    agent, relay = _agent(None), _relay()
    [hello] = agent.data_to_send()
    relay.receive_message(hello, 1.0)
    [event] = relay.events_received()
    assert isinstance(event, HelloReceived)
    assert event.subscription is None


def test_malformed_subscription_fails_the_link_with_protocol_error() -> None:
    """A subscription of the wrong shape is a peer fault: error frame, close 4000."""
    relay = _relay()
    relay.receive_message(
        frames.encode(Hello(agent_id="a", subscription={"types": ["*"]})), 1.0
    )
    assert relay.state is CLOSING
    assert relay.close_requested is not None
    assert relay.close_requested.code == CloseCode.PROTOCOL_ERROR
    assert relay.events_received() == []
    [error] = relay.data_to_send()
    assert "'*' may only end" in json.loads(error)["message"]


# -- agent configuration ---------------------------------------------------------------------


def test_subscription_config_loads_from_toml_and_goes_to_the_wire(tmp_path: Path) -> None:
    """[subscription] in the agent's TOML becomes the hello field."""
    path = tmp_path / "agent.toml"
    path.write_text('[subscription]\ntypes = ["call.*"]\nparams = { dialled = ["0201"] }\n')
    config = load(AgentConfig, path=path, env={}, flags={}, env_prefix=AGENT_ENV_PREFIX)
    assert config.subscription.to_wire() == {"types": ["call.*"], "params": {"dialled": ["0201"]}}
    assert AgentConfig().subscription.to_wire() is None


def test_subscription_config_from_the_environment() -> None:
    """Types as a comma list, params as a JSON object, from XON_RELAY_AGENT_SUBSCRIPTION_*."""
    env = {"XON_RELAY_AGENT_SUBSCRIPTION_TYPES": "sms.received, call.*",
           "XON_RELAY_AGENT_SUBSCRIPTION_PARAMS": '{"extension": ["200"]}'}
    config = load(AgentConfig, path=None, env=env, flags={}, env_prefix=AGENT_ENV_PREFIX)
    assert config.subscription == SubscriptionConfig(
        types=["sms.received", "call.*"], params={"extension": ["200"]}
    )


def test_bad_subscription_config_is_a_config_error() -> None:
    """A malformed subscription is refused when the config loads, not at the relay."""
    with pytest.raises(ConfigError, match="needs at least one value"):
        SubscriptionConfig(params={"dialled": []})


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/xon", "http://localhost/x",
                                 "http://[::1]:80/", "https://127.0.0.2/a"])
def test_forward_targets_on_loopback_are_accepted(url: str) -> None:
    """Loopback URLs need no extra permission."""
    assert ForwardTarget(url=url).key == url


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://192.0.2.1/xon"}, "not on loopback"),
        ({"url": "http://example.com/xon"}, "not on loopback"),
        ({"url": "ftp://127.0.0.1/"}, "must be http"),
        ({"url": ""}, "must be http"),
        ({"url": "http://127.0.0.1/x?a=1"}, "no query"),
        ({"url": "http://127.0.0.1/x", "types": ["*"]}, "may only end"),
        ({"url": "http://127.0.0.1/x", "start": "now"}, "start must be"),
        ({"url": "http://127.0.0.1/x", "retry_initial": 0.0}, "retry_initial"),
        ({"url": "http://127.0.0.1/x", "retry_initial": 9.0, "retry_max": 1.0}, "retry_max"),
        ({"url": "http://127.0.0.1/x", "timeout": 0.0}, "timeout"),
    ],
)
def test_bad_forward_targets_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    """A forward target off loopback (unless allowed) or with bad settings is refused."""
    with pytest.raises(ConfigError, match=message):
        ForwardTarget(**kwargs)


def test_remote_targets_need_allow_remote() -> None:
    """allow_remote = true lets a target leave loopback, deliberately."""
    assert ForwardTarget(url="http://192.0.2.1/xon", allow_remote=True).url
    assert TcpTarget(address="192.0.2.1:5000", allow_remote=True).key == "192.0.2.1:5000"
    with pytest.raises(ConfigError, match="not on loopback"):
        TcpTarget(address="192.0.2.1:5000")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        TcpTarget(address="127.0.0.1")


def test_delivery_settings_load_from_toml(tmp_path: Path) -> None:
    """[[forward]], [[tcp]], [ttl] and stale load from the agent's TOML."""
    path = tmp_path / "agent.toml"
    path.write_text(
        'stale = "skip"\nsse_heartbeat = 5\n[ttl]\n"call.arriving" = 60\n'
        '[[forward]]\nurl = "http://127.0.0.1:9000/xon"\ntypes = ["sms.*"]\nname = "crm"\n'
        '[[tcp]]\naddress = "127.0.0.1:5000"\n'
    )
    config = load(AgentConfig, path=path, env={}, flags={}, env_prefix=AGENT_ENV_PREFIX)
    assert config.ttl == {"call.arriving": 60.0}
    assert config.stale == "skip"
    assert config.sse_heartbeat == 5.0
    assert config.forward == [ForwardTarget(url="http://127.0.0.1:9000/xon", types=["sms.*"],
                                            name="crm")]
    assert config.tcp[0].key == "127.0.0.1:5000"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl": {"call.arriving": 0.0}}, "ttl for 'call.arriving'"),
        ({"stale": "drop"}, "stale must be"),
        ({"sse_heartbeat": 0.0}, "sse_heartbeat"),
        ({"forward": [ForwardTarget(url="http://127.0.0.1/a", name="x"),
                      ForwardTarget(url="http://127.0.0.1/b", name="x")]}, "same name"),
        ({"tcp": [TcpTarget(address="127.0.0.1:1"), TcpTarget(address="127.0.0.1:1")]},
         "same name"),
    ],
)
def test_bad_delivery_settings_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    """Non-positive TTLs, unknown stale actions and duplicate target names are refused."""
    with pytest.raises(ConfigError, match=message):
        AgentConfig(**kwargs)


def test_equal_subscriptions_have_equal_digests() -> None:
    """The digest recognises a subscription again; any difference changes it."""
    one = Subscription.from_wire({"types": ["a"], "params": {"x": ["1", "2"]}})
    same = Subscription.from_wire({"params": {"x": ["1", "2", "1"]}, "types": ["a"]})
    other = Subscription.from_wire({"types": ["a"], "params": {"x": ["1"]}})
    assert one.digest() == same.digest() != other.digest()


def test_a_passed_over_run_is_skipped_only_by_its_subscription_and_joins_a_touching_one() -> None:
    """PassedOver: the scan jumps from inside the run to its end, with the same digest only."""
    run = PassedOver(b"s", 10, 100)
    assert run.skip(b"s", 10) == 100
    assert run.skip(b"s", 50) == 100
    assert run.skip(b"s", 9) == 9  # before the run: events 10 and below are not known
    assert run.skip(b"s", 100) == 100
    assert run.skip(b"t", 50) == 50
    assert run.joined(PassedOver(b"s", 60, 150)) == PassedOver(b"s", 10, 150)
    assert run.joined(PassedOver(b"s", 120, 150)) == PassedOver(b"s", 120, 150)
    assert run.joined(PassedOver(b"t", 60, 150)) == PassedOver(b"t", 60, 150)
