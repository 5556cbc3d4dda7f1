"""Stale events (docs/delivery.md, Stale events): past its type's TTL an event is marked
``"stale": true``, or passed over by push modes with ``stale = "skip"``; never removed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from relay_agent.delivery import Delivery, StalePolicy
from relay_agent.inbox import Inbox, InboxEvent
from shared.config import AgentConfig
from shared.events import format_time

from .support import eventually, make_event
from .test_consumers import serve_api
from .test_forward import Target, forward_to, serve_target
from .test_sse import Stream, open_stream
from .test_tcp import LineApp, serve_app, tcp_to

TTL = {"sms.received": 3600.0}
"""An hour: the example events of 2023 are stale, events made now are not."""


def fresh(n: int, event_type: str = "sms.received") -> dict[str, Any]:
    return {**make_event(n), "type": event_type, "received_at": format_time(time.time())}


def old(n: int, event_type: str = "sms.received") -> dict[str, Any]:
    return {**make_event(n), "type": event_type}  # received in 2023


async def commit_mix(api: Any) -> None:
    """ev-1 stale sms, ev-2 fresh sms, ev-3 old event of a type without a TTL."""
    await api.inbox.commit([(1, old(1)), (2, fresh(2)), (3, old(3, "call.ended"))])


def stale_flags(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {event["id"]: event.get("stale") for event in events}


def test_stale_policy_counts_from_received_at() -> None:
    """Stale strictly after received_at + TTL; no TTL or no usable time: never stale."""
    now = 1_700_000_100.0
    policy = StalePolicy({"call.arriving": 60.0}, "mark", clock=lambda: now)
    event = {"type": "call.arriving", "received_at": format_time(now - 60)}
    assert not policy.is_stale(event)
    assert policy.is_stale({**event, "received_at": format_time(now - 61)})
    assert not policy.is_stale({**event, "type": "sms.received",
                                "received_at": format_time(now - 10_000)})
    assert not policy.is_stale({**event, "received_at": "yesterday"})
    assert not policy.is_stale({"type": "call.arriving"})
    item = InboxEvent(5, {**event, "received_at": format_time(now - 61)})
    assert policy.present(item)["stale"] is True
    assert "stale" not in policy.present(InboxEvent(6, event))
    assert not policy.skip and StalePolicy({}, "skip").skip


async def test_pull_modes_mark_stale_events(tmp_path: Path) -> None:
    """/v1/events, named consumers and the stream mark stale events and keep the rest as is."""
    expected = {"ev-1": True, "ev-2": None, "ev-3": None}
    async with serve_api(tmp_path, ttl=TTL) as api:
        await commit_mix(api)
        _, polled = await api.get("/v1/events")
        _, consumed = await api.get("/v1/consumers/crm/events")
        async with await open_stream(api) as response:
            streamed = [data for _, data in await Stream(response).events(3)]
    assert stale_flags(polled["events"]) == expected
    assert stale_flags(consumed["events"]) == expected
    assert stale_flags(streamed) == expected


async def test_forward_and_tcp_mark_stale_events(tmp_path: Path) -> None:
    """Marking reaches push modes as the X-Xon-Stale header and the _stale=1 param."""
    async with serve_target(Target()) as target, serve_app(LineApp()) as app:
        async with serve_api(tmp_path, ttl=TTL, forward=[forward_to(target)],
                             tcp=[tcp_to(app)]) as api:
            await commit_mix(api)
            await eventually(lambda: len(target.delivered) == 3 and len(app.acked) == 3,
                             what="3 events forwarded and sent")
    assert [r.headers.get("X-Xon-Stale") for r in target.requests] == ["true", None, None]
    assert [fields.get("_stale") for _, fields in app.lines] == ["1", None, None]


async def test_skip_passes_stale_events_over_in_push_modes_but_keeps_them(
    tmp_path: Path,
) -> None:
    """stale = "skip": forward, tcp and the stream leave stale events out, the inbox keeps
    them, and health counts them."""
    async with serve_target(Target()) as target, serve_app(LineApp()) as app:
        async with serve_api(tmp_path, ttl=TTL, stale="skip", forward=[forward_to(target)],
                             tcp=[tcp_to(app)]) as api:
            await commit_mix(api)
            await eventually(lambda: len(target.delivered) == 2 and len(app.acked) == 2,
                             what="the fresh events forwarded and sent")
            async with await open_stream(api) as response:
                streamed = await Stream(response).events(2)

            async def passed_over() -> bool:
                _, health = await api.get("/v1/health")
                return all(e["cursor"] == "3" for e in health["forward"] + health["tcp"])
            await eventually(passed_over, what="both targets past the last event")
            _, health = await api.get("/v1/health")
            _, polled = await api.get("/v1/events")
    assert target.delivered == ["ev-2", "ev-3"]
    assert app.acked == ["ev-2", "ev-3"]
    assert [data["id"] for _, data in streamed] == ["ev-2", "ev-3"]
    assert [e["stale_skipped"] for e in health["forward"] + health["tcp"]] == [1, 1]
    assert stale_flags(polled["events"]) == {"ev-1": True, "ev-2": None, "ev-3": None}


async def test_event_going_stale_while_retried_is_skipped(tmp_path: Path) -> None:
    """With skip, an event that passes its TTL during retries stops being retried."""
    now = [time.time()]
    inbox = await Inbox.open(tmp_path / "inbox.db")
    try:
        async with serve_target(Target(script=[500] * 10_000)) as target:
            config = AgentConfig(ttl={"sms.received": 60.0}, stale="skip",
                                 forward=[forward_to(target)])
            delivery = Delivery(config, inbox, clock=lambda: now[0])
            await inbox.commit([(1, {**make_event(1), "received_at": format_time(now[0])})])
            await delivery.start()
            try:
                status = delivery.forwarders[0].status
                await eventually(lambda: status.failures >= 2, what="two failed attempts")
                now[0] += 61
                await eventually(lambda: status.stale_skipped == 1, what="the event skipped")
                await eventually(lambda: status.cursor == 1, what="the position stored")
                assert status.failures == 0
            finally:
                await delivery.close()
        assert target.delivered == []
        assert await inbox.position("forward:crm") == 1
        assert [e.event["id"] for e in await inbox.read(None, 10)] == ["ev-1"]
    finally:
        await inbox.close()
