"""Ingress abuse (issue 6): oversized and compressed bodies, slow clients, key guesses, logs.

Every test runs the real public app with the production runner options
(``relay_server.app.server_options``) on a real 127.0.0.1 socket; raw sockets play the
abusive clients, so nothing in aiohttp's client smooths their behaviour over.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.config import LimitsConfig
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public
from tests.helpers.timing import MS

MAX_BODY = 4096
WAIT = 5000 * MS


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[PublicRelay]:
    limits = LimitsConfig(header_timeout=300 * MS, body_timeout=300 * MS)
    async with serve_public(relay_config(tmp_path, max_body_size=MAX_BODY, limits=limits)) as r:
        yield r


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers, body)."""
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True once the server closed the connection (EOF or reset), reading what is left."""
    try:
        async with asyncio.timeout(WAIT):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass
    return True


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["error"]["code"]
    return code


async def test_content_length_over_the_limit_is_413_before_any_body(relay: PublicRelay) -> None:
    """A Content-Length past max_body_size is refused at once, with no body byte sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(
        f"POST {relay.ingress_path}/sms HTTP/1.1\r\nHost: relay\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {MAX_BODY * 1000}\r\n\r\n".encode()
    )
    status, _, body = await read_response(reader)
    writer.close()
    assert (status, error_code(body)) == (413, "body_too_large")
    assert await relay.event_ids() == []


async def test_chunked_body_over_the_limit_is_413_before_it_ends(relay: PublicRelay) -> None:
    """A chunked body is refused as soon as it crosses the limit; the client never had to
    finish it (no terminating chunk is ever sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(
        f"POST {relay.ingress_path}/sms HTTP/1.1\r\nHost: relay\r\n"
        "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"x" * 1024
    for _ in range(MAX_BODY // len(chunk) + 1):
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()
    status, _, body = await read_response(reader)
    writer.close()
    assert (status, error_code(body)) == (413, "body_too_large")
    assert await relay.event_ids() == []


@pytest.mark.parametrize("size", [MAX_BODY, MAX_BODY + 1])
async def test_whole_chunked_body_is_kept_or_refused_by_its_size(
    relay: PublicRelay, size: int
) -> None:
    """A chunked body that arrives complete with its head (no deadline is armed for it) is
    stored byte-exact up to the limit and refused with 413 one byte past it."""
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                      for part in (body[:1000], body[1000:]))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(
        f"POST {relay.ingress_path}/sms HTTP/1.1\r\nHost: relay\r\n"
        "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        .encode() + chunks + b"0\r\n\r\n"
    )
    status, _, answer = await read_response(reader)
    writer.close()
    stored = await relay.services.store.read_events(relay.account_id, after=0, limit=10)
    if size <= MAX_BODY:
        assert status == 200
        assert [s.event.request.body for s in stored] == [body]
    else:
        assert (status, error_code(answer)) == (413, "body_too_large")
        assert stored == []


def _bombs() -> dict[str, bytes]:
    inflated = b"0" * (64 * MAX_BODY)  # 64 times the limit, a few hundred bytes compressed
    return {
        "gzip": gzip.compress(inflated),
        "deflate": zlib.compress(inflated),
        "br": b"\x1b\xff\xff\x0f" + inflated[:64],  # never decoded: refused on its header
        "zstd": b"\x28\xb5\x2f\xfd" + inflated[:64],
    }


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, identity"])
async def test_compressed_bodies_are_refused_with_415(relay: PublicRelay, encoding: str) -> None:
    """Any Content-Encoding is 415 unsupported_encoding: nothing is inflated or stored."""
    bomb = _bombs()[encoding.split(",")[0]]
    assert len(bomb) < MAX_BODY
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.post(
            relay.base + relay.ingress_path + "/sms",
            data=bomb,
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 415
            assert (await resp.json())["error"]["code"] == "unsupported_encoding"
    assert await relay.event_ids() == []


async def test_identity_encoding_is_accepted(relay: PublicRelay) -> None:
    """``Content-Encoding: identity`` is the plain body and goes through."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            relay.base + relay.ingress_path + "/sms",
            data=b"from=1&text=hi",
            headers={
                "Content-Encoding": "identity",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        ) as resp:
            assert resp.status == 200
    assert len(await relay.event_ids()) == 1


async def _normal_requests(relay: PublicRelay, count: int) -> list[int]:
    async with aiohttp.ClientSession() as http:
        statuses = []
        for n in range(count):
            async with http.get(f"{relay.base}{relay.ingress_path}/sms?n={n}") as resp:
                statuses.append(resp.status)
        return statuses


async def _dribble(
    writer: asyncio.StreamWriter, data: bytes, step: float, answered: asyncio.Task[Any]
) -> int:
    """Send ``data`` one byte per ``step`` until ``answered`` is done; the bytes sent."""
    for sent in range(len(data)):
        if answered.done():
            return sent
        try:
            writer.write(data[sent : sent + 1])
            await writer.drain()
        except ConnectionError:
            return sent
        await asyncio.wait([answered], timeout=step)
    return len(data)


async def test_slow_header_client_is_closed_while_others_flow(relay: PublicRelay) -> None:
    """A client dribbling its request head is cut at header_timeout; normal requests made
    meanwhile all succeed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    # Long enough to outlast 20 header deadlines at one byte per 15 ms.
    head = f"GET {relay.ingress_path}/sms HTTP/1.1\r\nHost: relay\r\nX-Slow: ".encode()
    head += b"a" * 400
    loop = asyncio.get_running_loop()
    started = loop.time()
    closed: asyncio.Task[object] = asyncio.create_task(closed_by_peer(reader))
    dribbler = asyncio.create_task(_dribble(writer, head, 15 * MS, closed))
    statuses = await _normal_requests(relay, 5)
    sent = await dribbler
    took = loop.time() - started
    writer.close()
    assert statuses == [200] * 5
    assert closed.done() and sent < len(head), "the slow-header client was never cut off"
    print(f"\nslow header: cut after {sent} bytes, {took:.3f} s (header_timeout {300 * MS:g} s)")


async def test_slow_body_client_gets_408_and_is_closed(relay: PublicRelay) -> None:
    """A client dribbling its body gets 408 body_timeout and the connection closes; normal
    requests made meanwhile all succeed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    body = b"a=" + b"b" * 400
    writer.write(
        f"POST {relay.ingress_path}/sms HTTP/1.1\r\nHost: relay\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode()
    )
    answer = asyncio.create_task(read_response(reader))
    dribbler = asyncio.create_task(_dribble(writer, body, 15 * MS, answer))
    statuses = await _normal_requests(relay, 5)
    sent = await dribbler
    status, _, payload = await answer
    assert (status, error_code(payload)) == (408, "body_timeout")
    assert sent < len(body)
    assert await closed_by_peer(reader)
    writer.close()
    assert statuses == [200] * 5
    assert len(await relay.event_ids()) == 5  # the normal ones only
