"""The operations admin API (docs/operations.md): account rename, key rotation and removal,
agent details and rename, event lookup and listing, and the dashboard login."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from relay_server.app import create_admin_app
from relay_server.dashboard import COOKIE
from relay_server.services import Services
from shared import crypto

from .conftest import ADMIN_TOKEN, Account, ClientFactory, create_account

Client = TestClient[web.Request, web.Application]


async def error_code(resp: ClientResponse) -> tuple[int, str]:
    return resp.status, (await resp.json())["error"]["code"]


async def post_events(public: Client, account: Account, count: int) -> list[str]:
    ids = []
    for n in range(count):
        resp = await public.get(f"{account.path}/call.started?caller=20{n}&text=SECRET-{n}")
        assert resp.status == 200, await resp.text()
        ids.append((await resp.json())["id"])
    return ids


async def add_agent(admin: Client, account: str, name: str = "pc") -> dict[str, Any]:
    resp = await admin.post(f"/v1/accounts/{account}/agents", json={"name": name})
    assert resp.status == 201
    return dict(await resp.json())


async def test_rename_account(admin: Client, account: Account) -> None:
    """PUT name renames; a taken or bad name is refused; the id stays."""
    await create_account(admin, "other")
    resp = await admin.put(f"/v1/accounts/{account.name}/name", json={"name": "acme-ltd"})
    assert resp.status == 200
    assert (await resp.json())["id"] == account.id
    assert (await admin.get("/v1/accounts/acme-ltd")).status == 200
    assert await error_code(await admin.get("/v1/accounts/acme")) == (404, "unknown_account")
    resp = await admin.put(f"/v1/accounts/{account.id}/name", json={"name": "other"})
    assert await error_code(resp) == (409, "account_exists")
    resp = await admin.put(f"/v1/accounts/{account.id}/name", json={"name": ""})
    assert await error_code(resp) == (400, "bad_request")


async def test_show_account_counts_agents_and_keys(admin: Client, account: Account) -> None:
    """Account details add agent counts, the log head and previous keys' deadlines."""
    await add_agent(admin, account.id)
    shown = await (await admin.get(f"/v1/accounts/{account.id}")).json()
    assert shown["agents"] == 1 and shown["active_agents"] == 1
    assert shown["head_seq"] == 0
    assert shown["previous_ingress_keys_valid_until"] == []
    assert "ingress_key_hash" not in shown and "xon_api_key" not in shown


async def test_rotated_ingress_url_overlaps(
    admin: Client, public: Client, account: Account
) -> None:
    """After a rotation both URLs work during the overlap; with overlap 0 the old one is 404."""
    resp = await admin.post(f"/v1/accounts/{account.id}/rotate-key", json={"overlap": 3600})
    assert resp.status == 200
    rotated = await resp.json()
    assert rotated["previous_key_valid_until"] is not None
    new_path = "/xon/" + rotated["ingress_url"].rsplit("/xon/", 1)[1]
    assert (await public.get(f"{account.path}/ping")).status == 200
    assert (await public.get(f"{new_path}/ping")).status == 200
    shown = await (await admin.get(f"/v1/accounts/{account.id}")).json()
    assert len(shown["previous_ingress_keys_valid_until"]) == 1

    resp = await admin.post(f"/v1/accounts/{account.id}/rotate-key", json={"overlap": 0})
    latest = await resp.json()
    assert latest["previous_key_valid_until"] is None
    assert (await public.get(f"{new_path}/ping")).status == 404
    assert (await public.get(f"{account.path}/ping")).status == 200  # its own deadline
    for bad in (-1, "1h", True, 10**9):
        resp = await admin.post(f"/v1/accounts/{account.id}/rotate-key", json={"overlap": bad})
        assert await error_code(resp) == (400, "bad_request")


async def test_remove_account_refuses_active_agents(
    admin: Client, public: Client, services: Services, account: Account
) -> None:
    """Removal is refused while an agent is not revoked; forced, it revokes and deletes."""
    agent = await add_agent(admin, account.id)
    await post_events(public, account, 2)
    resp = await admin.delete(f"/v1/accounts/{account.id}")
    assert await error_code(resp) == (409, "agents_active")
    resp = await admin.delete(f"/v1/accounts/{account.id}?force=true")
    assert resp.status == 200
    assert await resp.json() == {
        "id": account.id,
        "name": account.name,
        "deleted": True,
        "revoked_agents": 1,
        "had_events": True,
    }
    assert await error_code(await admin.get(f"/v1/accounts/{account.id}")) == (
        404,
        "unknown_account",
    )
    assert await services.store.get_agent(agent["agent_id"]) is None
    assert (await public.get(f"{account.path}/ping")).status == 404


async def test_remove_account_without_agents(admin: Client, account: Account) -> None:
    """An account whose agents are all revoked goes without --force."""
    agent = await add_agent(admin, account.id)
    await admin.post(f"/v1/agents/{agent['agent_id']}/revoke")
    resp = await admin.delete(f"/v1/accounts/{account.name}")
    assert resp.status == 200 and (await resp.json())["revoked_agents"] == 0


async def test_agent_show_and_rename(admin: Client, public: Client, account: Account) -> None:
    """An agent's details carry state and backlog; rename changes only the name."""
    agent = await add_agent(admin, account.id)
    agent_id = agent["agent_id"]
    shown = await (await admin.get(f"/v1/agents/{agent_id}")).json()
    assert shown["state"] == "pending" and shown["backlog"] == 0
    resp = await admin.patch(f"/v1/agents/{agent_id}", json={"name": "front desk"})
    assert resp.status == 200 and (await resp.json())["name"] == "front desk"
    for body in ({}, {"name": ""}, {"name": "x", "cursor": 0}):
        resp = await admin.patch(f"/v1/agents/{agent_id}", json=body)
        assert await error_code(resp) == (400, "bad_request")
    assert await error_code(await admin.get("/v1/agents/agt_nope")) == (404, "unknown_agent")
    resp = await admin.patch("/v1/agents/agt_nope", json={"name": "x"})
    assert await error_code(resp) == (404, "unknown_agent")


async def test_event_lookup_by_id(admin: Client, public: Client, account: Account) -> None:
    """An event is found by id with its params and raw request; an unknown id is 404."""
    ids = await post_events(public, account, 2)
    resp = await admin.get(f"/v1/events/{ids[1]}")
    assert resp.status == 200
    found = await resp.json()
    assert found["id"] == ids[1] and found["type"] == "call.started"
    assert found["event"]["params"]["caller"] == "201"
    assert (await admin.get(f"/v1/events/{ids[0]}?account={account.name}")).status == 200
    assert await error_code(await admin.get("/v1/events/ev_nope")) == (404, "unknown_event")
    other = await create_account(admin, "other")
    resp = await admin.get(f"/v1/events/{ids[0]}?account={other.id}")
    assert await error_code(resp) == (404, "unknown_event")


async def test_event_listing_pages(admin: Client, public: Client, account: Account) -> None:
    """Events list newest first by default, oldest first with after/since; no params unless
    full=true."""
    ids = await post_events(public, account, 5)
    page = await (await admin.get(f"/v1/accounts/{account.id}/events?limit=2")).json()
    assert [e["id"] for e in page["events"]] == [ids[4], ids[3]]
    assert "event" not in page["events"][0] and page["order"] == "newest_first"
    rest = await (
        await admin.get(f"/v1/accounts/{account.id}/events?limit=10&before={page['next']}")
    ).json()
    assert [e["id"] for e in rest["events"]] == [ids[2], ids[1], ids[0]]
    assert rest["next"] is None

    forward = await (
        await admin.get(f"/v1/accounts/{account.id}/events?after=0&limit=3&full=true")
    ).json()
    assert [e["id"] for e in forward["events"]] == ids[:3]
    assert forward["remaining"] == 2 and forward["events"][0]["event"]["id"] == ids[0]
    since = await (
        await admin.get(
            f"/v1/accounts/{account.id}/events", params={"since": "2000-01-01T00:00:00Z"}
        )
    ).json()
    assert [e["id"] for e in since["events"]] == ids
    for query in ("limit=0", "limit=x", "before=0", "since=yesterday", "after=-1"):
        resp = await admin.get(f"/v1/accounts/{account.id}/events?{query}")
        assert await error_code(resp) == (400, "bad_request"), query


async def test_dashboard_login_is_one_time(
    services: Services, aiohttp_client: ClientFactory
) -> None:
    """A login code opens a cookie session once; the page needs the cookie, not the token."""
    browser = await aiohttp_client(create_admin_app(services))
    resp = await browser.post(
        "/v1/dashboard/login-codes", json={}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert resp.status == 201
    url = (await resp.json())["url"]
    path = url[url.index("/dashboard/login") :]
    page = await browser.get("/")
    assert page.status == 401 and "xon-relay-server dashboard" in await page.text()
    assert (await browser.head(path)).status == 405  # a link preview cannot spend it
    login = await browser.get(path, allow_redirects=False)
    assert login.status == 303 and login.headers["Location"] == "/"
    cookie = login.headers["Set-Cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = await browser.get("/")
    assert page.status == 200 and "Agents online" in await page.text()
    assert "script-src" not in page.headers["Content-Security-Policy"]
    again = await browser.get(path, allow_redirects=False)
    assert again.status == 403
    # The cookie opens the page only, never the API.
    assert (await browser.get("/v1/accounts")).status == 401
    browser.session.cookie_jar.clear()
    browser.session.cookie_jar.update_cookies({COOKIE: crypto.new_token(32)})
    assert (await browser.get("/")).status == 401


async def test_rename_refuses_other_fields(admin: Client, account: Account) -> None:
    """The rename route takes a name and nothing else; unknown accounts are 404."""
    for body in ({}, {"name": "x", "xon_api_key": "k"}):
        resp = await admin.put(f"/v1/accounts/{account.id}/name", json=body)
        assert await error_code(resp) == (400, "bad_request")
    resp = await admin.put("/v1/accounts/nope/name", json={"name": "x"})
    assert await error_code(resp) == (404, "unknown_account")
