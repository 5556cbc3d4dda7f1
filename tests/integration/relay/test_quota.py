"""Ingress over an account's byte quota (docs/redis.md, Quotas): 507 ``quota_exceeded`` with
the JSON error and a metric, before the shared store grows; the ceiling and the usage shown by
the admin API; another account on the same relay keeps being served."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relay_server.app import create_admin_app
from relay_server.services import Services
from shared.config import QuotaConfig, ServerConfig

from .conftest import ADMIN_TOKEN, MAX_BODY, ClientFactory, create_account
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


async def test_the_dashboard_shows_usage_against_the_quota(
    admin: Client, public: Client, services: Services, aiohttp_client: ClientFactory
) -> None:
    """Each account's section of the dashboard says what it stores against its ceiling."""
    hostile = await create_account(admin, "hostile")
    await create_account(admin, "other")
    assert (await public.post(hostile.path + "/upload", data=b"x" * 1000)).status == 200
    browser = await aiohttp_client(create_admin_app(services))
    resp = await browser.post(
        "/v1/dashboard/login-codes", json={}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    url = (await resp.json())["url"]
    assert (await browser.get(url[url.index("/dashboard/login"):])).status == 200
    page = await (await browser.get("/")).text()
    used = (await admin.get(f"/v1/accounts/{hostile.id}"))
    usage = (await used.json())["usage"]
    assert f"stored: 1 events, {usage['bytes']} bytes" in page
    assert f"% of its quota of {QUOTA} bytes" in page
    assert f"quota of {QuotaConfig().max_bytes} bytes" in page  # the other account's default
