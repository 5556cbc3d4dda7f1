"""The agent's ``POST /v1/ctox/{type}`` against a small relay made of the real RelaySession
(DESIGN §Link protocol, Commands; §Agent local API). Real sockets on both sides; the relay's
answers are scripted so that every path of the agent is exercised on its own."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDictProxy

from relay_agent.commands import Commands
from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink, LinkState
from relay_agent.local_api import create_local_app
from shared import crypto
from shared.config import AgentConfig, LinkConfig
from shared.link import frames
from shared.link.frames import SUBPROTOCOL
from shared.link.session import (
    Authenticated,
    CommandReceived,
    HelloReceived,
    RelaySession,
)
from tests.helpers.timing import MS

from .support import TOKEN, eventually

AGENT_ID = "agent-ctox"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=5000 * MS)

Answer = Callable[[frames.Command], Awaitable[frames.CommandResult | None]]


def xon_result(
    command: frames.Command, status: int = 202, body: Any = None, **kwargs: Any
) -> frames.CommandResult:
    """A result as the relay builds it from X-on's answer (JSON body by default)."""
    payload = json.dumps({"status": "OK", "callId": "call-1"} if body is None else body)
    return frames.CommandResult(
        request_id=command.request_id, status=status, content_type="application/json",
        body_b64=base64.b64encode(payload.encode()).decode(), **kwargs,
    )


async def answer_202(command: frames.Command) -> frames.CommandResult:
    return xon_result(command)


class _Link:
    def __init__(self, ws: web.WebSocketResponse, session: RelaySession) -> None:
        self.ws = ws
        self.session = session
        self.lock = asyncio.Lock()

    async def flush(self) -> None:
        async with self.lock:
            for text in self.session.data_to_send():
                if self.ws.closed:
                    return
                await self.ws.send_str(text)


@dataclass
class MiniRelay:
    """A relay made of the real :class:`RelaySession` on a real socket, answering commands with
    ``answer`` (``None``: never answer) and sending status frames on demand."""

    agents: dict[str, str]
    """agent id → public key"""
    answer: Answer = answer_202
    relay_id: str = "relay-mini"
    account_id: str = "acct-1"
    port: int = 0
    commands: list[frames.Command] = field(default_factory=list)
    links: list[_Link] = field(default_factory=list)
    opened: int = 0
    """Links that completed the handshake so far."""

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,))
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        link = _Link(ws, RelaySession(relay_id=self.relay_id, nonce=crypto.new_nonce(),
                                      window=16, auth_timeout=5000 * MS, now=loop.time()))
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    break
                link.session.receive_message(msg.data, loop.time())
                for event in link.session.events_received():
                    match event:
                        case HelloReceived(agent_id=agent_id):
                            link.session.agent_found(self.agents[agent_id], self.account_id)
                        case Authenticated():
                            self.links.append(link)
                            self.opened += 1
                        case CommandReceived(command=command):
                            self.commands.append(command)
                            task = asyncio.create_task(self._answer(link, command))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                await link.flush()
        finally:
            if link in self.links:
                self.links.remove(link)
            for task in list(tasks):
                task.cancel()
        return ws

    async def _answer(self, link: _Link, command: frames.Command) -> None:
        result = await self.answer(command)
        if result is not None:
            link.session.send_command_result(result)
            await link.flush()

    async def send_status(self, items: list[dict[str, Any]], *, snapshot: bool = False) -> None:
        for link in list(self.links):
            link.session.send_status(items, snapshot=snapshot)
            await link.flush()

    async def drop(self) -> None:
        """Close every link, as a failing relay would; agents reconnect."""
        for link in list(self.links):
            await link.ws.close(code=1011, message=b"test drop")


@asynccontextmanager
async def serve_mini_relay(relay: MiniRelay) -> AsyncIterator[MiniRelay]:
    app = web.Application()
    app.router.add_get("/v1/agent", relay.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", relay.port).start()
        relay.port = runner.addresses[0][1]
        yield relay
    finally:
        await runner.cleanup()


@dataclass
class AgentUnderTest:
    """The agent's link, inbox and local API, wired as ``run_agent`` wires them."""

    url: str
    http: aiohttp.ClientSession
    link: AgentLink
    inbox: Inbox

    async def ctox(
        self, ctox_type: str, *, key: str | None = None, headers: dict[str, str] | None = None,
        client_timeout: float = 5000 * MS, **kwargs: Any,
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        """POST a command; (status, JSON or text body, headers). ``client_timeout`` bounds it."""
        all_headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
        if key is not None:
            all_headers["Idempotency-Key"] = key
        timeout = aiohttp.ClientTimeout(total=client_timeout)
        async with self.http.post(f"{self.url}/v1/ctox/{ctox_type}", headers=all_headers,
                                  timeout=timeout, **kwargs) as response:
            text = await response.text()
            body = json.loads(text) if response.content_type == "application/json" else text
            return response.status, body, response.headers

    async def status(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/v1/status", timeout=CLIENT_TIMEOUT,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body

    async def connected(self) -> None:
        await eventually(lambda: self.link.status.state is LinkState.CONNECTED, what="welcome")


@asynccontextmanager
async def run_agent_under_test(
    data_dir: Path, relay_port: int, relay_id: str, key: crypto.Ed25519PrivateKey,
    *, agent_id: str = AGENT_ID, commands: Commands | None = None,
) -> AsyncIterator[AgentUnderTest]:
    data_dir.mkdir(exist_ok=True)
    config = AgentConfig(
        relay_url=f"http://127.0.0.1:{relay_port}", agent_id=agent_id, relay_id=relay_id,
        data_dir=data_dir, backoff_initial=10 * MS, backoff_max=50 * MS,
        link=LinkConfig(auth_timeout=5000 * MS),
    )
    inbox = await Inbox.open(data_dir / "inbox.db")
    link = AgentLink(config, private_key=key, inbox=inbox, commands=commands)
    app = create_local_app(config=config, inbox=inbox, link_status=link.status, token=TOKEN,
                           commands=link.commands)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    task = asyncio.create_task(link.run())
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with aiohttp.ClientSession() as http:
            yield AgentUnderTest(f"http://127.0.0.1:{runner.addresses[0][1]}", http, link, inbox)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
        await inbox.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def agent_key() -> crypto.Ed25519PrivateKey:
    return crypto.generate_private_key()


@pytest.fixture
def mini_relay(agent_key: crypto.Ed25519PrivateKey) -> MiniRelay:
    return MiniRelay(agents={AGENT_ID: crypto.public_key_b64(agent_key)})


@asynccontextmanager
async def online(
    tmp_path: Path, relay: MiniRelay, key: crypto.Ed25519PrivateKey,
    commands: Commands | None = None,
) -> AsyncIterator[AgentUnderTest]:
    async with serve_mini_relay(relay), run_agent_under_test(
        tmp_path / "agent", relay.port, relay.relay_id, key, commands=commands
    ) as agent:
        await agent.connected()
        yield agent


# -- the happy path ------------------------------------------------------------------------------


async def test_command_goes_over_the_link_and_the_answer_comes_back_unchanged(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """JSON params and the app's Idempotency-Key reach the relay in a command frame; the app
    gets X-on's status, content type and body, plus X-Request-Id."""
    async with online(tmp_path, mini_relay, agent_key) as agent:
        params = {"destination": "201", "target": "07700900123", "priority": 2, "tags": ["a"]}
        status, body, headers = await agent.ctox("make_call", key="k-1", json=params)
    assert (status, body) == (202, {"status": "OK", "callId": "call-1"})
    assert headers["Content-Type"] == "application/json"
    [command] = mini_relay.commands
    assert command.ctox_type == "make_call"
    assert command.params == params  # JSON values kept as given
    assert command.idempotency_key == "k-1"
    assert headers["X-Request-Id"] == command.request_id
    assert headers["Idempotency-Key"] == "k-1"


async def test_form_params_travel_as_strings(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """A form body becomes string params (a repeated name a list); no body, no params."""
    async with online(tmp_path, mini_relay, agent_key) as agent:
        status, _, _ = await agent.ctox("send_sms", data={"to": "0770", "text": "hi there"})
        assert status == 202
        status, _, _ = await agent.ctox("conference", data=[("n", "1"), ("n", "2"), ("n", "3")])
        assert status == 202
        status, _, _ = await agent.ctox("order_status")
        assert status == 202
    assert [c.params for c in mini_relay.commands] == [
        {"to": "0770", "text": "hi there"}, {"n": ["1", "2", "3"]}, {},
    ]


async def test_each_request_without_a_key_gets_its_own_generated_key(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """Without Idempotency-Key the agent makes one per request and tells the app."""
    async with online(tmp_path, mini_relay, agent_key) as agent:
        answers = [await agent.ctox("make_call", json={"destination": "1"}) for _ in range(2)]
    keys = [c.idempotency_key for c in mini_relay.commands]
    assert len(set(keys)) == 2 and all(keys)
    assert [h["Idempotency-Key"] for _, _, h in answers] == keys
    assert len({c.request_id for c in mini_relay.commands}) == 2


# -- failures --------------------------------------------------------------------------------------


async def test_offline_agent_answers_503_at_once_and_never_sends_later(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """No link: 503 relay_unreachable without waiting; once the relay is back, the refused
    command is not sent (nothing is queued)."""
    mini_relay.port = free_port()
    async with run_agent_under_test(tmp_path / "agent", mini_relay.port, mini_relay.relay_id,
                                    agent_key) as agent:
        status, body, headers = await agent.ctox(
            "make_call", key="k-off", json={"destination": "1"},
        )
        assert status == 503
        assert body["error"]["code"] == "relay_unreachable"
        assert headers["Idempotency-Key"] == "k-off"
        async with serve_mini_relay(mini_relay):
            await agent.connected()
            await eventually(lambda: mini_relay.opened == 1, what="the relay's handshake")
            status, _, _ = await agent.ctox("make_call", key="k-on", json={"destination": "1"})
            assert status == 202
    assert [c.idempotency_key for c in mini_relay.commands] == ["k-on"]


async def test_a_command_cut_off_by_a_link_drop_is_resent_with_the_same_ids(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """The link drops before the answer: the agent resends the same frame (request id and
    idempotency key) on the next link and the app gets that answer."""

    async def drop_first(command: frames.Command) -> frames.CommandResult | None:
        if len(mini_relay.commands) == 1:
            await mini_relay.drop()
            return None
        return xon_result(command, body={"status": "OK", "callId": "call-2"})

    mini_relay.answer = drop_first
    async with online(tmp_path, mini_relay, agent_key) as agent:
        status, body, headers = await agent.ctox("make_call", json={"destination": "1"})
    assert (status, body) == (202, {"status": "OK", "callId": "call-2"})
    first, second = mini_relay.commands
    assert first == second
    assert headers["X-Request-Id"] == first.request_id
    assert mini_relay.opened == 2


async def test_no_answer_within_the_deadline_is_504_command_timeout(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """A relay that never answers: 504 command_timeout with the ids to retry with."""

    async def never(command: frames.Command) -> None:
        return None

    mini_relay.answer = never
    async with online(tmp_path, mini_relay, agent_key, Commands(timeout=200 * MS)) as agent:
        status, body, headers = await agent.ctox("make_call", key="k-slow")
        assert agent.link.commands.in_flight == 0
    assert status == 504
    assert body["error"]["code"] == "command_timeout"
    assert headers["Idempotency-Key"] == "k-slow"
    assert headers["X-Request-Id"] == mini_relay.commands[0].request_id


async def test_refusals_pass_through_with_status_body_and_retry_after(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """X-on's 429 and the relay's own refusals keep their status, body and Retry-After."""
    error = {"error": {"code": "rate_limited", "message": "slow down"}}

    async def refuse(command: frames.Command) -> frames.CommandResult:
        if command.ctox_type == "rate":
            return xon_result(command, 429, error, headers={"retry-after": "7"},
                              error="rate_limited")
        return xon_result(command, 503, {"fault": "busy"}, headers={"Retry-After": 30})

    mini_relay.answer = refuse
    async with online(tmp_path, mini_relay, agent_key) as agent:
        limited = await agent.ctox("rate")
        busy = await agent.ctox("busy")
    assert limited[:2] == (429, error)
    assert limited[2]["Retry-After"] == "7"
    assert busy[:2] == (503, {"fault": "busy"})
    assert busy[2]["Retry-After"] == "30"


async def test_relay_refusal_without_a_body_still_answers_a_json_error(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """A result with ``error`` and no body becomes {"error": {"code": ...}} with its status."""

    async def conflict(command: frames.Command) -> frames.CommandResult:
        return frames.CommandResult(request_id=command.request_id, status=409,
                                    error="idempotency_conflict")

    mini_relay.answer = conflict
    async with online(tmp_path, mini_relay, agent_key) as agent:
        status, body, _ = await agent.ctox("make_call", key="k")
    assert status == 409
    assert body["error"]["code"] == "idempotency_conflict"


async def test_undecodable_relay_answer_is_502(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """A result the agent cannot turn into HTTP (bad base64, bad status) is a 502."""

    async def broken(command: frames.Command) -> frames.CommandResult:
        if command.ctox_type == "b64":
            return frames.CommandResult(request_id=command.request_id, status=200,
                                        body_b64="not base64!")
        return frames.CommandResult(request_id=command.request_id, status=99)

    mini_relay.answer = broken
    async with online(tmp_path, mini_relay, agent_key) as agent:
        for ctox_type in ("b64", "status"):
            status, body, _ = await agent.ctox(ctox_type)
            assert status == 502
            assert body["error"]["code"] == "bad_relay_response"


async def test_commands_in_flight_are_bounded_with_429(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """Beyond max_in_flight waiting commands the agent answers 429 too_many_commands."""
    release = asyncio.Event()

    async def held(command: frames.Command) -> frames.CommandResult:
        await release.wait()
        return xon_result(command)

    mini_relay.answer = held
    async with online(tmp_path, mini_relay, agent_key, Commands(max_in_flight=2)) as agent:
        waiting = [asyncio.create_task(agent.ctox("make_call")) for _ in range(2)]
        await eventually(lambda: len(mini_relay.commands) == 2, what="two commands in flight")
        status, body, _ = await agent.ctox("make_call")
        assert (status, body["error"]["code"]) == (429, "too_many_commands")
        release.set()
        assert [r[0] for r in await asyncio.gather(*waiting)] == [202, 202]
    assert len(mini_relay.commands) == 2


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        ("/v1/ctox/bad%20type", {}, 400, "bad_ctox_type"),
        ("/v1/ctox/make_call", {"headers": {"Idempotency-Key": "has space"}}, 400,
         "bad_idempotency_key"),
        ("/v1/ctox/make_call", {"data": b"x", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("/v1/ctox/make_call", {"json": [1, 2]}, 400, "bad_params"),
        ("/v1/ctox/make_call", {"data": b"{", "headers": {"Content-Type": "application/json"}},
         400, "bad_json"),
        ("/v1/ctox/make_call", {"json": {"big": "x" * 2048}}, 413, "command_too_large"),
        # docs/protocol.md, Frame limits: what the relay would refuse, and drop the link for.
        ("/v1/ctox/make_call", {"data": b'{"to": "\\ud800"}',
                                "headers": {"Content-Type": "application/json"}},
         400, "bad_params"),
        ("/v1/ctox/make_call", {"json": {"n": 2**64}}, 400, "bad_params"),
        ("/v1/ctox/make_call", {"json": {"deep": [[[[[[[["x"]]]]]]]]}}, 400, "bad_params"),
    ],
    ids=["type", "key", "media-type", "json-array", "bad-json", "too-large", "surrogate",
         "huge-int", "too-deep"],
)
async def test_malformed_requests_are_refused_before_anything_is_sent(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey,
    path: str, kwargs: dict[str, Any], status: int, code: str,
) -> None:
    """Bad type, key, content type or params: a clear 4xx and no command frame."""
    mini_relay.agents[AGENT_ID] = crypto.public_key_b64(agent_key)
    async with serve_mini_relay(mini_relay):
        data_dir = tmp_path / "agent"
        data_dir.mkdir()
        config = AgentConfig(relay_url=f"http://127.0.0.1:{mini_relay.port}",
                             agent_id=AGENT_ID, data_dir=data_dir,
                             link=LinkConfig(max_message_size=1024))
        inbox = await Inbox.open(data_dir / "inbox.db")
        link = AgentLink(config, private_key=agent_key, inbox=inbox)
        app = create_local_app(config=config, inbox=inbox, link_status=link.status,
                               token=TOKEN, commands=link.commands)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        task = asyncio.create_task(link.run())
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            await eventually(lambda: link.status.state is LinkState.CONNECTED, what="welcome")
            url = f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
            headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
            async with aiohttp.ClientSession() as http, http.post(
                url, headers=headers, timeout=CLIENT_TIMEOUT, **kwargs
            ) as response:
                assert response.status == status
                assert (await response.json())["error"]["code"] == code
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()
            await inbox.close()
    assert mini_relay.commands == []


async def test_ctox_needs_the_local_token(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """The local token guards commands like every other path."""
    async with online(tmp_path, mini_relay, agent_key) as agent:
        async with agent.http.post(agent.url + "/v1/ctox/make_call",
                                   timeout=CLIENT_TIMEOUT) as response:
            assert response.status == 401
    assert mini_relay.commands == []


async def test_stopping_agent_fails_waiting_commands_with_503(
    tmp_path: Path, mini_relay: MiniRelay, agent_key: crypto.Ed25519PrivateKey
) -> None:
    """On shutdown a waiting command gets 503 agent_stopping instead of hanging."""

    async def never(command: frames.Command) -> None:
        return None

    mini_relay.answer = never
    commands = Commands()
    async with online(tmp_path, mini_relay, agent_key, commands) as agent:
        waiting = asyncio.create_task(agent.ctox("make_call"))
        await eventually(lambda: commands.in_flight == 1, what="a command in flight")
        commands.close()
        status, body, _ = await waiting
    assert (status, body["error"]["code"]) == (503, "agent_stopping")
