"""The Redis store URL (shared/redis_url.py): three deployment forms, TLS and ACL credentials,
and refusals that name the bad part but never the password (docs/redis.md, Deployments)."""

from __future__ import annotations

import pytest

from shared.config import ServerConfig
from shared.errors import ConfigError
from shared.redis_url import parse_redis_url


def test_single_server_keeps_its_defaults() -> None:
    target = parse_redis_url("redis://:pw@10.0.0.5/2?prefix=p:")
    assert (target.kind, target.tls, target.nodes, target.db) == (
        "single",
        False,
        (("10.0.0.5", 6379),),
        2,
    )
    assert (target.username, target.password, target.prefix) == (None, "pw", "p:")
    assert target.address == "redis://10.0.0.5:6379/2"


def test_sentinel_url_names_every_sentinel_the_service_and_db() -> None:
    target = parse_redis_url("rediss+sentinel://relay:s%40cret@h1:26379,h2:26380,h3/mymaster/3")
    assert target.kind == "sentinel" and target.tls
    assert target.nodes == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (target.service, target.db) == ("mymaster", 3)
    assert (target.username, target.password) == ("relay", "s@cret")
    assert target.address == "rediss+sentinel://h1:26379,h2:26380,h3:26379/mymaster/3"
    assert "cret" not in repr(target)


def test_cluster_url_takes_seed_nodes_and_db_zero_only() -> None:
    target = parse_redis_url("redis+cluster://u:pw@h1:7000,h2:7001/")
    assert target.kind == "cluster" and not target.tls
    assert target.nodes == (("h1", 7000), ("h2", 7001))
    assert (target.db, target.username, target.password) == (0, "u", "pw")
    assert target.address == "redis+cluster://h1:7000,h2:7001"
    assert parse_redis_url("rediss+cluster://h1:7000?prefix=x:").tls
    tls = parse_redis_url("rediss+cluster://h1:7000?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none")
    assert dict(tls.options) == {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "none"}


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://:pw-secret@h1:26379", "master name"),
        ("redis+sentinel://:pw-secret@h1:26379/m/99", "database number"),
        ("redis+cluster://:pw-secret@h1:7000/1", "database 0 only"),
        ("redis://:pw-secret@h1:6379,h2:6379/0", "redis+sentinel"),
        ("redis+cluster://:pw-secret@h1:port", "invalid port"),
        ("redis+cluster://:pw-secret@", "at least one host"),
        ("redis+cluster://:pw-secret@h1,,h2", "empty host"),
        ("redis+sentinel://:pw-secret@h1/m/0?ssl_cert_reqs=none", "only these parameters: prefix;"),
        ("rediss+cluster://:pw-secret@h1?db=2", "ssl_ca_certs"),
        ("memcache://:pw-secret@h1", "must start with"),
        ("redis://:pw-secret@h1/0/extra", "unexpected path"),
    ],
)
def test_malformed_urls_name_the_part_never_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_url(url)
    assert says in str(info.value)
    assert "pw-secret" not in str(info.value)


def test_config_checks_the_store_url_when_loaded() -> None:
    """A bad ``--store`` stops the relay at start-up, before it opens anything."""
    ServerConfig(store="redis+cluster://127.0.0.1:7000")
    with pytest.raises(ConfigError, match="master name"):
        ServerConfig(store="redis+sentinel://:pw-secret@127.0.0.1:26379")
    with pytest.raises(ConfigError, match="store must be") as info:
        ServerConfig(store="mysql://root:pw-secret@db/x")
    assert "pw-secret" not in str(info.value)
