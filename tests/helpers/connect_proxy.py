"""ConnectProxy: a small HTTP CONNECT proxy on 127.0.0.1, like a corporate one.

It answers ``CONNECT host:port HTTP/1.1`` with ``200 Connection established`` and then copies
bytes both ways until either side closes. Options:

- ``user``/``password``: authentication; a CONNECT without credentials gets a ``407``
  challenge (``Proxy-Authenticate`` from ``offer``) on a kept-alive connection, wrong
  credentials a final ``407`` that closes it.
- ``scheme``: ``basic`` (the default), ``ntlm`` or ``negotiate`` (SPNEGO; with no Kerberos
  here, NTLM inside it): the proxy side is pyspnego's
  acceptor, which checks the client against the file named by ``NTLM_USER_FILE`` (written
  by :meth:`ConnectProxy.start` from ``user``/``password`` as ``DOMAIN:USER:PASSWORD``, and
  put in the environment only while the acceptor runs). The negotiate, challenge and
  authenticate legs must come on one connection, as real NTLM proxies demand.
- ``offer``: the ``Proxy-Authenticate`` values of a challenge (default: the scheme's own).
- ``hosts``: names the proxy resolves itself (``{"relay.test": "127.0.0.1"}``), so a client
  that got through must have used the proxy: it cannot resolve ``relay.test`` alone.
- ``deny``: target hosts it refuses with ``403`` (a proxy policy).

``connects`` lists every CONNECT target it accepted, ``refused`` every status it answered
instead (a challenge that invites the next leg is counted in ``challenges``, not there),
``users`` who authenticated. Every connection ends when the proxy does:
:meth:`ConnectProxy.close` aborts them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import spnego

__all__ = ["ConnectProxy"]

_CHUNK = 65536
_MAX_HEAD = 16384
_MAX_REQUESTS = 8
DOMAIN = "CORP"


@dataclass(eq=False)
class ConnectProxy:
    user: str | None = None
    password: str | None = None
    scheme: str = "basic"
    offer: list[str] | None = None
    hosts: dict[str, str] = field(default_factory=dict)
    deny: set[str] = field(default_factory=set)
    connects: list[str] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    challenges: int = 0
    users: list[str] = field(default_factory=list)
    port: int = 0
    _user_file: Path | None = None
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        """``http://[user:password@]127.0.0.1:port``."""
        auth = f"{self.user}:{self.password}@" if self.user is not None else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    @property
    def bare_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ntlm_url(self) -> str:
        """``http://CORP%5Cuser:password@127.0.0.1:port`` (DOMAIN\\USER, percent-encoded)."""
        return f"http://{DOMAIN}%5C{self.user}:{self.password}@127.0.0.1:{self.port}"

    async def start(self) -> ConnectProxy:
        if self.scheme in ("ntlm", "negotiate"):
            handle, name = tempfile.mkstemp(prefix="ntlm-users-", text=True)
            with os.fdopen(handle, "w") as file:
                file.write(f"{DOMAIN}:{self.user}:{self.password}\n")
            self._user_file = Path(name)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            # The aborts end every handler (their reads see the end of the stream); cancelling
            # one still in a read makes Python 3.11's stream callback log the cancellation.
            _, pending = await asyncio.wait(set(self._tasks), timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._user_file is not None:
            self._user_file.unlink(missing_ok=True)

    async def __aenter__(self) -> ConnectProxy:
        return await self.start()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _challenge_values(self) -> list[str]:
        if self.offer is not None:
            return self.offer
        return {"ntlm": ["NTLM"], "negotiate": ["Negotiate"]}.get(self.scheme,
                                                                   ['Basic realm="test"'])

    @contextlib.contextmanager
    def _user_file_env(self) -> Iterator[None]:
        # pyspnego's acceptor reads NTLM_USER_FILE; only while it runs, so that an agent in
        # this process does not find credentials there.
        saved = os.environ.get("NTLM_USER_FILE")
        os.environ["NTLM_USER_FILE"] = str(self._user_file)
        try:
            yield
        finally:
            if saved is None:
                del os.environ["NTLM_USER_FILE"]
            else:
                os.environ["NTLM_USER_FILE"] = saved

    def _check(self, headers: dict[str, str], state: dict[str, spnego.ContextProxy]
               ) -> tuple[bool, str | None]:
        """Whether the request may pass, or the challenge to answer (None: a final 407)."""
        if self.user is None:
            return True, None
        given = headers.get("proxy-authorization", "")
        scheme, _, value = given.partition(" ")
        if not given:
            return False, ""
        if self.scheme == "basic" and scheme.lower() == "basic":
            expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            if value == expected:
                self.users.append(self.user)
                return True, None
            return False, None
        if self.scheme in ("ntlm", "negotiate") and scheme.lower() == self.scheme:
            try:
                token = base64.b64decode(value, validate=True)
                with self._user_file_env():
                    if "context" not in state:
                        state["context"] = spnego.server(protocol=self.scheme)
                    answer = state["context"].step(token)
            except (ValueError, spnego.exceptions.SpnegoError):
                return False, None
            if state["context"].complete:
                self.users.append(str(state["context"].client_principal))
                return True, None
            return False, f"{scheme} " + base64.b64encode(answer or b"").decode()
        return False, None

    async def _answer(self, writer: asyncio.StreamWriter, status: int, reason: str,
                      extra: str = "", *, final: bool = True) -> None:
        if final:
            self.refused.append(status)
        else:
            self.challenges += 1
        body = b"<html>proxy authentication required</html>" if not final else b""
        closing = "Connection: close\r\n" if final else ""
        writer.write(f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: {len(body)}\r\n"
                     f"{closing}\r\n".encode() + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        state: dict[str, spnego.ContextProxy] = {}
        try:
            for _ in range(_MAX_REQUESTS):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ConnectionError):
                    return
                if len(head) > _MAX_HEAD:
                    await self._answer(writer, 431, "Request Header Fields Too Large")
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                method, _, rest = request_line.partition(" ")
                target = rest.partition(" ")[0]
                if method != "CONNECT":
                    await self._answer(writer, 405, "Method Not Allowed")
                    return
                passed, challenge = self._check(headers, state)
                if passed:
                    break
                if challenge is None:
                    await self._answer(writer, 407, "Proxy Authentication Required",
                                       "".join(f"Proxy-Authenticate: {v}\r\n"
                                               for v in self._challenge_values()))
                    return
                values = [challenge] if challenge else self._challenge_values()
                await self._answer(writer, 407, "Proxy Authentication Required",
                                   "".join(f"Proxy-Authenticate: {v}\r\n" for v in values),
                                   final=False)
            else:
                return
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            if host in self.deny:
                await self._answer(writer, 403, "Forbidden")
                return
            try:
                up_reader, upstream = await asyncio.open_connection(
                    self.hosts.get(host, host), int(port))
            except (OSError, ValueError):
                await self._answer(writer, 502, "Bad Gateway")
                return
            self._writers.add(upstream)
            self.connects.append(target)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()
