"""The agent link inside the real public and admin apps: enrollment, ingress, revocation."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from aiohttp.test_utils import TestClient

from relay_server.services import Services
from shared import crypto
from shared.link.frames import CloseCode
from shared.link.session import EventReceived
from tests.helpers.relay_app import Agent

from .conftest import Account

Client = TestClient[web.Request, web.Application]


@dataclass(slots=True)
class Target:
    url: str
    relay_id: str


async def enrolled_agent(public: Client, admin: Client, account: Account) -> Agent:
    """An agent enrolled through the admin and enrollment APIs, ready to connect."""
    resp = await admin.post(f"/v1/accounts/{account.id}/agents", json={"name": "pc"})
    assert resp.status == 201, await resp.text()
    code = (await resp.json())["code"]
    key = crypto.generate_private_key()
    resp = await public.post(
        "/v1/enroll", json={"code": code, "public_key": crypto.public_key_b64(key)}
    )
    assert resp.status == 200, await resp.text()
    enrolled = await resp.json()
    url = str(public.make_url("/v1/agent")).replace("http://", "ws://", 1)
    return Agent(Target(url, enrolled["relay_id"]), enrolled["agent_id"], key)


async def test_ingress_event_reaches_the_connected_agent(
    public: Client, admin: Client, account: Account
) -> None:
    """An event X-on posts to the ingress URL is pushed to the account's connected agent."""
    agent = await (await enrolled_agent(public, admin, account)).connect()
    await agent.welcome()
    resp = await public.get(account.path + "/sms.received?from=441234&text=hi")
    assert resp.status == 200, await resp.text()
    event_id = (await resp.json())["id"]
    (event,) = await agent.read_until(EventReceived)
    assert event.event["id"] == event_id
    assert event.event["request"]["query"] == "from=441234&text=hi"
    await agent.close()


async def test_admin_revoke_disconnects_the_live_agent(
    public: Client, admin: Client, account: Account, services: Services
) -> None:
    """Revoking through the admin API closes the agent's link with 4403 at once."""
    agent = await (await enrolled_agent(public, admin, account)).connect()
    await agent.welcome()
    assert list(services.hub.online()) == [agent.agent_id]
    resp = await admin.post(f"/v1/agents/{agent.agent_id}/revoke")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["disconnected"] is True
    assert (await agent.closed()).code == CloseCode.REVOKED
    again = await agent.connect()
    assert (await again.closed()).code == CloseCode.REVOKED


async def test_draining_services_send_goaway(
    public: Client, admin: Client, account: Account, services: Services
) -> None:
    """Services.drain() (the server's shutdown path) closes agent links with 1001."""
    agent = await (await enrolled_agent(public, admin, account)).connect()
    await agent.welcome()
    await services.drain()
    assert (await agent.closed()).code == 1001
