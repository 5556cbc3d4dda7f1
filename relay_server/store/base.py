"""The relay store interface. SQLite (embedded default) and Redis implement it.

Every method is a coroutine; an implementation that cannot reach its backend raises
``StoreError`` (ingress answers 503, never a false 2xx). One contract test suite runs against
every implementation (DESIGN principle 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.events import XonEvent

__all__ = ["AccountRecord", "AgentRecord", "StoredEvent", "AppendResult", "Store"]


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
    """True when X-on's own id was seen before: ``stored`` is the first copy."""


class Store(Protocol):
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreError`` unless the backend answers (readiness)."""

    async def relay_id(self) -> str:
        """This relay's stable identity (made on first use, shared by all instances)."""

    # -- accounts ------------------------------------------------------------------------------
    async def create_account(
        self, *, name: str, ingress_key_hash: str, xon_api_url: str = "", xon_api_key: str = ""
    ) -> AccountRecord:
        """Raises ``ApiError(409, "account_exists")`` when the name is taken."""

    async def get_account(self, id_or_name: str) -> AccountRecord | None: ...

    async def account_by_ingress_hash(self, key_hash: str) -> AccountRecord | None: ...

    async def list_accounts(self) -> list[AccountRecord]: ...

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
    async def append_event(self, event: XonEvent, *, xon_id: str | None) -> AppendResult:
        """Durably store ``event`` in its account's log; return only after the commit.

        ``xon_id`` is the id X-on gave the event, if any: a second event with the same
        (account, xon_id) is not stored again and the first copy is returned.
        Concurrent calls are batched into one commit.
        """

    async def read_events(self, account_id: str, *, after: int, limit: int) -> list[StoredEvent]:
        """Events of one account with seq > ``after``, oldest first."""

    async def head_seq(self, account_id: str) -> int:
        """Highest seq of the account's log (0 when empty)."""

    async def get_cursor(self, agent_id: str) -> int:
        """Highest seq the agent acked (0 when none)."""

    async def set_cursor(self, agent_id: str, seq: int) -> None: ...
