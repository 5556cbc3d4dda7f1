"""HTTP CONNECT tunnels to the relay through a proxy that may want authentication.

The CONNECT exchange (RFC 9110 §9.3.6) is a small sans-I/O state machine,
:class:`Handshake`: it writes requests, reads the proxy's answers and, on ``407``, answers the
challenge with :mod:`.proxyauth` (Negotiate, NTLM or Basic) until the proxy opens the tunnel,
refuses it, or rejects the credentials. NTLM's legs must share one connection, so a ``407``
body is read to its end and the connection kept when the proxy allows it; when it does not, the
next leg goes on a fresh connection (the handshake says so). Two thin drivers run it:
:func:`open_tunnel` (asyncio, for the link and enrollment) and :func:`open_tunnel_sync`
(blocking, for ``doctor``). Both hand back the raw socket with the tunnel open: TLS to the relay
goes on top of it (websockets' ``sock=``, aiohttp through :class:`relay_agent.net`'s
connector).

Bounds: a response head of at most 16 KiB, a ``407`` body of at most 64 KiB (a longer one is
not read, and the next leg takes a new connection), at most four requests per tunnel.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.errors import UpstreamError

from .proxyauth import (
    Authenticator,
    AuthUnavailable,
    Challenge,
    ProxyCredentials,
    choose_scheme,
    explain_407,
    parse_challenges,
)

__all__ = [
    "ProxyEndpoint",
    "ProxyError",
    "ProxyRefused",
    "ProxyAnswerInvalid",
    "ProxyUnreachable",
    "ProxyTimeout",
    "Handshake",
    "Send",
    "ESTABLISHED",
    "open_tunnel",
    "open_tunnel_sync",
    "MAX_HEAD",
    "MAX_BODY",
    "MAX_REQUESTS",
]

MAX_HEAD = 16384
MAX_BODY = 65536
MAX_REQUESTS = 4
_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class ProxyEndpoint:
    """A CONNECT proxy: where it is, its credentials, and how to name it in messages."""

    host: str
    port: int
    credentials: ProxyCredentials | None
    shown: str
    """The proxy URL without its password."""


class ProxyError(UpstreamError, ConnectionError):
    """The proxy did not open the tunnel. A ``ConnectionError`` too, so that callers that
    retry failed connections (the link) treat it as one."""


class ProxyRefused(ProxyError):
    """The proxy answered the CONNECT with a status other than 2xx; the message explains it."""

    def __init__(self, message: str, *, status: int, reason: str,
                 offered: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.offered = offered


class ProxyUnreachable(ProxyError):
    """No connection to the proxy could be made."""


class ProxyTimeout(ProxyError, TimeoutError):
    """No tunnel within the time allowed."""


class ProxyAnswerInvalid(ProxyError):
    """The proxy's answer is not HTTP, or it closed the connection before answering."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data``; on a fresh connection to the proxy first when ``reconnect``."""

    data: bytes
    reconnect: bool


class _Established:
    def __repr__(self) -> str:
        return "ESTABLISHED"


ESTABLISHED = _Established()
"""The tunnel is open: what is sent next reaches the relay."""

Step = Send | _Established


@dataclass(slots=True)
class _Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    keep_alive: bool

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


@dataclass(slots=True)
class _Reader:
    """Collects one response: its head, then (for a refusal) its body, which is discarded."""

    buffer: bytearray = field(default_factory=bytearray)
    head: _Response | None = None
    remaining: int | None = None
    """Body bytes still to read (Content-Length), or None."""
    chunked: bool = False
    body_seen: int = 0

    def feed(self, data: bytes, shown: str, target: str) -> _Response | None:
        if not data:
            if self.head is not None and not self.head.keep_alive:
                return self.head  # a close-delimited body ends here
            raise ProxyAnswerInvalid(f"the proxy {shown} closed the connection without "
                                     f"answering CONNECT {target}")
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise ProxyAnswerInvalid(f"the proxy {shown} sent an answer head over "
                                             f"{MAX_HEAD} bytes to CONNECT {target}")
                return None
            self.head = _parse_head(bytes(self.buffer[:end]), shown, target)
            del self.buffer[:end + 4]
            if 200 <= self.head.status < 300:
                return self.head  # no body: the tunnel starts here (RFC 9110 §9.3.6)
            self._framing()
        return self._body()

    def _framing(self) -> None:
        assert self.head is not None
        encoding = ",".join(self.head.get_all("transfer-encoding")).lower()
        lengths = self.head.get_all("content-length")
        if "chunked" in encoding:
            self.chunked = True
        elif lengths and lengths[0].strip().isdigit():
            self.remaining = int(lengths[0].strip())
        else:
            self.head.keep_alive = False  # delimited by close: unusable for another request
        if self.remaining is not None and self.remaining > MAX_BODY:
            self.head.keep_alive = False

    def _body(self) -> _Response | None:
        assert self.head is not None
        if not self.head.keep_alive:
            return self.head  # nothing more is read from this connection
        if self.remaining is not None:
            taken = min(self.remaining, len(self.buffer))
            del self.buffer[:taken]
            self.remaining -= taken
            return self.head if self.remaining == 0 else None
        # Chunked: size lines, data, and a last empty chunk with optional trailers.
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return self._check_body_size()
            line = bytes(self.buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                self.head.keep_alive = False
                return self.head
            if size == 0:
                trailers_end = self.buffer.find(b"\r\n\r\n", line_end)
                if self.buffer[line_end:line_end + 4] == b"\r\n\r\n" or trailers_end >= 0:
                    return self.head
                return self._check_body_size()
            if len(self.buffer) < line_end + 2 + size + 2:
                return self._check_body_size()
            self.body_seen += size
            del self.buffer[:line_end + 2 + size + 2]

    def _check_body_size(self) -> _Response | None:
        assert self.head is not None
        if self.body_seen + len(self.buffer) > MAX_BODY:
            self.head.keep_alive = False
            return self.head
        return None


def _parse_head(raw: bytes, shown: str, target: str) -> _Response:
    lines = raw.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not (
            fields[1].isascii() and fields[1].isdigit() and len(fields[1]) == 3):
        raise ProxyAnswerInvalid(f"the proxy {shown} sent no valid answer to CONNECT {target}: "
                                 "is it an HTTP proxy?")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    tokens = {t.strip().lower() for key, value in headers
              if key in ("connection", "proxy-connection") for t in value.split(",")}
    keep_alive = "close" not in tokens and (fields[0] != "HTTP/1.0" or "keep-alive" in tokens)
    return _Response(int(fields[1]), fields[2] if len(fields) > 2 else "", headers, keep_alive)


class Handshake:
    """The CONNECT exchange for one tunnel, without I/O (module docstring).

    Use: send :meth:`start`'s bytes; feed what the proxy answers to :meth:`receive_data` until
    it returns a step: :data:`ESTABLISHED`, or :class:`Send` (maybe on a new connection).

    Raises (from :meth:`receive_data`):
        ProxyRefused: a non-2xx answer, or a 407 the agent cannot or could not satisfy.
        ProxyAnswerInvalid: not an HTTP answer, or the connection closed before one.
    """

    def __init__(self, proxy: ProxyEndpoint, host: str, port: int, *,
                 windows: bool | None = None, kerberos: bool | None = None) -> None:
        self.proxy = proxy
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._windows = windows
        self._kerberos = kerberos
        self._auth: Authenticator | None = None
        self._reader = _Reader()
        self.requests = 0
        self.offered: list[str] = []
        """The schemes the proxy's last 407 offered."""

    def start(self) -> bytes:
        # No credentials up front: a password goes only to a proxy that asks for Basic.
        return self._request(None)

    def _request(self, authorization: str | None) -> bytes:
        self.requests += 1
        head = f"CONNECT {self.target} HTTP/1.1\r\nHost: {self.target}\r\n"
        if authorization is not None:
            head += f"Proxy-Authorization: {authorization}\r\n"
        # Keep-alive is HTTP/1.1's default; the header helps HTTP/1.0-minded proxies keep
        # NTLM's legs on one connection.
        return (head + "Proxy-Connection: keep-alive\r\n\r\n").encode("latin-1")

    def receive_data(self, data: bytes) -> Step | None:
        """Feed bytes from the proxy (``b""``: it closed); the next step once an answer is
        complete, else None."""
        response = self._reader.feed(data, self.proxy.shown, self.target)
        if response is None:
            return None
        if 200 <= response.status < 300:
            if self._reader.buffer:
                raise ProxyAnswerInvalid(f"the proxy {self.proxy.shown} sent data after "
                                         f"opening the tunnel to {self.target}")
            return ESTABLISHED
        self._reader = _Reader()
        answer = f"HTTP {response.status}" + (f" {response.reason}" if response.reason else "")
        if response.status != 407:
            raise ProxyRefused(
                f"the proxy {self.proxy.shown} refused to connect to {self.target} (CONNECT "
                f"answered {answer}): ask the network administrator to allow it, or use another "
                "proxy", status=response.status, reason=response.reason)
        challenges = parse_challenges(response.get_all("proxy-authenticate"))
        self.offered = list(dict.fromkeys(c.scheme for c in challenges))
        return Send(self._answer(challenges, answer, response.reason, response.keep_alive),
                    not response.keep_alive)

    def _refused(self, answer: str, reason: str, *, tried: str | None,
                 problem: str | None = None) -> ProxyRefused:
        message = explain_407(shown_proxy=self.proxy.shown, answer=answer, offered=self.offered,
                              tried=tried, credentials=self.proxy.credentials, problem=problem,
                              windows=self._windows)
        return ProxyRefused(message, status=407, reason=reason, offered=tuple(self.offered))

    def _answer(self, challenges: list[Challenge], answer: str, reason: str,
                keep_alive: bool) -> bytes:
        if self._auth is None:
            scheme = choose_scheme(self.offered, credentials=self.proxy.credentials,
                                   windows=self._windows, kerberos=self._kerberos)
            if scheme is None:
                raise self._refused(answer, reason, tried=None)
            try:
                self._auth = Authenticator(scheme, proxy_host=self.proxy.host,
                                           credentials=self.proxy.credentials)
            except AuthUnavailable as exc:
                raise self._refused(answer, reason, tried=scheme,
                                    problem=str(exc)) from exc
            challenge = None
        else:
            scheme = self._auth.scheme
            challenge = next((c for c in challenges if c.scheme == scheme and c.token), None)
            if challenge is None or scheme == "basic" or self.requests >= MAX_REQUESTS:
                raise self._refused(answer, reason, tried=scheme)  # rejected
            if not keep_alive:
                raise self._refused(
                    answer, reason, tried=scheme,
                    problem=f"the proxy closed the connection in the middle of the "
                            f"{self._auth.name} exchange, which needs one kept-alive connection")
        try:
            return self._request(self._auth.header(challenge))
        except AuthUnavailable as exc:
            raise self._refused(answer, reason, tried=scheme, problem=str(exc)) from exc


# -- drivers -------------------------------------------------------------------------------------


async def _connect(loop: asyncio.AbstractEventLoop, proxy: ProxyEndpoint) -> socket.socket:
    """A connection to the proxy; a failure names it (the proxy may come from a PAC file or
    the Windows settings, which the caller's message would not show)."""
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProxyUnreachable(f"cannot connect to the proxy {proxy.shown}: cannot resolve "
                               f"{proxy.host} ({exc.strerror or exc})") from exc
    error: OSError = OSError(f"cannot resolve {proxy.host}")
    for family, kind, protocol, _, address in infos:
        sock = socket.socket(family, kind, protocol)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise ProxyUnreachable(f"cannot connect to the proxy {proxy.shown}: "
                           f"{error.strerror or error}") from error


async def open_tunnel(proxy: ProxyEndpoint, host: str, port: int, *,
                      timeout: float | None) -> socket.socket:
    """A connected socket through ``proxy`` to ``host:port`` (module docstring).

    Raises:
        ProxyRefused, ProxyAnswerInvalid: as :class:`Handshake`.
        ProxyUnreachable: the proxy cannot be reached.
        ProxyTimeout: no tunnel within ``timeout`` seconds.
    """
    try:
        async with asyncio.timeout(timeout):
            return await _open(proxy, host, port)
    except TimeoutError as exc:
        if isinstance(exc, ProxyError):
            raise
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ProxyTimeout(f"the proxy {proxy.shown} opened no tunnel to {target} within "
                           f"{timeout or 0:g} s") from exc


async def _open(proxy: ProxyEndpoint, host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    handshake = Handshake(proxy, host, port)
    sock = await _connect(loop, proxy)
    try:
        data = handshake.start()
        for _ in range(MAX_REQUESTS):
            await loop.sock_sendall(sock, data)
            step = None
            while step is None:  # bounded: the reader refuses an oversized answer
                step = handshake.receive_data(await loop.sock_recv(sock, _CHUNK))
            if isinstance(step, _Established):
                return sock
            if step.reconnect:
                sock.close()
                sock = await _connect(loop, proxy)
            data = step.data
        raise AssertionError("the handshake ends within MAX_REQUESTS")  # pragma: no cover
    except BaseException:
        sock.close()
        raise


def open_tunnel_sync(connect: Callable[[], socket.socket], proxy: ProxyEndpoint, host: str,
                     port: int) -> socket.socket:
    """:func:`open_tunnel` on blocking sockets; ``connect`` opens a connection to the proxy
    (with its timeout set) and is called again when a leg needs a fresh one."""
    handshake = Handshake(proxy, host, port)
    sock = connect()
    try:
        data = handshake.start()
        for _ in range(MAX_REQUESTS):
            sock.sendall(data)
            step = None
            while step is None:
                step = handshake.receive_data(sock.recv(_CHUNK))
            if isinstance(step, _Established):
                return sock
            if step.reconnect:
                sock.close()
                sock = connect()
            data = step.data
        raise AssertionError("the handshake ends within MAX_REQUESTS")  # pragma: no cover
    except BaseException:
        sock.close()
        raise
