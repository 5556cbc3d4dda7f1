"""``POST /v1/agent/probe`` (docs/protocol.md, Enrollment probe) on the real public app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay_server.limits import Limits, limits_key
from relay_server.probe import MAX_BODY, SKEW, probe_key
from shared import crypto
from shared.config import LimitsConfig
from tests.helpers.clock import FakeClock
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public

LOCKOUT = 900.0


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[PublicRelay]:
    limits = LimitsConfig(enroll_max_failures=5, enroll_window=600.0, enroll_lockout=LOCKOUT,
                          trusted_proxies=["127.0.0.1"])
    async with serve_public(relay_config(tmp_path, limits=limits)) as running:
        yield running


def signed(relay: PublicRelay, agent_id: str, key: crypto.Ed25519PrivateKey, *,
           at: float | None = None, relay_id: str | None = None) -> dict[str, Any]:
    ts = int((time.time() if at is None else at) * 1000)
    return {"agent_id": agent_id, "timestamp": ts,
            "signature": crypto.sign_probe(key, relay_id or relay.relay_id, agent_id, ts)}


async def post(relay: PublicRelay, body: object, *, source: str = "192.0.2.1",
               raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"X-Forwarded-For": source}
    async with aiohttp.ClientSession() as http:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with http.post(relay.base + "/v1/agent/probe", headers=headers, **kwargs) as resp:
            return resp.status, await resp.json()


def error(answer: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    status, data = answer
    return status, data["error"]["code"] if "error" in data else "ok"


async def test_an_enrolled_agent_passes(relay: PublicRelay) -> None:
    """A fresh probe signed by an enrolled agent's key: 200 with its account and the relay."""
    agent_id, key = await relay.add_agent()
    status, data = await post(relay, signed(relay, agent_id, key))
    assert status == 200
    assert data == {"agent_id": agent_id, "account_id": relay.account_id,
                    "relay_id": relay.relay_id, "status": "active"}


async def test_a_revoked_agent_is_told_so_only_with_a_valid_signature(
    relay: PublicRelay,
) -> None:
    """Revoked: 403 ``revoked`` for its own key, the plain 401 for anyone else's."""
    agent_id, key = await relay.add_agent()
    await relay.services.store.revoke_agent(agent_id, now=time.time())
    assert error(await post(relay, signed(relay, agent_id, key))) == (403, "revoked")
    stranger = crypto.generate_private_key()
    assert error(await post(relay, signed(relay, agent_id, stranger))) == (401, "unauthorized")


async def test_unknown_pending_and_forged_probes_get_one_answer(relay: PublicRelay) -> None:
    """Unknown id, an agent not enrolled yet, another key, another relay's id: the same 401
    body, so a stranger cannot tell which."""
    agent_id, key = await relay.add_agent()
    pending_id, _ = await relay.new_code()
    other = crypto.generate_private_key()
    answers = [
        await post(relay, signed(relay, "agt_nobody", other)),
        await post(relay, signed(relay, pending_id, other)),
        await post(relay, signed(relay, agent_id, other)),
        await post(relay, signed(relay, agent_id, key, relay_id="another-relay")),
    ]
    assert {status for status, _ in answers} == {401}
    assert len({str(data) for _, data in answers}) == 1


async def test_a_link_auth_signature_is_no_probe(relay: PublicRelay) -> None:
    """The link's ``auth`` signature (another domain) does not pass as a probe."""
    agent_id, key = await relay.add_agent()
    ts = int(time.time() * 1000)
    forged = crypto.sign_auth(key, relay.relay_id, agent_id, str(ts))
    answer = await post(relay, {"agent_id": agent_id, "timestamp": ts, "signature": forged})
    assert error(answer) == (401, "unauthorized")


async def test_old_future_and_replayed_probes_are_refused(relay: PublicRelay) -> None:
    """A time beyond the skew either way is 400 ``bad_timestamp`` naming the clock; the same
    probe sent twice is refused the second time."""
    agent_id, key = await relay.add_agent()
    old = await post(relay, signed(relay, agent_id, key, at=time.time() - SKEW - 60))
    assert error(old) == (400, "bad_timestamp")
    assert "behind" in old[1]["error"]["message"] and "clock" in old[1]["error"]["message"]
    ahead = await post(relay, signed(relay, agent_id, key, at=time.time() + SKEW + 60))
    assert error(ahead) == (400, "bad_timestamp") and "ahead" in ahead[1]["error"]["message"]
    body = signed(relay, agent_id, key)
    assert error(await post(relay, body)) == (200, "ok")
    assert error(await post(relay, body)) == (401, "unauthorized")
    assert error(await post(relay, signed(relay, agent_id, key, at=time.time() + 0.5))) == (
        200, "ok")


@pytest.mark.parametrize("body", [
    [], {"agent_id": "a", "timestamp": True, "signature": "s"},
    {"agent_id": "a", "timestamp": 1.5, "signature": "s"},
    {"agent_id": "", "timestamp": 1, "signature": "s"},
    {"agent_id": "a" * 129, "timestamp": 1, "signature": "s"},
    {"agent_id": "a", "timestamp": 1},
])
async def test_malformed_probes_are_400(relay: PublicRelay, body: object) -> None:
    """Wrong types, empty or overlong fields: 400 ``bad_request``."""
    assert error(await post(relay, body)) == (400, "bad_request")


async def test_an_oversized_body_is_413(relay: PublicRelay) -> None:
    """More than MAX_BODY bytes: 413 before any parsing."""
    answer = await post(relay, None, raw=b"{" + b" " * MAX_BODY + b"}")
    assert error(answer) == (413, "body_too_large")


async def test_refused_probes_lock_their_source_out_only(relay: PublicRelay) -> None:
    """Five refused probes from a source: 429 even for a valid one; another source's agent and
    the account's ingress keep working; the lockout ends after its time."""
    clock = FakeClock(1000.0)
    limits = relay.app[limits_key].config
    relay.app[probe_key].lockout = Limits.build(limits, clock=clock).enroll
    agent_id, key = await relay.add_agent()
    other = crypto.generate_private_key()
    for _ in range(5):
        assert error(await post(relay, signed(relay, agent_id, other))) == (401, "unauthorized")
    status, _ = await post(relay, signed(relay, agent_id, key))
    assert status == 429
    assert error(await post(relay, signed(relay, agent_id, key), source="192.0.2.2")) == (
        200, "ok")
    async with aiohttp.ClientSession() as http:
        async with http.get(relay.base + relay.ingress_path + "/sms.received?n=1") as resp:
            assert resp.status == 200
    clock.advance(LOCKOUT)
    assert error(await post(relay, signed(relay, agent_id, key))) == (200, "ok")
