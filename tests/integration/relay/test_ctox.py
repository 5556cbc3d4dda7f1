"""CTOX commands through the relay (DESIGN §Link protocol, Commands; docs/ctox.md).

Everything runs on real sockets: the relay's public and admin apps on 127.0.0.1, the fake X-on
API (shared/sim/xon_api.py) as a real HTTP server, real SQLite in tmp_path, and the real
AgentSession over a websockets client (tests/helpers/relay_app.py).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay_server.app import create_admin_app, create_public_app
from relay_server.services import Services, open_services
from relay_server.store.base import AccountRecord
from shared import crypto
from shared.config import CtoxConfig, CtoxTypeConfig, ServerConfig
from shared.link import frames
from shared.link.session import CommandResultReceived
from shared.sim.xon_api import FakeXonApi
from tests.helpers.relay_app import WAIT, Agent, eventually
from tests.helpers.timing import MS

ADMIN_TOKEN = "ctox-admin-token-0123456789"
XON_KEY = "xon-secret-api-key-5150"
_ids = itertools.count(1)


# -- harness (also used by test_status.py) -------------------------------------------------------


@dataclass(slots=True)
class Target:
    url: str
    relay_id: str


@dataclass(slots=True)
class RunningRelay:
    services: Services
    public_url: str
    admin_url: str

    @property
    def target(self) -> Target:
        return Target(
            self.public_url.replace("http://", "ws://") + "/v1/agent", self.services.relay_id
        )

    async def add_agent(self, account_id: str) -> Agent:
        """An enrolled agent of ``account_id``, connected and past its welcome."""
        store = self.services.store
        code = crypto.new_token()
        await store.create_agent(
            account_id=account_id,
            name="pc",
            code_hash=crypto.hash_secret(code),
            code_expires_at=time.time() + 3600,
        )
        key = crypto.generate_private_key()
        record = await store.enroll_agent(
            code_hash=crypto.hash_secret(code),
            public_key=crypto.public_key_b64(key),
            now=time.time(),
        )
        return await connect(self.target, record.id, key)


async def connect(target: Target, agent_id: str, key: crypto.Ed25519PrivateKey) -> Agent:
    agent = await Agent(target, agent_id, key).connect()
    await agent.welcome()
    return agent


def relay_config(tmp_path: Path, **ctox: Any) -> ServerConfig:
    settings: dict[str, Any] = {"timeout": 2000 * MS, **ctox}
    return ServerConfig(data_dir=tmp_path, ctox=CtoxConfig(**settings))


@asynccontextmanager
async def running_relay(config: ServerConfig) -> AsyncIterator[RunningRelay]:
    """The real public and admin apps on 127.0.0.1 ports, over ``config``'s SQLite file."""
    async with open_services(config, admin_token=ADMIN_TOKEN) as services:
        runners = [
            web.AppRunner(create_public_app(services)),
            web.AppRunner(create_admin_app(services)),
        ]
        urls = []
        try:
            for runner in runners:
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
            yield RunningRelay(services, urls[0], urls[1])
            await services.drain()
        finally:
            for runner in runners:
                await runner.cleanup()


async def send(agent: Agent, ctox_type: str, params: dict[str, Any], *, key: str = "") -> str:
    """Send one command frame; returns its request id."""
    request_id = f"req-{next(_ids)}"
    agent.session.send_command(
        frames.Command(
            request_id=request_id, ctox_type=ctox_type, params=params, idempotency_key=key
        )
    )
    for text in agent.session.data_to_send():
        await agent.ws.send(text)
    return request_id


async def results(agent: Agent, count: int) -> dict[str, frames.CommandResult]:
    """The next ``count`` command results, by request id."""
    found = await agent.read_until(CommandResultReceived, count)
    return {event.result.request_id: event.result for event in found}


async def command(
    agent: Agent, ctox_type: str, params: dict[str, Any], *, key: str = ""
) -> frames.CommandResult:
    request_id = await send(agent, ctox_type, params, key=key)
    result = (await results(agent, 1))[request_id]
    return result


def body(result: frames.CommandResult) -> Any:
    return json.loads(base64.b64decode(result.body_b64))


CALL = {"destination": "+441632960123", "target": "201"}


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
async def xon() -> AsyncIterator[FakeXonApi]:
    async with FakeXonApi(api_key=XON_KEY) as api:
        yield api


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    async with running_relay(relay_config(tmp_path)) as running:
        yield running


async def new_account(relay: RunningRelay, url: str, name: str = "acme") -> AccountRecord:
    return await relay.services.store.create_account(
        name=name,
        ingress_key_hash=crypto.hash_secret(crypto.new_token()),
        xon_api_url=url,
        xon_api_key=XON_KEY,
    )


@pytest.fixture
async def account(relay: RunningRelay, xon: FakeXonApi) -> AccountRecord:
    return await new_account(relay, xon.url)


# -- the happy path --------------------------------------------------------------------------------


async def test_make_call_reaches_xon_with_bearer_key_and_params(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """make_call becomes POST /api/v1/clicktocall with the Bearer key; X-on's 202 comes back."""
    agent = await relay.add_agent(account.id)
    request_id = await send(agent, "make_call", CALL)
    result = (await results(agent, 1))[request_id]
    assert (result.status, result.error) == (202, "")
    assert result.content_type.startswith("application/json")
    answer = body(result)
    assert answer["status"] == "OK" and answer["callId"]
    (seen,) = xon.requests
    assert (seen.method, seen.path) == ("POST", "/api/v1/clicktocall")
    assert seen.authorization == f"Bearer {XON_KEY}"
    assert seen.content_type.startswith("application/x-www-form-urlencoded")
    assert seen.params == CALL
    await agent.close()


async def test_commands_do_not_block_the_link(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """While X-on holds one command, another one is answered on the same link."""
    agent = await relay.add_agent(account.id)
    xon.hold(count=1)
    held = await send(agent, "make_call", CALL)
    await xon.wait_for_requests(1, timeout=WAIT)
    quick = await send(agent, "send_sms", {"to": "+441632960999", "message": "hi & bye"})
    first = await results(agent, 1)
    assert list(first) == [quick] and first[quick].status == 202
    assert xon.requests[1].params == {"to": "+441632960999", "message": "hi & bye"}
    xon.release()
    assert (await results(agent, 1))[held].status == 202
    await agent.close()


# -- exactly once per idempotency key --------------------------------------------------------------


async def test_same_key_five_times_reaches_xon_once(tmp_path: Path, xon: FakeXonApi) -> None:
    """One key sent 5 times, across a new link and a relay restart on the same SQLite file,
    calls X-on once and always answers the first result."""
    config = relay_config(tmp_path)
    answers = []
    async with running_relay(config) as relay:
        account = await new_account(relay, xon.url)
        agent = await relay.add_agent(account.id)
        agent_id, key = agent.agent_id, agent.key
        for _ in range(2):
            answers.append(await command(agent, "make_call", CALL, key="call-once"))
        await agent.close()
        again = await connect(relay.target, agent_id, key)
        answers.append(await command(again, "make_call", CALL, key="call-once"))
        await again.close()
    async with running_relay(config) as relay:
        agent = await connect(relay.target, agent_id, key)
        for _ in range(2):
            answers.append(await command(agent, "make_call", CALL, key="call-once"))
        await agent.close()
    assert len(xon.requests) == 1
    assert {(a.status, a.body_b64) for a in answers} == {(202, answers[0].body_b64)}


async def test_request_id_is_the_key_without_an_idempotency_key(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """A command frame resent with the same request id (no key) is not sent to X-on again."""
    agent = await relay.add_agent(account.id)
    frame = frames.Command(request_id="resent-1", ctox_type="make_call", params=CALL)
    for _ in range(2):
        agent.session.send_command(frame)
        for text in agent.session.data_to_send():
            await agent.ws.send(text)
        assert (await results(agent, 1))["resent-1"].status == 202
    assert len(xon.requests) == 1
    await agent.close()


async def test_concurrent_duplicates_wait_for_the_first(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """A duplicate arriving while the first is at X-on waits and gets the same answer."""
    agent = await relay.add_agent(account.id)
    other = await relay.add_agent(account.id)
    xon.hold(count=1)
    first = await send(agent, "make_call", CALL, key="dup")
    await xon.wait_for_requests(1, timeout=WAIT)
    second = await send(agent, "make_call", CALL, key="dup")
    third = await send(other, "make_call", CALL, key="dup")

    async def all_waiting() -> bool:
        return relay.services.ctox.waiting(account.id, "dup") == 3

    await eventually(all_waiting)
    xon.release()
    mine = await results(agent, 2)
    theirs = await results(other, 1)
    assert {r.body_b64 for r in (mine[first], mine[second], theirs[third])} == {
        mine[first].body_b64
    }
    assert mine[first].status == 202
    assert len(xon.requests) == 1
    await agent.close()
    await other.close()


async def test_same_key_with_another_body_is_a_conflict(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """Reusing a key for different params answers 409 idempotency_conflict, X-on untouched."""
    agent = await relay.add_agent(account.id)
    assert (await command(agent, "make_call", CALL, key="k1")).status == 202
    result = await command(agent, "make_call", {**CALL, "target": "202"}, key="k1")
    assert (result.status, result.error) == (409, "idempotency_conflict")
    assert body(result)["error"]["code"] == "idempotency_conflict"
    assert len(xon.requests) == 1
    await agent.close()


async def test_abandoned_claim_answers_outcome_unknown(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """A claim left by a relay that died mid-call is never sent again: 502 outcome_unknown."""
    from relay_server.ctox import request_hash

    now = time.time()
    claimed = await relay.services.store.claim_command(
        account.id,
        "crashed",
        request_hash=request_hash("make_call", CALL),
        now=now - 30,
        claim_deadline=now - 1,
        expires_at=now + 3600,
    )
    assert claimed is None
    agent = await relay.add_agent(account.id)
    for _ in range(2):
        result = await command(agent, "make_call", CALL, key="crashed")
        assert (result.status, result.error) == (502, "outcome_unknown")
    assert xon.requests == []
    await agent.close()


# -- failures --------------------------------------------------------------------------------------


async def test_slow_xon_answers_504_and_is_not_retried(tmp_path: Path, xon: FakeXonApi) -> None:
    """X-on slower than ctox.timeout → 504 upstream_timeout, stored for the key."""
    async with running_relay(relay_config(tmp_path, timeout=200 * MS)) as relay:
        account = await new_account(relay, xon.url)
        agent = await relay.add_agent(account.id)
        xon.slow(60.0)
        for _ in range(2):
            result = await command(agent, "make_call", CALL, key="slow")
            assert (result.status, result.error) == (504, "upstream_timeout")
        assert len(xon.requests) == 1
        await agent.close()


async def test_xon_5xx_passes_through(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """X-on's own 503 comes back with its body and Retry-After, and is the key's result."""
    agent = await relay.add_agent(account.id)
    xon.fail(503, count=1, retry_after=5)
    for _ in range(2):
        result = await command(agent, "make_call", CALL, key="k5xx")
        assert (result.status, result.error) == (503, "")
        assert result.headers == {"Retry-After": "5"}
        assert body(result) == {"status": "ERROR", "message": "unavailable"}
    assert len(xon.requests) == 1
    await agent.close()


async def test_xon_429_passes_through_and_frees_the_key(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """X-on's 429 + Retry-After comes back; X-on did nothing, so the same key may retry."""
    agent = await relay.add_agent(account.id)
    xon.rate_limit(7, count=1)
    limited = await command(agent, "make_call", CALL, key="k429")
    assert (limited.status, limited.headers, limited.error) == (429, {"Retry-After": "7"}, "")
    assert body(limited)["status"] == "ERROR"
    assert (await command(agent, "make_call", CALL, key="k429")).status == 202
    assert len(xon.requests) == 2
    await agent.close()


async def test_connection_refused_is_502_unreachable(relay: RunningRelay) -> None:
    """An X-on API nobody listens on answers 502 upstream_unreachable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    account = await new_account(relay, f"http://127.0.0.1:{port}")
    agent = await relay.add_agent(account.id)
    result = await command(agent, "make_call", CALL)
    assert (result.status, result.error) == (502, "upstream_unreachable")
    await agent.close()


async def test_wrong_key_gets_xons_401(relay: RunningRelay, xon: FakeXonApi) -> None:
    """X-on's 401 for a wrong key passes through unchanged."""
    account = await relay.services.store.create_account(
        name="wrong", ingress_key_hash="h", xon_api_url=xon.url, xon_api_key="nope"
    )
    agent = await relay.add_agent(account.id)
    result = await command(agent, "make_call", CALL)
    assert (result.status, result.error) == (401, "")
    await agent.close()


# -- refusals made by the relay --------------------------------------------------------------------


async def test_unknown_ctox_type_is_404(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """An unknown CTOX type is refused with 404 unknown_ctox_type; X-on sees nothing."""
    agent = await relay.add_agent(account.id)
    result = await command(agent, "teleport", {})
    assert (result.status, result.error) == (404, "unknown_ctox_type")
    assert result.content_type == "application/json"
    assert xon.requests == []
    await agent.close()


async def test_missing_params_are_refused(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """make_call without a target is 400 missing_params, before X-on is called."""
    agent = await relay.add_agent(account.id)
    result = await command(agent, "make_call", {"destination": "+441632960123"})
    assert (result.status, result.error) == (400, "missing_params")
    assert xon.requests == []
    await agent.close()


async def test_account_without_xon_api_is_503(relay: RunningRelay) -> None:
    """An account with no X-on API URL answers 503 xon_api_not_configured."""
    account = await new_account(relay, "")
    agent = await relay.add_agent(account.id)
    result = await command(agent, "make_call", CALL)
    assert (result.status, result.error) == (503, "xon_api_not_configured")
    await agent.close()


async def test_rate_limit_per_minute_is_429(tmp_path: Path, xon: FakeXonApi) -> None:
    """Beyond ctox.per_minute the account gets 429 rate_limited + Retry-After; replays pass."""
    async with running_relay(relay_config(tmp_path, per_minute=2)) as relay:
        account = await new_account(relay, xon.url)
        agent = await relay.add_agent(account.id)
        for n in range(2):
            assert (await command(agent, "make_call", CALL, key=f"m{n}")).status == 202
        refused = await command(agent, "make_call", CALL, key="m2")
        assert (refused.status, refused.error) == (429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert (await command(agent, "make_call", CALL, key="m0")).status == 202
        assert len(xon.requests) == 2
        await agent.close()


async def test_concurrency_limit_is_429(tmp_path: Path, xon: FakeXonApi) -> None:
    """Beyond ctox.max_in_flight calls at X-on, the account gets 429 at once."""
    async with running_relay(relay_config(tmp_path, max_in_flight=1)) as relay:
        account = await new_account(relay, xon.url)
        agent = await relay.add_agent(account.id)
        xon.hold(count=1)
        held = await send(agent, "make_call", CALL, key="c1")
        await xon.wait_for_requests(1, timeout=WAIT)
        refused = await command(agent, "make_call", CALL, key="c2")
        assert (refused.status, refused.error, refused.headers) == (
            429,
            "rate_limited",
            {"Retry-After": "1"},
        )
        xon.release()
        assert (await results(agent, 1))[held].status == 202
        assert (await command(agent, "make_call", CALL, key="c2")).status == 202
        await agent.close()


async def test_link_bounds_pending_commands(tmp_path: Path, xon: FakeXonApi) -> None:
    """Beyond ctox.max_per_link pending commands, one link gets 429 at once."""
    async with running_relay(relay_config(tmp_path, max_per_link=1)) as relay:
        account = await new_account(relay, xon.url)
        agent = await relay.add_agent(account.id)
        xon.hold(count=1)
        held = await send(agent, "make_call", CALL)
        await xon.wait_for_requests(1, timeout=WAIT)
        refused = await command(agent, "make_call", CALL)
        assert (refused.status, refused.error) == (429, "rate_limited")
        xon.release()
        assert (await results(agent, 1))[held].status == 202
        await agent.close()


# -- catalogue -------------------------------------------------------------------------------------


async def test_raw_command_reaches_any_path_under_the_base(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord
) -> None:
    """ctox type raw sends method, path and params as given; X-on's 404 passes through."""
    agent = await relay.add_agent(account.id)
    result = await command(
        agent, "raw", {"method": "GET", "path": "/api/v2/queues", "params": {"q": "sales"}}
    )
    assert (result.status, result.error) == (404, "")
    (seen,) = xon.requests
    assert (seen.method, seen.path, seen.query) == ("GET", "/api/v2/queues", {"q": "sales"})
    assert seen.authorization == f"Bearer {XON_KEY}"
    json_call = await command(
        agent, "raw", {"path": "/api/v1/clicktocall", "encoding": "json", "params": CALL}
    )
    assert json_call.status == 202
    assert xon.requests[1].content_type.startswith("application/json")
    await agent.close()


@pytest.mark.parametrize(
    "path", ["/../admin", "//evil.example/x", "http://evil.example/x", "/a?b=1", "/%2e%2e/x", "x"]
)
async def test_raw_command_cannot_leave_the_base_url(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord, path: str
) -> None:
    """A raw path that could escape the account's X-on base URL is 400 bad_raw_path."""
    agent = await relay.add_agent(account.id)
    result = await command(agent, "raw", {"path": path})
    assert (result.status, result.error) == (400, "bad_raw_path")
    assert xon.requests == []
    await agent.close()


async def test_catalogue_extends_per_account(tmp_path: Path, xon: FakeXonApi) -> None:
    """A ctox.accounts entry adds a type for one account only, with its method and encoding."""
    custom = CtoxTypeConfig(method="GET", path="/api/v1/presence", encoding="query")
    config = relay_config(tmp_path)
    config = dataclasses.replace(
        config, ctox=dataclasses.replace(config.ctox, accounts={"acme": {"presence": custom}})
    )
    async with running_relay(config) as relay:
        acme = await new_account(relay, xon.url)
        other = await new_account(relay, xon.url, name="other")
        agent = await relay.add_agent(acme.id)
        assert (await command(agent, "presence", {"user": "201"})).status == 404  # X-on's
        assert (xon.requests[0].method, xon.requests[0].query) == ("GET", {"user": "201"})
        stranger = await relay.add_agent(other.id)
        refused = await command(stranger, "presence", {"user": "201"})
        assert refused.error == "unknown_ctox_type"
        await agent.close()
        await stranger.close()


# -- secrets ---------------------------------------------------------------------------------------


async def test_relay_logs_neither_key_nor_params(
    relay: RunningRelay, xon: FakeXonApi, account: AccountRecord, caplog: pytest.LogCaptureFixture
) -> None:
    """No relay log record carries the X-on key, a param value or X-on's body."""
    caplog.set_level(logging.DEBUG)
    agent = await relay.add_agent(account.id)
    xon.fail(500, count=1)
    await command(agent, "make_call", CALL)
    result = await command(agent, "make_call", {**CALL, "target": "209"})
    call_id = body(result)["callId"]
    await agent.close()
    ours = [r for r in caplog.records if r.name.startswith(("relay_server", "shared"))]
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in ours)
    assert "ctox.sent" in text
    for secret in (XON_KEY, CALL["destination"], call_id):
        assert secret not in text


async def test_results_wait_is_bounded_by_the_relay_timeout(
    tmp_path: Path, xon: FakeXonApi
) -> None:
    """A held X-on call still ends (504) by the timeout, and the link stays usable."""
    async with running_relay(relay_config(tmp_path, timeout=200 * MS)) as relay:
        account = await new_account(relay, xon.url)
        agent = await relay.add_agent(account.id)
        xon.hold(count=1)
        result = await command(agent, "make_call", CALL)
        assert result.status == 504
        xon.release()
        assert (await command(agent, "make_call", CALL)).status == 202
        await agent.close()


async def test_shutdown_waits_for_running_calls(tmp_path: Path, xon: FakeXonApi) -> None:
    """Stopping the relay lets a running X-on call finish and stores its result."""
    config = relay_config(tmp_path)
    async with running_relay(config) as relay:
        account = await new_account(relay, xon.url)
        agent = await relay.add_agent(account.id)
        agent_id, key = agent.agent_id, agent.key
        xon.slow(100 * MS, count=1)
        await send(agent, "make_call", CALL, key="during-stop")
        await xon.wait_for_requests(1, timeout=WAIT)
    async with running_relay(config) as relay:
        agent = await connect(relay.target, agent_id, key)
        assert (await command(agent, "make_call", CALL, key="during-stop")).status == 202
        await agent.close()
    assert len(xon.requests) == 1
