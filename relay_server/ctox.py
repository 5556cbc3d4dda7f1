"""CTOX egress: agents' commands become HTTP calls to X-on's API (DESIGN §Link protocol, Commands).

Theory of operation (the user-facing rules are in docs/ctox.md):

* **Catalogue.** A CTOX type names an X-on method, path and param encoding
  (:data:`DEFAULT_CATALOGUE`, extended by ``ctox.types`` and per account by
  ``ctox.accounts``); the ``raw`` type names them itself, restricted to paths under the
  account's X-on API base URL. The relay, not the office PC, holds that URL and the key, and
  sends the key as ``Authorization: Bearer …``.
* **Exactly once per idempotency key.** The key is the command's ``idempotency_key``, else its
  request id. One coroutine per (account, key) *leads*: it claims the key in the store, calls
  X-on, stores the result (kept ``ctox.idempotency_ttl``). Concurrent duplicates in this process
  await the leader's future; a claim found in the store (another instance, or a relay that
  died) is polled until it has a result or its deadline passed, after which the key answers
  502 ``outcome_unknown`` for good: X-on may or may not have acted, so it is never called
  again for that key. The same key with another body is 409 ``idempotency_conflict``.
* **What is stored.** Every X-on answer, except those that prove X-on did nothing (its 429,
  and a connection that could not be opened): their claim is released so that the same key may
  be retried. Relay refusals (unknown type, bad params, limits) are never stored.
* **Limits.** Per account, in this process: X-on calls running at once and started per minute
  (429 ``rate_limited`` + ``Retry-After``). Replays of stored results are not limited.

Nothing here logs the X-on key, params or bodies (STYLE §6).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec.structs
from yarl import URL

from shared.config import CtoxConfig, CtoxTypeConfig
from shared.errors import ApiError, RelayError
from shared.link.frames import Command, CommandResult

from .store.base import AccountRecord, CommandRecord, Store

__all__ = [
    "DEFAULT_CATALOGUE",
    "RAW",
    "CommandRefused",
    "XonRequest",
    "CtoxService",
    "AccountLimits",
    "catalogue_for",
    "build_request",
    "request_hash",
    "refusal",
]

log = logging.getLogger(__name__)

RAW = "raw"
"""The pass-through CTOX type: params ``method``, ``path``, ``params``, optional ``encoding``."""

DEFAULT_CATALOGUE: Mapping[str, CtoxTypeConfig] = {
    # X-on documents click-to-call (POST /api/v1/clicktocall, destination + target → 202
    # {"status": "OK", "callId": …}); the other paths follow its naming and are overridable.
    "make_call": CtoxTypeConfig(path="/api/v1/clicktocall", required=["destination", "target"]),
    "send_sms": CtoxTypeConfig(path="/api/v1/sms", required=["to", "message"]),
    "send_recorded_message": CtoxTypeConfig(
        path="/api/v1/recordedmessage", required=["destination", "recording"]
    ),
    "conference": CtoxTypeConfig(path="/api/v1/conference", required=["participants"]),
    "order_status": CtoxTypeConfig(path="/api/v1/statusorder", required=["event"]),
}

_RAW_ENCODINGS = ("form", "json", "query")
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_PASSED_HEADERS = ("Retry-After",)
_PURGE_EVERY = 3600.0
_MAX_CLAIMS = 3


class CommandRefused(ApiError):
    """The relay refuses a command itself; ``retry_after`` (seconds) goes in ``Retry-After``."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None):
        super().__init__(status, code, message)
        self.retry_after = retry_after


def refusal(
    status: int, code: str, message: str, *, request_id: str = "", retry_after: int | None = None
) -> CommandResult:
    """A relay-made result: our usual JSON error body, ``error`` set to ``code``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return CommandResult(
        request_id=request_id,
        status=status,
        content_type="application/json",
        body_b64=base64.b64encode(body).decode("ascii"),
        headers={} if retry_after is None else {"Retry-After": str(retry_after)},
        error=code,
    )


def request_hash(ctox_type: str, params: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of (type, params): what "the same body" means."""
    text = json.dumps([ctox_type, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- catalogue and request building ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XonRequest:
    """One X-on call, ready to send."""

    ctox_type: str
    method: str
    url: URL
    encoding: str
    params: dict[str, Any]


def catalogue_for(config: CtoxConfig, account: AccountRecord) -> dict[str, CtoxTypeConfig]:
    """Built-in entries, then ``ctox.types``, then the account's (by name, then by id)."""
    merged = dict(DEFAULT_CATALOGUE)
    merged.update(config.types)
    merged.update(config.accounts.get(account.name, {}))
    merged.update(config.accounts.get(account.id, {}))
    return merged


def _base_url(account: AccountRecord) -> URL:
    if not account.xon_api_url:
        raise CommandRefused(
            503, "xon_api_not_configured", "the relay has no X-on API URL for this account"
        )
    base = URL(account.xon_api_url)
    if base.scheme not in ("http", "https") or not base.host:
        raise CommandRefused(
            503, "xon_api_not_configured", "the account's X-on API URL is not an http(s) URL"
        )
    return base


def _join(base: URL, path: str) -> URL:
    """``base`` + ``path``; refuses any path that would leave the base (raw commands)."""
    if (
        not path.startswith("/")
        or path.startswith("//")
        or any(c in path for c in "?#\\%")
        or any(not c.isprintable() or c.isspace() for c in path)
        or ".." in path.split("/")
    ):
        raise CommandRefused(
            400, "bad_raw_path", "path must be a plain absolute path without ?, #, % or .."
        )
    url = URL(str(base).rstrip("/") + path)
    prefix = base.path.rstrip("/") + "/"
    if url.origin() != base.origin() or not url.path.startswith(prefix):
        raise CommandRefused(400, "bad_raw_path", "path leaves the account's X-on API base URL")
    return url


def _scalar(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if value is None:
        return ""
    raise CommandRefused(400, "bad_params", f"param {name!r} must be a string, number or list")


def _pairs(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Params as (name, value) pairs for a form or query; a list repeats its name."""
    pairs: list[tuple[str, str]] = []
    for name, value in params.items():
        values = value if isinstance(value, list) else [value]
        pairs.extend((name, _scalar(name, v)) for v in values)
    return pairs


def build_request(
    catalogue: Mapping[str, CtoxTypeConfig],
    account: AccountRecord,
    ctox_type: str,
    params: Mapping[str, Any],
) -> XonRequest:
    """Map a command to one X-on call.

    Raises:
        CommandRefused: 404 ``unknown_ctox_type``; 400 ``missing_params``, ``bad_params`` or
            ``bad_raw_path``; 503 ``xon_api_not_configured``.
    """
    if ctox_type == RAW:
        method = params.get("method", "POST")
        path = params.get("path")
        inner = params.get("params", {})
        if not isinstance(method, str) or method.upper() not in _METHODS:
            raise CommandRefused(400, "bad_params", f"raw: method must be one of {_METHODS}")
        method = method.upper()
        encoding = params.get("encoding", "query" if method in ("GET", "DELETE") else "form")
        if (
            not isinstance(path, str)
            or not isinstance(inner, dict)
            or encoding not in _RAW_ENCODINGS
        ):
            raise CommandRefused(
                400,
                "bad_params",
                "raw: needs path (string), params (object), encoding form|json|query",
            )
        call_params: dict[str, Any] = dict(inner)
    else:
        spec = catalogue.get(ctox_type)
        if spec is None:
            raise CommandRefused(404, "unknown_ctox_type", f"unknown CTOX type {ctox_type!r}")
        missing = [name for name in spec.required if params.get(name) in (None, "")]
        if missing:
            raise CommandRefused(400, "missing_params", f"{ctox_type} needs {', '.join(missing)}")
        method, path, encoding = spec.method.upper(), spec.path, spec.encoding
        call_params = dict(params)
    url = _join(_base_url(account), path)
    if encoding != "json":
        _pairs(call_params)  # refuses nested values now, before anything is claimed
    return XonRequest(ctox_type, method, url, encoding, call_params)


# -- per-account limits ------------------------------------------------------------------------


@dataclass(slots=True)
class _Usage:
    running: int = 0
    started: collections.deque[float] = field(default_factory=collections.deque)


class AccountLimits:
    """Per-account X-on calls at once and per minute, in this process (docs/ctox.md, Limits).

    Args:
        max_in_flight: calls running at once; ``None``: no limit.
        per_minute: calls started in any 60 s; ``None``: no limit.
        clock: monotonic seconds.
    """

    WINDOW = 60.0

    def __init__(
        self,
        *,
        max_in_flight: int | None,
        per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.per_minute = per_minute
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def acquire(self, account_id: str) -> int | None:
        """Take a slot: ``None`` when granted, else the seconds to wait (``Retry-After``)."""
        now = self._clock()
        usage = self._usage.setdefault(account_id, _Usage())
        while usage.started and usage.started[0] <= now - self.WINDOW:
            usage.started.popleft()
        if self.max_in_flight is not None and usage.running >= self.max_in_flight:
            return 1
        if self.per_minute is not None and len(usage.started) >= self.per_minute:
            return max(1, math.ceil(usage.started[0] + self.WINDOW - now))
        usage.running += 1
        usage.started.append(now)
        return None

    def release(self, account_id: str) -> None:
        """Give back the running slot of one granted ``acquire``."""
        usage = self._usage[account_id]
        usage.running -= 1
        if not usage.running and not usage.started:
            del self._usage[account_id]


# -- the service -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Lead:
    digest: str
    future: asyncio.Future[CommandResult]
    waiters: int = 0


class CtoxService:
    """Performs agents' commands against X-on, exactly once per (account, idempotency key).

    Args:
        store: idempotency records and accounts.
        config: ``ServerConfig.ctox``.
        clock: Unix time, for stored deadlines and expiry.
        poll_interval: seconds between store reads while another relay holds the claim.
    """

    def __init__(
        self,
        store: Store,
        config: CtoxConfig,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 0.1,
    ) -> None:
        self.store = store
        self.config = config
        self._clock = clock
        self._poll = poll_interval
        self.limits = AccountLimits(
            max_in_flight=config.max_in_flight, per_minute=config.per_minute
        )
        # One session for every account: no cookie jar (one account's cookies must never
        # reach another), no proxy from the environment, no redirects (the key stays on the
        # configured host); asyncio.timeout bounds each call instead of aiohttp's default.
        self._http = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._leads: dict[tuple[str, str], _Lead] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_purge = -math.inf

    def waiting(self, account_id: str, key: str) -> int:
        """Requests of this process now waiting for (account, key) (tests, dashboard)."""
        lead = self._leads.get((account_id, key))
        return 0 if lead is None else lead.waiters

    async def close(self) -> None:
        """Let running X-on calls finish (bounded by ``timeout``) so their results are stored,
        then cancel what is left and close the HTTP session."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.config.timeout + 1)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.close()

    async def execute(self, account_id: str, command: Command) -> CommandResult:
        """The result for ``command``: X-on's answer, a stored one, or the relay's refusal.

        Never raises for the command's faults or X-on's; the result carries them.
        """
        try:
            result = await self._execute(account_id, command)
        except CommandRefused as exc:
            result = refusal(exc.http_status, exc.code, exc.message, retry_after=exc.retry_after)
        except RelayError as exc:  # StoreError and kin
            log.warning("ctox.refused", extra={"error": exc.code, "request_id": command.request_id})
            result = refusal(exc.http_status, exc.code, str(exc))
        return msgspec.structs.replace(result, request_id=command.request_id)

    async def _execute(self, account_id: str, command: Command) -> CommandResult:
        account = await self.store.get_account(account_id)
        if account is None:
            raise CommandRefused(404, "unknown_account", "the agent's account no longer exists")
        catalogue = catalogue_for(self.config, account)
        request = build_request(catalogue, account, command.ctox_type, command.params)
        key = command.idempotency_key or command.request_id
        digest = request_hash(command.ctox_type, command.params)
        slot = (account.id, key)
        lead = self._leads.get(slot)
        if lead is None:
            lead = _Lead(digest, asyncio.get_running_loop().create_future())
            self._leads[slot] = lead
            task = asyncio.create_task(self._lead(account, key, command.request_id, request, lead))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif lead.digest != digest:
            raise _conflict()
        # The link may go away while X-on answers; the lead runs on and stores the result.
        lead.waiters += 1
        try:
            return await asyncio.shield(lead.future)
        finally:
            lead.waiters -= 1

    async def _lead(
        self, account: AccountRecord, key: str, request_id: str, request: XonRequest, lead: _Lead
    ) -> None:
        try:
            result = await self._claim_and_call(account, key, request_id, request, lead.digest)
        except CommandRefused as exc:
            result = refusal(exc.http_status, exc.code, exc.message, retry_after=exc.retry_after)
        except RelayError as exc:
            log.error("ctox.store_error", extra={"account": account.id, "error": str(exc)})
            result = refusal(exc.http_status, exc.code, str(exc))
        except asyncio.CancelledError:
            lead.future.set_result(
                refusal(503, "relay_shutting_down", "the relay stopped before X-on answered")
            )
            raise
        except Exception:
            log.exception("ctox.internal_error", extra={"account": account.id})
            result = refusal(500, "internal", "internal error")
        finally:
            if self._leads.get((account.id, key)) is lead:
                del self._leads[(account.id, key)]
        lead.future.set_result(result)

    async def _claim_and_call(
        self, account: AccountRecord, key: str, request_id: str, request: XonRequest, digest: str
    ) -> CommandResult:
        store, config = self.store, self.config
        for _ in range(_MAX_CLAIMS):
            now = self._clock()
            if now - self._last_purge >= _PURGE_EVERY:
                self._last_purge = now
                await store.purge_commands(now=now)
            record = await store.claim_command(
                account.id,
                key,
                request_hash=digest,
                now=now,
                claim_deadline=now + config.timeout + config.claim_grace,
                expires_at=now + config.idempotency_ttl,
            )
            if record is None:
                return await self._call_claimed(account, key, request_id, request, digest)
            if record.request_hash != digest:
                raise _conflict()
            if record.result is not None:
                log.info(
                    "ctox.replayed",
                    extra={
                        "account": account.id,
                        "request_id": request_id,
                        "status": record.result.status,
                    },
                )
                return record.result
            finished = await self._await_claim(record, request_id)
            if finished is not None:
                return finished
            # The other holder released its claim (X-on did nothing): claim it ourselves.
        raise CommandRefused(
            503, "command_busy", "the command key is busy; retry later", retry_after=1
        )

    async def _call_claimed(
        self, account: AccountRecord, key: str, request_id: str, request: XonRequest, digest: str
    ) -> CommandResult:
        retry_after = self.limits.acquire(account.id)
        if retry_after is not None:
            await self.store.release_command(account.id, key)
            raise CommandRefused(
                429,
                "rate_limited",
                "too many X-on commands for this account",
                retry_after=retry_after,
            )
        try:
            result, performed = await self._call(account, request, request_id)
        finally:
            self.limits.release(account.id)
        if not performed:
            await self.store.release_command(account.id, key)
            return result
        now = self._clock()
        stored = await self.store.finish_command(
            account.id,
            key,
            request_hash=digest,
            result=result,
            now=now,
            expires_at=now + self.config.idempotency_ttl,
        )
        if stored.result != result:
            # We overran the claim deadline and a waiter declared the outcome unknown; our
            # caller still learns what X-on actually said.
            log.warning(
                "ctox.claim_overrun", extra={"account": account.id, "request_id": request_id}
            )
        return result

    async def _await_claim(self, record: CommandRecord, request_id: str) -> CommandResult | None:
        """Wait for a claim held elsewhere: its result, or ``None`` when it was released.

        Past the claim deadline its holder is gone (it would have stored a result or timed out
        by then): the outcome is unknown, and stored as such so no relay ever calls X-on again
        for this key (the exactly-once rule wins over a retry that might double an SMS).
        """
        account_id, key = record.account_id, record.key
        while True:
            now = self._clock()
            # The store decides, by its own clock as well (docs/scaling.md, Clocks): a relay
            # whose clock runs ahead must not declare a call still in flight elsewhere lost.
            if await self.store.claim_overdue(record, now=now):
                log.warning(
                    "ctox.claim_abandoned", extra={"account": account_id, "request_id": request_id}
                )
                unknown = refusal(
                    502,
                    "outcome_unknown",
                    "a relay stopped while X-on was being called for this idempotency key; "
                    "X-on may or may not have acted: check before using a new key",
                )
                stored = await self.store.finish_command(
                    account_id,
                    key,
                    request_hash=record.request_hash,
                    result=unknown,
                    now=now,
                    expires_at=now + self.config.idempotency_ttl,
                )
                assert stored.result is not None
                return stored.result
            left = record.claim_deadline - now
            await asyncio.sleep(min(self._poll, left) if left > 0 else self._poll)
            current = await self.store.get_command(account_id, key, now=self._clock())
            if current is None:
                return None
            if current.result is not None:
                return current.result
            record = current

    async def _call(
        self, account: AccountRecord, request: XonRequest, request_id: str
    ) -> tuple[CommandResult, bool]:
        """One X-on call → (result, performed?); ``performed`` is False only when X-on provably
        did nothing (its 429, or no connection at all)."""
        headers = {}
        if account.xon_api_key:
            headers["Authorization"] = f"Bearer {account.xon_api_key}"
        kwargs: dict[str, Any] = {}
        if request.encoding == "json":
            kwargs["json"] = request.params
        elif request.encoding == "form":
            kwargs["data"] = _pairs(request.params)
        else:
            kwargs["params"] = _pairs(request.params)
        loop = asyncio.get_running_loop()
        started = loop.time()
        extra: dict[str, Any] = {
            "account": account.id,
            "ctox_type": request.ctox_type,
            "request_id": request_id,
        }
        limit = self.config.max_response_size
        try:
            async with asyncio.timeout(self.config.timeout):
                async with self._http.request(
                    request.method, request.url, headers=headers, allow_redirects=False, **kwargs
                ) as resp:
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) > limit:
                            log.warning("ctox.response_too_large", extra=extra)
                            return refusal(
                                502,
                                "upstream_response_too_large",
                                f"X-on's answer exceeds {limit} bytes",
                            ), True
        except TimeoutError:
            log.warning("ctox.timeout", extra=extra)
            return refusal(
                504, "upstream_timeout", f"X-on did not answer within {self.config.timeout:g} s"
            ), True
        except aiohttp.ClientConnectorError:
            log.warning("ctox.unreachable", extra=extra)
            return refusal(502, "upstream_unreachable", "cannot connect to X-on's API"), False
        except aiohttp.ClientError as exc:
            # The request may have reached X-on before the connection broke.
            log.warning("ctox.upstream_error", extra={**extra, "error": type(exc).__name__})
            return refusal(502, "upstream_error", "the connection to X-on's API failed"), True
        log.info(
            "ctox.sent",
            extra={**extra, "status": resp.status, "ms": round((loop.time() - started) * 1000)},
        )
        passed = {name: resp.headers[name] for name in _PASSED_HEADERS if name in resp.headers}
        result = CommandResult(
            request_id=request_id,
            status=resp.status,
            content_type=resp.headers.get("Content-Type", ""),
            body_b64=base64.b64encode(bytes(body)).decode("ascii"),
            headers=passed,
        )
        return result, resp.status != 429


def _conflict() -> CommandRefused:
    return CommandRefused(
        409, "idempotency_conflict", "this idempotency key was used with a different command"
    )
