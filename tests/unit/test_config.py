"""shared/config.py: precedence flag > env > file > default, coercion, validation, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import (
    AGENT_ENV_PREFIX,
    SERVER_ENV_PREFIX,
    AgentConfig,
    LimitsConfig,
    LinkConfig,
    ServerConfig,
    load,
    parse_hostport,
)
from shared.errors import ConfigError


def _server(
    path: Path | None = None,
    env: dict[str, str] | None = None,
    flags: dict[str, object] | None = None,
) -> ServerConfig:
    return load(
        ServerConfig, path=path, env=env or {}, flags=flags or {}, env_prefix=SERVER_ENV_PREFIX
    )


def _agent(
    path: Path | None = None,
    env: dict[str, str] | None = None,
    flags: dict[str, object] | None = None,
) -> AgentConfig:
    return load(
        AgentConfig, path=path, env=env or {}, flags=flags or {}, env_prefix=AGENT_ENV_PREFIX
    )


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- precedence --------------------------------------------------------------------------------


def test_defaults_without_any_source() -> None:
    """With no file, env or flags, load() gives the dataclass defaults."""
    assert _server() == ServerConfig()
    assert _agent() == AgentConfig()


def test_file_overrides_default(tmp_path: Path) -> None:
    """A TOML value beats the default."""
    path = _toml(tmp_path, 'listen = "127.0.0.1:9000"\n')
    assert _server(path).listen == "127.0.0.1:9000"


def test_env_overrides_file(tmp_path: Path) -> None:
    """An XON_RELAY_* variable beats the TOML file."""
    path = _toml(tmp_path, 'listen = "127.0.0.1:9000"\n')
    cfg = _server(path, env={"XON_RELAY_LISTEN": "127.0.0.1:9001"})
    assert cfg.listen == "127.0.0.1:9001"


def test_flag_overrides_env_and_file(tmp_path: Path) -> None:
    """A command-line flag beats both the environment and the file."""
    path = _toml(tmp_path, 'listen = "127.0.0.1:9000"\n')
    cfg = _server(
        path, env={"XON_RELAY_LISTEN": "127.0.0.1:9001"}, flags={"listen": "127.0.0.1:9002"}
    )
    assert cfg.listen == "127.0.0.1:9002"


def test_flag_of_none_means_not_given() -> None:
    """A flag whose value is None (argparse default) does not hide the environment."""
    cfg = _server(env={"XON_RELAY_LISTEN": "127.0.0.1:9001"}, flags={"listen": None})
    assert cfg.listen == "127.0.0.1:9001"


def test_nested_section_precedence(tmp_path: Path) -> None:
    """[link] in TOML, XON_RELAY_LINK_* and "link.*" flags follow the same precedence."""
    path = _toml(tmp_path, "[link]\nwindow = 10\nauth_timeout = 3\n")
    assert _server(path).link == LinkConfig(window=10, auth_timeout=3.0)
    env = {"XON_RELAY_LINK_WINDOW": "20"}
    assert _server(path, env=env).link.window == 20
    assert _server(path, env=env, flags={"link.window": 30}).link.window == 30
    assert _server(path, env=env, flags={"link.window": 30}).link.auth_timeout == 3.0


def test_agent_uses_its_own_env_prefix() -> None:
    """The agent reads XON_RELAY_AGENT_*; the server's XON_RELAY_LISTEN does not apply."""
    env = {
        "XON_RELAY_LISTEN": "127.0.0.1:1",
        "XON_RELAY_AGENT_LISTEN": "127.0.0.1:2",
        "XON_RELAY_AGENT_LINK_WINDOW": "7",
    }
    cfg = _agent(env=env)
    assert cfg.listen == "127.0.0.1:2"
    assert cfg.link.window == 7


# -- coercion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["none", "None", "null", "off", ""])
def test_none_words_disable_an_optional_limit(word: str) -> None:
    """'none', 'null', 'off' and '' in the environment mean None for optional fields."""
    cfg = _agent(
        env={
            "XON_RELAY_AGENT_RETENTION_MAX_EVENTS": word,
            "XON_RELAY_AGENT_RETENTION_MAX_AGE": word,
        }
    )
    assert cfg.retention_max_events is None
    assert cfg.retention_max_age is None


def test_none_word_in_toml_disables_a_limit(tmp_path: Path) -> None:
    """TOML has no null: the string "none" disables an optional limit."""
    path = _toml(tmp_path, 'retention_max_events = "none"\n[link]\nping_interval = "off"\n')
    cfg = _agent(path)
    assert cfg.retention_max_events is None
    assert cfg.link.ping_interval is None


def test_optional_field_keeps_a_value() -> None:
    """An optional field given a number gets that number, coerced to the field type."""
    cfg = _agent(env={"XON_RELAY_AGENT_RETENTION_MAX_AGE": "60"})
    assert cfg.retention_max_age == 60.0
    assert isinstance(cfg.retention_max_age, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_bool_words(text: str, expected: bool) -> None:
    """Booleans accept the usual words in either case."""
    assert _agent(env={"XON_RELAY_AGENT_INSECURE": text}).insecure is expected


def test_path_is_expanded() -> None:
    """A data dir with ~ is expanded to the home directory."""
    cfg = _server(env={"XON_RELAY_DATA_DIR": "~/relay-data"})
    assert cfg.data_dir == Path.home() / "relay-data"


def test_toml_integer_for_float_field(tmp_path: Path) -> None:
    """TOML integers are fine where seconds (floats) are expected."""
    path = _toml(tmp_path, "enrollment_ttl = 60\n")
    assert _server(path).enrollment_ttl == 60.0


# -- errors name the key and the source --------------------------------------------------------


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    """An unknown top-level key is an error naming the key and the file."""
    path = _toml(tmp_path, 'listen = "127.0.0.1:1"\nlisten_port = 5\n')
    with pytest.raises(ConfigError) as info:
        _server(path)
    assert "listen_port" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_nested_toml_key_is_refused(tmp_path: Path) -> None:
    """An unknown key inside [link] is an error naming the section and the key."""
    path = _toml(tmp_path, "[link]\nwindoww = 5\n")
    with pytest.raises(ConfigError) as info:
        _server(path)
    assert "link." in str(info.value)
    assert "windoww" in str(info.value)


def test_scalar_where_a_table_is_expected(tmp_path: Path) -> None:
    """`link = 5` is refused: link is a table."""
    path = _toml(tmp_path, "link = 5\n")
    with pytest.raises(ConfigError, match="link"):
        _server(path)


def test_bad_env_value_names_key_and_variable() -> None:
    """A non-integer window from the environment names link.window and the variable."""
    with pytest.raises(ConfigError) as info:
        _server(env={"XON_RELAY_LINK_WINDOW": "lots"})
    message = str(info.value)
    assert "link.window" in message
    assert "XON_RELAY_LINK_WINDOW" in message


def test_bad_flag_value_names_the_command_line() -> None:
    """A bad flag value says it came from the command line."""
    with pytest.raises(ConfigError) as info:
        _server(flags={"max_body_size": "big"})
    assert "max_body_size" in str(info.value)
    assert "command line" in str(info.value)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("max_body_size = 1.5\n", "max_body_size"),
        ("max_body_size = true\n", "max_body_size"),
        ("listen = 8080\n", "listen"),
        ("insecure = 1\n", "insecure"),
        ("data_dir = 5\n", "data_dir"),
        ("[link]\nauth_timeout = true\n", "link.auth_timeout"),
    ],
)
def test_bad_toml_type_names_key_and_file(tmp_path: Path, toml: str, key: str) -> None:
    """A value of the wrong TOML type names the key and the file."""
    path = _toml(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        if key == "insecure":
            _agent(path)
        else:
            _server(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_bad_bool_word_is_refused() -> None:
    """'maybe' is not a boolean."""
    with pytest.raises(ConfigError, match="insecure"):
        _agent(env={"XON_RELAY_AGENT_INSECURE": "maybe"})


def test_missing_config_file(tmp_path: Path) -> None:
    """A named config file that does not exist is an error, not silently ignored."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        _server(missing)


def test_invalid_toml(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError naming the file."""
    path = _toml(tmp_path, "listen = \n")
    with pytest.raises(ConfigError) as info:
        _server(path)
    assert str(path) in str(info.value)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {"XON_RELAY_LISTEN": "nope"},
        {"XON_RELAY_ADMIN_LISTEN": "127.0.0.1:99999"},
        {"XON_RELAY_MAX_BODY_SIZE": "0"},
        {"XON_RELAY_LOG_FORMAT": "xml"},
        {"XON_RELAY_STORE": "postgres://db"},
        {"XON_RELAY_LINK_WINDOW": "0"},
        {"XON_RELAY_LINK_AUTH_TIMEOUT": "0"},
        {"XON_RELAY_LINK_MAX_MESSAGE_SIZE": "10"},
    ],
)
def test_server_validation(env: dict[str, str]) -> None:
    """Values that cannot work are refused at load time."""
    with pytest.raises(ConfigError):
        _server(env=env)


@pytest.mark.parametrize(
    "env",
    [
        {"XON_RELAY_AGENT_LISTEN": "localhost"},
        {"XON_RELAY_AGENT_BACKOFF_INITIAL": "0"},
        {"XON_RELAY_AGENT_BACKOFF_INITIAL": "5", "XON_RELAY_AGENT_BACKOFF_MAX": "1"},
        {"XON_RELAY_AGENT_RETENTION_MAX_EVENTS": "0"},
        {"XON_RELAY_AGENT_RETENTION_MAX_AGE": "-1"},
        {"XON_RELAY_AGENT_LOG_FORMAT": "yaml"},
    ],
)
def test_agent_validation(env: dict[str, str]) -> None:
    """Agent values that cannot work are refused at load time."""
    with pytest.raises(ConfigError):
        _agent(env=env)


def test_parse_hostport() -> None:
    """HOST:PORT splits; IPv6 brackets are removed."""
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:8080") == ("::1", 8080)
    for bad in ("8080", ":8080", "host:", "host:http", "host:70000"):
        with pytest.raises(ConfigError):
            parse_hostport(bad)


def test_server_urls() -> None:
    """base_url comes from listen (wildcards become loopback) unless public_url is set."""
    assert ServerConfig(listen="0.0.0.0:8080").base_url == "http://127.0.0.1:8080"
    assert ServerConfig(listen="[::1]:8080").base_url == "http://[::1]:8080"
    assert ServerConfig(public_url="https://relay.example/").base_url == "https://relay.example"
    cfg = ServerConfig(data_dir=Path("/srv/relay"))
    assert cfg.store_url == "sqlite:////srv/relay/relay.db"
    assert ServerConfig(store="redis://127.0.0.1:6379/0").store_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("cls", "env"),
    [
        (ServerConfig, {"XON_RELAY_LINK_AUTH_TIMEOUT": "nan"}),
        (ServerConfig, {"XON_RELAY_LINK_PING_INTERVAL": "-5"}),
        (ServerConfig, {"XON_RELAY_LINK_PING_TIMEOUT": "0"}),
        (ServerConfig, {"XON_RELAY_ENROLLMENT_TTL": "-1"}),
        (ServerConfig, {"XON_RELAY_LOG_LEVEL": "verbose"}),
        (AgentConfig, {"XON_RELAY_AGENT_MAX_WAIT": "-3"}),
        (AgentConfig, {"XON_RELAY_AGENT_BACKOFF_MAX": "nan"}),
        (AgentConfig, {"XON_RELAY_AGENT_LOG_LEVEL": "verbose"}),
    ],
    ids=[
        "auth-timeout-nan",
        "ping-interval-negative",
        "ping-timeout-zero",
        "ttl-negative",
        "server-log-level",
        "max-wait-negative",
        "backoff-nan",
        "agent-log-level",
    ],
)
def test_unusable_values_are_refused_at_load(cls: type, env: dict[str, str]) -> None:
    """NaN or negative durations and unknown log levels are ConfigErrors, not runtime surprises."""
    prefix = SERVER_ENV_PREFIX if cls is ServerConfig else AGENT_ENV_PREFIX
    with pytest.raises(ConfigError):
        load(cls, path=None, env=env, flags={}, env_prefix=prefix)


def test_list_of_tables_from_the_environment_is_json() -> None:
    """[[forward]] targets come from the environment as a JSON array; anything else is refused."""
    cfg = load(
        AgentConfig,
        path=None,
        env={"XON_RELAY_AGENT_FORWARD": '[{"url": "http://127.0.0.1:9000/xon"}]'},
        flags={},
        env_prefix=AGENT_ENV_PREFIX,
    )
    assert [t.url for t in cfg.forward] == ["http://127.0.0.1:9000/xon"]
    for bad in ("x", '{"url": "http://127.0.0.1:9000"}', '["x"]'):
        with pytest.raises(ConfigError, match="forward"):
            load(AgentConfig, path=None, env={"XON_RELAY_AGENT_FORWARD": bad}, flags={},
                 env_prefix=AGENT_ENV_PREFIX)


def test_trusted_proxies_take_cidr_ranges_from_the_environment() -> None:
    """Ranges and single addresses, comma-separated in the environment, are kept as given."""
    config = _server(env={"XON_RELAY_LIMITS_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1,fd00::/8"})
    assert config.limits.trusted_proxies == ["10.0.0.0/8", "127.0.0.1", "fd00::/8"]


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "caddy", "10.0.0.1-10.0.0.9", ""])
def test_trusted_proxies_refuse_what_is_not_an_address_or_range(entry: str) -> None:
    """A host name or a malformed range is refused at load, naming the key and the entry."""
    with pytest.raises(ConfigError) as info:
        LimitsConfig(trusted_proxies=["127.0.0.1", entry])
    assert "limits.trusted_proxies" in str(info.value) and repr(entry) in str(info.value)


def test_quota_section_from_toml_with_per_account_overrides(tmp_path: Path) -> None:
    """[quota] takes a default ceiling (or none) and a table of per-account ones; an override
    is looked up by name, then id."""
    path = _toml(tmp_path, "[quota]\nmax_bytes = 1048576\n[quota.accounts]\nacme = 4096\n")
    quota = _server(path).quota
    assert quota.for_account("acct_1", "acme") == 4096
    assert quota.for_account("acct_2", "other") == 1048576
    assert _server(env={"XON_RELAY_QUOTA_MAX_BYTES": "none"}).quota.max_bytes is None
    with pytest.raises(ConfigError, match="quota.accounts.acme"):
        _server(_toml(tmp_path, "[quota.accounts]\nacme = 10\n"))
