"""The link's last error, in words for the person at the PC: what is wrong, and what to do.

The link records its last failure as a technical line (``LinkStatus.last_error``: an exception
with its errno, an HTTP status, a close code), which ``/v1/health``, the log and ``status
--json`` keep for IT staff. The status page and ``status`` show :func:`describe` instead, the
one place that turns those lines into sentences; what it does not recognise becomes a general
"cannot reach the relay" with the doctor to run, never the raw text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Problem", "describe"]

_DOCTOR = "run xon-relay-agent doctor on this PC for a step-by-step check"
_RUN_DOCTOR = "Run xon-relay-agent doctor on this PC for a step-by-step check."
_RETRYING = "The agent keeps retrying by itself"


@dataclass(frozen=True, slots=True)
class Problem:
    cause: str
    """What is wrong, in one sentence."""
    action: str
    """What to do about it, in one sentence."""

    def text(self) -> str:
        return f"{self.cause} {self.action}"


def _host(relay_url: str) -> str:
    try:
        return urlsplit(relay_url).hostname or "the relay"
    except ValueError:
        return "the relay"


def _close(code: int, host: str) -> Problem:
    if code in (1000, 1001):
        return Problem(f"The relay ({host}) closed the connection, usually because it is "
                       "restarting.", f"{_RETRYING}; nothing to do unless this lasts.")
    if code == 4010:
        return Problem("Another copy of this agent connected to the relay with the same "
                       "identity and took over the connection.",
                       "Make sure this agent runs on one PC only (a copied data folder?).")
    if code in (4011, 4012):
        return Problem(f"The relay ({host}) had a problem on its side.",
                       f"{_RETRYING}; if this lasts, tell the relay's operator.")
    if code in (4401, 4403):
        return Problem("The relay refused this agent (revoked, or not known to it).",
                       "Ask the relay's operator for a new enrollment code and enroll again "
                       "(xon-relay-agent enroll --force).")
    return Problem(f"The connection to the relay ({host}) was interrupted.",
                   f"{_RETRYING}; if this lasts, {_DOCTOR}.")


_PATTERNS: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"certificate|SSL|TLS", re.I),
     "The secure connection to the relay ({host}) could not be verified.",
     f"A company proxy may inspect encrypted traffic; {_DOCTOR} and give the result to your "
     "IT staff."),
    (re.compile(r"proxy", re.I),
     "The company proxy did not let the agent through to the relay ({host}).",
     f"Give the result of the check to your IT staff: {_DOCTOR}."),
    (re.compile(r"inbox cannot store", re.I),
     "The agent cannot save incoming events on this PC (the disk may be full or read-only).",
     "Free some disk space; the relay keeps the events until the agent can save them."),
    (re.compile(r"refused|Connect call failed|ECONNREFUSED|Errno 111|10061", re.I),
     "The relay ({host}) is not accepting connections: it may be down or restarting.",
     f"{_RETRYING}; if this lasts more than a few minutes, tell the relay's operator."),
    (re.compile(r"getaddrinfo|Name or service not known|nodename nor servname|name resolution"
                r"|No address associated|11001|Errno -[235]\b", re.I),
     "This PC cannot find the relay's address ({host}) on the network (DNS).",
     f"Check that this PC is connected to the internet; {_DOCTOR}."),
    (re.compile(r"timed out|TimeoutError|timeout", re.I),
     "The relay ({host}) did not answer in time.",
     "Check this PC's internet connection; a firewall may block outgoing connections. "
     f"{_RETRYING}."),
    (re.compile(r"unreachable|Errno 101|Errno 113|10051|10065", re.I),
     "This PC has no network route to the relay ({host}).",
     f"Check that this PC is connected to the network; {_DOCTOR}."),
    (re.compile(r"reset|aborted|closed|EOF|ConnectionClosed|Errno 104|10054", re.I),
     "The connection to the relay ({host}) was cut (a network drop, or a proxy ending it).",
     f"{_RETRYING}; if this keeps happening, {_DOCTOR}."),
]


def describe(last_error: str | None, *, relay_url: str) -> Problem | None:
    """The problem behind ``last_error`` (``LinkStatus.last_error``); None when there is none."""
    if not last_error:
        return None
    host = _host(relay_url)
    closed = re.match(r"link closed \((\d+)\)", last_error)
    if closed:
        return _close(int(closed.group(1)), host)
    upgrade = re.match(r"WebSocket upgrade refused: HTTP (\d+)", last_error)
    if upgrade:
        status = int(upgrade.group(1))
        if status in (429, 503):
            return Problem(f"The relay ({host}) is busy and asked the agent to come back a "
                           "little later.", f"{_RETRYING}; nothing to do.")
        if status >= 500 or status in (408, 425):
            return Problem(f"The relay ({host}) answered with an error (HTTP {status}).",
                           f"{_RETRYING}; if this lasts, tell the relay's operator.")
        return Problem(f"Something at the relay's address ({host}) refused the agent's "
                       f"connection (HTTP {status}): a proxy, or a wrong relay address.",
                       _RUN_DOCTOR)
    for pattern, cause, action in _PATTERNS:
        if pattern.search(last_error):
            return Problem(cause.format(host=host), action)
    return Problem(f"The agent cannot reach the relay ({host}).", _RUN_DOCTOR)
