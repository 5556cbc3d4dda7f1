"""Forward: X-on's original request re-issued to a local URL (docs/delivery.md, Forward).

For apps written for X-on's fixed-URL HTTP push (DESIGN §Agent local API, "forward"): the app
receives the request X-on sent, unchanged (DESIGN principle 2): the same method, the event's
path suffix appended to the target URL's path, X-on's query string byte for byte, the same
``Content-Type`` and body bytes. The agent adds ``X-Xon-Event-Id``, ``X-Xon-Received-At`` and
``X-Xon-Cursor`` (and ``X-Xon-Stale: true`` for a stale event, ``X-Xon-Withheld: REASON`` for a
stand-in), so that the app can drop a repeat: delivery is at least once (docs/delivery.md).

Any 2xx answer acknowledges the event; anything else (another status, a refused connection,
a time-out) is retried by :class:`~relay_agent.delivery.base.PushTarget` with back-off.
Redirects are not followed: a 3xx is a failure, so an event never leaves for another host.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import aiohttp
from yarl import URL

from shared.config import ForwardTarget
from shared.errors import UpstreamError, UpstreamTimeout
from shared.events import RawRequest, confined_suffix, plain_suffix

from ..inbox import Inbox, InboxEvent
from ..link import CLIENT
from .base import PushTarget, Sleep, StalePolicy

__all__ = ["Forwarder", "forward_url"]

_BODYLESS_METHODS = frozenset({"GET", "HEAD"})


def forward_url(base: str, request: RawRequest) -> URL:
    """The target URL with X-on's path suffix and raw query (kept encoded, byte-exact).

    The suffix never climbs above the target's path (docs/delivery.md, Forward): the relay
    refuses any that could, and one stored by an older relay is re-encoded here with its dot
    segments resolved inside the target's path.
    """
    path = request.path if plain_suffix(request.path) else confined_suffix(request.path)
    text = (base.rstrip("/") if path else base) + path
    if request.query:
        text += "?" + request.query
    return URL(text, encoded=True)


class Forwarder(PushTarget):
    """One ``[[forward]]`` target. Set :attr:`http` (the agent's one client session) before
    running it."""

    kind: ClassVar[str] = "forward"

    def __init__(
        self, target: ForwardTarget, *, inbox: Inbox, stale: StalePolicy,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            key=target.key, types=target.types, start=target.start,
            retry_initial=target.retry_initial, retry_max=target.retry_max,
            inbox=inbox, stale=stale, sleep=sleep,
        )
        self.target = target
        self.http: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=target.timeout)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "url": self.target.url,
                "last_status": self.status.last_status}

    async def deliver(self, item: InboxEvent, stale: bool) -> None:
        assert self.http is not None, "Forwarder.http is set by Delivery.start()"
        event = item.event
        request = RawRequest.from_json(event.get("request") or {})  # ValueError: malformed
        headers = {
            "User-Agent": CLIENT,
            "X-Xon-Event-Id": str(event.get("id", "")),
            "X-Xon-Received-At": str(event.get("received_at", "")),
            "X-Xon-Cursor": str(item.cursor),
        }
        if stale:
            headers["X-Xon-Stale"] = "true"
        withheld = event.get("withheld")
        if isinstance(withheld, dict):  # docs/delivery.md, Withheld events
            headers["X-Xon-Withheld"] = str(withheld.get("reason", ""))
        skip_auto: tuple[str, ...] = ()
        if request.content_type:
            headers["Content-Type"] = request.content_type
        else:
            skip_auto = ("Content-Type",)  # aiohttp would invent application/octet-stream
        body = None if request.method.upper() in _BODYLESS_METHODS and not request.body else (
            request.body)
        try:
            async with self.http.request(
                request.method,
                forward_url(self.target.url, request),
                data=body,
                headers=headers,
                skip_auto_headers=skip_auto,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                self.status.last_status = response.status
                if not 200 <= response.status <= 299:
                    raise UpstreamError(f"HTTP {response.status} from {self.target.url}")
        except TimeoutError as exc:
            self.status.last_status = None
            raise UpstreamTimeout(
                f"no answer from {self.target.url} within {self.target.timeout:g} s"
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise ValueError(f"cannot forward to {exc}") from exc  # retrying cannot fix it
        except aiohttp.ClientError as exc:
            self.status.last_status = None
            raise UpstreamError(f"{type(exc).__name__}: {exc}"[:300]) from exc
