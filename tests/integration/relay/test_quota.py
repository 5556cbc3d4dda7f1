"""Ingress over an account's byte quota (docs/redis.md, Quotas): 507 ``quota_exceeded`` with
the JSON error and a metric, before the shared store grows; the ceiling and the usage shown by
the admin API; another account on the same relay keeps being served."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shared.config import QuotaConfig, ServerConfig

from .conftest import MAX_BODY, create_account
from .test_metrics import samples

Client = TestClient[web.Request, web.Application]
QUOTA = 20_000


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    # The default ceiling for everyone, a small one of its own for "hostile".
    return ServerConfig(data_dir=tmp_path, public_url="http://relay.test", max_body_size=MAX_BODY,
                        quota=QuotaConfig(accounts={"hostile": QUOTA}))


async def test_an_account_over_its_quota_gets_507_and_others_go_on(
    admin: Client, public: Client
) -> None:
    hostile = await create_account(admin, "hostile")
    other = await create_account(admin, "other")
    body = b"x" * MAX_BODY
    statuses = []
    for _ in range(20):
        resp = await public.post(hostile.path + "/upload", data=body,
                                 headers={"Content-Type": "application/octet-stream"})
        statuses.append(resp.status)
        if resp.status == 507:
            error = (await resp.json())["error"]
            break
    assert statuses[-1] == 507 and set(statuses[:-1]) == {200}
    assert error["code"] == "quota_exceeded" and str(QUOTA) in error["message"]
    # Refused again (no retention ran), and stored nothing more.
    resp = await public.post(hostile.path + "/upload", data=body)
    assert resp.status == 507

    shown = await (await admin.get(f"/v1/accounts/{hostile.id}")).json()
    usage = shown["usage"]
    assert usage["quota_bytes"] == QUOTA and usage["events"] == len(statuses) - 1
    assert len(body) * usage["events"] < usage["bytes"] <= QUOTA
    assert shown["head_seq"] == usage["events"]

    # Another tenant under the default ceiling is served as before.
    for _ in range(len(statuses) + 2):
        resp = await public.post(other.path + "/upload", data=body)
        assert resp.status == 200
    shown = await (await admin.get(f"/v1/accounts/{other.id}")).json()
    assert shown["usage"]["quota_bytes"] == QuotaConfig().max_bytes

    metrics = samples(await (await admin.get("/metrics")).text())
    assert metrics["xon_relay_events_over_quota_total"] == 2
    assert metrics['xon_relay_ingress_requests_total{status="507"}'] == 2
