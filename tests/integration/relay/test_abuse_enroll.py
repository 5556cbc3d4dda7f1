"""Enrollment brute force (issue 6, agent auth): a lockout after a few bad codes per source.

Code reuse and expiry are refused by the store (tests/integration/relay/test_enroll.py); here a
source that keeps guessing is locked out, valid code or not, until the cool-down passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay_server.limits import Limits, limits_key
from shared import crypto
from shared.config import LimitsConfig
from tests.helpers.clock import FakeClock
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public

LOCKOUT = 900.0


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[PublicRelay, FakeClock]]:
    limits = LimitsConfig(
        enroll_max_failures=5,
        enroll_window=600.0,
        enroll_lockout=LOCKOUT,
        trusted_proxies=["127.0.0.1"],
    )
    async with serve_public(relay_config(tmp_path, limits=limits)) as running:
        # The lockout counts real seconds; the test moves this clock instead of sleeping.
        clock = FakeClock(1000.0)
        running.app[limits_key].enroll = Limits.build(limits, clock=clock).enroll
        yield running, clock


async def _enroll(
    http: aiohttp.ClientSession, relay: PublicRelay, code: str, source: str = "192.0.2.1"
) -> tuple[int, str, str]:
    body = {"code": code, "public_key": crypto.public_key_b64(crypto.generate_private_key())}
    async with http.post(
        relay.base + "/v1/enroll", json=body, headers={"X-Forwarded-For": source}
    ) as resp:
        data = await resp.json()
        code_ = data["error"]["code"] if "error" in data else "ok"
        return resp.status, code_, resp.headers.get("Retry-After", "")


async def test_five_bad_codes_lock_the_source_out(
    relay: tuple[PublicRelay, FakeClock],
) -> None:
    """After 5 invalid codes a source gets 429 with Retry-After, even with a valid code; other
    sources are unaffected; after the cool-down the valid code works."""
    running, clock = relay
    agent_id, good = await running.new_code()
    async with aiohttp.ClientSession() as http:
        for n in range(5):
            assert (await _enroll(http, running, f"guess-{n}"))[:2] == (400, "invalid_code")
        status, code, retry_after = await _enroll(http, running, good)
        assert (status, code) == (429, "rate_limited")
        assert int(retry_after) == LOCKOUT
        # Another source is not locked out (and a guess from it is just invalid).
        assert (await _enroll(http, running, "guess-x", "192.0.2.2"))[:2] == (400, "invalid_code")
        clock.advance(LOCKOUT / 2)
        status, _, retry_after = await _enroll(http, running, good)
        assert status == 429 and int(retry_after) == LOCKOUT / 2
        clock.advance(LOCKOUT / 2)
        assert (await _enroll(http, running, good))[:2] == (200, "ok")
    agent = await running.services.store.get_agent(agent_id)
    assert agent is not None and agent.public_key is not None


async def test_failures_outside_the_window_do_not_add_up(
    relay: tuple[PublicRelay, FakeClock],
) -> None:
    """Four bad codes, a pause longer than the window, four more: never locked out."""
    running, clock = relay
    async with aiohttp.ClientSession() as http:
        for n in range(4):
            assert (await _enroll(http, running, f"a-{n}"))[0] == 400
        clock.advance(601.0)
        for n in range(4):
            assert (await _enroll(http, running, f"b-{n}"))[0] == 400


async def test_malformed_requests_do_not_count_as_guesses(
    relay: tuple[PublicRelay, FakeClock],
) -> None:
    """Bad JSON or a bad public key are not code guesses and never lead to a lockout."""
    running, _ = relay
    async with aiohttp.ClientSession() as http:
        for _ in range(6):
            async with http.post(
                running.base + "/v1/enroll", data=b"{", headers={"X-Forwarded-For": "192.0.2.1"}
            ) as resp:
                assert resp.status == 400
            async with http.post(
                running.base + "/v1/enroll",
                json={"code": "c", "public_key": "nope"},
                headers={"X-Forwarded-For": "192.0.2.1"},
            ) as resp:
                assert (await resp.json())["error"]["code"] == "bad_public_key"
        assert (await _enroll(http, running, "guess"))[:2] == (400, "invalid_code")


async def test_a_spent_code_counts_as_a_failure(relay: tuple[PublicRelay, FakeClock]) -> None:
    """Replaying a used code is a failed guess like any other."""
    running, _ = relay
    _, code = await running.new_code()
    async with aiohttp.ClientSession() as http:
        assert (await _enroll(http, running, code))[0] == 200
        for _ in range(5):
            assert (await _enroll(http, running, code))[:2] == (400, "invalid_code")
        assert (await _enroll(http, running, code))[:2] == (429, "rate_limited")
