"""Random parameters against the agent's real local API (issue 6, fuzzing): never a 5xx.

The app is ``relay_agent.local_api.create_local_app`` on 127.0.0.1 with a real SQLite inbox
holding a few events, as tests/integration/agent builds it. ``wait`` is clamped to a few
milliseconds by ``AgentConfig.max_wait`` so a valid long-poll ends quickly. The one 5xx the
contract allows is CTOX's immediate 503 ``relay_unreachable`` (no link in this test).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from relay_agent.inbox import Inbox
from relay_agent.link import LinkStatus
from relay_agent.local_api import create_local_app
from shared.config import AgentConfig
from tests.helpers.timing import MS
from tests.integration.agent.support import make_event

from .strategies import json_values, params
from .support import FUZZ, measured, on_loop

TOKEN = "fuzz-local-token"


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[str]:
    inbox = await Inbox.open(tmp_path / "inbox.db")
    await inbox.commit([(n, make_event(n)) for n in range(1, 6)])
    config = AgentConfig(relay_url="https://relay.example", agent_id="agent-1",
                         data_dir=tmp_path, max_wait=20 * MS)
    app = create_local_app(config=config, inbox=inbox, link_status=LinkStatus(), token=TOKEN)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await inbox.close()


def _allowed(path: str, status: int, body: bytes) -> bool:
    if status < 500:
        return True
    if path.startswith("/v1/ctox/") and status == 503:
        return bool(json.loads(body)["error"]["code"] == "relay_unreachable")
    return False


async def test_local_api_parameters_never_get_a_5xx(local: str) -> None:
    """after/limit/wait, consumer names, ack bodies, CTOX params, Last-Event-ID: any value
    gets a 2xx or a clear 4xx."""
    statuses: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        with measured("local API") as counter:

            @FUZZ
            @given(
                endpoint=st.sampled_from(["events", "consumer", "ack", "status", "health",
                                          "ctox", "stream"]),
                query=st.dictionaries(st.sampled_from(["after", "limit", "wait", "cursor"]),
                                      params, max_size=3),
                name=st.text(max_size=12),
                body=json_values,
            )
            def run(endpoint: str, query: dict[str, str], name: str, body: object) -> None:
                counter.examples += 1
                on_loop(loop, example(endpoint, query, name, body))

            async def example(endpoint: str, query: dict[str, str], name: str,
                              body: object) -> None:
                segment = quote(name, safe="") or "x"
                method, path, data, extra = "GET", "/v1/events", None, {}
                match endpoint:
                    case "consumer":
                        path = f"/v1/consumers/{segment}/events"
                    case "ack":
                        method, path = "POST", f"/v1/consumers/{segment}/ack"
                        data = json.dumps(body).encode()
                    case "status" | "health":
                        path = f"/v1/{endpoint}"
                    case "ctox":
                        method, path = "POST", f"/v1/ctox/{segment}"
                        data = json.dumps(body).encode()
                        extra = {"Content-Type": "application/json"}
                    case "stream":
                        path = "/v1/stream"
                        extra = {"Last-Event-ID": "".join(c for c in name if c.isprintable())}
                url = local + path + ("?" + urlencode(query) if query else "")
                async with http.request(method, URL(url, encoded=True),
                                        data=data, headers=extra) as resp:
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    # The stream never ends by itself: its status line is the answer.
                    payload = b"" if endpoint == "stream" else await resp.read()
                    assert _allowed(path, resp.status, payload), (resp.status, path, payload)

            await asyncio.to_thread(run)
    print(f"\nlocal API fuzz statuses: {dict(sorted(statuses.items()))}")
