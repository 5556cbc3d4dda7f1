"""Relays on a Redis Cluster (docs/redis.md, Cluster): the three primaries of the session's
``redis_cluster`` fixture, on loopback. The store contract itself runs in test_store.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_server.store import open_store
from relay_server.store.redis import RedisStore
from shared import crypto
from shared.config import RetentionConfig, ServerConfig
from shared.errors import StoreError
from tests.helpers.redis_ha import Cluster, make_tls_files, running_cluster
from tests.helpers.relay_app import Agent

from .conftest import new_tenant, running_instance
from .test_multi_instance import SLOW_POLL, ingress, received_params
from .test_store import make_event

pytestmark = pytest.mark.redis


def cluster_url(cluster: Cluster) -> str:
    return f"{cluster.url}?prefix=xontest:{crypto.new_token(6).lower()}:"


async def test_wake_ups_cross_instances_by_sharded_pub_sub(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    """Agent on A, ingress on B, the poll out of the way: the SPUBLISH wake-up alone delivers
    (in order) to the agents of accounts spread over the cluster's slots."""
    url = cluster_url(redis_cluster)
    configs = [
        ServerConfig(
            data_dir=tmp_path / name,
            store=url,
            cluster=SLOW_POLL,
            retention=RetentionConfig(interval=None),
        )
        for name in "ab"
    ]
    async with running_instance(configs[0]) as a, running_instance(configs[1]) as b:
        assert isinstance(a.store, RedisStore) and a.store.is_cluster
        tenants = [await new_tenant(a.store, f"t{i}") for i in range(4)]
        client = a.store.client
        slots = {client.keyslot(a.store._acct(t.account_id, "events")) for t in tenants}
        nodes = {client.get_node_from_key(a.store._acct(t.account_id, "events")).name
                 for t in tenants}
        print(f"{len(tenants)} accounts on {len(slots)} slots, {len(nodes)} nodes")
        for tenant in tenants:
            agent = await Agent(a, tenant.agent_id, tenant.private_key).connect()
            await agent.welcome()
            for n in range(5):
                assert await ingress(b, tenant, n) == 200
            assert await received_params(agent, 5) == [str(n) for n in range(5)]
            await agent.close()


async def test_wait_settings_are_refused_on_a_cluster(redis_cluster: Cluster) -> None:
    """WAIT cannot cover a pipeline spread over several primaries: a clear refusal at open."""
    with pytest.raises(StoreError, match="not supported on a Redis Cluster"):
        await open_store(cluster_url(redis_cluster), wait_replicas=1)


async def test_acl_credentials_reach_every_node_and_are_never_shown(tmp_path: Path) -> None:
    """``redis+cluster://user:password@…``: the ACL user works on every node (accounts on
    several slots); a wrong password is a StoreError that names the nodes, not the secret."""
    secret = "pw-" + crypto.new_token(8)
    with running_cluster(tmp_path / "acl", password=secret) as cluster:
        store = await open_store(cluster.url)
        try:
            for i in range(4):
                tenant = await new_tenant(store, f"t{i}")
                result = await store.append_event(make_event(tenant.account_id, i), xon_id=None)
                assert result.stored.seq == 1
        finally:
            await store.close()
        wrong = cluster.url.replace(secret, "wrong-" + secret)
        with pytest.raises(StoreError) as info:
            await open_store(wrong)
        assert secret not in str(info.value)
        assert f"127.0.0.1:{cluster.nodes[0].port}" in str(info.value)


async def test_tls_cluster_with_a_private_ca(tmp_path: Path) -> None:
    """``rediss+cluster://…?ssl_ca_certs=CA``: TLS to every node, verified against the CA; the
    same cluster without the CA (the OS store) is refused, naming the nodes."""
    tls = make_tls_files(tmp_path / "certs")
    with running_cluster(tmp_path / "tls", tls=tls) as cluster:
        store = await open_store(f"{cluster.url}&prefix=xontest:tls:")
        try:
            for i in range(4):
                tenant = await new_tenant(store, f"t{i}")
                result = await store.append_event(make_event(tenant.account_id, i), xon_id=None)
                assert result.stored.seq == 1
        finally:
            await store.close()
        unverified = cluster.url.split("?", 1)[0]
        with pytest.raises(StoreError, match="cannot reach redis at rediss\\+cluster://"):
            await open_store(unverified)
