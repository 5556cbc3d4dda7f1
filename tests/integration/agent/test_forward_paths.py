"""Forward paths (docs/delivery.md, Forward): an event's path suffix never takes a forwarded
request above the target's path, even for events stored by a relay that let such paths in.

The target is a plain asyncio server on 127.0.0.1 that records each request line exactly as
it came off the wire, so nothing between the agent and the assertion rewrites the path.
"""

from __future__ import annotations

import asyncio
import posixpath
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from shared.config import ForwardTarget
from shared.events import RawRequest
from tests.helpers.timing import MS

from .support import make_event
from .test_consumers import serve_api

WAIT = 5000 * MS


class RawTarget:
    """Records the request target of every request; answers 200 to each."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.port = 0
        self._arrived = asyncio.Condition()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                async with self._arrived:
                    self.targets.append(lines[0].split(" ")[1])
                    self._arrived.notify_all()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait_for(self, count: int) -> list[str]:
        async with asyncio.timeout(WAIT), self._arrived:
            await self._arrived.wait_for(lambda: len(self.targets) >= count)
        return self.targets


@asynccontextmanager
async def serve_raw_target() -> AsyncIterator[RawTarget]:
    target = RawTarget()
    server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    target.port = server.sockets[0].getsockname()[1]
    try:
        yield target
    finally:
        server.close()
        await server.wait_closed()


def _legacy_event(n: int, path: str) -> dict[str, object]:
    """An event as an older relay could have stored it, with ``path`` as its suffix."""
    event = make_event(n)
    event["request"] = RawRequest(
        method="POST", path=path, query="a=%2F", content_type="text/plain", body=b"x"
    ).to_json()
    return event


def _resolved(target: str) -> str:
    """The path a lenient app serves: decoded, backslashes read as slashes, dots resolved."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(target).path).replace("\\", "/")
    return posixpath.normpath(path)


CASES = [
    ("/b/..%2f..%2fadmin", "/hook/admin"),
    ("/b/../../admin", "/hook/admin"),
    ("/%2e%2e/%2E%2E/admin", "/hook/admin"),
    ("/b\\..\\..\\admin", "/hook/admin"),
    ("/b/..;/..;/admin", "/hook/admin"),
    ("/b/%5c..%5c..%5cadmin", "/hook/admin"),
    ("/sms.received", "/hook/sms.received"),
    ("/call%20started", "/hook/call%20started"),
]


@pytest.mark.parametrize(("stored", "sent"), CASES, ids=[c[0] for c in CASES])
async def test_forwarded_path_stays_under_the_target_path(
    tmp_path: Path, stored: str, sent: str
) -> None:
    """A stored suffix that would climb (encoded slashes, dot segments, backslashes, ``..;``)
    reaches the target re-encoded under its path; a plain one arrives byte for byte."""
    async with serve_raw_target() as target:
        url = f"http://127.0.0.1:{target.port}/hook"
        forward = ForwardTarget(url=url, name="app", start="oldest", retry_initial=1 * MS,
                                retry_max=5 * MS)
        async with serve_api(tmp_path, forward=[forward]) as api:
            await api.inbox.commit([(1, _legacy_event(1, stored))])
            [got] = await target.wait_for(1)
    assert got == sent + "?a=%2F"
    resolved = _resolved(got)
    assert resolved == "/hook" or resolved.startswith("/hook/")
