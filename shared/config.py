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
import ipaddress
import json
import math
import os
import sys
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .events import IngressLimits
from .redis_url import REDIS_SCHEMES, parse_redis_url
from .subscription import Subscription

__all__ = [
    "LinkConfig",
    "QuotaConfig",
    "CtoxTypeConfig",
    "CtoxConfig",
    "StatusConfig",
    "ClusterConfig",
    "RetentionConfig",
    "LimitsConfig",
    "EVENT_FRAME_ALLOWANCE",
    "ServerConfig",
    "AgentConfig",
    "SubscriptionConfig",
    "ForwardTarget",
    "TcpTarget",
    "STALE_ACTIONS",
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
    heartbeat_interval: float | None = 15.0
    """Relay: seconds between ``heartbeat`` frames telling the agent the newest seq it should
    have (docs/protocol.md, Heartbeat); ``None``: send none."""
    stall_timeout: float | None = 30.0
    """Agent: seconds it waits, once a heartbeat says events are waiting and it has acked all
    it received, for an event to arrive before it closes the link (4013 ``stalled``) and
    reconnects; ``None``: never."""
    max_handshakes: int | None = 64
    """Relay: link handshakes (upgrade to authenticated, or failed) one process runs at once.
    An upgrade beyond it waits for a slot, first come first served, for up to
    ``handshake_queue_timeout``; ``None``: no limit, every upgrade starts at once. Running all
    of a reconnect storm's handshakes together makes each slower than the agents' open
    timeout, so none finishes (docs/performance.md, reconnect storm)."""
    handshake_queue_timeout: float = 2.0
    """Relay: seconds an upgrade waits for a handshake slot before it is answered 503 ``busy``
    with a ``Retry-After`` booked after the queue and earlier refusals at the relay's handshake
    rate (1–30 s); one behind more waiters than the relay could serve in this time at its best
    pace is refused at once. ``0``: no waiting, refuse at once when every slot is taken. Keep
    it well under the agents' open timeout (their ``link.auth_timeout``, 10 s) so a refused
    agent hears so in time."""
    hello_timeout: float = 3.0
    """Relay: seconds an upgraded link has to send its ``hello``; one that stays silent is
    closed (4008 ``auth_timeout``) and frees its handshake slot, so idle upgrades cannot
    hold the slots real agents need (docs/protocol.md, Reconnecting)."""
    handshake_share: float | None = 0.125
    """Relay: the share of ``max_handshakes`` one source address (``limits.trusted_proxies``
    decides what the source is) may hold, running or queued, but at least 2; an upgrade beyond
    it is refused at once with 429 ``busy``. ``None``: no per-source cap."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError("link.window must be at least 1")
        if self.max_handshakes is not None and self.max_handshakes < 1:
            raise ConfigError("link.max_handshakes must be at least 1 (or none)")
        if not 0 <= self.handshake_queue_timeout < math.inf:
            raise ConfigError("link.handshake_queue_timeout must be 0 or more seconds")
        if self.auth_timeout <= 0:
            raise ConfigError("link.auth_timeout must be positive")
        if not 0 < self.hello_timeout < math.inf:
            raise ConfigError("link.hello_timeout must be positive")
        if self.handshake_share is not None and not 0 < self.handshake_share <= 1:
            raise ConfigError("link.handshake_share must be above 0 and at most 1 (or none)")
        if self.max_message_size < 1024:
            raise ConfigError("link.max_message_size must be at least 1024 bytes")
        for name, value in (
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
            ("stall_timeout", self.stall_timeout),
        ):
            if value is not None and value <= 0:
                raise ConfigError(f"link.{name} must be positive (or none)")


_HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_ENCODINGS = ("form", "json", "query")


@dataclass(frozen=True, slots=True, kw_only=True)
class CtoxTypeConfig:
    """One CTOX command type: how the relay calls X-on for it (docs/ctox.md)."""

    method: str = "POST"
    """HTTP method of the X-on call."""
    path: str = ""
    """Path appended to the account's X-on API base URL, e.g. ``/api/v1/clicktocall``."""
    encoding: str = "form"
    """How params travel: ``form`` (urlencoded body), ``json`` (JSON body) or ``query``."""
    required: list[str] = field(default_factory=list)
    """Params the relay insists on before calling X-on (400 ``missing_params`` otherwise)."""

    def __post_init__(self) -> None:
        if self.method.upper() not in _HTTP_METHODS:
            raise ConfigError(f"method must be one of {', '.join(_HTTP_METHODS)}")
        if not self.path.startswith("/") or "//" in self.path or ".." in self.path.split("/"):
            raise ConfigError(f"path must be an absolute path like /api/v1/x, got {self.path!r}")
        if self.encoding not in _ENCODINGS:
            raise ConfigError(f"encoding must be one of {', '.join(_ENCODINGS)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CtoxConfig:
    """CTOX egress to X-on: timeouts, idempotency, per-account limits, the catalogue."""

    timeout: float = 10.0
    """Seconds an X-on call may take in total; beyond it the command answers 504."""
    idempotency_ttl: float = 24 * 3600.0
    """Seconds a command's result is kept per (account, idempotency key) (issue: ≥ 24 h)."""
    claim_grace: float = 5.0
    """Seconds past ``timeout`` after which an unfinished claim counts as abandoned (a relay
    died mid-call): its key then answers 502 ``outcome_unknown``, never a second X-on call."""
    max_in_flight: int | None = 8
    """X-on calls one account may have running at once (429 beyond); ``None``: no limit."""
    per_minute: int | None = 120
    """X-on calls one account may start per minute (429 beyond); ``None``: no limit."""
    max_per_link: int = 32
    """Commands one agent link may have pending at once (429 beyond)."""
    max_response_size: int = 256 * 1024
    """Largest X-on response body passed back, in bytes (502 beyond)."""
    types: dict[str, CtoxTypeConfig] = field(default_factory=dict)
    """Catalogue entries added to (or replacing) the built-in ones, by CTOX type."""
    accounts: dict[str, dict[str, CtoxTypeConfig]] = field(default_factory=dict)
    """Per-account catalogue entries: account id or name → CTOX type → entry."""

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.claim_grace < 0:
            raise ConfigError("ctox.timeout must be positive and ctox.claim_grace not negative")
        if self.idempotency_ttl <= 0:
            raise ConfigError("ctox.idempotency_ttl must be positive")
        for name, limit in (("max_in_flight", self.max_in_flight), ("per_minute", self.per_minute)):
            if limit is not None and limit < 1:
                raise ConfigError(f"ctox.{name} must be at least 1 (or none)")
        if self.max_per_link < 1 or self.max_response_size < 1:
            raise ConfigError("ctox.max_per_link and ctox.max_response_size must be positive")


def _default_status_types() -> dict[str, list[str]]:
    # The simulator's status event (shared/sim/catalogue.py): one item per mailbox.
    return {"messages.waiting": ["mailbox"]}


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusConfig:
    """Which X-on events are status events, and which params identify a status item."""

    types: dict[str, list[str]] = field(default_factory=_default_status_types)
    """Event type → names of the params that identify one item (empty: one item per type).
    Replaces the default as a whole when set."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """Abuse limits of the public listener (docs/reliability.md, Ingress abuse): rates,
    enrollment lockout, deadlines, and what one ingress request may turn into (README,
    Ingress limits)."""

    source_rate: float | None = 1000.0
    """Requests per second one source address may make on the public listener (429 beyond);
    ``None``: no limit. X-on sends every account's events from few addresses: keep it high."""
    source_burst: int = 2000
    """Requests a source may make at once before ``source_rate`` applies."""
    account_rate: float | None = 500.0
    """Ingress requests per second one account may receive (429 beyond); ``None``: no limit."""
    account_burst: int = 5000
    """Ingress requests an account may receive at once before ``account_rate`` applies."""
    enroll_max_failures: int | None = 5
    """Failed enrollment codes one source may send within ``enroll_window`` before it is
    locked out for ``enroll_lockout`` seconds (429); ``None``: no lockout."""
    enroll_window: float = 600.0
    enroll_lockout: float = 900.0
    header_timeout: float = 10.0
    """Seconds a client has to send a complete request head, counted from the connection or
    from the previous response (also the idle keep-alive limit): slow-header clients close."""
    body_timeout: float = 30.0
    """Seconds a client has to send a request body (408 beyond): slow-body clients close."""
    trusted_proxies: list[str] = field(default_factory=list)
    """Addresses or CIDR ranges (``10.0.0.0/8``, ``fd00::/8``) of the reverse proxies (the TLS
    front) whose ``X-Forwarded-For`` names the source: walked from the right, the first hop
    outside these ranges is the client (docs/deployment.md, The client behind a proxy).
    Requests from anywhere else are keyed by their own address."""
    max_tracked: int = 100_000
    """Most sources (or accounts) each limiter remembers; the least recently seen go first."""
    max_params: int = 1000
    """Name/value pairs one ingress request may carry: query, form fields, JSON and XML
    leaves, repeats included (413 ``too_many_params`` beyond)."""
    max_key_size: int = 512
    """Longest param name (a flattened JSON name with its dots) and event type, in UTF-8
    bytes (413 ``param_too_large`` / ``type_too_large`` beyond)."""
    max_value_size: int = 64 * 1024
    """Longest param value, in UTF-8 bytes (413 ``param_too_large`` beyond)."""
    max_depth: int = 32
    """Deepest nesting of JSON objects and arrays, or of XML elements, in an ingress body
    (413 ``nesting_too_deep`` beyond); at most 100."""
    max_event_size: int = 1024 * 1024
    """Largest event the relay stores, as its JSON form with the body in base64 (413
    ``event_too_large`` beyond). ``link.max_message_size`` must carry it with the frame
    around it: at least this plus ``EVENT_FRAME_ALLOWANCE``."""

    @property
    def ingress(self) -> IngressLimits:
        """The limits ``shared.events.parse_ingress`` applies."""
        return IngressLimits(
            max_params=self.max_params,
            max_key_size=self.max_key_size,
            max_value_size=self.max_value_size,
            max_depth=self.max_depth,
            max_event_size=self.max_event_size,
        )

    def __post_init__(self) -> None:
        for name, rate in (("source_rate", self.source_rate), ("account_rate", self.account_rate)):
            if rate is not None and not rate > 0:
                raise ConfigError(f"limits.{name} must be positive (or none)")
        if self.source_burst < 1 or self.account_burst < 1 or self.max_tracked < 1:
            raise ConfigError("limits.source_burst, account_burst and max_tracked must be >= 1")
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError as exc:
                raise ConfigError(
                    f"limits.trusted_proxies: {entry!r} is not an IP address or CIDR range"
                ) from exc
        if self.enroll_max_failures is not None and self.enroll_max_failures < 1:
            raise ConfigError("limits.enroll_max_failures must be at least 1 (or none)")
        for name, value in (
            ("enroll_window", self.enroll_window),
            ("enroll_lockout", self.enroll_lockout),
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
        ):
            if not value > 0:
                raise ConfigError(f"limits.{name} must be positive")
        for name in ("max_params", "max_key_size", "max_value_size", "max_event_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name} must be at least 1")
        if not 1 <= self.max_depth <= 100:
            # The JSON walk recurses once per level; 100 keeps it far from Python's limit.
            raise ConfigError("limits.max_depth must be between 1 and 100")


EVENT_FRAME_ALLOWANCE = 1024
"""Bytes an ``events`` frame adds around one event's JSON form: ``{"v":1,"type":"events",
"items":[{"seq":N,"event":`` … ``}]}`` is under 80 with a 19-digit seq; the rest is room for
fields the frame may gain. tests/unit/test_ingress_limits.py encodes a frame to check it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """Several relay instances on one Redis (issue 5, docs/scaling.md)."""

    poll_interval: float = 1.0
    """Seconds between re-reads of each served account's log head and status, so a missed
    pub/sub wake-up delays delivery by at most this much and loses nothing."""
    recheck_interval: float = 1.0
    """Seconds between re-checks of every connected agent (revoked? replaced by a newer link on
    another instance?): the fallback when a broadcast was missed."""
    handover_timeout: float = 2.0
    """Seconds a new link waits for the instance that held the agent's previous link to confirm
    it stopped sending, before it sends anyway (that instance is dead or cut off). Must be at
    least ``recheck_interval``: a live instance notices the takeover by then without help."""
    redis_wait_replicas: int = 0
    """After each append pipeline, ``WAIT`` for this many replicas before answering X-on 2xx
    (0: do not wait). Fewer acknowledgements within ``redis_wait_timeout`` answer 503."""
    redis_wait_aof: bool = False
    """After each append pipeline, ``WAITAOF 1 <redis_wait_replicas>``: the write is fsynced to
    the primary's AOF (and the replicas') before the 2xx. Needs Redis 7.2 or newer."""
    redis_wait_timeout: float = 1.0
    """Seconds ``WAIT``/``WAITAOF`` may take."""

    def __post_init__(self) -> None:
        for name in ("poll_interval", "recheck_interval", "handover_timeout", "redis_wait_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"cluster.{name} must be positive")
        if self.handover_timeout < self.recheck_interval:
            raise ConfigError("cluster.handover_timeout must be at least cluster.recheck_interval")
        if self.redis_wait_replicas < 0:
            raise ConfigError("cluster.redis_wait_replicas must not be negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionConfig:
    """How long the relay keeps each account's event log (docs/redis.md, Retention)."""

    interval: float | None = 60.0
    """Seconds between retention passes; ``None``: never trim."""
    max_age: float | None = 7 * 24 * 3600.0
    """Events older than this many seconds are dropped once every agent of the account acked
    them; ``None``: no age limit."""
    max_events: int | None = 100_000
    """Events beyond the newest ``max_events`` of an account are dropped once every agent
    acked them; ``None``: no count limit."""
    hard_max_events: int | None = 1_000_000
    """Events beyond the newest ``hard_max_events`` are dropped even if an agent has not acked
    them: that agent is told it is behind retention (docs/protocol.md). ``None``: no limit."""
    hard_max_age: float | None = None
    """Like ``hard_max_events``, by age in seconds; ``None``: no limit."""
    max_bytes: int | None = None
    """Oldest events beyond this many stored bytes of an account (docs/redis.md, Quotas) are
    dropped once every agent acked them, like ``max_events``; ``None``: no byte limit. The
    hard ceiling in bytes is the quota (``quota.max_bytes``), which refuses new events."""
    batch: int = 10_000
    """Most events one pass drops per account (bounds each pass's work on the store)."""

    def __post_init__(self) -> None:
        for name in ("interval", "max_age", "hard_max_age"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"retention.{name} must be positive (or none)")
        for name in ("max_events", "hard_max_events"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"retention.{name} must be at least 1 (or none)")
        if self.batch < 1:
            raise ConfigError("retention.batch must be at least 1")
        if self.max_bytes is not None and self.max_bytes < 1024:
            raise ConfigError("retention.max_bytes must be at least 1024 bytes (or none)")


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaConfig:
    """Per-account ceilings on the relay's stored events (docs/redis.md, Quotas)."""

    max_bytes: int | None = 512 * 1024 * 1024
    """Stored bytes one account's event log may hold; an event that would pass it is refused
    with 507 ``quota_exceeded`` until retention frees space. ``None``: no quota."""
    accounts: dict[str, int] = field(default_factory=dict)
    """Account name (or id) → its own ``max_bytes``, in place of the default."""

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 1024:
            raise ConfigError("quota.max_bytes must be at least 1024 bytes (or none)")
        for name, value in self.accounts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1024:
                raise ConfigError(f"quota.accounts.{name} must be at least 1024 bytes")

    def for_account(self, account_id: str, name: str) -> int | None:
        """The byte quota of one account: its own entry (by name, then id), else the default."""
        own = self.accounts.get(name, self.accounts.get(account_id))
        return self.max_bytes if own is None else own


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
    shutdown_grace: float = 10.0
    """Seconds SIGTERM waits for in-flight ingress requests and CTOX commands to finish before
    agents are sent away and the listeners close; it stops sooner once they are done."""
    log_level: str = "info"
    log_format: str = "text"
    """``text`` for a console, ``json`` for machines."""
    xon_id_params: list[str] = field(default_factory=lambda: ["id"])
    """Bare param names that carry X-on's id for an event (the first present counts): a
    repeat needs that id and the same request (docs/delivery.md, Duplicates)."""
    link: LinkConfig = field(default_factory=LinkConfig)
    ctox: CtoxConfig = field(default_factory=CtoxConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)

    def __post_init__(self) -> None:
        parse_hostport(self.listen, what="listen")
        parse_hostport(self.admin_listen, what="admin_listen")
        if self.max_body_size < 1:
            raise ConfigError("max_body_size must be positive")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        _check_log_level(self.log_level)
        if not all(self.xon_id_params):
            raise ConfigError("xon_id_params must not name an empty param")
        if self.enrollment_ttl <= 0:
            raise ConfigError("enrollment_ttl must be positive")
        if self.shutdown_grace < 0:
            raise ConfigError("shutdown_grace must not be negative")
        if self.limits.max_event_size + EVENT_FRAME_ALLOWANCE > self.link.max_message_size:
            # The link must carry the largest event the relay accepts: one it cannot would
            # close the account's link on every attempt to send it.
            raise ConfigError(
                f"limits.max_event_size ({self.limits.max_event_size}) must be at most"
                f" link.max_message_size ({self.link.max_message_size}) minus"
                f" {EVENT_FRAME_ALLOWANCE} bytes for the frame around the event"
            )
        if self.store.lower().startswith(REDIS_SCHEMES):
            parse_redis_url(self.store)  # ConfigError names the part, never the password
        elif self.store and not self.store.startswith("sqlite:///"):
            raise ConfigError(
                "store must be sqlite:///PATH, redis://HOST:PORT/DB, redis+sentinel://HOSTS/"
                f"SERVICE/DB or redis+cluster://HOSTS, got {self.store.split(':', 1)[0]!r}:..."
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
class SubscriptionConfig:
    """Which events the relay sends this agent (docs/protocol.md, Routing); empty: all."""

    types: list[str] = field(default_factory=list)
    """Event types, exact or ``prefix.*`` (``"call.*"``); empty: any type."""
    params: dict[str, list[str]] = field(default_factory=dict)
    """Parameter name → accepted values; an event must match every name listed."""

    def __post_init__(self) -> None:
        try:
            Subscription.from_wire({"types": self.types, "params": self.params})
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def to_wire(self) -> dict[str, Any] | None:
        """The ``hello`` field; ``None`` when it would match everything."""
        return Subscription.from_wire({"types": self.types, "params": self.params}).to_wire()


STALE_ACTIONS = ("mark", "skip")
_TARGET_STARTS = ("latest", "oldest")


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_target(kind: str, name: str, types_: list[str], start: str, retry_initial: float,
                  retry_max: float, timeout: float) -> None:
    try:
        Subscription.from_wire({"types": types_})
    except ValueError as exc:
        raise ConfigError(f"{kind} {name}: {exc}") from exc
    if start not in _TARGET_STARTS:
        raise ConfigError(f"{kind} {name}: start must be 'latest' or 'oldest', got {start!r}")
    if not 0 < retry_initial <= retry_max or not timeout > 0:
        raise ConfigError(f"{kind} {name}: need 0 < retry_initial <= retry_max and timeout > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardTarget:
    """One ``[[forward]]`` target: X-on's original request re-issued to a local URL
    (docs/delivery.md, Forward)."""

    url: str = ""
    """Base URL; the event's path suffix is appended to its path, then X-on's query string."""
    name: str = ""
    """Key of the stored progress and the name in health reports; empty: the URL."""
    types: list[str] = field(default_factory=list)
    """Event types to forward (exact or ``prefix.*``); empty: all."""
    allow_remote: bool = False
    """Allow a non-loopback URL (DESIGN principle 3: delivery stays on this PC by default)."""
    timeout: float = 10.0
    """Seconds one forwarded request may take; then it counts as failed and is retried."""
    retry_initial: float = 1.0
    """First retry delay in seconds; doubles per failure up to ``retry_max``."""
    retry_max: float = 60.0
    start: str = "latest"
    """Where a target never seen before starts: ``latest`` (new events only) or ``oldest``
    (everything the inbox still holds). Ignored once progress is stored."""

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"forward url must be http://HOST[:PORT]/PATH, got {self.url!r}")
        if parts.query or parts.fragment:
            raise ConfigError(f"forward url {self.url!r}: no query or fragment (X-on's are used)")
        if not self.allow_remote and not _is_loopback_host(parts.hostname):
            raise ConfigError(
                f"forward url {self.url!r} is not on loopback; set allow_remote = true to allow it"
            )
        _check_target("forward", self.key, self.types, self.start, self.retry_initial,
                      self.retry_max, self.timeout)

    @property
    def key(self) -> str:
        return self.name or self.url


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpTarget:
    """One ``[[tcp]]`` target: one line per event to a local socket (docs/delivery.md, TCP)."""

    address: str = ""
    """``HOST:PORT`` the agent connects to."""
    name: str = ""
    """Key of the stored progress and the name in health reports; empty: the address."""
    types: list[str] = field(default_factory=list)
    """Event types to send (exact or ``prefix.*``); empty: all."""
    allow_remote: bool = False
    """Allow a non-loopback address."""
    timeout: float = 30.0
    """Seconds to connect, and to wait for the ack line of each event; then reconnect."""
    retry_initial: float = 1.0
    """First reconnect delay in seconds; doubles per failure up to ``retry_max``."""
    retry_max: float = 30.0
    start: str = "latest"
    """As for :class:`ForwardTarget`."""

    def __post_init__(self) -> None:
        host, _ = parse_hostport(self.address, what="tcp address")
        if not self.allow_remote and not _is_loopback_host(host):
            raise ConfigError(
                f"tcp address {self.address!r} is not on loopback; set allow_remote = true"
            )
        _check_target("tcp", self.key, self.types, self.start, self.retry_initial,
                      self.retry_max, self.timeout)

    @property
    def key(self) -> str:
        return self.name or self.address


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
    """Local API address; loopback only unless ``allow_non_loopback``."""
    allow_non_loopback: bool = False
    """Let ``listen`` name a non-loopback address (DESIGN principle 3 says loopback only: the
    local API then still needs the token, but other machines can reach it)."""
    max_waiters: int = 16
    """Long-polls and streams waiting at once per credential; 429 ``too_many_waiters`` beyond."""
    insecure: bool = False
    """Allow plain http/ws to a non-loopback relay (logs a warning at every start)."""
    proxy: str = ""
    """HTTP CONNECT proxy for the link and enrollment: ``http://[USER:PASSWORD@]HOST:PORT``;
    ``pac:URL``: a PAC file chooses; ``direct``: never a proxy; empty: ``HTTPS_PROXY``
    (``HTTP_PROXY`` for an http relay) unless ``NO_PROXY`` covers the relay, else the Windows
    proxy settings; ``auto``: as empty, plus WPAD (docs/corporate-networks.md)."""
    ca_file: Path | None = None
    """PEM file of extra CA certificates to trust besides the OS store (e.g. a TLS-inspecting
    proxy's CA); ``None``: the OS store only."""
    retention_max_events: int | None = 100_000
    """Inbox keeps at most this many events; ``None``: no count limit."""
    retention_max_age: float | None = 7 * 24 * 3600.0
    """Inbox drops events older than this many seconds; ``None``: no age limit."""
    backoff_initial: float = 1.0
    """First reconnect delay in seconds; doubles up to ``backoff_max``, with jitter."""
    backoff_max: float = 30.0
    max_wait: float = 60.0
    """Longest long-poll ``wait`` a local app may ask for, in seconds."""
    command_timeout: float = 15.0
    """Seconds a local CTOX call may wait for the relay's answer (a little above the relay's
    X-on timeout), resends after a reconnect included; then 504 ``command_timeout``."""
    max_commands_in_flight: int = 32
    """Local CTOX calls waiting at once; 429 ``too_many_commands`` beyond."""
    log_level: str = "info"
    log_format: str = "text"
    link: LinkConfig = field(default_factory=LinkConfig)
    subscription: SubscriptionConfig = field(default_factory=SubscriptionConfig)
    """Routing: the events the relay sends this agent (docs/protocol.md, Routing)."""
    ttl: dict[str, float] = field(default_factory=dict)
    """Event type → seconds after the relay received it that the event is stale
    (docs/delivery.md, Stale events); types not listed never go stale."""
    stale: str = "mark"
    """``mark``: stale events carry ``"stale": true``; ``skip``: push modes (stream, forward,
    tcp) pass over them. Stale events always stay in the inbox."""
    sse_heartbeat: float = 15.0
    """Seconds between comment lines on an idle ``/v1/stream``, so proxies keep it open and
    both ends notice a dead one."""
    max_page_bytes: int = 4 * 1024 * 1024
    """Most bytes of events (their stored JSON) one ``/v1/events`` or consumer answer, or one
    page of a ``/v1/stream``, carries: the page ends early rather than growing past it, but
    always holds at least one event, however large (docs/delivery.md, Response sizes)."""
    stream_buffer: int = 1024 * 1024
    """Bytes a ``/v1/stream`` may leave unsent in its socket's buffer; past it the stream waits
    for the client to read, and drops a client that does not within ``stream_write_timeout``."""
    stream_write_timeout: float = 30.0
    """Seconds a stream waits for a client that does not read its buffer below
    ``stream_buffer``; then the stream is closed (the client may resume with Last-Event-ID)."""
    forward: list[ForwardTarget] = field(default_factory=list)
    tcp: list[TcpTarget] = field(default_factory=list)

    def __post_init__(self) -> None:
        parse_hostport(self.listen, what="listen")
        _check_delivery(self)
        if self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise ConfigError("backoff_initial must be > 0 and <= backoff_max")
        if self.retention_max_events is not None and self.retention_max_events < 1:
            raise ConfigError("retention_max_events must be at least 1 (or none)")
        if self.retention_max_age is not None and self.retention_max_age <= 0:
            raise ConfigError("retention_max_age must be positive (or none)")
        if self.max_wait <= 0:
            raise ConfigError("max_wait must be positive")
        if self.max_waiters < 1:
            raise ConfigError("max_waiters must be at least 1")
        if self.max_page_bytes < 1024 or self.stream_buffer < 1024:
            raise ConfigError("max_page_bytes and stream_buffer must be at least 1024 bytes")
        if not self.stream_write_timeout > 0:
            raise ConfigError("stream_write_timeout must be positive")
        if self.command_timeout <= 0 or self.max_commands_in_flight < 1:
            raise ConfigError("command_timeout and max_commands_in_flight must be positive")
        _check_log_level(self.log_level)
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")


def _check_delivery(config: AgentConfig) -> None:
    for event_type, seconds in config.ttl.items():
        if not seconds > 0:
            raise ConfigError(f"ttl for {event_type!r} must be positive")
    if config.stale not in STALE_ACTIONS:
        raise ConfigError(f"stale must be 'mark' or 'skip', got {config.stale!r}")
    if not config.sse_heartbeat > 0:
        raise ConfigError("sse_heartbeat must be positive")
    # Progress is stored by name: two targets with one name would share (and skip) events.
    for kind, keys in (("forward", [t.key for t in config.forward]),
                       ("tcp", [t.key for t in config.tcp])):
        if len(set(keys)) != len(keys):
            raise ConfigError(f"two {kind} targets have the same name; give each a unique name")


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _check_log_level(level: str) -> None:
    if level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {level!r}")


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
            number = float(value)
            if not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        if hint is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
        if hint is Path:
            if not isinstance(value, str | Path):
                raise ValueError("expected a path")
            return Path(value).expanduser()
        if origin is list:
            (item_hint,) = typing.get_args(hint) or (Any,)
            if isinstance(value, str):
                if dataclasses.is_dataclass(item_hint):
                    # A list of tables ([[forward]]) from the environment: a JSON array.
                    value = json.loads(value)
                else:
                    return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError("expected a list")
            if item_hint is Any:
                return value
            return [_coerce(v, item_hint, f"{key}[{i}]", source) for i, v in enumerate(value)]
        if origin is dict:
            # A TOML table, or a JSON object from the environment or a flag.
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError("expected a table")
            _, value_hint = typing.get_args(hint)
            return {
                str(k): _coerce(v, value_hint, f"{key}.{k}", source) for k, v in value.items()
            }
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError("expected a table")
            return _table(hint, value, key, source)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key} from {source}: {exc} (got {value!r})") from exc
    raise ConfigError(f"{key} from {source}: unsupported setting type")  # pragma: no cover


def _table(cls: Any, value: Mapping[str, Any], key: str, source: str) -> Any:
    """A dataclass (e.g. a catalogue entry) from one table; unknown keys are refused."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in value:
        if name not in names:
            raise ConfigError(f"unknown key {key}.{name} from {source}")
    kwargs = {n: _coerce(v, hints[n], f"{key}.{n}", source) for n, v in value.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{key} from {source}: {exc}") from exc


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
