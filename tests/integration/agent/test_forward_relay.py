"""Forward end to end: the simulator's request → the real relay → the agent's link and inbox →
a local app, which receives the same method, path suffix, query, content type and body bytes
(DESIGN principle 2; docs/delivery.md, Forward)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from relay_agent.delivery import Delivery
from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink
from shared import crypto
from shared.config import AgentConfig, LinkConfig
from shared.sim import ENCODINGS, Encoding, build_request, example_params
from tests.helpers.timing import MS

from .support import eventually, serve_relay
from .test_forward import Target, forward_to, serve_target


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_forward_reissues_the_simulator_request_byte_exact(
    tmp_path: Path, encoding: Encoding
) -> None:
    """Whatever X-on's transport (GET query, form, JSON, envelope, SOAP XML), the local app
    gets X-on's request unchanged."""
    sim = build_request("sms.received", example_params("sms.received", 7), encoding,
                        event_id="xon-7", created_at="2026-01-02T03:04:05Z")
    async with serve_relay(tmp_path / "relay") as relay, serve_target(Target()) as target:
        store = relay.services.store
        ingress_key = crypto.new_token()
        account = await store.create_account(name="routed",
                                             ingress_key_hash=crypto.hash_secret(ingress_key))
        code = crypto.new_token()
        await store.create_agent(account_id=account.id, name="pc",
                                 code_hash=crypto.hash_secret(code),
                                 code_expires_at=time.time() + 3600)
        key = crypto.generate_private_key()
        agent = await store.enroll_agent(code_hash=crypto.hash_secret(code),
                                         public_key=crypto.public_key_b64(key), now=time.time())
        config = AgentConfig(
            relay_url=relay.url, agent_id=agent.id, relay_id=relay.services.relay_id,
            data_dir=tmp_path, backoff_initial=10 * MS, backoff_max=100 * MS,
            link=LinkConfig(auth_timeout=5000 * MS), forward=[forward_to(target)],
        )
        inbox = await Inbox.open(tmp_path / "inbox.db")
        delivery = Delivery(config, inbox)
        link = AgentLink(config, private_key=key, inbox=inbox)
        task = asyncio.create_task(link.run())
        await delivery.start()
        try:
            url = f"{relay.url}/xon/{ingress_key}{sim.path_suffix}"
            if sim.query:
                url += "?" + sim.query
            headers = {"Content-Type": sim.content_type} if sim.content_type else {}
            async with aiohttp.ClientSession() as http:
                async with http.request(
                    sim.method, URL(url, encoded=True), data=sim.body or None, headers=headers,
                    skip_auto_headers=() if sim.content_type else ("Content-Type",),
                ) as response:
                    assert response.status // 100 == 2
            await eventually(lambda: len(target.delivered) == 1, what="the forwarded event")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await delivery.close()
            await inbox.close()
    [got] = target.requests
    assert got.method == sim.method
    expected_path = "/xon" + sim.path_suffix + ("?" + sim.query if sim.query else "")
    assert got.raw_path == expected_path
    assert got.content_type == (sim.content_type or None)
    assert got.body == sim.body
