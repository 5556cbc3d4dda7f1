"""Abuse limits of the public listener: token buckets, enrollment lockout, bounded body reads.

Issue 6 (ingress abuse, agent auth): a stranger may flood the relay, guess enrollment codes, or
hold connections open by sending slowly. Each defence here answers with a clear refusal
(DESIGN principle 6): 429 with ``Retry-After``, 413, 415 or 408, as ``ApiError``s that the error
middleware turns into ``{"error": {...}}``.

Every table is bounded by ``LimitsConfig.max_tracked``: a dict kept in least-recently-used
order (an entry is re-inserted on use), trimmed from its oldest end. Forgetting a key only gives
it a fresh allowance, so an attacker with many addresses gains nothing a single one lacks.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from shared.config import LimitsConfig
from shared.errors import ApiError
from shared.events import IngressLimits, plain_suffix

__all__ = [
    "RateLimited",
    "TokenBuckets",
    "FailureLockout",
    "Limits",
    "limits_key",
    "client_address",
    "read_body",
    "check_target",
]

Clock = Callable[[], float]
V = TypeVar("V")


class RateLimited(ApiError):
    """429: too many requests; ``retry_after`` whole seconds go in the ``Retry-After`` header."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(429, "rate_limited", message)
        self.retry_after = max(1, math.ceil(retry_after))


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate`` per second.

    Args:
        rate: tokens added per second.
        burst: bucket size (what a quiet key may spend at once).
        max_keys: most keys remembered.
        clock: monotonic seconds.
    """

    def __init__(self, *, rate: float, burst: int, max_keys: int, clock: Clock) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, time)

    def take(self, key: str) -> float | None:
        """Spend one token; ``None`` if there was one, else seconds until there is."""
        now = self._clock()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = None if tokens >= 1.0 else (1.0 - tokens) / self.rate
        if wait is None:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        _trim(self._buckets, self.max_keys)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


class FailureLockout:
    """Locks a key out for ``lockout`` seconds after ``max_failures`` within ``window``.

    Issue 6, agent auth: enrollment codes are long random tokens, but a lockout after a few
    failures makes guessing from one source hopeless even with a weak code.
    """

    def __init__(
        self, *, max_failures: int, window: float, lockout: float, max_keys: int, clock: Clock
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_keys = max_keys
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._locked: dict[str, float] = {}  # key → locked until

    @classmethod
    def for_enrollment(cls, config: LimitsConfig, clock: Clock) -> FailureLockout | None:
        """The lockout the ``limits.enroll_*`` settings describe (``None``: no lockout); the
        enrollment probe shares those settings."""
        if config.enroll_max_failures is None:
            return None
        return cls(
            max_failures=config.enroll_max_failures,
            window=config.enroll_window,
            lockout=config.enroll_lockout,
            max_keys=config.max_tracked,
            clock=clock,
        )

    def check(self, key: str) -> float | None:
        """Seconds the key stays locked out, or ``None`` if it may try."""
        until = self._locked.get(key)
        if until is None:
            return None
        left = until - self._clock()
        if left > 0:
            return left
        del self._locked[key]
        return None

    def failed(self, key: str) -> bool:
        """Count one failure; True if it was the ``max_failures``-th within the window, which
        starts a lockout."""
        now = self._clock()
        recent = [t for t in self._failures.pop(key, []) if t > now - self.window]
        recent.append(now)
        if len(recent) >= self.max_failures:
            self._locked[key] = now + self.lockout
            _trim(self._locked, self.max_keys)
            return True
        self._failures[key] = recent
        _trim(self._failures, self.max_keys)
        return False

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


def _trim(table: dict[str, V], size: int) -> None:
    while len(table) > size:
        del table[next(iter(table))]


@dataclass(slots=True)
class Limits:
    """The public app's limiters, built from ``LimitsConfig`` (``None`` rates disable one)."""

    config: LimitsConfig
    sources: TokenBuckets | None
    accounts: TokenBuckets | None
    enroll: FailureLockout | None
    ingress: IngressLimits
    """What one ingress request may turn into (``shared.events.parse_ingress``)."""

    @classmethod
    def build(cls, config: LimitsConfig, *, clock: Clock = time.monotonic) -> Limits:
        def buckets(rate: float | None, burst: int) -> TokenBuckets | None:
            if rate is None:
                return None
            return TokenBuckets(rate=rate, burst=burst, max_keys=config.max_tracked, clock=clock)

        enroll = FailureLockout.for_enrollment(config, clock)
        return cls(
            config=config,
            sources=buckets(config.source_rate, config.source_burst),
            accounts=buckets(config.account_rate, config.account_burst),
            enroll=enroll,
            ingress=config.ingress,
        )

    def source(self, request: web.BaseRequest) -> str:
        """The client's address (:func:`client_address`)."""
        return client_address(request, self.config.trusted_proxies)

    def check_source(self, request: web.BaseRequest) -> None:
        """Raises:
        RateLimited: this source exceeded ``source_rate``."""
        if self.sources is not None:
            wait = self.sources.take(self.source(request))
            if wait is not None:
                raise RateLimited("too many requests from this address", retry_after=wait)

    def check_account(self, account_id: str) -> None:
        """Raises:
        RateLimited: this account's ingress exceeded ``account_rate``."""
        if self.accounts is not None:
            wait = self.accounts.take(account_id)
            if wait is not None:
                raise RateLimited("too many events for this account", retry_after=wait)


limits_key = web.AppKey("limits", Limits)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=16)
def _networks(trusted: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """``limits.trusted_proxies`` parsed once (the config validated every entry at load)."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in trusted)


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def client_address(request: web.BaseRequest, trusted: Sequence[str]) -> str:
    """The client's address (docs/deployment.md, The client behind a proxy).

    The peer itself, unless it lies in one of the ``trusted`` ranges (the TLS front). Then
    every ``X-Forwarded-For`` line, joined as one list, is walked from the right: each
    trusted proxy appends the address it saw, so the first hop outside the trusted ranges is
    the client, and anything further left is what the client claimed and is ignored. A
    garbled hop stops the walk at the trusted hop to its right (a forged header costs its
    sender its own proxy's key, never another client's); a chain of trusted hops only gives
    its left-most one.
    """
    peer = request.remote or ""
    nets = _networks(tuple(trusted))
    current = _address(peer)
    if current is None or not any(current in net for net in nets):
        return peer
    lines = request.headers.getall("X-Forwarded-For", [])
    hops = [hop for line in lines for hop in line.split(",")]
    for hop in reversed(hops):
        if not hop.strip():
            continue
        address = _address(hop)
        if address is None:
            break
        current = address
        if not any(address in net for net in nets):
            break
    return str(current)


async def read_body(request: web.Request, *, limit: int, timeout: float) -> bytes:
    """The request body, read incrementally: never more than ``limit`` + 1 bytes buffered.

    Only ``identity`` bodies are taken (DESIGN principle 2: X-on's bytes are kept as sent, so
    the relay neither stores nor inflates compressed ones, and no compression bomb can expand
    in its memory).

    Raises:
        ApiError: 415 ``unsupported_encoding`` for a ``Content-Encoding``; 413
            ``body_too_large`` past ``limit`` (at once when ``Content-Length`` says so, else
            as soon as the chunked body crosses it); 408 ``body_timeout`` when the body takes
            longer than ``timeout`` seconds.
    """
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415, "unsupported_encoding", "Content-Encoding is not supported; send the body as is"
        )
    too_large = ApiError(413, "body_too_large", f"request body exceeds {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    if request.content.is_eof():
        # The whole body already arrived (a small request comes in one packet with its head):
        # take it without arming the deadline, a timer per request otherwise.
        whole = request.content.read_nowait()
        if len(whole) > limit:
            raise too_large
        return whole
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await request.content.read(limit + 1 - len(body))
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError as exc:
        message = f"request body not received within {timeout:g} s"
        raise ApiError(408, "body_timeout", message) from exc


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_target(path: str, query: str, content_type: str) -> None:
    """Refuse an ingress target or content type that an event could not carry safely.

    Raises:
        ApiError: 400 ``bad_path`` for a path suffix that could climb above a forward
            target's path (``shared.events.plain_suffix``; docs/delivery.md, Forward); 400
            ``bad_path`` / ``bad_content_type`` for text that is not Unicode (aiohttp keeps a
            header's undecodable bytes as lone surrogates, which no JSON encoder can write).
    """
    if not plain_suffix(path):
        raise ApiError(
            400, "bad_path",
            "path suffix has a dot segment, a backslash or an encoded '.', '/' or '\\'",
        )
    if _unencodable(path) or _unencodable(query):
        raise ApiError(400, "bad_path", "request target is not valid UTF-8")
    if _unencodable(content_type):
        raise ApiError(400, "bad_content_type", "Content-Type is not valid UTF-8")


def _unencodable(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None
