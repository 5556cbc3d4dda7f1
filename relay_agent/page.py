"""The status page for the person at the PC (``GET /``) and its one-time login.

The page needs the local token like every endpoint, but a token must not sit in a reusable URL
(browser history, shell scrollback). So ``xon-relay-agent open`` asks the running agent for a
one-time login code (``POST /v1/login-codes``, bearer token) and opens ``/login?code=…``, which
swaps the code for an HttpOnly, SameSite=Strict session cookie and redirects to ``/``. The
cookie opens only the page and the read-only data it fetches (:mod:`.security`).

The page is rendered here from the same sources as ``/v1/health`` and ``/v1/status`` and then
refreshed by a little inline script (:mod:`.page_assets`). Event bodies never reach it: the
page shows types, times and cursors only.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import secrets
import sqlite3
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from shared.config import AgentConfig
from shared.errors import ApiError, ConfigError, UpstreamError

from . import page_assets, problems
from .enroll import STATE_FILE, TOKEN_FILE
from .inbox import CursorExpired, Inbox
from .link import LinkStatus
from .security import auth_key, cookie_name
from .system import pid_alive
from .tokens import read_token

__all__ = ["install", "login_url", "open_page", "status_text", "RECENT", "SUMMARY_PATH"]

log = logging.getLogger(__name__)

RECENT = 10
"""Events the page lists."""
SUMMARY_PATH = "/page/summary"
LOGIN_PATH = "/login"
_LABELS = {"connected": "Connected", "connecting": "Connecting", "disconnected": "Disconnected"}
DELIVERY_KEYS = ("consumers", "forward", "tcp")
"""The ``/v1/health`` lists of consumers and push targets (relay_agent/delivery)."""
PROGRESS = ("url", "address", "connected", "lag", "delivered", "failures", "last_status",
            "last_error")
"""Their fields worth a glance (the script in page_assets shows the same)."""


@dataclass(frozen=True, slots=True)
class _Sources:
    config: AgentConfig
    inbox: Inbox
    link_status: LinkStatus


_sources_key = web.AppKey("page_sources", _Sources)
routes = web.RouteTableDef()


# -- data ----------------------------------------------------------------------------------------


def _count_since(path: Path, since: float) -> int:
    # A read-only connection of its own: the inbox's worker thread owns its connection, and WAL
    # lets this reader run beside it without blocking a commit.
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT COUNT(*) FROM events WHERE stored_at >= ?", (since,)).fetchone()
    finally:
        db.close()
    return int(row[0])


async def _events_today(inbox: Inbox) -> int | None:
    midnight = datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        return await asyncio.to_thread(_count_since, inbox.path, midnight.timestamp())
    except sqlite3.Error as exc:
        log.warning("page.count_failed", extra={"error": str(exc)})
        return None


async def _recent(inbox: Inbox) -> list[dict[str, str]]:
    """The last :data:`RECENT` events: type, receive time and cursor, never params or body."""
    for _ in range(3):  # retention may prune between reading its mark and reading the rows
        after = max(inbox.last_cursor - RECENT, inbox.pruned_cursor)
        try:
            events = await inbox.read(after, RECENT)
        except CursorExpired:
            continue
        return [
            {"type": str(e.event.get("type", "")), "received_at": str(e.event.get(
                "received_at", "")), "cursor": str(e.cursor)}
            for e in reversed(events)
        ]
    return []


def _problem(sources: _Sources) -> problems.Problem | None:
    """What the page says about the link: nothing while it is up."""
    status = sources.link_status
    if status.state.value == "connected":
        return None
    return problems.describe(status.last_error, relay_url=sources.config.relay_url)


@routes.get(SUMMARY_PATH)
async def get_summary(request: web.Request) -> web.Response:
    sources = request.app[_sources_key]
    problem = _problem(sources)
    return web.json_response({
        "events_today": await _events_today(sources.inbox),
        "recent": await _recent(sources.inbox),
        "problem": None if problem is None else {"cause": problem.cause,
                                                 "action": problem.action},
    })


# -- login ---------------------------------------------------------------------------------------


@routes.post("/v1/login-codes")
async def post_login_code(request: web.Request) -> web.Response:
    auth = request.app[auth_key]
    code = auth.sessions.new_code(auth.token.current())
    log.info("page.login_code", extra={"ttl": auth.sessions.code_ttl})
    url = f"http://{request.headers['Host']}{LOGIN_PATH}?code={code}"
    return web.json_response({"code": code, "url": url, "expires_in": auth.sessions.code_ttl},
                             status=201)


@routes.get(LOGIN_PATH, allow_head=False)  # a HEAD (a link preview) must not spend the code
async def get_login(request: web.Request) -> web.Response:
    auth = request.app[auth_key]
    session = auth.sessions.redeem(request.query.get("code", ""), auth.token.current())
    if session is None:
        log.info("page.login_refused")
        return web.Response(status=403, text=page_assets.LOGIN_FAILED, content_type="text/html",
                            headers={"Referrer-Policy": "no-referrer"})
    log.info("page.login")
    # 303 to / takes the spent code out of the address bar; Strict keeps other sites' links
    # and forms from carrying the cookie.
    response = web.HTTPSeeOther("/", headers={"Referrer-Policy": "no-referrer"})
    response.set_cookie(cookie_name(request), session, path="/", httponly=True,
                        samesite="Strict")
    raise response


# -- the page ------------------------------------------------------------------------------------


def _local(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _local_iso(text: str) -> str:
    try:
        return _local(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return text


def _rows(rows: list[list[str]], width: int, empty: str) -> str:
    if not rows:
        return f'<tr><td colspan="{width}" class="empty">{html.escape(empty)}</td></tr>'
    return "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows
    )


def _pairs(values: Any, skip: set[str]) -> str:
    if not isinstance(values, Mapping):
        return ""
    return ", ".join(f"{k}={v}" for k, v in values.items()
                     if k not in skip and not isinstance(v, dict | list) and v is not None)


def _status_row(item: Mapping[str, Any]) -> list[str]:
    ids = item.get("ids") if isinstance(item.get("ids"), Mapping) else {}
    assert isinstance(ids, Mapping)
    named = f" ({_pairs(ids, set())})" if ids else ""
    return [f"{item.get('type') or item.get('key')}{named}",
            _pairs(item.get("params"), set(ids)), _local_iso(str(item.get("received_at", "")))]


@routes.get("/")
async def get_page(request: web.Request) -> web.Response:
    sources = request.app[_sources_key]
    status = sources.link_status
    inbox = sources.inbox
    stats = await inbox.stats()
    view = await inbox.read_status()
    today = await _events_today(inbox)
    recent = await _recent(inbox)
    link = status.state.value
    problem = _problem(sources)
    nonce = secrets.token_urlsafe(16)
    esc = html.escape
    body = page_assets.PAGE.format(
        nonce=nonce,
        style=page_assets.STYLE,
        script=page_assets.SCRIPT,
        link=esc(link),
        link_label=esc(_LABELS.get(link, link)),
        since=esc(f"since {_local(status.connected_since)}"
                  if link == "connected" and status.connected_since else ""),
        problem_cause=esc(problem.cause if problem else ""),
        problem_action=esc(problem.action if problem else ""),
        relay_url=esc(sources.config.relay_url),
        agent_id=esc(sources.config.agent_id),
        last_event=esc(_local(status.last_event_at) if status.last_event_at or not recent
                       else _local_iso(recent[0]["received_at"])),
        events_today="?" if today is None else today,
        inbox_events=stats.events,
        recent_rows=_rows([[_local_iso(e["received_at"]), e["type"], e["cursor"]]
                           for e in recent], 3, "no events yet"),
        status_rows=_rows([_status_row(i) for i in view.items], 3, "no status values yet"),
        updated=esc(_local(time.time())),
    )
    return web.Response(text=body, content_type="text/html", headers={
        # No external assets, no framing, no forms; fetches go to this origin only.
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"),
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    })


def install(app: web.Application, *, config: AgentConfig, inbox: Inbox,
            link_status: LinkStatus) -> None:
    """Add the page routes; call after :func:`relay_agent.security.install`."""
    app[_sources_key] = _Sources(config, inbox, link_status)
    app.add_routes(routes)
    auth = app[auth_key]
    auth.cookie_paths.update({"/", "/v1/health", "/v1/status", SUMMARY_PATH})
    auth.public_paths.add(LOGIN_PATH)
    auth.login_pages["/"] = page_assets.LOGIN_NEEDED


# -- the CLI side (``open``, ``status``) ---------------------------------------------------------


def _running_url(data_dir: Path) -> str:
    """The running agent's local API URL, from the state file ``run`` writes."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or not pid_alive(state.get("pid")) \
            or not isinstance(state.get("local_url"), str):
        raise ApiError(503, "agent_not_running",
                       f"no agent is running with data dir {data_dir} (start it with "
                       "xon-relay-agent run)")
    return str(state["local_url"])


def login_url(data_dir: Path, *, timeout: float = 5.0) -> str:
    """Ask the running agent for a one-time status-page login URL.

    Raises:
        ApiError: no agent runs for ``data_dir``, or it refused (its code and message).
        ConfigError: the local token cannot be read.
        UpstreamError: the agent did not answer.
    """
    base = _running_url(data_dir)
    try:
        token = read_token(data_dir / TOKEN_FILE)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the local token: {exc}") from exc
    request = urllib.request.Request(base + "/v1/login-codes", data=b"", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    # No proxy: the token must go to 127.0.0.1 only, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ApiError(exc.code, "login_code_refused",
                       f"the agent refused a login code (HTTP {exc.code})") from exc
    except (OSError, ValueError) as exc:
        raise UpstreamError(f"the agent at {base} did not answer: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise UpstreamError(f"the agent at {base} sent no login URL")
    return str(data["url"])


def open_page(data_dir: Path, *, browser: bool = True) -> int:
    """``xon-relay-agent open``: print a one-time login URL and open it in the browser.

    Returns:
        0 (the URL is printed even when no browser could be started).

    Raises:
        RelayError: as :func:`login_url`.
    """
    url = login_url(data_dir)
    print(f"status page (the link works once, within a minute): {url}")
    if browser and not webbrowser.open(url):
        print("no browser could be started: open the link above yourself", file=sys.stderr)
    return 0


def _progress(item: Mapping[str, Any]) -> str:
    """One consumer's or push target's progress, as the page shows it."""
    shown = [f"{k}={item[k]}" for k in PROGRESS if item.get(k) is not None]
    return ", ".join(["not started", *shown] if item.get("lag", 0) is None else shown)


def _backlog_lines(health: Mapping[str, Any]) -> list[str]:
    lines = []
    for key in DELIVERY_KEYS:
        section = health.get(key)
        for item in section if isinstance(section, list) else []:
            if isinstance(item, Mapping):
                lines.append(f"{key} {item.get('name')}: {_progress(item)}")
    return lines


def status_text(out: Mapping[str, Any]) -> str:
    """The human form of ``status``: ``out`` is what ``status --json`` prints (``running``,
    ``pid``, ``local_url`` and ``/v1/health``'s fields, or ``running: false`` with ``inbox``).
    """
    lines = []
    refused = out.get("refused")
    if out.get("running"):
        link = str(out.get("link", ""))
        since = out.get("connected_since")
        lines.append(f"running (pid {out.get('pid')}), link {link}"
                     + (f" since {_local_iso(str(since))}" if link == "connected" and since
                        else ""))
    elif isinstance(refused, Mapping):
        lines.append(f"not running: the relay refused this agent ({refused.get('kind')}) at "
                     f"{_local(float(refused.get('at') or 0))}")
        lines.append(str(refused.get("action", "")))
    elif out.get("enrolled") is False:
        lines.append("not enrolled")
    else:
        lines.append("not running")
    if out.get("action"):
        lines.append(f"next: {out['action']}")
    if out.get("relay_url"):
        lines.append(f"relay: {out['relay_url']}")
    if out.get("local_url"):
        lines.append(f"local API: {out['local_url']}")
    problem = problems.describe(str(out.get("last_error") or ""),
                                relay_url=str(out.get("relay_url") or ""))
    if problem is not None and out.get("link") != "connected":
        lines.append(f"problem: {problem.text()}")
        lines.append(f"last error: {out['last_error']}")
    if out.get("running"):
        last = out.get("last_event_at")
        lines.append(f"last event: {_local_iso(str(last)) if last else 'none since start'}")
    inbox = out.get("inbox")
    if isinstance(inbox, Mapping):
        lines.append(f"inbox: {inbox.get('events')} events, last cursor "
                     f"{inbox.get('last_cursor')}, last seq {inbox.get('last_seq')}")
    lines += _backlog_lines(out)
    return "\n".join(lines)
