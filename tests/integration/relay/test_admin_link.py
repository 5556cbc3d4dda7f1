"""The public and admin apps wired to the real hub: enroll over HTTP, connect on /v1/agent,
ingress reaches the agent at once, and revocation disconnects it (DESIGN §Link protocol)."""

from __future__ import annotations

import asyncio

from aiohttp import ClientWebSocketResponse, WSMsgType, web
from aiohttp.test_utils import TestClient

from relay_server.services import Services
from shared import crypto
from shared.link.frames import SUBPROTOCOL, CloseCode
from shared.link.session import AgentSession, Closed, EventReceived, LinkEvent, Welcomed
from tests.helpers.timing import MS

from .conftest import Account

Client = TestClient[web.Request, web.Application]
WAIT = 5000 * MS


async def read_until(ws: ClientWebSocketResponse, session: AgentSession, kind: type) -> LinkEvent:
    """Pump messages into ``session`` until an event of ``kind`` comes out."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WAIT):
        while True:
            for event in session.events_received():
                if isinstance(event, kind):
                    return event
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                session.receive_message(msg.data, loop.time())
            else:
                session.receive_closed(ws.close_code, "", loop.time())
            for text in session.data_to_send():
                await ws.send_str(text)


async def test_ingress_reaches_agent_and_revoke_disconnects_it(
    public: Client, admin: Client, services: Services, account: Account
) -> None:
    """An enrolled agent gets new ingress events pushed; revoking closes its link with 4403."""
    created = await (
        await admin.post(f"/v1/accounts/{account.id}/agents", json={"name": "pc"})
    ).json()
    key = crypto.generate_private_key()
    resp = await public.post(
        "/v1/enroll", json={"code": created["code"], "public_key": crypto.public_key_b64(key)}
    )
    enrolled = await resp.json()
    ws = await public.ws_connect("/v1/agent", protocols=(SUBPROTOCOL,))
    session = AgentSession(
        agent_id=enrolled["agent_id"],
        relay_id=enrolled["relay_id"],
        private_key=key,
        resume_after=0,
        auth_timeout=WAIT,
        now=asyncio.get_running_loop().time(),
    )
    for text in session.data_to_send():
        await ws.send_str(text)
    welcomed = await read_until(ws, session, Welcomed)
    assert isinstance(welcomed, Welcomed) and welcomed.account_id == account.id

    posted = await (await public.get(account.path + "/sms.received?from=44")).json()
    received = await read_until(ws, session, EventReceived)
    assert isinstance(received, EventReceived)
    assert received.event["id"] == posted["id"]
    assert received.event["params"] == {"from": "44"}
    listing = await (await admin.get("/v1/agents")).json()
    assert listing["agents"][0]["online"] is True

    resp = await admin.post(f"/v1/agents/{enrolled['agent_id']}/revoke")
    assert (await resp.json())["disconnected"] is True
    closed = await read_until(ws, session, Closed)
    assert isinstance(closed, Closed) and closed.code == CloseCode.REVOKED
    await ws.close()
