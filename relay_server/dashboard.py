"""The operator's dashboard at ``/`` on the admin listener (DESIGN §Relay server endpoints).

One server-rendered page, no script, no external asset: agents with their link state and
backlog, ingress error rates, the latest events of each account (type and time only, never
params or bodies) and the latest CTOX command results. It reloads itself every
:data:`REFRESH` seconds.

The admin token must never sit in a reusable URL (browser history, shell scrollback), so the
page uses the agent page's scheme (relay_agent/page.py): ``xon-relay-server dashboard`` asks
for a one-time login code (``POST /v1/dashboard/login-codes`` with the bearer token) and opens
``/dashboard/login?code=…``, which swaps the code for an HttpOnly, SameSite=Strict session
cookie and redirects to ``/``. Codes live :data:`CODE_TTL` seconds and work once; sessions
live :data:`SESSION_TTL`. Both are kept in memory, hashed, and lost on restart.
"""

from __future__ import annotations

import html
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from aiohttp import web

from shared import crypto
from shared.events import format_time

from .admin import DASHBOARD_LOGIN, DASHBOARD_PAGE, AgentState, agent_states
from .metrics import CommandOutcome, IngressRates
from .services import Services, services_key

__all__ = ["install", "DashboardSessions", "COOKIE", "CODE_TTL", "SESSION_TTL", "REFRESH"]

log = logging.getLogger(__name__)

COOKIE = "xon_relay_dashboard"
CODE_TTL = 60.0
SESSION_TTL = 8 * 3600.0
REFRESH = 10
_MAX_ENTRIES = 64
"""Live codes and sessions each; the oldest goes first (a flood of logins cannot grow it)."""
_ACCOUNTS_SHOWN = 20
_EVENTS_PER_ACCOUNT = 10
_COMMANDS_SHOWN = 20
_HEADERS = {
    # No script, no frame, no form, nothing fetched: only the inline style below.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline';"
    " frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


class DashboardSessions:
    """One-time login codes and the sessions they open, stored as hashes.

    Args:
        clock: Unix time.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._codes: OrderedDict[str, float] = OrderedDict()
        self._sessions: OrderedDict[str, float] = OrderedDict()

    def new_code(self) -> str:
        code = crypto.new_token(24)
        self._put(self._codes, code, CODE_TTL)
        return code

    def redeem(self, code: str) -> str | None:
        """Spend ``code``; a new session token, or ``None`` for an unknown, used or expired
        code."""
        expires = self._codes.pop(crypto.hash_secret(code), None) if code else None
        if expires is None or expires <= self._clock():
            return None
        session = crypto.new_token(32)
        self._put(self._sessions, session, SESSION_TTL)
        return session

    def valid(self, session: str) -> bool:
        expires = self._sessions.get(crypto.hash_secret(session)) if session else None
        return expires is not None and expires > self._clock()

    def _put(self, table: OrderedDict[str, float], secret: str, ttl: float) -> None:
        now = self._clock()
        for key in [k for k, expires in table.items() if expires <= now]:
            del table[key]
        while len(table) >= _MAX_ENTRIES:
            table.popitem(last=False)
        table[crypto.hash_secret(secret)] = now + ttl


sessions_key = web.AppKey("dashboard_sessions", DashboardSessions)
routes = web.RouteTableDef()


def install(app: web.Application) -> None:
    """Add the dashboard to the admin app."""
    app[sessions_key] = DashboardSessions()
    app.add_routes(routes)


@routes.post("/v1/dashboard/login-codes")
async def post_login_code(request: web.Request) -> web.Response:
    """A one-time login URL for the dashboard (behind the bearer token)."""
    code = request.app[sessions_key].new_code()
    log.info("dashboard.login_code", extra={"ttl": CODE_TTL})
    url = f"{request.scheme}://{request.host}{DASHBOARD_LOGIN}?code={code}"
    return web.json_response({"url": url, "expires_in": CODE_TTL}, status=201)


@routes.get(DASHBOARD_LOGIN, allow_head=False)  # a HEAD (a link preview) must not spend it
async def get_login(request: web.Request) -> web.Response:
    session = request.app[sessions_key].redeem(request.query.get("code", ""))
    if session is None:
        log.info("dashboard.login_refused")
        return _page(
            "Login failed",
            "<p>This login link is unknown, used or expired. Run"
            " <code>xon-relay-server dashboard</code> for a new one.</p>",
            status=403,
        )
    log.info("dashboard.login")
    # 303 takes the spent code out of the address bar; Strict keeps other sites' links and
    # forms from carrying the cookie.
    response = web.HTTPSeeOther(DASHBOARD_PAGE, headers=_HEADERS)
    response.set_cookie(
        COOKIE, session, path="/", httponly=True, samesite="Strict", max_age=int(SESSION_TTL)
    )
    raise response


@routes.get(DASHBOARD_PAGE)
async def get_dashboard(request: web.Request) -> web.Response:
    if not request.app[sessions_key].valid(request.cookies.get(COOKIE, "")):
        return _page(
            "Login needed",
            "<p>Open the dashboard with <code>xon-relay-server dashboard</code>, which prints"
            " a one-time login link.</p>",
            status=401,
        )
    services = request.app[services_key]
    return _page("X-on relay", await _render(services), refresh=True)


# -- rendering -----------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin-bottom:.6em}
th,td{border-bottom:1px solid #ddd;padding:.25em .7em;text-align:left;white-space:nowrap}
th{background:#f3f3f3}.num{text-align:right}.muted{color:#777}
.online{color:#0a0}.offline{color:#a60}.revoked,.bad{color:#c00}.pending{color:#777}
.tiles{display:flex;gap:1em;flex-wrap:wrap}
.tile{border:1px solid #ddd;border-radius:6px;padding:.5em 1em;min-width:9em}
.tile b{display:block;font-size:1.5em}
"""


def _page(title: str, body: str, *, status: int = 200, refresh: bool = False) -> web.Response:
    meta = f'<meta http-equiv="refresh" content="{REFRESH}">' if refresh else ""
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return web.Response(text=text, content_type="text/html", status=status, headers=_HEADERS)


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], *, empty: str) -> str:
    """A table of already-escaped cells; ``empty`` when there is no row."""
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{body}</table>"


def _time(ts: float | None) -> str:
    return "-" if ts is None else format_time(ts)


async def _render(services: Services) -> str:
    states = await agent_states(services)
    accounts = await services.store.list_accounts()
    names = {account.id: account.name for account in accounts}
    metrics = services.hub.metrics
    online = sum(1 for state in states if state.state == "online")
    backlog = sum(state.backlog for state in states)
    parts = [
        "<h1>X-on relay</h1>",
        f'<p class="muted">relay {_e(services.relay_id)} · instance'
        f" {_e(services.hub.instance_id)} · {_e(format_time(time.time()))}"
        f" · refreshes every {REFRESH} s</p>",
        '<div class="tiles">',
        _tile("Agents online", f"{online} / {len(states)}"),
        _tile("Backlog (events)", str(backlog)),
        _tile("Accounts", str(len(accounts))),
        "</div>",
        "<h2>Ingress</h2>",
        _ingress([metrics.ingress_rates(5), metrics.ingress_rates(60)]),
        "<h2>Agents</h2>",
        _agents(states, names),
        "<h2>Recent events</h2>",
    ]
    for account in accounts[:_ACCOUNTS_SHOWN]:
        recent = await services.store.recent_events(account.id, limit=_EVENTS_PER_ACCOUNT)
        rows = [
            [
                f"<td>{_e(s.event.received_at)}</td>",
                f"<td>{_e(s.event.type)}</td>",
                f'<td class="num">{s.seq}</td>',
                f"<td>{_e(s.event.id)}</td>",
            ]
            for s in recent
        ]
        parts.append(f"<h3>{_e(account.name)} <span class='muted'>{_e(account.id)}</span></h3>")
        parts.append(await _usage(services, account.id, account.name))
        parts.append(_table(["received", "type", "seq", "id"], rows, empty="no events"))
    if len(accounts) > _ACCOUNTS_SHOWN:
        parts.append(f'<p class="muted">{len(accounts) - _ACCOUNTS_SHOWN} more accounts</p>')
    parts += ["<h2>Recent command results</h2>", _commands(metrics.recent_commands, names)]
    return "".join(parts)


async def _usage(services: Services, account_id: str, name: str) -> str:
    """Stored events and bytes against the account's quota (docs/redis.md, Quotas)."""
    usage = await services.store.account_usage(account_id)
    quota = services.config.quota.for_account(account_id, name)
    share = "no quota" if quota is None else (
        f"{usage.bytes * 100 // quota}% of its quota of {quota} bytes")
    return (f'<p class="muted quota">stored: {usage.events} events, {usage.bytes} bytes'
            f" ({_e(share)})</p>")


def _tile(label: str, value: str) -> str:
    return f'<div class="tile">{_e(label)}<b>{_e(value)}</b></div>'


def _ingress(windows: list[IngressRates]) -> str:
    rows = [
        [
            f"<td>last {w.minutes} min</td>",
            f'<td class="num">{w.total}</td>',
            f'<td class="num">{w.client_errors}</td>',
            f'<td class="num">{w.server_errors}</td>',
            f'<td class="num{" bad" if w.error_rate > 0.05 else ""}">{w.error_rate:.1%}</td>',
        ]
        for w in windows
    ]
    return _table(["window", "requests", "4xx", "5xx", "error rate"], rows, empty="")


def _agents(states: list[AgentState], names: dict[str, str]) -> str:
    rows = [
        [
            f"<td>{_e(s.record.name)}</td>",
            f"<td>{_e(s.record.id)}</td>",
            f"<td>{_e(names.get(s.record.account_id, s.record.account_id))}</td>",
            f'<td class="{s.state}">{s.state}</td>',
            f"<td>{_e(_time(s.record.last_seen))}</td>",
            f'<td class="num">{s.cursor}</td>',
            f'<td class="num">{s.backlog}</td>',
        ]
        for s in states
    ]
    headers = ["name", "id", "account", "state", "last seen", "cursor", "backlog"]
    return _table(headers, rows, empty="no agents")


def _commands(outcomes: Iterable[CommandOutcome], names: dict[str, str]) -> str:
    recent = list(outcomes)[-_COMMANDS_SHOWN:]
    rows = [
        [
            f"<td>{_e(format_time(c.at))}</td>",
            f"<td>{_e(names.get(c.account_id, c.account_id))}</td>",
            f"<td>{_e(c.ctox_type)}</td>",
            f"<td>{_e(c.request_id)}</td>",
            f'<td class="num{" bad" if c.status >= 400 else ""}">{c.status}</td>',
            f"<td>{_e(c.error or '-')}</td>",
            f'<td class="num">{c.seconds * 1000:.0f} ms</td>',
        ]
        for c in reversed(recent)
    ]
    headers = ["time", "account", "type", "request id", "status", "error", "latency"]
    return _table(headers, rows, empty="no commands since this instance started")
