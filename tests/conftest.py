"""Fixtures shared by every test folder.

Redis (STYLE §8, issue 5): tests that need it carry the ``redis`` marker or use ``redis_url``.
The server comes from ``XON_TESTS_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``, a database
number nothing else uses). When it does not answer, such tests are skipped, except under
``CI=true``, where a missing Redis is a failure: CI promises one.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from typing import NoReturn

import pytest
import redis
import redis.asyncio as aioredis

from tests.helpers.timing import MS

REDIS_URL_ENV = "XON_TESTS_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def _printable(url: str) -> str:
    """The URL without its password."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=""))


def redis_missing(message: str) -> NoReturn:
    """Skip the test, or fail it under ``CI=true`` (CI provides Redis: its absence is a bug)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis URL, after one ping; skips (or fails under CI=true) when unreachable."""
    url = os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=1000 * MS, socket_timeout=1000 * MS)
    try:
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        message = (
            f"Redis not reachable at {_printable(url)} ({exc}); "
            f"start redis-server or set {REDIS_URL_ENV}"
        )
        redis_missing(message)
    finally:
        client.close()
    return url


@pytest.fixture(autouse=True)
def _redis_marker(request: pytest.FixtureRequest) -> None:
    """A test marked ``redis`` gets the reachability check even without asking for it."""
    if request.node.get_closest_marker("redis") is not None:
        request.getfixturevalue("redis_url")


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (made of [0-9a-z:] only, so no glob escaping)."""
    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=prefix + "*", count=500):
            await client.unlink(key)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_store_url(redis_url: str) -> AsyncIterator[str]:
    """A ``redis://`` store URL with a fresh key prefix, so runs never see each other's keys;
    its keys are deleted before and after the test."""
    prefix = f"xontest:{secrets.token_hex(6)}:"
    separator = "&" if "?" in redis_url else "?"
    await delete_prefix(redis_url, prefix)
    try:
        yield f"{redis_url}{separator}prefix={prefix}"
    finally:
        await delete_prefix(redis_url, prefix)
