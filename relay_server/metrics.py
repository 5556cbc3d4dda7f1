"""Relay metrics: Prometheus counters the relay updates as things happen, and the gauges
``GET /metrics`` computes when scraped (DESIGN §Relay server endpoints; docs/operations.md).

One :class:`RelayMetrics` per hub (``AgentHub.metrics``), in a registry of its own, so two
relays in one process (tests) never mix their figures. Ingress, the agent links and the admin
listener reach it through the hub they already hold. It also keeps the little history the
dashboard shows: ingress outcomes per minute for the last hour and the latest command results.

Label cardinality stays bounded: statuses are HTTP codes, command outcomes are status
classes, and at most ``max_agent_labels`` agents get a backlog series of their own; the rest
are summed under ``agent="_other"``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shared.link.frames import Command, CommandResult

from .appkeys import hub_key

__all__ = [
    "RelayMetrics",
    "CommandOutcome",
    "IngressRates",
    "WithheldTally",
    "count_ingress",
    "CONTENT_TYPE_LATEST",
    "OTHER_AGENTS",
]

OTHER_AGENTS = "_other"
"""The ``agent`` label of the backlog summed over the agents beyond ``max_agent_labels``."""
INGRESS_PREFIX = "/xon/"
_HISTORY_MINUTES = 60
_RECENT_COMMANDS = 50

# Seconds; X-on calls take tens of ms to the CTOX timeout, a commit ms to a second or two.
_COMMAND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """One CTOX command result as the dashboard lists it (no params, no body)."""

    at: float
    account_id: str
    ctox_type: str
    request_id: str
    status: int
    error: str
    seconds: float


@dataclass(frozen=True, slots=True)
class WithheldTally:
    """Events set aside for one agent (docs/delivery.md, Withheld events)."""

    count: int
    last_reason: str


@dataclass(frozen=True, slots=True)
class IngressRates:
    """Ingress answers over a window: total, 4xx and 5xx."""

    minutes: int
    total: int
    client_errors: int
    server_errors: int

    @property
    def error_rate(self) -> float:
        """Share of answers that were 4xx or 5xx (0.0 with no traffic)."""
        return (self.client_errors + self.server_errors) / self.total if self.total else 0.0


class RelayMetrics:
    """The relay's metrics and the dashboard's short history.

    Args:
        max_agent_labels: agents that get their own backlog series (the largest backlogs).
        clock: Unix time, for the per-minute ingress history.
    """

    def __init__(
        self, *, max_agent_labels: int = 50, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_agent_labels = max_agent_labels
        self._clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.ingress_requests = Counter(
            "xon_relay_ingress_requests",
            "X-on ingress requests answered, by HTTP status",
            ["status"],
            registry=r,
        )
        self.events_stored = Counter(
            "xon_relay_events_stored", "Events durably stored (X-on retries excluded)", registry=r
        )
        self.events_over_quota = Counter(
            "xon_relay_events_over_quota",
            "Events refused with 507 quota_exceeded: their account's stored bytes would pass"
            " its quota (docs/redis.md, Quotas)",
            registry=r,
        )
        self.events_duplicate = Counter(
            "xon_relay_events_duplicate",
            "Ingress requests recognised as a repeat of a stored event (X-on's id and the"
            " same request, or an envelope's event.id)",
            registry=r,
        )
        self.events_xon_id_reused = Counter(
            "xon_relay_events_xon_id_reused",
            "Events stored as new although X-on's id was seen before with another request",
            registry=r,
        )
        self.store_commit = Histogram(
            "xon_relay_store_commit_seconds",
            "Time an ingress request waited for the durable commit of its event",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            "xon_relay_deliveries",
            "Events sent to agents (a resend after a reconnect counts)",
            registry=r,
        )
        self.acks = Counter("xon_relay_acks", "Cumulative acks received from agents", registry=r)
        self.events_withheld = Counter(
            "xon_relay_events_withheld",
            "Events the link could not carry, sent as a stand-in instead, by reason"
            " (docs/delivery.md, Withheld events; a resend counts)",
            ["reason"],
            registry=r,
        )
        self.commands = Counter(
            "xon_relay_commands",
            "CTOX commands answered, by status class (2xx, 4xx, 5xx)",
            ["status"],
            registry=r,
        )
        self.command_seconds = Histogram(
            "xon_relay_command_seconds",
            "Time from a command frame to its result",
            buckets=_COMMAND_BUCKETS,
            registry=r,
        )
        self.connected_agents = Gauge(
            "xon_relay_connected_agents", "Agents with an open link to this instance", registry=r
        )
        self.agent_backlog = Gauge(
            "xon_relay_agent_backlog",
            f"Events after the agent's cursor; agents beyond the largest {max_agent_labels}"
            f" summed as agent={OTHER_AGENTS!r}",
            ["agent"],
            registry=r,
        )
        self.backlog = Gauge(
            "xon_relay_backlog", "Events after the cursors of all enrolled agents", registry=r
        )
        # labels() parses its arguments and takes a lock on every call; an ingress answer
        # happens per event, so each status's child is looked up once (statuses are few).
        self._ingress_by_status: dict[int, Counter] = {}
        self._minutes: deque[tuple[int, list[int]]] = deque(maxlen=_HISTORY_MINUTES)
        self.recent_commands: deque[CommandOutcome] = deque(maxlen=_RECENT_COMMANDS)
        """The latest command results on this instance, newest last."""
        self.withheld: dict[str, WithheldTally] = {}
        """Agent id → the events set aside for it on this instance since it started."""

    # -- updated where things happen ------------------------------------------------------------

    def ingress_answered(self, status: int) -> None:
        child = self._ingress_by_status.get(status)
        if child is None:
            child = self._ingress_by_status[status] = self.ingress_requests.labels(
                status=str(status)
            )
        child.inc()
        minute = int(self._clock() // 60)
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append((minute, [0, 0, 0]))
        counts = self._minutes[-1][1]
        counts[0] += 1
        if 400 <= status < 500:
            counts[1] += 1
        elif status >= 500:
            counts[2] += 1

    def event_appended(
        self, *, duplicate: bool, seconds: float, xon_id_reused: bool = False
    ) -> None:
        """One ``append_event`` returned after ``seconds``."""
        self.store_commit.observe(seconds)
        (self.events_duplicate if duplicate else self.events_stored).inc()
        if xon_id_reused:
            self.events_xon_id_reused.inc()

    def event_withheld(self, agent_id: str, reason: str) -> None:
        """A stand-in went to ``agent_id`` in place of an event the link cannot carry."""
        self.events_withheld.labels(reason=reason).inc()
        tally = self.withheld.get(agent_id)
        count = 1 if tally is None else tally.count + 1
        self.withheld[agent_id] = WithheldTally(count, reason)

    def command_finished(
        self, account_id: str, command: Command, result: CommandResult, seconds: float
    ) -> None:
        self.commands.labels(status=f"{result.status // 100}xx").inc()
        self.command_seconds.observe(seconds)
        self.recent_commands.append(
            CommandOutcome(
                at=self._clock(),
                account_id=account_id,
                ctox_type=command.ctox_type,
                request_id=command.request_id,
                status=result.status,
                error=result.error,
                seconds=seconds,
            )
        )

    # -- computed when scraped ------------------------------------------------------------------

    def set_link_state(self, *, connected: int, backlogs: Iterable[tuple[str, int]]) -> None:
        """Gauges from the hub and the store: connected agents and each agent's backlog."""
        self.connected_agents.set(connected)
        ranked = sorted(backlogs, key=lambda pair: (-pair[1], pair[0]))
        self.agent_backlog.clear()
        for agent_id, backlog in ranked[: self.max_agent_labels]:
            self.agent_backlog.labels(agent=agent_id).set(backlog)
        rest = ranked[self.max_agent_labels :]
        if rest:
            self.agent_backlog.labels(agent=OTHER_AGENTS).set(sum(b for _, b in rest))
        self.backlog.set(sum(b for _, b in ranked))

    def ingress_rates(self, minutes: int) -> IngressRates:
        """Ingress answers in the last ``minutes`` minutes (this one included)."""
        first = int(self._clock() // 60) - minutes + 1
        total = client = server = 0
        for minute, (count, c4, c5) in self._minutes:
            if minute >= first:
                total, client, server = total + count, client + c4, server + c5
        return IngressRates(minutes, total, client, server)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


async def count_ingress(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook of the public app: count ingress answers by status.

    A signal rather than a middleware: it sees every answer, including refusals the error
    middleware turned into JSON and aiohttp's own (404, 405, 413).
    """
    if request.path.startswith(INGRESS_PREFIX):
        request.app[hub_key].metrics.ingress_answered(response.status)
