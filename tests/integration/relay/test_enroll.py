"""POST /v1/enroll: one-time code + public key → agent id (DESIGN §Link protocol, Auth)."""

from __future__ import annotations

import time

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from relay_server.services import Services
from shared import crypto

from .conftest import Account

Client = TestClient[web.Request, web.Application]


async def new_code(admin: Client, account: Account) -> dict[str, str]:
    resp = await admin.post(f"/v1/accounts/{account.id}/agents", json={"name": "pc"})
    assert resp.status == 201
    data: dict[str, str] = await resp.json()
    return data


async def error_code(resp: ClientResponse) -> tuple[int, str]:
    return resp.status, (await resp.json())["error"]["code"]


def public_key() -> str:
    return crypto.public_key_b64(crypto.generate_private_key())


async def test_enroll_binds_the_public_key(
    public: Client, admin: Client, services: Services, account: Account
) -> None:
    """A valid code and key give the agent id, its account and the relay id."""
    created = await new_code(admin, account)
    key = public_key()
    resp = await public.post("/v1/enroll", json={"code": created["code"], "public_key": key})
    assert resp.status == 200
    assert await resp.json() == {
        "agent_id": created["agent_id"],
        "account_id": account.id,
        "relay_id": services.relay_id,
    }
    agent = await services.store.get_agent(created["agent_id"])
    assert agent is not None and agent.public_key == key
    listing = await (await admin.get("/v1/agents")).json()
    assert listing["agents"][0]["enrolled"] is True


async def test_code_works_once(public: Client, admin: Client, account: Account) -> None:
    """A spent code is invalid_code, like an unknown one."""
    created = await new_code(admin, account)
    body = {"code": created["code"], "public_key": public_key()}
    assert (await public.post("/v1/enroll", json=body)).status == 200
    assert await error_code(await public.post("/v1/enroll", json=body)) == (400, "invalid_code")
    unknown = {"code": "guess", "public_key": public_key()}
    assert await error_code(await public.post("/v1/enroll", json=unknown)) == (400, "invalid_code")


async def test_expired_code_is_invalid(
    public: Client, services: Services, account: Account
) -> None:
    """A code past its expiry is refused."""
    code = crypto.new_token(16)
    await services.store.create_agent(
        account_id=account.id,
        name="late",
        code_hash=crypto.hash_secret(code),
        code_expires_at=time.time() - 1.0,
    )
    resp = await public.post("/v1/enroll", json={"code": code, "public_key": public_key()})
    assert await error_code(resp) == (400, "invalid_code")


async def test_bad_public_key_does_not_spend_the_code(
    public: Client, admin: Client, account: Account
) -> None:
    """A malformed key is bad_public_key, and the code still works afterwards."""
    created = await new_code(admin, account)
    for bad in ("not-a-key", "AAAA", "!!!"):
        resp = await public.post("/v1/enroll", json={"code": created["code"], "public_key": bad})
        assert await error_code(resp) == (400, "bad_public_key")
    resp = await public.post(
        "/v1/enroll", json={"code": created["code"], "public_key": public_key()}
    )
    assert resp.status == 200


async def test_malformed_enroll_requests_are_400(public: Client) -> None:
    """Non-JSON bodies and missing fields are 400 bad_request."""
    for body in (b"", b"nope", b"[]", b'{"code": "x"}', b'{"code": 1, "public_key": "k"}'):
        resp = await public.post("/v1/enroll", data=body)
        assert await error_code(resp) == (400, "bad_request")


async def test_revoked_agent_code_is_invalid(
    public: Client, admin: Client, account: Account
) -> None:
    """Revoking a pending agent kills its enrollment code."""
    created = await new_code(admin, account)
    assert (await admin.post(f"/v1/agents/{created['agent_id']}/revoke")).status == 200
    resp = await public.post(
        "/v1/enroll", json={"code": created["code"], "public_key": public_key()}
    )
    assert await error_code(resp) == (400, "invalid_code")


async def test_lone_surrogates_in_enroll_requests_are_400(public: Client) -> None:
    """Text that is not valid Unicode ("\\ud800" escapes) is a 400, not a 500 from hashing it."""
    for code in ('"\\ud800"', '"x\\udfff"'):
        body = f'{{"code": {code}, "public_key": "{public_key()}"}}'.encode()
        resp = await public.post("/v1/enroll", data=body)
        assert await error_code(resp) == (400, "bad_request")
    resp = await public.post("/v1/enroll", data=b'{"\\ud800": 1}')
    assert await error_code(resp) == (400, "bad_request")
