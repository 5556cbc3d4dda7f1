"""The status page and its one-time login (issue 4, Localhost API security and UX), on a real
local app: login codes are single-use and expire, the cookie opens the page's data only, the
page shows types and times but never event bodies; ``open`` and ``status`` helpers."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay_agent import page
from relay_agent.enroll import STATE_FILE
from relay_agent.link import LinkState
from relay_agent.security import auth_key
from relay_agent.tokens import rotate_token
from shared.errors import ApiError

from .test_security import SECRET_PARAM, Guarded, serve_guarded


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Guarded]:
    async with serve_guarded(tmp_path / "agent") as running:
        await running.inbox.save_status([{
            "key": "messages.waiting?mailbox=5", "type": "messages.waiting",
            "ids": {"mailbox": "5"}, "params": {"mailbox": "5", "waiting": "3"}, "seq": 1,
            "received_at": "2026-01-01T00:00:01.000Z"}], snapshot=True)
        yield running


async def login_url(guarded: Guarded) -> str:
    status, body, _ = await guarded.request("POST", "/v1/login-codes", guarded.auth())
    assert status == 201, body
    data = json.loads(body)
    assert data["url"] == f"{guarded.url}/login?code={data['code']}"
    assert data["expires_in"] > 0
    return str(data["url"])


async def login(guarded: Guarded) -> dict[str, str]:
    """Log in with a fresh code; the Cookie header the browser would then send."""
    url = await login_url(guarded)
    async with guarded.http.get(url, allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/"
        cookie = response.headers["Set-Cookie"]
    name, _, rest = cookie.partition("=")
    return {"Cookie": f"{name}={rest.partition(';')[0]}"}


async def test_login_sets_a_strict_httponly_session_cookie(guarded: Guarded) -> None:
    """/login swaps the code for an HttpOnly, SameSite=Strict cookie that is not the token."""
    url = await login_url(guarded)
    async with guarded.http.get(url, allow_redirects=False) as response:
        assert response.status == 303
        cookie = response.headers["Set-Cookie"]
    attributes = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/" in attributes
    assert cookie.startswith(f"xon_relay_session_{guarded.port}=")
    assert guarded.token not in cookie


async def test_login_code_works_once(guarded: Guarded) -> None:
    """A login code is single-use: the second visit gets 403 and no cookie."""
    url = await login_url(guarded)
    async with guarded.http.get(url, allow_redirects=False) as response:
        assert response.status == 303
    async with guarded.http.get(url, allow_redirects=False) as response:
        assert response.status == 403
        assert "Set-Cookie" not in response.headers
        assert "expired" in await response.text()


async def test_head_request_does_not_spend_the_code(guarded: Guarded) -> None:
    """A link preview's HEAD neither logs in nor burns the code."""
    url = await login_url(guarded)
    status, _, headers = await guarded.request("HEAD", url.removeprefix(guarded.url))
    assert status == 405
    assert "Set-Cookie" not in headers
    async with guarded.http.get(url, allow_redirects=False) as response:
        assert response.status == 303


async def test_login_code_expires(guarded: Guarded) -> None:
    """A code older than its TTL opens nothing."""
    sessions = guarded.app[auth_key].sessions
    now = [1000.0]
    sessions.clock = lambda: now[0]
    url = await login_url(guarded)
    now[0] += sessions.code_ttl + 1
    async with guarded.http.get(url, allow_redirects=False) as response:
        assert response.status == 403
        assert "Set-Cookie" not in response.headers


async def test_unknown_or_missing_code_is_refused(guarded: Guarded) -> None:
    """/login without a valid code sets no cookie."""
    for path in ("/login", "/login?code=", "/login?code=guess"):
        status, body, headers = await guarded.request("GET", path)
        assert status == 403
        assert "Set-Cookie" not in headers
        assert SECRET_PARAM not in body


async def test_cross_site_login_is_refused_and_keeps_the_code(guarded: Guarded) -> None:
    """A foreign page linking to /login cannot log the browser in (nor burn the code)."""
    url = await login_url(guarded)
    path = url.removeprefix(guarded.url)
    status, _, headers = await guarded.request("GET", path, {"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert "Set-Cookie" not in headers
    status, _, _ = await guarded.request("GET", path)
    assert status == 303


async def test_login_codes_need_the_bearer_token(guarded: Guarded) -> None:
    """A session cookie cannot mint login codes; only the token's holder can."""
    cookie = await login(guarded)
    status, _, _ = await guarded.request("POST", "/v1/login-codes", cookie)
    assert status == 401


async def test_cookie_opens_the_page_and_its_data_only(guarded: Guarded) -> None:
    """The cookie reads /, /v1/health, /v1/status and /page/summary; not events or CTOX."""
    cookie = await login(guarded)
    for path in ("/", "/v1/health", "/v1/status", "/page/summary"):
        status, body, _ = await guarded.request("GET", path, cookie)
        assert status == 200, (path, body)
    for method, path in (("GET", "/v1/events"), ("POST", "/v1/ctox/MakeCall"),
                         ("POST", "/v1/health")):
        status, body, _ = await guarded.request(method, path, cookie)
        assert status in (401, 405), (path, body)
        assert SECRET_PARAM not in body


async def test_cookie_still_needs_own_host_and_origin(guarded: Guarded) -> None:
    """Host and Origin checks apply to cookie requests as to token ones."""
    cookie = await login(guarded)
    status, _, _ = await guarded.request("GET", "/", {**cookie, "Host": "evil.example"})
    assert status == 403
    status, _, _ = await guarded.request("GET", "/v1/health",
                                         {**cookie, "Origin": "https://evil.example"})
    assert status == 403


async def test_rotating_the_token_ends_page_sessions(guarded: Guarded) -> None:
    """Sessions and codes made under the old token die with it."""
    cookie = await login(guarded)
    url = await login_url(guarded)
    rotate_token(guarded.data_dir)
    assert (await guarded.request("GET", "/", cookie))[0] == 401
    async with guarded.http.get(url, allow_redirects=False) as response:
        assert response.status == 403


async def test_page_shows_state_types_and_status_but_no_bodies(guarded: Guarded) -> None:
    """GET / renders link state, events today, last event types and status values only."""
    cookie = await login(guarded)
    status, body, headers = await guarded.request("GET", "/", cookie)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert 'id="link-state" class="state state-connected">Connected<' in body
    assert body.count("<td>call.arriving</td>") == 3
    assert "messages.waiting (mailbox=5)" in body and "waiting=3" in body
    assert '<dd id="events-today">3</dd>' in body
    assert SECRET_PARAM not in body
    assert "<script nonce=" in body and "src=" not in body


async def test_page_escapes_what_events_carry(guarded: Guarded) -> None:
    """An event type or status value with markup is shown as text, never run."""
    event = {"id": "ev-x", "account": "a", "type": "<script>alert(1)</script>",
             "received_at": "2026-01-01T00:00:00.000Z", "params": {}, "request": {}}
    await guarded.inbox.commit([(99, event)])
    cookie = await login(guarded)
    _, body, _ = await guarded.request("GET", "/", cookie)
    assert "<script>alert(1)</script>" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body


async def test_summary_lists_newest_first_without_bodies(guarded: Guarded) -> None:
    """/page/summary: events today and the last events' type, time and cursor only."""
    status, body, _ = await guarded.request("GET", "/page/summary", guarded.auth())
    assert status == 200
    data = json.loads(body)
    assert data["events_today"] == 3
    assert [e["cursor"] for e in data["recent"]] == ["3", "2", "1"]
    assert all(set(e) == {"type", "received_at", "cursor"} for e in data["recent"])
    assert SECRET_PARAM not in body


async def test_unauthenticated_page_tells_how_to_open_it(guarded: Guarded) -> None:
    """A person who types the URL gets a 401 login page (HTML, not JSON) that says what this
    is and the command to run, with no data; API clients and the API paths get JSON."""
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    status, body, headers = await guarded.request("GET", "/", browser)
    assert status == 401
    assert headers["Content-Type"].startswith("text/html")
    assert "<code>xon-relay-agent open</code>" in body and "status page" in body
    assert '"error"' not in body and "<script" not in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert SECRET_PARAM not in body and "call.arriving" not in body and "agent-sec" not in body
    for path, accept in (("/v1/health", browser), ("/", {})):
        status, body, headers = await guarded.request("GET", path, accept)
        assert status == 401 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["error"]["code"] == "unauthorized"


RELAY_DOWN = "ConnectionRefusedError: [Errno 111] Connect call failed ('203.0.113.9', 443)"


async def test_a_relay_down_is_told_in_words_not_as_an_exception(guarded: Guarded) -> None:
    """Link down with an exception repr as last_error: the page and its summary give the cause
    and what to do, and never the repr."""
    guarded.status.state = LinkState.DISCONNECTED
    guarded.status.connected_since = None
    guarded.status.last_error = RELAY_DOWN
    cookie = await login(guarded)
    _, body, _ = await guarded.request("GET", "/", cookie)
    assert "relay.example) is not accepting connections" in body
    assert "keeps retrying by itself" in body
    for leak in ("Errno", "ConnectionRefusedError", "Connect call failed"):
        assert leak not in body
    _, body, _ = await guarded.request("GET", "/page/summary", cookie)
    problem = json.loads(body)["problem"]
    assert "not accepting connections" in problem["cause"] and problem["action"]
    guarded.status.state = LinkState.CONNECTED
    _, body, _ = await guarded.request("GET", "/page/summary", cookie)
    assert json.loads(body)["problem"] is None


# -- the CLI side --------------------------------------------------------------------------------


def write_state(guarded: Guarded, pid: int) -> None:
    (guarded.data_dir / STATE_FILE).write_text(
        json.dumps({"local_url": guarded.url, "pid": pid, "agent_id": "agent-sec"}))


async def test_open_page_prints_a_working_one_time_url(
    guarded: Guarded, capsys: pytest.CaptureFixture[str]
) -> None:
    """open_page asks the running agent for a login URL and prints it."""
    write_state(guarded, os.getpid())
    assert await asyncio.to_thread(page.open_page, guarded.data_dir, browser=False) == 0
    out = capsys.readouterr().out
    url = out.split()[-1]
    assert url.startswith(f"{guarded.url}/login?code=")
    assert guarded.token not in out
    async with guarded.http.get(url, allow_redirects=False) as response:
        assert response.status == 303


async def test_open_page_without_a_running_agent_fails_clearly(guarded: Guarded) -> None:
    """No agent.json (or a dead pid): a clear agent_not_running refusal."""
    with pytest.raises(ApiError, match="no agent is running") as info:
        page.login_url(guarded.data_dir)
    assert info.value.code == "agent_not_running"
    write_state(guarded, 2**22 + 12345)
    with pytest.raises(ApiError, match="no agent is running"):
        page.login_url(guarded.data_dir)


def test_status_text_shows_link_last_event_and_backlogs() -> None:
    """status_text: link state since when, relay, last event, inbox and per-target backlog."""
    out: dict[str, Any] = {
        "running": True, "pid": 42, "local_url": "http://127.0.0.1:8765",
        "link": "connected", "connected_since": "2026-01-01T10:00:00.000Z",
        "last_event_at": "2026-01-01T10:05:00.000Z", "relay_url": "https://relay.example",
        "inbox": {"events": 7, "last_cursor": "7", "last_seq": 9},
        "consumers": [{"name": "crm", "cursor": "5", "lag": 2}],
        "forward": [{"name": "forward-1", "url": "http://127.0.0.1:9000/xon", "cursor": "4",
                     "lag": 3, "delivered": 4, "failures": 3, "last_error": "HTTP 500",
                     "last_status": 500, "stale_skipped": 0}],
        "tcp": [{"name": "tcp-1", "address": "127.0.0.1:7000", "cursor": None, "lag": None,
                 "connected": False, "delivered": 0, "failures": 0, "last_error": None}],
    }
    text = page.status_text(out)
    assert text.splitlines()[0].startswith("running (pid 42), link connected since 2026-01-01")
    assert "relay: https://relay.example" in text
    assert "last event: 2026-01-01" in text
    assert "inbox: 7 events" in text
    assert "consumers crm: lag=2" in text
    assert ("forward forward-1: url=http://127.0.0.1:9000/xon, lag=3, delivered=4, failures=3, "
            "last_status=500, last_error=HTTP 500") in text
    assert "tcp tcp-1: not started, address=127.0.0.1:7000, connected=False" in text
    stopped = page.status_text({"running": False, "relay_url": "https://relay.example",
                                "inbox": {"events": 0, "last_cursor": "0", "last_seq": 0}})
    assert stopped.splitlines()[0] == "not running"
    never = page.status_text({"running": False, "enrolled": False, "action": "enroll it"})
    assert never.splitlines() == ["not enrolled", "next: enroll it"]
    down = page.status_text({**out, "link": "connecting", "last_error": RELAY_DOWN})
    assert "problem: The relay (relay.example) is not accepting connections" in down
