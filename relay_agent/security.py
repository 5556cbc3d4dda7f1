"""Who may talk to the agent's local API (DESIGN §Agent local API; issue 4, Localhost API
security).

Threat: a web page the person at the PC visits. It can make the browser send requests to
127.0.0.1, but it cannot read the local token. Layers, each enough on its own for its attack:

1. ``Host`` must name this listener: ``localhost`` or an IP literal that is loopback (or the
   listening socket's own address), *and* the port the connection arrived on. A DNS-rebinding
   page (``evil.example`` re-pointed at 127.0.0.1) sends ``Host: evil.example:PORT``.
2. A present ``Origin`` must be this listener's own origin (``http://`` + Host); ``Origin:
   null`` (sandboxed frames, file pages) is refused, and so is ``Sec-Fetch-Site: cross-site``.
   Such requests are refused before authentication, so a cross-site POST has no effect even
   with a cookie a browser might attach.
3. Credentials: the bearer token (re-read from its file when rotated, :mod:`.tokens`), or, for
   the status page's own GET routes only, a session cookie made by a one-time login code
   (:class:`Sessions`). The cookie is a separate secret: it grants reading the page's data,
   never events' bodies or CTOX, and it dies when the token is rotated.
4. No CORS headers, ever: any ``Access-Control-*`` header is stripped from every response.

Long-polls and streams hold a :func:`waiter_slot`: at most ``max_waiters`` per credential wait
at once, so one misbehaving app cannot pile up unbounded waiters (429 ``too_many_waiters``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from shared.config import parse_hostport
from shared.crypto import constant_time_equal, hash_secret
from shared.errors import ApiError, ConfigError, Unauthorized

from .enroll import is_loopback_host
from .tokens import StaticToken, TokenSource

__all__ = [
    "install",
    "check_listen",
    "own_host",
    "waiter_slot",
    "TooManyWaiters",
    "Sessions",
    "LocalAuth",
    "auth_key",
    "cookie_name",
    "COOKIE_PREFIX",
    "RETRY_AFTER",
]

log = logging.getLogger(__name__)

COOKIE_PREFIX = "xon_relay_session_"
"""Cookies are not scoped by port: the name carries the port so that two agents on one PC do
not overwrite each other's session."""
RETRY_AFTER = 1
"""Seconds a refused waiter is told to wait: a slot frees as soon as any long-poll answers."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def check_listen(listen: str, *, allow_non_loopback: bool) -> tuple[str, int]:
    """Parse the local API address and refuse a non-loopback one unless explicitly allowed.

    DESIGN principle 3: nothing listens on the office PC except on loopback.

    Returns:
        (host, port), as :func:`shared.config.parse_hostport`.

    Raises:
        ConfigError: not HOST:PORT, or not loopback without ``allow_non_loopback``.
    """
    host, port = parse_hostport(listen, what="listen")
    if not allow_non_loopback and not is_loopback_host(host):
        raise ConfigError(
            f"listen must be a loopback address, got {listen!r} (set allow_non_loopback = true, "
            "or pass --allow-non-loopback, to expose the local API to other machines)"
        )
    return host, port


def _split_host(host: str) -> tuple[str, int] | None:
    """``Host`` header → (lower-case name, port); None if malformed. No port means 80."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[1:end], host[end + 1:]
    else:
        name, sep, port = host.partition(":")
        rest = sep + port
        if ":" in port:
            return None
    if rest == "":
        return name.lower(), 80
    if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
        return None
    return name.lower(), int(rest[1:])


def own_host(host: str, sockname: tuple[str, int] | None) -> bool:
    """True when ``host`` (a Host header) names the socket that accepted the request.

    Only ``localhost`` and IP literals pass: an IP literal cannot be rebound by DNS, and a
    loopback one, or the listener's own address (``allow_non_loopback``), is this machine.
    """
    parsed = _split_host(host)
    if parsed is None or sockname is None:
        return False
    name, port = parsed
    if port != sockname[1]:
        return False
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if host.startswith("[") != (address.version == 6):
        return False
    return address.is_loopback or address == ipaddress.ip_address(sockname[0].split("%")[0])


class TooManyWaiters(ApiError):
    """Too many long-polls or streams wait at once for one credential (429)."""

    def __init__(self, limit: int) -> None:
        super().__init__(429, "too_many_waiters",
                         f"at most {limit} long-polls and streams may wait at once; retry later")
        self.retry_after = RETRY_AFTER


@dataclass(slots=True)
class _Session:
    token_hash: str
    expires: float


@dataclass(slots=True)
class Sessions:
    """One-time login codes and the page sessions they open, in memory only.

    A code is single-use and short-lived because it travels in a URL (a browser's history, a
    terminal's scrollback); the session cookie it turns into never does. Both are bound to the
    token that made them (its hash), so rotating the token ends them. Only hashes are kept.
    """

    code_ttl: float = 60.0
    session_ttl: float = 12 * 3600.0
    max_codes: int = 16
    max_sessions: int = 32
    clock: Callable[[], float] = time.monotonic
    _codes: dict[str, _Session] = field(default_factory=dict)
    _sessions: dict[str, _Session] = field(default_factory=dict)

    def new_code(self, token: str) -> str:
        """A fresh login code for the holder of ``token``."""
        code = secrets.token_urlsafe(32)
        self._put(self._codes, code, token, self.code_ttl, self.max_codes)
        return code

    def redeem(self, code: str, token: str) -> str | None:
        """Consume ``code`` (valid or not, it is gone); a new session id, or None."""
        entry = self._codes.pop(hash_secret(code), None)
        if entry is None or not self._live(entry, token):
            return None
        session = secrets.token_urlsafe(32)
        self._put(self._sessions, session, token, self.session_ttl, self.max_sessions)
        return session

    def check(self, session: str, token: str) -> bool:
        entry = self._sessions.get(hash_secret(session))
        return entry is not None and self._live(entry, token)

    def _live(self, entry: _Session, token: str) -> bool:
        return entry.expires > self.clock() and constant_time_equal(
            entry.token_hash, hash_secret(token))

    def _put(self, table: dict[str, _Session], secret: str, token: str, ttl: float,
             limit: int) -> None:
        now = self.clock()
        for key in [k for k, v in table.items() if v.expires <= now]:
            del table[key]
        while len(table) >= limit:
            del table[next(iter(table))]  # the oldest: dicts keep insertion order
        table[hash_secret(secret)] = _Session(hash_secret(token), now + ttl)


@dataclass(slots=True)
class LocalAuth:
    """The app's credentials and waiter counts (one per local app)."""

    token: TokenSource
    sessions: Sessions
    max_waiters: int
    cookie_paths: set[str] = field(default_factory=set)
    """GET paths a session cookie may read (the status page and its fetches)."""
    public_paths: set[str] = field(default_factory=set)
    """Paths that need no credential (``/login``: its code is the credential)."""
    login_pages: dict[str, str] = field(default_factory=dict)
    """GET path → the HTML a browser (``Accept: text/html``) gets there without a credential
    (the status page's login page) instead of the JSON refusal."""
    _waiting: dict[str, int] = field(default_factory=dict)

    @property
    def waiters(self) -> int:
        """Long-polls and streams waiting now, all credentials together."""
        return sum(self._waiting.values())

    def acquire(self, credential: str) -> bool:
        count = self._waiting.get(credential, 0)
        if count >= self.max_waiters:
            return False
        self._waiting[credential] = count + 1
        return True

    def release(self, credential: str) -> None:
        left = self._waiting[credential] - 1
        if left:
            self._waiting[credential] = left
        else:
            del self._waiting[credential]


auth_key = web.AppKey("local_auth", LocalAuth)
_credential_key = web.RequestKey("credential", str)


def cookie_name(request: web.Request) -> str:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else 0
    return f"{COOKIE_PREFIX}{port}"


def _refuse_foreign(request: web.Request) -> None:
    """Layers 1 and 2 of the module docstring."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    host = request.headers.get("Host", "")
    if not own_host(host, sockname):
        raise ApiError(403, "bad_host",
                       "the Host header must be localhost, 127.0.0.1 or [::1] with this port")
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != f"http://{host.lower()}":
        raise ApiError(403, "bad_origin", "requests from other web origins are refused")
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        raise ApiError(403, "cross_site", "cross-site requests are refused")


def _authenticate(request: web.Request, auth: LocalAuth) -> str | None:
    """The credential id (for waiter counts), or None for a public path."""
    token = auth.token.current()
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and constant_time_equal(given.strip(), token):
        return "token:" + hash_secret(token)
    if request.method in ("GET", "HEAD") and request.path in auth.cookie_paths:
        session = request.cookies.get(cookie_name(request), "")
        if session and auth.sessions.check(session, token):
            return "session:" + hash_secret(session)
    if request.path in auth.public_paths:
        return None
    hint = " (to open the status page, run: xon-relay-agent open)" \
        if request.path in auth.cookie_paths else ""
    raise Unauthorized(f"missing or wrong local token (Authorization: Bearer <token>){hint}")


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host, Origin and Sec-Fetch-Site checks, then the credential (module docstring)."""
    _refuse_foreign(request)
    auth = request.app[auth_key]
    try:
        credential = _authenticate(request, auth)
    except Unauthorized:
        # A browser (it asks for HTML) gets the page's login page; an API client the JSON.
        page = auth.login_pages.get(request.path) if request.method in ("GET", "HEAD") \
            and "text/html" in request.headers.get("Accept", "") else None
        if page is None:
            raise
        return _login_page(page)
    if credential is not None:
        request[_credential_key] = credential
    try:
        return await handler(request)
    except TooManyWaiters as exc:
        return web.json_response({"error": {"code": exc.code, "message": str(exc)}},
                                 status=exc.http_status,
                                 headers={"Retry-After": str(exc.retry_after)})


def _login_page(page: str) -> web.Response:
    # A page for a person, without a script or anything else to load: 401 with no data.
    return web.Response(status=401, text=page, content_type="text/html", headers={
        "WWW-Authenticate": "Bearer",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                   "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    })


@contextlib.asynccontextmanager
async def waiter_slot(request: web.Request) -> AsyncIterator[None]:
    """Hold one of the credential's ``max_waiters`` slots while a long-poll or stream waits.

    Use it around the waiting part, before ``StreamResponse.prepare`` for a stream::

        async with waiter_slot(request):
            ...

    Raises:
        TooManyWaiters: every slot is taken (the guard answers 429 with ``Retry-After``).
    """
    auth = request.app[auth_key]
    credential = request.get(_credential_key, "")
    if not auth.acquire(credential):
        log.warning("local_api.too_many_waiters",
                    extra={"path": request.path, "limit": auth.max_waiters})
        raise TooManyWaiters(auth.max_waiters)
    try:
        yield
    finally:
        auth.release(credential)


async def _no_cors(request: web.Request, response: web.StreamResponse) -> None:
    for name in [h for h in response.headers if h.lower().startswith("access-control-")]:
        del response.headers[name]
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Cache-Control", "no-store")


def install(app: web.Application, *, token: TokenSource | str, max_waiters: int) -> None:
    """Guard ``app``: call before its other middlewares run (append after the error one).

    Args:
        token: the token source (:class:`~relay_agent.tokens.TokenFile` picks up rotation),
            or a fixed token.
        max_waiters: long-polls and streams waiting at once per credential.
    """
    source = StaticToken(token) if isinstance(token, str) else token
    app[auth_key] = LocalAuth(token=source, sessions=Sessions(), max_waiters=max_waiters)
    app.middlewares.append(guard_middleware)
    app.on_response_prepare.append(_no_cors)

