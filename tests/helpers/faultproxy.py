"""FaultProxy: a small asyncio TCP proxy on 127.0.0.1 that can misbehave like a network.

Put it between an agent and the relay (the agent's ``relay_url`` names the proxy's port) and
switch its behaviour while traffic flows (issue 6, network scenarios):

- **pass** (the default): bytes go through unchanged.
- **black-hole** (:meth:`FaultProxy.blackhole`): nothing is forwarded any more, in either
  direction, on existing and new connections, and no FIN or RST is sent either: what each side
  writes is held, as a dead route or a sleeping NAT would. Each side must notice the silence by
  itself (pings). :meth:`FaultProxy.pass_through` releases what was held, as TCP retransmission
  would after the route comes back.
- **reset** (:meth:`FaultProxy.reset`): every open connection is aborted with an RST to both
  sides (``SO_LINGER`` 0).
- **delay** (``proxy.delay = seconds``): each chunk waits that long before it is forwarded.
- **throttle** (``proxy.throttle = bytes_per_second``): forwarding is paced to that rate.

Every loop here ends when its connection does; :meth:`FaultProxy.close` aborts them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

__all__ = ["FaultProxy"]

_CHUNK = 65536


@dataclass(eq=False, slots=True)
class _Pair:
    """One proxied connection: the client's socket and ours to the target."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self, *, rst: bool) -> None:
        for writer in (self.client, self.upstream):
            sock = writer.get_extra_info("socket")
            if rst and sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``target_host``:``target_port``, with faults on demand.

    Use as ``async with FaultProxy(host, port) as proxy: ...``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay = 0.0
        """Seconds each chunk waits before it is forwarded."""
        self.throttle: int | None = None
        """Bytes per second forwarded per direction and connection; ``None``: no limit."""
        self.accepted = 0
        """Connections accepted so far (each agent reconnect is one)."""
        self.resets = 0
        self._passing = asyncio.Event()
        self._passing.set()
        self._pairs: set[_Pair] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._pairs)

    @property
    def blackholed(self) -> bool:
        return not self._passing.is_set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._passing.set()
        for pair in list(self._pairs):
            pair.abort(rst=False)
        tasks = [task for pair in self._pairs for task in pair.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pairs.clear()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- faults -------------------------------------------------------------------------------

    def blackhole(self) -> None:
        """Stop forwarding everything, silently (no FIN, no RST), until :meth:`pass_through`."""
        self._passing.clear()

    def pass_through(self) -> None:
        """Forward again, held bytes first."""
        self._passing.set()

    def reset(self) -> int:
        """Abort every open connection with an RST to both sides; how many there were."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort(rst=True)
        self.resets += len(pairs)
        return len(pairs)

    # -- forwarding ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        # A black hole also swallows connection attempts: hold the client until it passes.
        await self._passing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            writer.transport.abort()
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        pair.tasks = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        try:
            await asyncio.gather(*pair.tasks, return_exceptions=True)
        finally:
            self._pairs.discard(pair)
            pair.abort(rst=False)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                data = await reader.read(_CHUNK)
            except ConnectionError:
                data = b""
            # Held here while black-holed: neither the data nor an EOF goes on.
            await self._passing.wait()
            if not data:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            if self.delay:
                await asyncio.sleep(self.delay)
            try:
                await self._write(writer, data)
            except ConnectionError:
                return

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        rate = self.throttle
        if rate is None:
            writer.write(data)
            await writer.drain()
            return
        # Slices of a tenth of a second's worth keep the pace smooth.
        step = max(1, rate // 10)
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(len(piece) / rate)
