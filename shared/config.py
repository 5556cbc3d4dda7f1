"""Typed configuration for the relay server and the agent, and one loader for both.

Precedence (DESIGN §Command line): command-line flag > environment variable > TOML file >
default. Environment variables are ``<prefix><FIELD>`` for top-level fields and
``<prefix><SECTION>_<FIELD>`` for nested sections, upper-case: ``XON_RELAY_LISTEN``,
``XON_RELAY_LINK_WINDOW`` for the server, ``XON_RELAY_AGENT_LISTEN`` for the agent. In TOML,
nested sections are tables (``[link]``). Durations are float seconds, sizes are bytes, and
``None`` (``"none"`` in the environment) disables a limit.

Only the CLIs read files and the environment; everything below them receives these dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = [
    "LinkConfig",
    "ServerConfig",
    "AgentConfig",
    "load",
    "default_data_dir",
    "parse_hostport",
    "SERVER_ENV_PREFIX",
    "AGENT_ENV_PREFIX",
]

SERVER_ENV_PREFIX = "XON_RELAY_"
AGENT_ENV_PREFIX = "XON_RELAY_AGENT_"

T = TypeVar("T")


def default_data_dir(app: str) -> Path:
    """Per-user data directory: ``%PROGRAMDATA%`` on Windows, XDG data home elsewhere."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / app
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / app


def parse_hostport(value: str, *, what: str = "address") -> tuple[str, int]:
    """``"127.0.0.1:8080"`` → ``("127.0.0.1", 8080)``; ``[::1]:80`` works too.

    Raises:
        ConfigError: not HOST:PORT with a port in 0–65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConfig:
    """Link protocol settings (both sides)."""

    window: int = 256
    """Most events the relay sends to one agent before it must ack (back-pressure)."""
    auth_timeout: float = 10.0
    """Seconds a new link has to complete the handshake."""
    ping_interval: float | None = 20.0
    """WebSocket ping interval; with ``ping_timeout`` a dead link is noticed within ~30 s."""
    ping_timeout: float | None = 10.0
    """Seconds to wait for a pong before declaring the link dead."""
    max_message_size: int = 2 * 1024 * 1024
    """Largest link message accepted, in bytes."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError("link.window must be at least 1")
        if self.auth_timeout <= 0:
            raise ConfigError("link.auth_timeout must be positive")
        if self.max_message_size < 1024:
            raise ConfigError("link.max_message_size must be at least 1024 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Relay server settings."""

    listen: str = "127.0.0.1:8080"
    """Public listener (X-on ingress, agent WebSocket, enrollment). Put TLS in front of it."""
    admin_listen: str = "127.0.0.1:8081"
    """Admin listener (management API); loopback by default."""
    data_dir: Path = field(default_factory=lambda: default_data_dir("xon-relay-server"))
    """Holds the SQLite store, the relay identity and the admin URL/token file."""
    store: str = ""
    """``sqlite:///path/relay.db`` or ``redis://host:port/db``; empty: SQLite in data_dir."""
    public_url: str = ""
    """Base URL printed in ingress URLs and enrollment instructions; empty: from ``listen``."""
    max_body_size: int = 256 * 1024
    """Largest X-on request body accepted, in bytes (413 beyond)."""
    enrollment_ttl: float = 24 * 3600.0
    """Seconds an enrollment code stays valid."""
    log_level: str = "info"
    log_format: str = "text"
    """``text`` for a console, ``json`` for machines."""
    link: LinkConfig = field(default_factory=LinkConfig)

    def __post_init__(self) -> None:
        parse_hostport(self.listen, what="listen")
        parse_hostport(self.admin_listen, what="admin_listen")
        if self.max_body_size < 1:
            raise ConfigError("max_body_size must be positive")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        if self.store and not self.store.startswith(("sqlite:///", "redis://", "rediss://")):
            raise ConfigError(
                f"store must be sqlite:///PATH or redis://HOST:PORT/DB, got {self.store!r}"
            )

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.data_dir / 'relay.db'}"

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = parse_hostport(self.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """Relay agent settings. ``enroll`` writes relay_url, agent_id and relay_id."""

    relay_url: str = ""
    """Base URL of the relay (https://…; http:// only for loopback or with ``insecure``)."""
    agent_id: str = ""
    relay_id: str = ""
    """The relay identity recorded at enrollment; the handshake refuses any other."""
    data_dir: Path = field(default_factory=lambda: default_data_dir("xon-relay-agent"))
    listen: str = "127.0.0.1:8765"
    """Local API address; loopback only."""
    insecure: bool = False
    """Allow plain http/ws to a non-loopback relay (logs a warning at every start)."""
    retention_max_events: int | None = 100_000
    """Inbox keeps at most this many events; ``None``: no count limit."""
    retention_max_age: float | None = 7 * 24 * 3600.0
    """Inbox drops events older than this many seconds; ``None``: no age limit."""
    backoff_initial: float = 1.0
    """First reconnect delay in seconds; doubles up to ``backoff_max``, with jitter."""
    backoff_max: float = 30.0
    max_wait: float = 60.0
    """Longest long-poll ``wait`` a local app may ask for, in seconds."""
    log_level: str = "info"
    log_format: str = "text"
    link: LinkConfig = field(default_factory=LinkConfig)

    def __post_init__(self) -> None:
        parse_hostport(self.listen, what="listen")
        if self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise ConfigError("backoff_initial must be > 0 and <= backoff_max")
        if self.retention_max_events is not None and self.retention_max_events < 1:
            raise ConfigError("retention_max_events must be at least 1 (or none)")
        if self.retention_max_age is not None and self.retention_max_age <= 0:
            raise ConfigError("retention_max_age must be positive (or none)")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")


# -- loading -----------------------------------------------------------------------------------

_NONE_WORDS = ("none", "null", "off", "")


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Coerce ``value`` (a string from env/flags, or a TOML value) to the field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        return _coerce(value, args[0], key, source)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
        if hint is Path:
            if not isinstance(value, str | Path):
                raise ValueError("expected a path")
            return Path(value).expanduser()
        if origin is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError("expected a list")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key} from {source}: {exc} (got {value!r})") from exc
    raise ConfigError(f"{key} from {source}: unsupported setting type")  # pragma: no cover


def load(
    cls: type[T],
    *,
    path: Path | None,
    env: Mapping[str, str],
    flags: Mapping[str, object],
    env_prefix: str,
) -> T:
    """Build ``cls`` from defaults, a TOML file, the environment and flags (highest wins).

    Args:
        cls: ``ServerConfig`` or ``AgentConfig``.
        path: TOML file, or ``None``. A missing named file is an error.
        env: usually ``os.environ``.
        flags: field name (``"listen"``, ``"link.window"``) → value; ``None`` values are
            ignored, so argparse defaults of ``None`` mean "not given".
        env_prefix: ``SERVER_ENV_PREFIX`` or ``AGENT_ENV_PREFIX``.

    Raises:
        ConfigError: unreadable file, unknown key, or a value of the wrong type, naming the key
            and where it came from.
    """
    file_data: dict[str, Any] = {}
    if path is not None:
        try:
            file_data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    try:
        return _build(cls, file_data, env, flags, env_prefix, "", str(path))
    except TypeError as exc:  # pragma: no cover - a field without default would be a bug
        raise ConfigError(str(exc)) from exc


def _build(
    cls: type[T],
    file_data: Mapping[str, Any],
    env: Mapping[str, str],
    flags: Mapping[str, object],
    env_prefix: str,
    section: str,
    file_name: str,
) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in file_data:
        if key not in names:
            raise ConfigError(f"unknown key {section}{key!r} in config file {file_name}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        key = f"{section}{f.name}"
        if dataclasses.is_dataclass(hint):
            sub = file_data.get(f.name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{key} in config file {file_name} must be a table")
            kwargs[f.name] = _build(
                hint, sub, env, flags, env_prefix, f"{key}.", file_name  # type: ignore[arg-type]
            )
            continue
        env_name = env_prefix + key.replace(".", "_").upper()
        if flags.get(key) is not None:
            kwargs[f.name] = _coerce(flags[key], hint, key, "the command line")
        elif env_name in env:
            kwargs[f.name] = _coerce(env[env_name], hint, key, f"environment {env_name}")
        elif f.name in file_data:
            kwargs[f.name] = _coerce(file_data[f.name], hint, key, f"config file {file_name}")
    return cls(**kwargs)
