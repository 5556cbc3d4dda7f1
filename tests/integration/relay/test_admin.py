"""The admin API: token, accounts, agents, revocation (DESIGN §Relay server endpoints)."""

from __future__ import annotations

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from relay_server.app import create_admin_app
from relay_server.services import Services
from shared import crypto

from .conftest import ADMIN_TOKEN, Account, ClientFactory, create_account

Client = TestClient[web.Request, web.Application]


async def error_code(resp: ClientResponse) -> tuple[int, str]:
    return resp.status, (await resp.json())["error"]["code"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}, {"Authorization": ""}],
    ids=["none", "wrong", "no-scheme", "empty"],
)
async def test_admin_needs_the_token(
    services: Services, aiohttp_client: ClientFactory, headers: dict[str, str]
) -> None:
    """Without the right bearer token every admin route answers 401 JSON."""
    client = await aiohttp_client(create_admin_app(services))
    for method, path in (("GET", "/v1/accounts"), ("POST", "/v1/accounts"), ("GET", "/nope")):
        resp = await client.request(method, path, headers=headers, json={"name": "x"})
        assert await error_code(resp) == (401, "unauthorized")
    assert await services.store.list_accounts() == []


async def test_create_account_returns_ingress_url_once(
    admin: Client, services: Services, public: Client
) -> None:
    """A new account gets a secret ingress URL under public_url; only its hash is stored."""
    resp = await admin.post(
        "/v1/accounts",
        json={"name": "acme", "xon_api_url": "https://api.x-on.test", "xon_api_key": "sekrit"},
    )
    assert resp.status == 201
    data = await resp.json()
    assert set(data) == {"id", "name", "ingress_url"}
    assert data["ingress_url"].startswith("http://relay.test/xon/")
    key = data["ingress_url"].rsplit("/", 1)[1]
    assert len(key) >= 32  # ≥ 128 bits of base64url
    record = await services.store.get_account(data["id"])
    assert record is not None and record.ingress_key_hash == crypto.hash_secret(key)
    assert (await public.get(f"/xon/{key}/ping")).status == 200


async def test_account_details_never_include_secrets(admin: Client, account: Account) -> None:
    """Account listings and details omit the ingress key, its hash and the X-on API key."""
    await create_account(admin, "second", xon_api_key="api-secret")
    key = account.path.rsplit("/", 1)[1]
    for path in ("/v1/accounts", f"/v1/accounts/{account.id}", "/v1/accounts/acme"):
        resp = await admin.get(path)
        assert resp.status == 200
        text = await resp.text()
        assert key not in text and "api-secret" not in text
        assert crypto.hash_secret(key) not in text
    by_name = await (await admin.get("/v1/accounts/acme")).json()
    assert by_name["id"] == account.id and by_name["name"] == "acme"
    listing = await (await admin.get("/v1/accounts")).json()
    assert [a["name"] for a in listing["accounts"]] == ["acme", "second"]
    assert listing["accounts"][1]["xon_api_key_set"] is True


async def test_account_errors(admin: Client, account: Account) -> None:
    """Unknown account → 404, taken name → 409, bad bodies → 400."""
    assert await error_code(await admin.get("/v1/accounts/nobody")) == (404, "unknown_account")
    assert await error_code(await admin.post("/v1/accounts", json={"name": "acme"})) == (
        409,
        "account_exists",
    )
    for body in (b"not json", b"[]", b'{"name": ""}', b'{"name": 5}', b'{"name": "a\\nb"}'):
        resp = await admin.post("/v1/accounts", data=body)
        assert await error_code(resp) == (400, "bad_request")
    resp = await admin.post("/v1/accounts", json={"name": "x", "xon_api_key": 1})
    assert await error_code(resp) == (400, "bad_request")


async def test_agent_add_list_and_revoke(
    admin: Client, services: Services, account: Account
) -> None:
    """An agent gets a one-time code; it is listed; revoking marks it and reports the link."""
    resp = await admin.post(f"/v1/accounts/{account.name}/agents", json={"name": "front desk"})
    assert resp.status == 201
    created = await resp.json()
    assert set(created) >= {"agent_id", "account_id", "name", "code", "expires_at"}
    assert created["account_id"] == account.id and created["name"] == "front desk"
    agent = await services.store.get_agent(created["agent_id"])
    assert agent is not None and not agent.revoked

    listing = await (await admin.get("/v1/agents")).json()
    assert listing == {
        "agents": [
            {
                "agent_id": created["agent_id"],
                "account_id": account.id,
                "name": "front desk",
                "enrolled": False,
                "revoked": False,
                "online": False,
                "last_seen": None,
                "cursor": 0,
                "state": "pending",
                "online_since": None,
                "backlog": 0,
                "withheld": 0,
                "withheld_reason": None,
            }
        ]
    }
    resp = await admin.post(f"/v1/agents/{created['agent_id']}/revoke")
    assert await resp.json() == {
        "agent_id": created["agent_id"],
        "revoked": True,
        "disconnected": False,
    }
    listing = await (await admin.get(f"/v1/agents?account={account.id}")).json()
    assert listing["agents"][0]["revoked"] is True


async def test_agent_default_name_and_account_filter(admin: Client, account: Account) -> None:
    """Agents without a name get "agent"; ?account= filters by id or name."""
    other = await create_account(admin, "other")
    await admin.post(f"/v1/accounts/{account.id}/agents", json={})
    await admin.post(f"/v1/accounts/{other.id}/agents", json={"name": "b"})
    mine = await (await admin.get("/v1/agents?account=acme")).json()
    assert [a["name"] for a in mine["agents"]] == ["agent"]
    assert len((await (await admin.get("/v1/agents")).json())["agents"]) == 2


async def test_agent_errors(admin: Client, account: Account) -> None:
    """Unknown account or agent → 404 with the right code."""
    resp = await admin.post("/v1/accounts/nobody/agents", json={})
    assert await error_code(resp) == (404, "unknown_account")
    assert await error_code(await admin.get("/v1/agents?account=nobody")) == (
        404,
        "unknown_account",
    )
    resp = await admin.post("/v1/agents/agt_nope/revoke")
    assert await error_code(resp) == (404, "unknown_agent")
