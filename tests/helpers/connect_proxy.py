"""ConnectProxy: a small HTTP CONNECT proxy on 127.0.0.1, like a corporate one (issue 8).

It answers ``CONNECT host:port HTTP/1.1`` with ``200 Connection established`` and then copies
bytes both ways until either side closes. Options:

- ``user``/``password``: basic auth; a CONNECT without the right ``Proxy-Authorization``
  gets ``407`` with ``Proxy-Authenticate: Basic``.
- ``hosts``: names the proxy resolves itself (``{"relay.test": "127.0.0.1"}``), so a client
  that got through must have used the proxy: it cannot resolve ``relay.test`` alone.
- ``deny``: target hosts it refuses with ``403`` (a proxy policy).

``connects`` lists every CONNECT target it accepted, ``refused`` every status it answered
instead. Every connection ends when the proxy does: :meth:`ConnectProxy.close` aborts them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["ConnectProxy"]

_CHUNK = 65536
_MAX_HEAD = 16384


@dataclass(eq=False)
class ConnectProxy:
    user: str | None = None
    password: str | None = None
    hosts: dict[str, str] = field(default_factory=dict)
    deny: set[str] = field(default_factory=set)
    connects: list[str] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    port: int = 0
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

    async def start(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> ConnectProxy:
        return await self.start()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.user is None:
            return True
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return headers.get("proxy-authorization", "") == f"Basic {expected}"

    async def _answer(self, writer: asyncio.StreamWriter, status: int, reason: str,
                      extra: str = "") -> None:
        self.refused.append(status)
        writer.write(f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\n"
                     "Connection: close\r\n\r\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
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
            if not self._authorized(headers):
                await self._answer(writer, 407, "Proxy Authentication Required",
                                   'Proxy-Authenticate: Basic realm="test"\r\n')
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
