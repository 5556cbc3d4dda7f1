"""`xon-sim xon-api` runs the fake X-on API as its own process."""

from __future__ import annotations

import asyncio
import socket
import sys

import aiohttp

from tests.helpers.timing import MS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_xon_api_command_answers_like_xon() -> None:
    """The standalone fake X-on API requires the Bearer key and answers click-to-call with 202."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.sim.cli", "xon-api",
        "--listen", f"127.0.0.1:{port}", "--api-key", "k1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10_000 * MS)
        assert f"http://127.0.0.1:{port}" in line.decode()
        url = f"http://127.0.0.1:{port}/api/v1/clicktocall"
        refused = 0
        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # the banner is printed just before the bind
                try:
                    async with http.post(url, data={"destination": "1", "target": "2"}) as r:
                        refused = r.status
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(25 * MS)
            assert refused == 401
            headers = {"Authorization": "Bearer k1"}
            async with http.post(url, data={"destination": "1", "target": "2"},
                                 headers=headers) as r:
                assert r.status == 202
                assert (await r.json())["status"] == "OK"
    finally:
        proc.terminate()
        await proc.wait()
