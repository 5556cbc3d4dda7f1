"""Hostile link frames against a real relay (SQLite store, both listeners on 127.0.0.1).

docs/protocol.md, Frame limits: an enrolled agent that signs its challenge after a hello with
``resume_after`` = 2**64 (which once reached the store as a cursor SQLite cannot hold and
killed its writer), or that puts a lone surrogate in its ``agent_id``, gets a protocol-error
close at once, the relay logs no traceback, and another tenant's ingress and link go on.

And docs/protocol.md, Handshake: unknown, pending and revoked agents get one answer until a
valid signature.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection

from shared import crypto
from shared.config import RetentionConfig, ServerConfig
from shared.link import CloseCode, frames
from tests.helpers.relay_app import WAIT, Agent, raw_close_code, raw_connect

from .conftest import Instance, Tenant, new_tenant, running_instance


@pytest.fixture
async def instance(tmp_path: Path) -> AsyncIterator[Instance]:
    config = ServerConfig(data_dir=tmp_path, retention=RetentionConfig(interval=None))
    async with running_instance(config) as running:
        yield running


async def _ingress(instance: Instance, tenant: Tenant, n: int) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{instance.base_url}/xon/{tenant.ingress_key}/sms.received"
        async with http.get(url, params={"n": str(n)}) as resp:
            assert resp.status == 200, await resp.text()


async def _recv(ws: ClientConnection) -> dict[str, object]:
    data = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    assert isinstance(data, dict)
    return data


async def _signed_hello(instance: Instance, tenant: Tenant, hello: str) -> ClientConnection:
    """Send ``hello`` and, to the challenge, a valid signature of the tenant's agent."""
    ws = await raw_connect(instance)
    await ws.send(hello)
    challenge = await _recv(ws)
    if challenge.get("type") == "challenge":
        signature = crypto.sign_auth(
            tenant.private_key, instance.relay_id, tenant.agent_id, str(challenge["nonce"])
        )
        await ws.send(frames.encode(frames.Auth(signature=signature)))
    return ws


@pytest.mark.parametrize(
    "case", ["resume_after-2**64", "resume_after-2**63", "agent_id-surrogate", "seq-float"]
)
async def test_hostile_hello_closes_only_its_link(
    instance: Instance, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The hostile link closes with 4000 before any welcome; nothing is logged at ERROR or
    with a traceback; the other tenant's agent keeps receiving what its ingress accepts."""
    victim = await new_tenant(instance.store, "victim")
    attacker = await new_tenant(instance.store, "attacker")
    other = await Agent(instance, victim.agent_id, victim.private_key).connect()
    await other.welcome()
    await _ingress(instance, victim, 1)
    assert len(await other.events(1)) == 1

    hello = {"v": 1, "type": "hello", "agent_id": attacker.agent_id}
    match case:
        case "resume_after-2**64":
            hello["resume_after"] = 2**64
        case "resume_after-2**63":
            hello["resume_after"] = 2**63
        case "agent_id-surrogate":
            hello["agent_id"] = "\ud800"  # json.dumps sends the \ud800 escape
        case "seq-float":
            hello["resume_after"] = 1.0
    with caplog.at_level(logging.INFO):
        ws = await _signed_hello(instance, attacker, json.dumps(hello))
        assert await raw_close_code(ws) == CloseCode.PROTOCOL_ERROR
        # Both tenants' ingress and the victim's link still work, and the store commits.
        await _ingress(instance, victim, 2)
        await _ingress(instance, attacker, 3)
        assert len(await other.events(1)) == 1
        assert await instance.store.get_cursor(attacker.agent_id) == 0
        # The attacker's own, honest reconnect is served too.
        honest = await Agent(instance, attacker.agent_id, attacker.private_key).connect()
        await honest.welcome()
        assert len(await honest.events(1)) == 1
        await honest.close()
    await other.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


async def _answer(instance: Instance, agent_id: str, key: crypto.Ed25519PrivateKey) -> list[str]:
    """What the relay says to a hello and a signed auth: the frame types, then the close."""
    ws = await raw_connect(instance)
    await ws.send(frames.encode(frames.Hello(agent_id=agent_id)))
    challenge = await _recv(ws)
    seen = [str(challenge["type"])]
    # Nothing more, and no close, before the auth: the relay waits for it as for any agent.
    # (Any early frame or close would be read here instead of timing out on an empty wire.)
    signature = crypto.sign_auth(key, instance.relay_id, agent_id, str(challenge["nonce"]))
    await ws.send(frames.encode(frames.Auth(signature=signature)))
    error = await _recv(ws)
    seen.append(f"{error['type']}:{error['code']}:{error['message']}")
    seen.append(str(await raw_close_code(ws)))
    return seen


async def test_unknown_pending_and_revoked_agents_get_one_answer(instance: Instance) -> None:
    """Until a valid signature the relay answers every agent that has not proved its key the
    same: challenge, then after auth error{unauthorized} and 4401. A revoked agent that signs
    with its own key learns 4403, and only then."""
    tenant = await new_tenant(instance.store)
    stranger = crypto.generate_private_key()
    pending = await instance.store.create_agent(
        account_id=tenant.account_id, name="new", code_hash="0" * 64, code_expires_at=1e12
    )
    revoked = await new_tenant(instance.store, "gone")
    await instance.store.revoke_agent(revoked.agent_id, now=1.0)
    refused = ["challenge", "error:unauthorized:authentication failed", "4401"]
    assert await _answer(instance, "ag_no_such_agent", stranger) == refused
    assert await _answer(instance, pending.id, stranger) == refused
    assert await _answer(instance, revoked.agent_id, stranger) == refused  # not its key
    assert await _answer(instance, tenant.agent_id, stranger) == refused  # valid id, wrong key
    assert await _answer(instance, revoked.agent_id, revoked.private_key) == [
        "challenge",
        "error:revoked:agent revoked",
        "4403",
    ]
    # And the enrolled agent with its key is welcome: the answers above were refusals.
    agent = await Agent(instance, tenant.agent_id, tenant.private_key).connect()
    await agent.welcome()
    await agent.close()
