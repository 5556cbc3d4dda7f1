"""Rate limits, key guesses and log redaction on the public listener (issue 6).

The limiters themselves are pure (a clock is injected), so their rules are tested without
sockets first; then the real public app shows the HTTP contract: 429 with ``Retry-After`` and
the JSON error, per source and per account, ``None`` disabling a limit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay_server.limits import FailureLockout, Limits, RateLimited, TokenBuckets, limits_key
from shared.config import LimitsConfig
from shared.logs import JsonFormatter, TextFormatter
from tests.helpers.clock import FakeClock
from tests.helpers.public_relay import PublicRelay, relay_config, serve_public

# -- the limiters, pure --------------------------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    """A fresh key spends its burst at once, then gets one token per 1/rate seconds."""
    clock = FakeClock()
    buckets = TokenBuckets(rate=2.0, burst=3, max_keys=10, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [None, None, None]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") is None  # keys are independent
    clock.advance(0.5)
    assert buckets.take("a") is None
    assert buckets.take("a") == pytest.approx(0.5)
    clock.advance(100.0)  # refills up to the burst, never beyond
    assert [buckets.take("a") for _ in range(4)][-1] is not None


def test_token_buckets_forget_the_least_recently_seen_key() -> None:
    """The table never holds more than max_keys keys; the oldest unused one goes first."""
    clock = FakeClock()
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=2, clock=clock)
    buckets.take("a")
    buckets.take("b")
    assert buckets.take("a") is not None  # "a" is now the most recent
    buckets.take("c")
    assert len(buckets) == 2
    assert buckets.take("a") is not None  # still remembered, still empty
    assert buckets.take("b") is None  # forgotten: a fresh bucket


def test_lockout_after_max_failures_within_the_window() -> None:
    """The max_failures-th failure inside the window locks the key out for the lockout time;
    failures older than the window do not count; success clears the count."""
    clock = FakeClock()
    lockout = FailureLockout(max_failures=3, window=10.0, lockout=60.0, max_keys=10, clock=clock)
    assert lockout.failed("ip") is False
    clock.advance(11.0)  # the first failure leaves the window
    assert lockout.failed("ip") is False
    assert lockout.failed("ip") is False
    assert lockout.check("ip") is None
    assert lockout.failed("ip") is True
    assert lockout.check("ip") == pytest.approx(60.0)
    assert lockout.check("other") is None
    clock.advance(60.0)
    assert lockout.check("ip") is None
    lockout.failed("ip")
    lockout.succeeded("ip")
    assert [lockout.failed("ip") for _ in range(3)] == [False, False, True]


def test_rate_limited_rounds_retry_after_up_to_whole_seconds() -> None:
    """Retry-After is an integer number of seconds, at least 1."""
    assert RateLimited("x", retry_after=0.01).retry_after == 1
    assert RateLimited("x", retry_after=2.2).retry_after == 3
    assert RateLimited("x", retry_after=0.01).http_status == 429


def test_none_disables_each_limit() -> None:
    """A None rate or failure count builds no limiter at all."""
    limits = Limits.build(
        LimitsConfig(source_rate=None, account_rate=None, enroll_max_failures=None)
    )
    assert (limits.sources, limits.accounts, limits.enroll) == (None, None, None)
    limits.check_account("acct")  # never raises


# -- over HTTP ------------------------------------------------------------------------------------


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[PublicRelay]:
    limits = LimitsConfig(
        source_rate=0.001,
        source_burst=6,
        account_rate=0.001,
        account_burst=3,
        trusted_proxies=["127.0.0.1"],
    )
    async with serve_public(relay_config(tmp_path, limits=limits)) as running:
        yield running


async def _get(http: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, str, str]:
    async with http.get(url, **kwargs) as resp:  # type: ignore[arg-type]
        body = await resp.json()
        code = body["error"]["code"] if "error" in body else ""
        return resp.status, code, resp.headers.get("Retry-After", "")


async def test_source_rate_limit_answers_429_with_retry_after(relay: PublicRelay) -> None:
    """Past its burst, a source gets 429 rate_limited with a Retry-After in whole seconds, on
    every route but the health probes; another source is unaffected."""
    async with aiohttp.ClientSession() as http:
        url = relay.base + "/xon/not-a-key"
        for _ in range(6):
            assert (await _get(http, url))[:2] == (404, "unknown_ingress_key")
        status, code, retry_after = await _get(http, url)
        assert (status, code) == (429, "rate_limited")
        assert int(retry_after) >= 1
        assert (await _get(http, relay.base + "/v1/unknown"))[:2] == (429, "rate_limited")
        assert (await _get(http, relay.base + "/healthz"))[0] == 200
        other = {"X-Forwarded-For": "192.0.2.7"}  # through the trusted proxy: another source
        assert (await _get(http, url, headers=other))[:2] == (404, "unknown_ingress_key")


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    """Without trusted_proxies a client cannot escape its bucket by naming another address."""
    limits = LimitsConfig(source_rate=0.001, source_burst=2)
    async with serve_public(relay_config(tmp_path, limits=limits)) as relay:
        async with aiohttp.ClientSession() as http:
            for n in range(2):
                await _get(http, relay.base + "/xon/x", headers={"X-Forwarded-For": f"10.0.0.{n}"})
            status, code, _ = await _get(
                http, relay.base + "/xon/x", headers={"X-Forwarded-For": "10.0.0.9"}
            )
            assert (status, code) == (429, "rate_limited")


async def test_account_rate_limit_answers_429_and_stores_nothing(relay: PublicRelay) -> None:
    """Past its burst an account's ingress gets 429 (nothing stored for it); another account
    and unknown keys keep their own answers."""
    other_id, other_key = await relay.add_account("other")
    async with aiohttp.ClientSession() as http:
        statuses = []
        for n in range(4):
            headers = {"X-Forwarded-For": f"192.0.2.{n}"}  # stay clear of the source limit
            statuses.append(
                await _get(http, f"{relay.base}{relay.ingress_path}/sms?n={n}", headers=headers)
            )
        assert [s[0] for s in statuses] == [200, 200, 200, 429]
        assert statuses[3][1] == "rate_limited" and int(statuses[3][2]) >= 1
        assert (await _get(http, f"{relay.base}/xon/{other_key}/sms"))[0] == 200
    assert len(await relay.event_ids()) == 3


async def test_limits_set_to_none_let_everything_through(tmp_path: Path) -> None:
    """With both rates None, a burst far past the defaults' bursts is all 2xx."""
    limits = LimitsConfig(source_rate=None, account_rate=None, source_burst=1, account_burst=1)
    async with serve_public(relay_config(tmp_path, limits=limits)) as relay:
        assert relay.app[limits_key].sources is None
        async with aiohttp.ClientSession() as http:
            for n in range(20):
                assert (await _get(http, f"{relay.base}{relay.ingress_path}/sms?n={n}"))[0] == 200


# -- key guesses and logs ---------------------------------------------------------------------


async def test_a_near_miss_key_answers_exactly_like_a_random_guess(relay: PublicRelay) -> None:
    """A key differing in one character gets the same 404 body as a random one: nothing tells
    a guesser they are close (the comparison itself is constant-time, shared.crypto)."""
    near = relay.ingress_key[:-1] + ("A" if relay.ingress_key[-1] != "A" else "B")
    async with aiohttp.ClientSession() as http:
        answers = []
        for key in (near, "x" * len(relay.ingress_key)):
            async with http.get(
                f"{relay.base}/xon/{key}/sms", headers={"X-Forwarded-For": "192.0.2.99"}
            ) as resp:
                answers.append((resp.status, await resp.read()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 404


async def test_ingress_keys_never_reach_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests to a valid and an invalid ingress URL, with the access log on at DEBUG, leave
    no trace of either key in any log record, raw or formatted."""
    guess = "guessed-key-0123456789abcdef"
    caplog.set_level(logging.DEBUG)
    async with serve_public(relay_config(tmp_path)) as relay:
        async with aiohttp.ClientSession() as http:
            for key in (relay.ingress_key, guess):
                for path in (f"/xon/{key}", f"/xon/{key}/sms?text=hi"):
                    async with http.get(relay.base + path) as resp:
                        await resp.read()
                async with http.post(
                    relay.base + f"/xon/{key}/sms",
                    data=b"x" * 10,
                    headers={"Content-Encoding": "gzip"},
                ) as resp:
                    await resp.read()
        key = relay.ingress_key
    records = caplog.records
    assert any(r.getMessage() == "http.request" for r in records), "access log was off"
    assert any(r.getMessage() == "ingress.accepted" for r in records)
    for record in records:
        raw = json.dumps({k: str(v) for k, v in vars(record).items()})
        for secret in (key, guess):
            assert secret not in raw, record.getMessage()
            assert secret not in JsonFormatter().format(record)
            assert secret not in TextFormatter().format(record)
