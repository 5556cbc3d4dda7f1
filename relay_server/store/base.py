"""The relay store interface. SQLite (embedded default) and Redis implement it.

Every method is a coroutine; an implementation that cannot reach its backend raises
``StoreError`` (ingress answers 503, never a false 2xx). One contract test suite runs against
every implementation (DESIGN principle 5).

Integers a caller passes in (seqs, cursors, epochs, limits) must lie within
``0..MAX_INT``, what both backends can hold; a store refuses anything else at once with
:class:`StoreArgumentError` (:func:`check_int`), before it reaches a transaction shared with
other tenants' writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.errors import ApiError, LocalProtocolError, StoreError
from shared.events import ENVELOPE_DIGEST, RawRequest, XonEvent, XonId, envelope_id
from shared.link.frames import CommandResult

__all__ = [
    "AccountRecord",
    "AgentRecord",
    "StoredEvent",
    "AppendResult",
    "AccountUsage",
    "QuotaExceeded",
    "CommandRecord",
    "StatusItem",
    "LinkClaim",
    "LinkCheck",
    "result_to_json",
    "result_from_json",
    "stored_xon_id",
    "Store",
    "MAX_INT",
    "StoreArgumentError",
    "check_int",
]

MAX_INT = 2**63 - 1
"""The largest seq, cursor, epoch or count a store takes (SQLite's INTEGER is 64-bit signed)."""


class StoreArgumentError(LocalProtocolError, StoreError):
    """A store call's argument is out of range: the caller's bug (a ``LocalProtocolError``:
    400 at an HTTP boundary), and a store call that failed (a ``StoreError``), so every caller
    that copes with a failed store call copes with this one."""


def check_int(name: str, value: int | None) -> None:
    """Refuse a store argument outside ``0..MAX_INT`` (``None`` passes: "not given").

    Raises:
        StoreArgumentError: ``value`` is not an int in range; the caller should have checked
            what it got from outside.
    """
    if value is None or (type(value) is int and 0 <= value <= MAX_INT):
        return
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise StoreArgumentError(f"store: {name} must be an integer 0..2**63-1, not {shown}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountRecord:
    id: str
    name: str
    created_at: float
    ingress_key_hash: str
    """SHA-256 hex of the ingress key; the key itself is shown once, never stored."""
    xon_api_url: str = ""
    xon_api_key: str = ""
    """Secret: never log it, never return it from the admin API."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentRecord:
    id: str
    account_id: str
    name: str
    created_at: float
    public_key: str | None = None
    """Base64url raw Ed25519 public key; ``None`` until the agent enrolled."""
    enrolled_at: float | None = None
    revoked_at: float | None = None
    last_seen: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    seq: int
    """Position in the account's log: strictly increasing per account, never reused."""
    event: XonEvent


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendResult:
    stored: StoredEvent
    duplicate: bool
    """True for a repeat of a stored event (docs/delivery.md, Duplicates): ``stored`` is the
    first copy, and nothing was stored."""
    xon_id_reused: bool = False
    """Stored as a new event although its X-on id was seen before with another request."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountUsage:
    """What one account's event log holds (docs/redis.md, Quotas)."""

    events: int
    bytes: int
    """The stored size of its events: what ``append_event``'s ``max_bytes`` is checked on."""


class QuotaExceeded(ApiError):
    """507: the account's stored events would pass its byte quota; nothing was stored."""

    def __init__(self, account_id: str, *, used: int, size: int, limit: int) -> None:
        super().__init__(
            507, "quota_exceeded",
            f"the account's stored events take {used} bytes; this event ({size} bytes) would "
            f"pass its quota of {limit} bytes until retention frees space",
        )
        self.account_id = account_id
        self.used, self.size, self.limit = used, size, limit


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRecord:
    """One CTOX command's idempotency record, per (account, idempotency key) (docs/ctox.md).

    While ``result`` is ``None`` the command is *claimed*: one relay is calling X-on for it.
    """

    account_id: str
    key: str
    request_hash: str
    """SHA-256 hex of (CTOX type, params): the same key with another body is a conflict."""
    claimed_at: float
    claim_deadline: float
    """Unix time by which the claiming relay must have stored a result; an unfinished claim
    past it was abandoned (the relay died mid-call)."""
    expires_at: float
    """Unix time after which the record is forgotten (the key may then be used afresh)."""
    result: CommandResult | None = None
    """The answer every later use of the key gets (its ``request_id`` is the first one's)."""


def stored_xon_id(value: str, request: RawRequest) -> XonId:
    """The :class:`XonId` of an event a release before request digests stored under X-on id
    ``value``, for the upgrade of its data (docs/deployment.md, Upgrading): the envelope
    marker when ``value`` was its envelope's ``event.id``, else its own request's digest, so
    only a true repeat of it matches."""
    mime = request.content_type.partition(";")[0].strip().lower()
    if (mime in ("application/json", "text/json") or mime.endswith("+json")) and envelope_id(
        request.body
    ) == value:
        return XonId(value, ENVELOPE_DIGEST)
    return XonId(value, request.digest())


def result_to_json(result: CommandResult) -> str:
    """A command result as JSON text, for backends that store strings."""
    return json.dumps(
        {
            "request_id": result.request_id,
            "status": result.status,
            "content_type": result.content_type,
            "body_b64": result.body_b64,
            "headers": result.headers,
            "error": result.error,
        },
        separators=(",", ":"),
    )


def result_from_json(text: str | bytes) -> CommandResult:
    """Inverse of :func:`result_to_json`."""
    data = json.loads(text)
    return CommandResult(
        request_id=str(data["request_id"]),
        status=int(data["status"]),
        content_type=str(data["content_type"]),
        body_b64=str(data["body_b64"]),
        headers=dict(data["headers"]),
        error=str(data["error"]),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusItem:
    """The latest value of one status item of an account (DESIGN §Link protocol, Status).

    An item is an event type plus its identifying params (``ServerConfig.status``); its value
    is the params of the newest status event for it.
    """

    account_id: str
    key: str
    """Stable item key: the type, then the identifying params, e.g.
    ``messages.waiting?mailbox=201``."""
    type: str
    ids: dict[str, str] = field(default_factory=dict)
    """The identifying params."""
    params: dict[str, str] = field(default_factory=dict)
    """All params of the newest event for this item."""
    event_id: str
    seq: int
    """The event's seq in the account's log: a higher seq is a newer value."""
    received_at: str
    """When the relay committed that event (ISO 8601 UTC)."""

    def to_json(self) -> dict[str, Any]:
        """The item as sent in a ``status`` frame (docs/ctox.md, Status)."""
        return {
            "key": self.key,
            "type": self.type,
            "ids": dict(self.ids),
            "params": dict(self.params),
            "event_id": self.event_id,
            "seq": self.seq,
            "received_at": self.received_at,
        }

    @classmethod
    def from_json(cls, account_id: str, data: dict[str, Any]) -> StatusItem:
        """Inverse of :meth:`to_json`; raises ``KeyError``/``TypeError`` when malformed."""
        return cls(
            account_id=account_id,
            key=str(data["key"]),
            type=str(data["type"]),
            ids={str(k): str(v) for k, v in data["ids"].items()},
            params={str(k): str(v) for k, v in data["params"].items()},
            event_id=str(data["event_id"]),
            seq=int(data["seq"]),
            received_at=str(data["received_at"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkClaim:
    """The outcome of :meth:`Store.claim_link` (docs/scaling.md, "One link per agent")."""

    epoch: int
    """The new link's epoch: one more than any link of this agent had before."""
    previous_owner: str
    """The relay instance that held the agent's previous link and has not released it
    (``""``: none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkCheck:
    """What a connected link must re-check: is the agent revoked, is this link still the
    newest one."""

    epoch: int
    revoked: bool


class Store(Protocol):
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreError`` unless an event can be committed now: the backend answers,
        the writer runs, and its last commit did not fail (docs/operations.md, Readiness)."""

    async def wait_failed(self) -> BaseException:
        """Wait until the store cannot go on (its writer stopped for good) and return why.

        Never returns while the store works; a failure that one request caused fails that
        request only. The store logged the cause, with its traceback, when it happened; every
        call after it raises ``StoreError``.
        """

    async def relay_id(self) -> str:
        """This relay's stable identity (made on first use, shared by all instances)."""

    # -- accounts ------------------------------------------------------------------------------
    async def create_account(
        self, *, name: str, ingress_key_hash: str, xon_api_url: str = "", xon_api_key: str = ""
    ) -> AccountRecord:
        """Raises ``ApiError(409, "account_exists")`` when the name is taken."""

    async def get_account(self, id_or_name: str) -> AccountRecord | None: ...

    async def account_by_ingress_hash(self, key_hash: str) -> AccountRecord | None:
        """The account whose ingress key, or a previous key still inside its overlap period
        (:meth:`rotate_ingress_key`), has this hash; its ``ingress_key_hash`` is the one that
        matched."""

    async def list_accounts(self) -> list[AccountRecord]: ...

    async def update_account(
        self, account_id: str, *, xon_api_url: str | None = None, xon_api_key: str | None = None
    ) -> AccountRecord | None:
        """Change the account's X-on API URL and/or key (``None``: leave as is).

        Returns the updated record, or ``None`` when no account has id ``account_id``.
        """

    # -- agents --------------------------------------------------------------------------------
    async def create_agent(
        self, *, account_id: str, name: str, code_hash: str, code_expires_at: float
    ) -> AgentRecord:
        """A pending agent with a one-time enrollment code (stored hashed)."""

    async def enroll_agent(self, *, code_hash: str, public_key: str, now: float) -> AgentRecord:
        """Bind a public key to the agent of a valid, unused, unexpired code; the code is spent.

        Raises:
            ApiError: 400 ``invalid_code`` (unknown, used or expired: one answer for all three,
                so a guesser learns nothing).
        """

    async def get_agent(self, agent_id: str) -> AgentRecord | None: ...

    async def list_agents(self, account_id: str | None = None) -> list[AgentRecord]: ...

    async def revoke_agent(self, agent_id: str, *, now: float) -> AgentRecord | None: ...

    async def touch_agent(self, agent_id: str, *, now: float) -> None:
        """Record ``last_seen``."""

    # -- events and cursors --------------------------------------------------------------------
    async def append_event(
        self, event: XonEvent, *, xon_id: XonId | None, max_bytes: int | None = None
    ) -> AppendResult:
        """Durably store ``event`` in its account's log; return only after the commit.

        ``xon_id`` is the id X-on gave the event, if any: a later event of the same account
        with an equal ``xon_id`` (value and digest) is a repeat, not stored again, and the
        first copy is returned (docs/delivery.md, Duplicates). Concurrent calls are batched
        into one commit.

        Raises:
            QuotaExceeded: the account's stored bytes (:meth:`account_usage`) plus this event
                would pass ``max_bytes`` (``None``: no quota); checked in the append's own
                atomic step, so concurrent appends cannot overshoot together. A repeat is
                answered whatever the quota (it stores nothing).
        """

    async def account_usage(self, account_id: str) -> AccountUsage:
        """The events and stored bytes of one account's log, kept up to date by every append,
        trim and account deletion."""

    async def read_events(self, account_id: str, *, after: int, limit: int) -> list[StoredEvent]:
        """Events of one account with seq > ``after``, oldest first."""

    async def head_seq(self, account_id: str) -> int:
        """Highest seq of the account's log (0 when empty)."""

    async def get_cursor(self, agent_id: str) -> int:
        """Highest seq the agent acked (0 when none)."""

    async def set_cursor(self, agent_id: str, seq: int) -> None: ...

    # -- link ownership (docs/scaling.md, "One link per agent") --------------------------------
    async def claim_link(self, agent_id: str, *, owner: str) -> LinkClaim:
        """Make a new link of ``agent_id``, held by relay instance ``owner``, the current one.

        Atomically increments the agent's link epoch and records ``owner`` as its holder.
        Raises ``StoreError`` for an unknown agent.
        """

    async def release_link(self, agent_id: str, *, epoch: int) -> None:
        """The link with ``epoch`` ended: forget its holder, unless a newer link claimed it."""

    async def check_links(self, agent_ids: Sequence[str]) -> dict[str, LinkCheck]:
        """Current link epoch and revocation of each agent; unknown agents are left out."""

    # -- retention (docs/redis.md, Retention) ---------------------------------------------------
    async def retention_cut(
        self, account_id: str, *, keep_events: int | None, keep_since: float | None
    ) -> int:
        """The highest seq of the account's log beyond a limit: not among the newest
        ``keep_events``, or received before Unix time ``keep_since`` (``None``: no such limit).
        Every older event is beyond a limit too. 0 when no event is."""

    async def trim_events(self, account_id: str, *, through: int, limit: int) -> int:
        """Drop the oldest events with seq <= ``through``, at most ``limit`` of them, never the
        newest event of the account (it holds the log's head). Returns how many went; each
        dropped event raises :meth:`trimmed_through`. Their X-on ids stop deduplicating (and no
        longer count as seen for ``xon_id_reused``)."""

    async def trimmed_through(self, account_id: str) -> int:
        """The highest seq retention dropped from the account's log (0: none)."""

    # -- CTOX idempotency (docs/ctox.md) --------------------------------------------------------
    async def claim_command(
        self,
        account_id: str,
        key: str,
        *,
        request_hash: str,
        now: float,
        claim_deadline: float,
        expires_at: float,
    ) -> CommandRecord | None:
        """Atomically claim (account, key) for one X-on call.

        When no record exists, or the existing one expired (``expires_at <= now``), store a new
        claim (``result=None``) and return ``None``: the caller must call X-on and then
        ``finish_command`` or ``release_command``. Otherwise change nothing and return the
        existing record (finished, or claimed by someone else).
        """

    async def get_command(self, account_id: str, key: str, *, now: float) -> CommandRecord | None:
        """The record of (account, key); ``None`` when there is none or it expired."""

    async def claim_overdue(self, record: CommandRecord, *, now: float) -> bool:
        """True when the unfinished claim ``record`` is past its ``claim_deadline`` by the
        store's clock as well as by ``now`` (docs/scaling.md, Clocks): an instance whose clock
        runs ahead cannot declare a claim held elsewhere abandoned early. SQLite serves one
        instance, whose clock is the store's."""

    async def finish_command(
        self,
        account_id: str,
        key: str,
        *,
        request_hash: str,
        result: CommandResult,
        now: float,
        expires_at: float,
    ) -> CommandRecord:
        """Store ``result`` for (account, key) unless a result is stored already.

        The first result wins: an existing result is kept and returned. A missing (or expired)
        record is created with ``claimed_at = claim_deadline = now``. Sets ``expires_at``
        only when this call stored the result. Returns the record as stored.
        """

    async def release_command(self, account_id: str, key: str) -> None:
        """Delete the claim of (account, key) if it has no result (X-on provably did nothing,
        so the key may be used again); a finished record is left alone."""

    async def purge_commands(self, *, now: float) -> int:
        """Delete every record with ``expires_at <= now``; returns how many went."""

    # -- status cache (DESIGN §Link protocol, Status) -------------------------------------------
    async def put_status(self, item: StatusItem) -> bool:
        """Store ``item`` as the latest value of (item.account_id, item.key) unless the stored
        one has a seq ≥ ``item.seq``. True when ``item`` was stored."""

    async def status_snapshot(self, account_id: str) -> list[StatusItem]:
        """Every status item of the account, ordered by key."""

    # -- operations (docs/operations.md) -------------------------------------------------------
    async def rename_account(self, account_id: str, name: str) -> AccountRecord | None:
        """Give the account a new name; ``None`` when no account has id ``account_id``.

        Raises:
            ApiError: 409 ``account_exists`` when another account has ``name``.
        """

    async def rotate_ingress_key(
        self, account_id: str, *, new_hash: str, old_valid_until: float
    ) -> AccountRecord | None:
        """Make ``new_hash`` the account's ingress key hash. The key it replaces keeps working
        until Unix time ``old_valid_until`` (at once when that is not in the future); earlier
        previous keys keep their own deadlines. ``None`` when there is no such account."""

    async def previous_ingress_keys(self, account_id: str, *, now: float) -> list[float]:
        """Deadlines of the account's previous ingress keys still valid at ``now``, soonest
        first."""

    async def delete_account(self, account_id: str) -> bool:
        """Delete the account and all it owns: agents (cursors, link records, unused
        enrollment codes), event log, status items, CTOX records, previous ingress keys.
        False when there is no such account."""

    async def rename_agent(self, agent_id: str, name: str) -> AgentRecord | None:
        """Give the agent a new display name; ``None`` when there is no such agent."""

    async def get_event(
        self, event_id: str, *, account_id: str | None = None
    ) -> StoredEvent | None:
        """The stored event with relay event id ``event_id``, looked for in one account or in
        all; ``None`` when it is not (or no longer) in the log."""

    async def recent_events(
        self, account_id: str, *, limit: int, before: int | None = None
    ) -> list[StoredEvent]:
        """The account's newest events with seq < ``before`` (``None``: up to the head),
        newest first, at most ``limit``."""

    async def count_after(self, account_id: str, after: int) -> int:
        """How many events of the account's log have seq > ``after`` (an agent's backlog)."""

    # -- replay (docs/operations.md, Replay) ----------------------------------------------------
    async def request_replay(self, agent_id: str, after_seq: int) -> None:
        """Record that the agent's next link must send its account's log again after
        ``after_seq``; replaces a pending request. Nothing happens for an unknown agent."""

    async def pending_replay(self, agent_id: str) -> int | None:
        """The agent's pending replay point (``None``: no replay pending). Reading leaves it
        recorded: it stays until a link settles it (:meth:`settle_replay`), so a link that
        ends early, a newer link that overtakes it, or a relay restart loses no replay."""

    async def settle_replay(self, agent_id: str, taken: int, rest: int | None) -> None:
        """A link that read the point ``taken`` is done with it (``rest`` is ``None``: the
        agent has every event again, or the replay was moot) or got the agent as far as
        ``rest``.

        Compared with what is recorded now: the point still ``taken`` is removed, or moved up
        to ``rest``; a point recorded meanwhile (a newer request, or another link's progress)
        is kept when done, and lowered to ``rest`` otherwise, the lower point covering both;
        no point (another link finished it) stays none."""
