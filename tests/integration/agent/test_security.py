"""The local API's guard (issue 4, Localhost API security): Host with port, Origin,
Sec-Fetch-Site, the bearer token and its live rotation, no CORS, bounded waiters. A real agent
local app on a real 127.0.0.1 socket, its token in a real file."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay_agent.enroll import TOKEN_FILE
from relay_agent.inbox import Inbox
from relay_agent.link import LinkState, LinkStatus
from relay_agent.local_api import create_local_app
from relay_agent.security import auth_key, check_listen
from relay_agent.tokens import TokenFile, rotate_token
from shared.config import AgentConfig
from shared.errors import ConfigError
from tests.helpers.timing import MS

from .support import eventually, make_event

SECRET_PARAM = "body-secret-4711"
"""A parameter value no refused request, and no page, may ever show."""
DATA_PATHS = ["/v1/events", "/v1/health", "/v1/status", "/", "/page/summary"]
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10_000 * MS)


@dataclass
class Guarded:
    """A running local app, its inbox, link status and data dir, and a client."""

    url: str
    port: int
    app: web.Application
    inbox: Inbox
    status: LinkStatus
    data_dir: Path
    http: aiohttp.ClientSession

    @property
    def token(self) -> str:
        return (self.data_dir / TOKEN_FILE).read_text().strip()

    def auth(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      **kwargs: Any) -> tuple[int, str, dict[str, str]]:
        async with self.http.request(method, self.url + path, headers=headers or {},
                                     allow_redirects=False, **kwargs) as response:
            return response.status, await response.text(), dict(response.headers)


def secret_event(n: int) -> dict[str, Any]:
    event = make_event(n)
    event["type"] = "call.arriving"
    event["params"] = {"n": str(n), "note": SECRET_PARAM}
    return event


@asynccontextmanager
async def serve_guarded(
    data_dir: Path, *, max_waiters: int = 16, events: int = 3,
    extra_routes: list[web.RouteDef] | None = None,
) -> AsyncIterator[Guarded]:
    """The real local app (create_local_app) with a rotatable token file in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rotate_token(data_dir)
    config = AgentConfig(relay_url="https://relay.example", agent_id="agent-sec",
                         data_dir=data_dir, max_wait=10_000 * MS, max_waiters=max_waiters)
    inbox = await Inbox.open(data_dir / "inbox.db")
    await inbox.commit([(n, secret_event(n)) for n in range(1, events + 1)])
    status = LinkStatus(state=LinkState.CONNECTED, connected_since=1_700_000_000.0)
    app = create_local_app(config=config, inbox=inbox, link_status=status,
                           token=TokenFile(data_dir / TOKEN_FILE))
    app.add_routes(extra_routes or [])
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = int(runner.addresses[0][1])
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
            yield Guarded(f"http://127.0.0.1:{port}", port, app, inbox, status, data_dir, http)
    finally:
        await runner.cleanup()
        await inbox.close()


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Guarded]:
    async with serve_guarded(tmp_path / "agent") as running:
        yield running


def assert_refused(status: int, body: str, expected: int, code: str) -> None:
    assert status == expected, body
    assert f'"code": "{code}"' in body
    for leak in (SECRET_PARAM, "call.arriving", "agent-sec", "relay.example", "cursor"):
        assert leak not in body


# -- Host ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [
    "evil.example:{port}", "evil.example", "127.0.0.1.evil.example:{port}", "localhost",
    "127.0.0.1", "127.0.0.1:{other}", "localhost:{other}", "[::1]:{other}", "", "::1:{port}",
    "[::1:{port}", "localhost:{port}:{port}", "localhost:+{port}", "10.1.2.3:{port}",
])
async def test_foreign_host_or_wrong_port_gets_403_and_no_data(
    guarded: Guarded, host: str
) -> None:
    """DNS-rebinding defence: Host must name this listener, with its port, even with the token."""
    value = host.format(port=guarded.port, other=guarded.port + 1)
    for path in DATA_PATHS:
        status, body, _ = await guarded.request("GET", path, guarded.auth(Host=value))
        assert_refused(status, body, 403, "bad_host")


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}",
                                  "[::1]:{port}", "127.0.0.9:{port}"])
async def test_own_loopback_host_with_its_port_is_accepted(guarded: Guarded, host: str) -> None:
    """localhost and loopback IP literals pass the Host check with the listener's port."""
    value = host.format(port=guarded.port)
    status, body, _ = await guarded.request("GET", "/v1/health", guarded.auth(Host=value))
    assert status == 200, body


# -- Origin and Sec-Fetch-Site ---------------------------------------------------------------------


@pytest.mark.parametrize("origin", [
    "https://evil.example", "null", "http://127.0.0.1:{other}", "http://localhost:{port}",
    "https://127.0.0.1:{port}", "http://127.0.0.1:{port}.evil.example", "",
])
async def test_foreign_origin_gets_403_and_no_data(guarded: Guarded, origin: str) -> None:
    """An Origin that is not this listener's own (Origin: null included) is refused."""
    value = origin.format(port=guarded.port, other=guarded.port + 1)
    for path in DATA_PATHS:
        status, body, headers = await guarded.request("GET", path, guarded.auth(Origin=value))
        assert_refused(status, body, 403, "bad_origin")
        assert not [h for h in headers if h.lower().startswith("access-control-")]


async def test_own_origin_is_accepted(guarded: Guarded) -> None:
    """The page's own fetches carry its own origin and pass."""
    origin = f"http://127.0.0.1:{guarded.port}"
    status, body, _ = await guarded.request("GET", "/v1/health", guarded.auth(Origin=origin))
    assert status == 200, body


async def test_cross_site_fetch_gets_403_and_no_data(guarded: Guarded) -> None:
    """Sec-Fetch-Site: cross-site is refused even with the token."""
    headers = guarded.auth(**{"Sec-Fetch-Site": "cross-site"})
    for path in DATA_PATHS:
        status, body, _ = await guarded.request("GET", path, headers)
        assert_refused(status, body, 403, "cross_site")


@pytest.mark.parametrize("site", ["same-origin", "none", "same-site"])
async def test_other_fetch_sites_pass(guarded: Guarded, site: str) -> None:
    """Only cross-site is refused outright: same-site pages still need the token and Origin."""
    headers = guarded.auth(**{"Sec-Fetch-Site": site})
    status, body, _ = await guarded.request("GET", "/v1/events", headers)
    assert status == 200, body


async def test_cross_site_post_has_no_effect(guarded: Guarded) -> None:
    """A form a foreign page posts is refused before anything runs (no login code is made)."""
    sessions = guarded.app[auth_key].sessions
    status, body, _ = await guarded.request(
        "POST", "/v1/login-codes", guarded.auth(Origin="https://evil.example"))
    assert_refused(status, body, 403, "bad_origin")
    assert not sessions._codes


# -- the token -------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic {token}", "Bearer",
                                           "{token}"])
async def test_missing_or_wrong_token_gets_401_and_no_data(
    guarded: Guarded, authorization: str | None
) -> None:
    """Every data path needs the bearer token."""
    headers = {} if authorization is None else {
        "Authorization": authorization.format(token=guarded.token)}
    for path in DATA_PATHS:
        status, body, response_headers = await guarded.request("GET", path, headers)
        assert_refused(status, body, 401, "unauthorized")
        assert response_headers["WWW-Authenticate"] == "Bearer"


async def test_rotated_token_is_picked_up_without_restart(guarded: Guarded) -> None:
    """rotate_token writes a new 0600 token; the running app accepts only the new one."""
    old = guarded.token
    assert (await guarded.request("GET", "/v1/health", guarded.auth()))[0] == 200
    for _ in range(2):
        new = rotate_token(guarded.data_dir)
        assert new != old
        assert guarded.token == new
        mode = stat.S_IMODE((guarded.data_dir / TOKEN_FILE).stat().st_mode)
        assert mode == 0o600
        status, _, _ = await guarded.request("GET", "/v1/health",
                                             {"Authorization": f"Bearer {old}"})
        assert status == 401
        status, body, _ = await guarded.request("GET", "/v1/health",
                                                {"Authorization": f"Bearer {new}"})
        assert status == 200, body
        old = new


async def test_unreadable_token_file_keeps_the_last_good_token(guarded: Guarded) -> None:
    """A deleted or emptied token file neither locks apps out nor opens the API."""
    token = guarded.token
    (guarded.data_dir / TOKEN_FILE).write_text("\n")
    assert (await guarded.request("GET", "/v1/health",
                                  {"Authorization": f"Bearer {token}"}))[0] == 200
    assert (await guarded.request("GET", "/v1/health", {"Authorization": "Bearer "}))[0] == 401
    (guarded.data_dir / TOKEN_FILE).unlink()
    assert (await guarded.request("GET", "/v1/health",
                                  {"Authorization": f"Bearer {token}"}))[0] == 200


# -- no CORS ---------------------------------------------------------------------------------------


async def test_preflight_gets_no_cors_headers(guarded: Guarded) -> None:
    """An OPTIONS preflight is refused and no Access-Control-* header is ever sent."""
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    status, _, headers = await guarded.request("OPTIONS", "/v1/ctox/MakeCall", preflight)
    assert status == 403
    assert not [h for h in headers if h.lower().startswith("access-control-")]
    status, _, headers = await guarded.request("OPTIONS", "/v1/events", guarded.auth())
    assert status == 405
    assert not [h for h in headers if h.lower().startswith("access-control-")]


async def test_cors_headers_are_stripped_from_every_response(tmp_path: Path) -> None:
    """Even a handler that sets an Access-Control-* header cannot grant CORS."""

    async def leaky(request: web.Request) -> web.Response:
        return web.Response(text="x", headers={"Access-Control-Allow-Origin": "*"})

    async with serve_guarded(tmp_path, extra_routes=[web.get("/leaky", leaky)]) as running:
        status, _, headers = await running.request("GET", "/leaky", running.auth())
    assert status == 200
    assert not [h for h in headers if h.lower().startswith("access-control-")]


# -- bounded waiters -------------------------------------------------------------------------------


async def test_too_many_waiters_get_429_with_retry_after(tmp_path: Path) -> None:
    """Beyond max_waiters concurrent long-polls per token: 429 too_many_waiters + Retry-After."""
    async with serve_guarded(tmp_path, max_waiters=3, events=0) as running:
        auth = running.app[auth_key]
        polls = [asyncio.create_task(running.request(
            "GET", "/v1/events?wait=10", running.auth())) for _ in range(3)]
        await eventually(lambda: auth.waiters == 3, what="3 waiting long-polls")
        status, body, headers = await running.request("GET", "/v1/events?wait=10",
                                                      running.auth())
        assert_refused(status, body, 429, "too_many_waiters")
        assert int(headers["Retry-After"]) >= 1
        # A read that does not wait is no waiter: it is served.
        assert (await running.request("GET", "/v1/events", running.auth()))[0] == 200
        await running.inbox.commit([(1, make_event(1))])
        assert [r[0] for r in await asyncio.gather(*polls)] == [200, 200, 200]
        assert auth.waiters == 0
        status, body, _ = await running.request("GET", "/v1/events?wait=0.001",
                                                running.auth())
        assert status == 200, body


# -- listen address --------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:8765", "localhost:0", "[::1]:8765",
                                    "127.0.0.2:1"])
def test_loopback_listen_is_accepted(listen: str) -> None:
    """Loopback addresses need no flag."""
    assert check_listen(listen, allow_non_loopback=False)[1] == int(listen.rpartition(":")[2])


@pytest.mark.parametrize("listen", ["0.0.0.0:8765", "[::]:8765", "192.168.1.5:8765",
                                    "example.com:8765"])
def test_non_loopback_listen_needs_the_explicit_flag(listen: str) -> None:
    """DESIGN principle 3: a non-loopback listen is refused unless allow_non_loopback."""
    with pytest.raises(ConfigError, match="allow_non_loopback"):
        check_listen(listen, allow_non_loopback=False)
    assert check_listen(listen, allow_non_loopback=True)[1] == 8765


def test_max_waiters_must_be_positive() -> None:
    """max_waiters = 0 would refuse every long-poll: refused at load time."""
    with pytest.raises(ConfigError, match="max_waiters"):
        AgentConfig(max_waiters=0)
