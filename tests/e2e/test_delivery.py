"""End to end: simulator → relay → agent → local app, in every encoding (DESIGN principles 1-2)."""

from __future__ import annotations

import base64

import pytest

from shared.sim import ENCODINGS, EVENT_TYPES, plan, send_requests

from .conftest import Account, MakeAgent, event_key, planned_key

pytestmark = pytest.mark.slow


async def test_every_encoding_arrives_intact_and_in_order(
    account: Account, make_agent: MakeAgent
) -> None:
    """Each type in each encoding reaches the local app with its raw request byte-exact."""
    agent = await make_agent(account)
    planned = plan(EVENT_TYPES, ENCODINGS)
    results = await send_requests(account.ingress_url, planned)
    assert [r.status for r in results] == [200] * len(planned)

    events = await agent.collect(len(planned))
    assert len(events) == len(planned)
    for p, result, event in zip(planned, results, events, strict=True):
        assert event["id"] == result.event_id
        assert event["account"] == account.id
        assert event["type"] == p.event_type
        request = event["request"]
        assert request["method"] == p.request.method
        assert request["path"] == p.request.path_suffix
        assert request["query"] == p.request.query
        assert request["content_type"] == p.request.content_type
        assert base64.b64decode(request["body_b64"]) == p.request.body
        for name, value in p.params.items():
            assert event["params"][name] == value, (p.encoding, name)
    cursors = [int(e["cursor"]) for e in events]
    assert cursors == sorted(set(cursors))


async def test_backlog_sent_while_agent_is_stopped_arrives_in_order_once(
    account: Account, make_agent: MakeAgent
) -> None:
    """300 events sent while the agent is down arrive after it starts, in order, each once."""
    agent = await make_agent(account)
    assert agent.stop() == 0
    planned = plan(["sms.received", "call.arriving"], ["json", "query", "form"], 300)
    results = await send_requests(account.ingress_url, planned)
    assert all(r.ok for r in results)

    await agent.start()
    events = await agent.collect(300)
    assert [event_key(e) for e in events] == [planned_key(p) for p in planned]
    assert len({e["id"] for e in events}) == 300


async def test_second_agent_of_the_account_gets_every_event(
    account: Account, make_agent: MakeAgent
) -> None:
    """Two agents of one account each receive the whole stream, in the same order."""
    first = await make_agent(account)
    second = await make_agent(account)
    planned = plan(EVENT_TYPES, ENCODINGS, 40)
    results = await send_requests(account.ingress_url, planned, concurrency=4)
    assert all(r.ok for r in results)

    got_first = await first.collect(40)
    got_second = await second.collect(40)
    assert len(got_first) == len(got_second) == 40
    assert [e["id"] for e in got_first] == [e["id"] for e in got_second]
    assert {e["id"] for e in got_first} == {r.event_id for r in results}


async def test_repeated_xon_id_is_delivered_once(account: Account, make_agent: MakeAgent) -> None:
    """X-on resending an event with the same id gets 2xx again; the app sees it once."""
    agent = await make_agent(account)
    planned = plan(["call.arriving"], ["envelope"])
    first = await send_requests(account.ingress_url, planned)
    again = await send_requests(account.ingress_url, planned)
    assert first[0].ok and again[0].ok
    assert first[0].event_id == again[0].event_id

    events = await agent.collect(1)
    assert [e["id"] for e in events] == [first[0].event_id]
