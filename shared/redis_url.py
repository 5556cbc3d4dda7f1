"""The Redis store URL (``--store``): one server, a Sentinel-managed primary, or a Cluster.

docs/redis.md, Deployments::

    redis[s]://[[user]:password@]host[:port][/db][?prefix=P]
    redis[s]+sentinel://[[user]:password@]h1[:26379],h2[:26379]/service[/db][?prefix=P]
    redis[s]+cluster://[[user]:password@]h1[:6379],h2[:6379][/][?prefix=P]

``rediss`` means TLS to every server (and to the sentinels). The user and password are the
Redis servers' ACL credentials. Pure parsing, no redis-py: the config check uses it too. The
password never appears in :attr:`RedisTarget.address` nor in an error message.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from .errors import ConfigError

__all__ = ["RedisTarget", "parse_redis_url", "REDIS_SCHEMES", "DEFAULT_PREFIX", "TLS_OPTIONS"]

DEFAULT_PREFIX = "xon:"

Kind = Literal["single", "sentinel", "cluster"]

_KINDS: dict[str, tuple[Kind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
REDIS_SCHEMES = tuple(f"{scheme}://" for scheme in _KINDS)
_DEFAULT_PORT: dict[Kind, int] = {"single": 6379, "sentinel": 26379, "cluster": 6379}
TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"})
"""Query parameters a ``rediss+sentinel``/``rediss+cluster`` URL takes besides ``prefix``:
a private CA, a client certificate and key, and ``ssl_cert_reqs=none`` to skip verification."""
_MAX_NODES = 64
_MAX_DB = 15


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: Kind
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    """The server (``single``), the sentinels, or the cluster's seed nodes."""
    db: int = 0
    service: str = ""
    """The Sentinel master name (``sentinel`` only)."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    options: tuple[tuple[str, str], ...] = ()
    """Other query parameters: any redis-py URL option for ``single``; the TLS ones
    (:data:`TLS_OPTIONS`) for ``sentinel`` and ``cluster``."""

    @property
    def address(self) -> str:
        """What logs and errors show: scheme, nodes, service and db, never the credentials."""
        scheme = next(s for s, k in _KINDS.items() if k == (self.kind, self.tls))
        hosts = ",".join(f"{_host(h)}:{p}" for h, p in self.nodes)
        path = f"/{self.service}/{self.db}" if self.kind == "sentinel" else f"/{self.db}"
        if self.kind == "cluster":
            path = ""
        return f"{scheme}://{hosts}{path}"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a Redis store URL.

    Raises:
        ConfigError: an unknown scheme or a malformed part, named without the password.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _KINDS:
        raise ConfigError(
            "redis store URL must start with one of "
            + ", ".join(REDIS_SCHEMES)
            + f" (got {scheme.lower()[:20]!r})"
        )
    kind, tls = _KINDS[scheme.lower()]
    # Reserved characters in the password (/ ? @ #) must be percent-encoded, as in any URL.
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
        if not colon:  # redis://secret@host: redis-py reads a lone userinfo as the password
            username, password = None, urllib.parse.unquote(user) or None
    nodes = _nodes(hostlist, _DEFAULT_PORT[kind], scheme.lower())
    if kind == "single" and len(nodes) > 1:
        raise ConfigError(
            f"{scheme}:// names one server; for several use {scheme}+sentinel:// or"
            f" {scheme}+cluster:// (docs/redis.md, Deployments)"
        )
    segments = [s for s in path.split("/") if s] if path else []
    service = ""
    if kind == "sentinel":
        if not segments:
            raise ConfigError(
                f"{scheme}+sentinel URL needs the master name after the hosts:"
                f" {scheme}://h1:26379,h2:26379/mymaster/0"
            )
        service, segments = urllib.parse.unquote(segments[0]), segments[1:]
    if len(segments) > 1:
        raise ConfigError(f"unexpected path in redis URL for {hostlist}: /{'/'.join(segments)}")
    db = _db(segments[0] if segments else "0", hostlist)
    if kind == "cluster" and db != 0:
        raise ConfigError(f"a Redis Cluster has database 0 only, got /{db} for {hostlist}")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    prefix = next((v for k, v in pairs if k == "prefix"), DEFAULT_PREFIX)
    options = tuple((k, v) for k, v in pairs if k != "prefix")
    unknown = {k for k, _ in options} - (TLS_OPTIONS if tls else set())
    if unknown and kind != "single":
        allowed = "prefix, " + ", ".join(sorted(TLS_OPTIONS)) if tls else "prefix"
        raise ConfigError(
            f"{scheme} URL takes only these parameters: {allowed}; got {', '.join(sorted(unknown))}"
        )
    return RedisTarget(
        kind=kind,
        tls=tls,
        nodes=nodes,
        db=db,
        service=service,
        username=username,
        password=password,
        prefix=prefix,
        options=options,
    )


def _nodes(hostlist: str, default_port: int, scheme: str) -> tuple[tuple[str, int], ...]:
    if not hostlist:
        return (("localhost", default_port),) if scheme in ("redis", "rediss") else _no_host()
    items = hostlist.split(",")
    if len(items) > _MAX_NODES:
        raise ConfigError(f"redis URL names {len(items)} hosts; at most {_MAX_NODES}")
    nodes = []
    for item in items:
        parts = urllib.parse.urlsplit(f"//{item}")
        try:
            port = parts.port or default_port
        except ValueError:
            raise ConfigError(f"invalid port in redis URL for host {item!r}") from None
        if not parts.hostname:
            raise ConfigError(f"empty host in redis URL host list {hostlist!r}")
        nodes.append((parts.hostname, port))
    return tuple(nodes)


def _no_host() -> tuple[tuple[str, int], ...]:
    raise ConfigError("redis sentinel/cluster URL needs at least one host:port")


def _db(text: str, hostlist: str) -> int:
    if not text.isdigit() or int(text) > _MAX_DB:
        raise ConfigError(f"invalid redis database number for {hostlist}: want /0 to /{_MAX_DB}")
    return int(text)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
