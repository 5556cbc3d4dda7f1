"""CTOX commands end to end: local app → agent → the real relay public app → the fake X-on API
(shared/sim/xon_api.py), all on real 127.0.0.1 sockets (issue 3, acceptance)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from relay_agent.commands import Commands
from relay_agent.link import LinkState
from relay_server.app import create_public_app
from relay_server.services import open_services
from shared import crypto
from shared.config import CtoxConfig, LinkConfig, ServerConfig
from shared.link import CloseCode
from shared.sim.xon_api import FakeXonApi
from tests.helpers.timing import MS

from .support import RelayUnderTest, eventually
from .test_ctox_local import AgentUnderTest, run_agent_under_test

XON_KEY = "xon-test-key"
CALL = {"destination": "201", "target": "07700900123"}


@asynccontextmanager
async def real_relay(
    data_dir: Path, xon: FakeXonApi, *, port: int = 0, ingress_key: str = "",
    ctox: CtoxConfig | None = None,
) -> AsyncIterator[RelayUnderTest]:
    """The relay's real public app with CTOX egress to ``xon``; the same ``data_dir`` and
    ``port`` again is the same relay restarted."""
    data_dir.mkdir(exist_ok=True)
    config = ServerConfig(listen=f"127.0.0.1:{port}", data_dir=data_dir,
                          link=LinkConfig(auth_timeout=5000 * MS), ctox=ctox or CtoxConfig())
    async with open_services(config, admin_token="admin-test-token") as services:
        accounts = await services.store.list_accounts()
        account = accounts[0] if accounts else await services.store.create_account(
            name="acme", ingress_key_hash=crypto.hash_secret(ingress_key or crypto.new_token()),
            xon_api_url=xon.url, xon_api_key=XON_KEY,
        )
        runner = web.AppRunner(create_public_app(services), shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            yield RelayUnderTest(runner.addresses[0][1], services, account.id)
        finally:
            await services.drain()
            await runner.cleanup()


@pytest.fixture
async def xon() -> AsyncIterator[FakeXonApi]:
    async with FakeXonApi(api_key=XON_KEY) as api:
        yield api


@asynccontextmanager
async def agent_of(
    tmp_path: Path, relay: RelayUnderTest, *, commands: Commands | None = None,
) -> AsyncIterator[AgentUnderTest]:
    agent_id, key = await relay.add_agent()
    async with run_agent_under_test(tmp_path / "agent", relay.port, relay.services.relay_id,
                                    key, agent_id=agent_id, commands=commands) as agent:
        await agent.connected()
        yield agent


async def test_make_call_reaches_xon_with_the_bearer_key_and_the_answer_comes_back(
    tmp_path: Path, xon: FakeXonApi
) -> None:
    """The app's make_call reaches X-on's click-to-call with the account's Bearer key and the
    app's params; the app gets X-on's 202 + callId and X-Request-Id."""
    async with real_relay(tmp_path / "relay", xon) as relay, agent_of(tmp_path, relay) as agent:
        status, body, headers = await agent.ctox("make_call", json=CALL)
    assert status == 202
    assert body["status"] == "OK" and body["callId"]
    assert headers["X-Request-Id"]
    [seen] = xon.requests
    assert (seen.method, seen.path) == ("POST", "/api/v1/clicktocall")
    assert seen.authorization == f"Bearer {XON_KEY}"
    assert seen.params == CALL


async def test_one_idempotency_key_five_times_reaches_xon_once(
    tmp_path: Path, xon: FakeXonApi
) -> None:
    """The same Idempotency-Key five times, across an agent reconnect and a relay restart:
    X-on is called once and every answer is the first one."""
    answers = []
    relay_stack = contextlib.AsyncExitStack()
    try:
        relay = await relay_stack.enter_async_context(real_relay(tmp_path / "relay", xon))
        agent_id, key = await relay.add_agent()
        async with run_agent_under_test(tmp_path / "agent", relay.port, relay.services.relay_id,
                                        key, agent_id=agent_id) as agent:
            await agent.connected()
            for _ in range(2):
                answers.append(await agent.ctox("make_call", key="same-key", json=CALL))
            await reconnect(relay, agent, agent_id)
            answers.append(await agent.ctox("make_call", key="same-key", json=CALL))
            await relay_stack.aclose()  # the relay stops; the agent keeps running
            await eventually(lambda: agent.link.status.state is not LinkState.CONNECTED,
                             what="the link to go down")
            await relay_stack.enter_async_context(
                real_relay(tmp_path / "relay", xon, port=relay.port))
            await agent.connected()
            for _ in range(2):
                answers.append(await agent.ctox("make_call", key="same-key", json=CALL))
    finally:
        await relay_stack.aclose()
    assert len(xon.requests) == 1
    assert {(status, body["callId"]) for status, body, _ in answers} == {
        (202, answers[0][1]["callId"])
    }


async def reconnect(relay: RelayUnderTest, agent: AgentUnderTest, agent_id: str) -> None:
    """Make the relay drop the agent's link; return once the agent is back on a new one."""
    opened = agent.link.status.connected_since
    assert await relay.services.hub.disconnect(agent_id, CloseCode.INTERNAL_ERROR, "test reconnect")
    await eventually(
        lambda: agent.link.status.state is LinkState.CONNECTED
        and agent.link.status.connected_since != opened,
        what="the agent's reconnect",
    )


async def test_a_command_cut_off_by_a_link_drop_reaches_xon_once(
    tmp_path: Path, xon: FakeXonApi
) -> None:
    """X-on is still answering when the link drops: the agent resends on the next link and
    the relay joins the call in progress instead of calling X-on again."""
    xon.hold(count=1)
    async with real_relay(tmp_path / "relay", xon) as relay:
        agent_id, key = await relay.add_agent()
        async with run_agent_under_test(tmp_path / "agent", relay.port, relay.services.relay_id,
                                        key, agent_id=agent_id) as agent:
            await agent.connected()
            call = asyncio.create_task(agent.ctox("make_call", json=CALL))
            await xon.wait_for_requests(1, timeout=5000 * MS)
            await reconnect(relay, agent, agent_id)
            xon.release()
            status, body, _ = await call
    assert status == 202 and body["callId"]
    assert len(xon.requests) == 1


async def test_relay_down_answers_503_relay_unreachable(tmp_path: Path, xon: FakeXonApi) -> None:
    """With the relay stopped the agent refuses at once with 503 relay_unreachable (the client
    timeout bounds the request, so a hang fails the test) and nothing reaches X-on."""
    async with real_relay(tmp_path / "relay", xon) as relay:
        agent_id, key = await relay.add_agent()
        port, relay_id = relay.port, relay.services.relay_id
    async with run_agent_under_test(tmp_path / "agent", port, relay_id, key,
                                    agent_id=agent_id) as agent:
        status, body, _ = await agent.ctox("make_call", json=CALL, client_timeout=1.0)
    assert status == 503
    assert body["error"]["code"] == "relay_unreachable"
    assert xon.requests == []


async def test_slow_xon_answers_504(tmp_path: Path, xon: FakeXonApi) -> None:
    """X-on slower than the relay's timeout: 504 reaches the app."""
    xon.slow(60.0)
    ctox = CtoxConfig(timeout=300 * MS)
    async with real_relay(tmp_path / "relay", xon, ctox=ctox) as relay, agent_of(
        tmp_path, relay
    ) as agent:
        status, body, headers = await agent.ctox("make_call", json=CALL)
    assert status == 504
    assert body["error"]["code"] == "upstream_timeout"
    assert headers["X-Request-Id"]


async def test_relay_slower_than_the_agent_deadline_answers_504_command_timeout(
    tmp_path: Path, xon: FakeXonApi
) -> None:
    """The agent's own deadline bounds the wait when the relay's answer is late."""
    xon.hold()
    async with real_relay(tmp_path / "relay", xon) as relay, agent_of(
        tmp_path, relay, commands=Commands(timeout=300 * MS)
    ) as agent:
        status, body, _ = await agent.ctox("make_call", json=CALL)
        xon.release()
    assert status == 504
    assert body["error"]["code"] == "command_timeout"


async def test_xon_429_passes_through_with_retry_after(tmp_path: Path, xon: FakeXonApi) -> None:
    """X-on's 429 reaches the app with its body and Retry-After."""
    xon.rate_limit(42, count=1)
    async with real_relay(tmp_path / "relay", xon) as relay, agent_of(tmp_path, relay) as agent:
        status, body, headers = await agent.ctox("make_call", json=CALL)
    assert status == 429
    assert headers["Retry-After"] == "42"
    assert body["status"] == "ERROR"


async def test_relay_refusal_passes_through(tmp_path: Path, xon: FakeXonApi) -> None:
    """A refusal made by the relay (missing params, same key with another body) keeps its
    status and JSON error body."""
    async with real_relay(tmp_path / "relay", xon) as relay, agent_of(tmp_path, relay) as agent:
        missing = await agent.ctox("make_call", json={"destination": "201"})
        first = await agent.ctox("make_call", key="k", json=CALL)
        conflict = await agent.ctox("make_call", key="k", json={**CALL, "target": "0"})
    assert (missing[0], missing[1]["error"]["code"]) == (400, "missing_params")
    assert first[0] == 202
    assert (conflict[0], conflict[1]["error"]["code"]) == (409, "idempotency_conflict")
    assert len(xon.requests) == 1
