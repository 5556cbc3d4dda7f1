"""``POST /v1/agent/probe``: an agent proves its enrollment without opening a link.

docs/protocol.md, Enrollment probe: ``xon-relay-agent doctor`` must tell a revoked or unknown
agent from a working one, but a second WebSocket login would replace the running agent's link
(4010). So the agent signs (relay id, agent id, ``probe``, a time in milliseconds) with its key
under a domain of its own (:func:`shared.crypto.probe_message`), and the relay answers:

- 200 ``{"agent_id", "account_id", "relay_id", "status": "active"}``: enrolled and not revoked;
- 400 ``bad_timestamp``: the time is more than :data:`SKEW` seconds off the relay's clock
  (checked first: it says nothing about the agent);
- 401 ``unauthorized``, one answer for an unknown agent id, an agent not enrolled yet, a bad
  signature and a probe seen before (a replay): a stranger learns nothing about which;
- 403 ``revoked``, only after a valid signature: only the key's holder learns it.

A source that sends ``limits.enroll_max_failures`` refused probes within
``limits.enroll_window`` is refused with 429 for ``limits.enroll_lockout`` seconds, as
enrollment codes are (relay_server/enroll.py); the per-source request rate applies too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from shared import crypto
from shared.config import LimitsConfig
from shared.errors import ApiError

from .appkeys import relay_id_key, store_key
from .enroll import read_json_object
from .limits import FailureLockout, RateLimited, limits_key

__all__ = ["install", "ProbeGuard", "probe_key", "SKEW", "MAX_BODY", "MAX_SEEN"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

SKEW = 300.0
"""Seconds a probe's time may be off the relay's clock, either way (Kerberos' customary five
minutes: office PCs keep their clocks within it)."""
MAX_BODY = 1024
"""Largest probe body, in bytes: three short fields."""
_MAX_AGENT_ID = 128
_MAX_SIGNATURE = 128  # 64 bytes are 86 base64url characters
_MAX_TIMESTAMP = 2**53  # milliseconds: exact in a JSON number anywhere
MAX_SEEN = 10_000
"""Valid probes remembered against replay (each for 2 × SKEW), oldest forgotten first."""

# A fixed key that no agent holds: unknown and pending agents cost the same verification as
# known ones, so the answer's timing does not tell them apart either.
_NOBODY = "azU-RgLw6urmAkG806oIt4kcx9N6YmEya52-BD_VC68"

Clock = Callable[[], float]


@dataclass(slots=True)
class ProbeGuard:
    """The probe's per-process state: the failure lockout and the probes already seen."""

    lockout: FailureLockout | None
    clock: Clock = time.time
    _seen: dict[str, float] = field(default_factory=dict)  # signature → forget after

    @classmethod
    def build(cls, config: LimitsConfig, *, clock: Clock = time.time,
              monotonic: Clock = time.monotonic) -> ProbeGuard:
        return cls(lockout=FailureLockout.for_enrollment(config, monotonic), clock=clock)

    def __len__(self) -> int:
        """Probes remembered now."""
        return len(self._seen)

    def first_use(self, signature: str) -> bool:
        """Record a valid probe; False when it was seen within the last 2 × SKEW seconds."""
        now = self.clock()
        # Kept in insertion order, which is expiry order: the expired ones are at the front.
        while self._seen and self._seen[oldest := next(iter(self._seen))] <= now:
            del self._seen[oldest]
        if self._seen.get(signature, 0.0) > now:
            return False
        self._seen[signature] = now + 2 * SKEW
        while len(self._seen) > MAX_SEEN:
            del self._seen[next(iter(self._seen))]
        return True


probe_key = web.AppKey("probe", ProbeGuard)


def _field(data: dict[str, object], name: str, limit: int) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ApiError(400, "bad_request", f"{name!r} must be a string of 1 to {limit} characters")
    return value


def _timestamp(data: dict[str, object]) -> int:
    value = data.get("timestamp")
    # bool is an int in Python, never in the protocol.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < _MAX_TIMESTAMP:
        raise ApiError(400, "bad_request", "'timestamp' must be milliseconds since 1970 (an "
                       "integer)")
    return value


async def _read(request: web.Request) -> tuple[str, int, str]:
    data = await read_json_object(request, limit=MAX_BODY)
    return (_field(data, "agent_id", _MAX_AGENT_ID), _timestamp(data),
            _field(data, "signature", _MAX_SIGNATURE))


@routes.post("/v1/agent/probe")
async def probe(request: web.Request) -> web.Response:
    guard = request.app[probe_key]
    source = request.app[limits_key].source(request)
    if guard.lockout is not None and (left := guard.lockout.check(source)) is not None:
        raise RateLimited("too many refused probes; try again later", retry_after=left)
    agent_id, timestamp, signature = await _read(request)
    offset = timestamp / 1000 - guard.clock()
    if abs(offset) > SKEW:
        raise ApiError(400, "bad_timestamp", f"the probe's time is {abs(offset):.0f} s "
                       f"{'ahead of' if offset > 0 else 'behind'} the relay's clock (at most "
                       f"{SKEW:.0f} s allowed): set this computer's clock right")
    relay_id = request.app[relay_id_key]
    agent = await request.app[store_key].get_agent(agent_id)
    known = agent is not None and agent.public_key is not None
    public_key = agent.public_key if agent is not None and agent.public_key else _NOBODY
    valid = crypto.verify_probe(public_key, signature, relay_id, agent_id, timestamp)
    if not (known and valid and guard.first_use(signature)):
        reason = "bad signature" if known and not valid else "replayed" if known else "unknown"
        log.info("agent.probe_refused", extra={"agent_id": agent_id, "reason": reason,
                                               "remote": source})
        if guard.lockout is not None and guard.lockout.failed(source):
            log.warning("probe.locked_out", extra={"remote": source})
        raise ApiError(401, "unauthorized", "unknown agent, or a bad or reused signature: "
                       "this agent is not enrolled at this relay")
    assert agent is not None
    if guard.lockout is not None:
        guard.lockout.succeeded(source)
    if agent.revoked:
        log.info("agent.probe_revoked", extra={"agent_id": agent_id})
        raise ApiError(403, "revoked", f"agent {agent_id} was revoked by the relay's operator")
    log.info("agent.probe_ok", extra={"agent_id": agent_id})
    return web.json_response({"agent_id": agent.id, "account_id": agent.account_id,
                              "relay_id": relay_id, "status": "active"})


def install(app: web.Application) -> None:
    """Add the probe route and its state to the public app (after ``limits_key`` is set)."""
    app[probe_key] = ProbeGuard.build(app[limits_key].config)
    app.add_routes(routes)
