"""The operations commands of ``xon-relay-server`` (docs/operations.md): accounts, agents,
events and the dashboard login, each a thin client of one admin API route.

``cli.py`` owns argv, config and the HTTP call to the admin listener; it hands this module
the parsed arguments and a ``call(method, path, body)`` function. Every command prints one
JSON object with ``--json``; every failure is one line on stderr and a non-zero exit (a
:class:`CommandFailed` or the admin API's refusal). Event bodies are never printed in text
output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.parse
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from shared.errors import RelayError
from shared.events import format_time, parse_time

__all__ = ["add_commands", "dispatch", "CommandFailed", "parse_duration", "parse_since"]

Call = Callable[[str, str, "dict[str, Any] | None"], Any]

_EXPORT_PAGE = 500
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


class CommandFailed(RelayError):
    """An operations command could not do its job; the message is the line the user sees."""

    code = "cli_error"


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h`` or ``7d`` → seconds.

    Raises:
        CommandFailed: anything else.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise CommandFailed(f"bad duration {text!r}: use e.g. 90s, 15m, 24h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_since(text: str, *, now: float) -> float:
    """An ISO 8601 time (UTC when it names no zone) or a duration ago (``2h``) → Unix time."""
    if _DURATION.fullmatch(text.strip()):
        return now - parse_duration(text)
    zoned = text if re.search(r"(Z|[+-]\d\d:?\d\d)$", text) else text + "Z"
    try:
        return parse_time(zoned)
    except ValueError as exc:
        raise CommandFailed(f"bad time {text!r}: use ISO 8601 or a duration ago (2h)") from exc


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _out(obj: dict[str, Any]) -> None:
    print(json.dumps(obj))


# -- parsers -------------------------------------------------------------------------------------


def add_commands(
    sub: Any,
    account_sub: Any,
    agent_sub: Any,
    admin: argparse.ArgumentParser,
) -> None:
    """Add the operations subcommands to ``cli.py``'s parser (``admin``: the parent parser with
    ``--admin-url``, ``--json`` and the rest)."""
    account_sub.add_parser("list", parents=[admin], help="list accounts")
    show = account_sub.add_parser("show", parents=[admin], help="show one account")
    show.add_argument("account", metavar="ACCOUNT")
    rename = account_sub.add_parser("rename", parents=[admin], help="rename an account")
    rename.add_argument("account", metavar="ACCOUNT")
    rename.add_argument("name", metavar="NEW_NAME")
    rotate = account_sub.add_parser(
        "rotate-key", parents=[admin], help="new ingress URL; the old one works for a while"
    )
    rotate.add_argument("account", metavar="ACCOUNT")
    rotate.add_argument(
        "--overlap", default="24h", help="how long the old URL keeps working (default 24h; 0)"
    )
    remove = account_sub.add_parser(
        "remove", parents=[admin], help="delete an account, its agents and its event log"
    )
    remove.add_argument("account", metavar="ACCOUNT")
    remove.add_argument("--force", action="store_true", help="revoke its agents first")

    agent_show = agent_sub.add_parser("show", parents=[admin], help="show one agent")
    agent_show.add_argument("agent_id", metavar="AGENT_ID")
    agent_rename = agent_sub.add_parser("rename", parents=[admin], help="rename an agent")
    agent_rename.add_argument("agent_id", metavar="AGENT_ID")
    agent_rename.add_argument("name", metavar="NEW_NAME")
    agent_replay = agent_sub.add_parser(
        "replay", parents=[admin], help="send an agent its account's events again"
    )
    agent_replay.add_argument("agent_id", metavar="AGENT_ID")
    point = agent_replay.add_mutually_exclusive_group(required=True)
    point.add_argument("--since", help="from this time: ISO 8601, or a duration ago (2h)")
    point.add_argument("--after-seq", type=int, help="the events after this seq")
    agent_replay.add_argument(
        "--wait", default="30s", help="how long to show progress (default 30s; 0: do not wait)"
    )

    events = sub.add_parser("events", help="look at the event log")
    events_sub = events.add_subparsers(dest="action", required=True, metavar="ACTION")
    event_show = events_sub.add_parser("show", parents=[admin], help="one event by id")
    event_show.add_argument("event_id", metavar="EVENT_ID")
    event_show.add_argument("--account", help="look only in this account")
    listing = events_sub.add_parser("list", parents=[admin], help="an account's latest events")
    listing.add_argument("account", metavar="ACCOUNT")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--before", type=int, help="page back from this seq")
    export = events_sub.add_parser(
        "export", parents=[admin], help="write an account's events as JSON lines"
    )
    export.add_argument("account", metavar="ACCOUNT")
    export.add_argument("--since", help="ISO 8601 time, or a duration ago (2h); default: all")
    export.add_argument("--output", type=Path, help="file to write (default: stdout)")

    dash = sub.add_parser("dashboard", parents=[admin], help="print a one-time dashboard link")
    dash.add_argument("--open", action="store_true", help="also open it in a browser")


# -- commands ------------------------------------------------------------------------------------


def dispatch(args: argparse.Namespace, call: Call) -> int | None:
    """Run an operations command; ``None`` when ``args`` names one of cli.py's own."""
    match (args.command, getattr(args, "action", None)):
        case ("account", "list"):
            return _account_list(args, call)
        case ("account", "show"):
            return _account_show(args, call)
        case ("account", "rename"):
            res = call("PUT", f"/v1/accounts/{_q(args.account)}/name", {"name": args.name})
            return _account_line(args, res, "renamed")
        case ("account", "rotate-key"):
            return _account_rotate(args, call)
        case ("account", "remove"):
            return _account_remove(args, call)
        case ("agent", "show"):
            return _agent_show(args, call("GET", f"/v1/agents/{_q(args.agent_id)}", None))
        case ("agent", "rename"):
            res = call("PATCH", f"/v1/agents/{_q(args.agent_id)}", {"name": args.name})
            return _agent_show(args, res)
        case ("agent", "replay"):
            return _agent_replay(args, call, sys.stderr)
        case ("events", "show"):
            return _event_show(args, call)
        case ("events", "list"):
            return _event_list(args, call)
        case ("events", "export"):
            return _event_export(args, call, sys.stderr)
        case ("dashboard", None):
            return _dashboard(args, call)
    return None


def _account_list(args: argparse.Namespace, call: Call) -> int:
    res = call("GET", "/v1/accounts", None)
    if args.json:
        _out({"accounts": res["accounts"]})
        return 0
    if not res["accounts"]:
        print("no accounts")
    for account in res["accounts"]:
        api = account["xon_api_url"] or "-"
        print(f"{account['id']}  {account['name']}  created={account['created_at']}  api={api}")
    return 0


def _account_show(args: argparse.Namespace, call: Call) -> int:
    res = call("GET", f"/v1/accounts/{_q(args.account)}", None)
    if args.json:
        _out(res)
        return 0
    print(f"account {res['name']} ({res['id']}), created {res['created_at']}")
    print(f"  agents: {res['agents']} ({res['active_agents']} not revoked)")
    print(f"  last seq: {res['head_seq']}")
    usage = res["usage"]
    quota = usage["quota_bytes"]
    share = "no quota" if quota is None else (
        f"quota {quota} bytes, {usage['bytes'] * 100 // quota}% used")
    print(f"  stored: {usage['events']} events, {usage['bytes']} bytes ({share})")
    print(
        f"  X-on API URL: {res['xon_api_url'] or '(none)'};"
        f" key: {'set' if res['xon_api_key_set'] else 'not set'}"
    )
    for until in res["previous_ingress_keys_valid_until"]:
        print(f"  a previous ingress URL works until {until}")
    return 0


def _account_line(args: argparse.Namespace, res: dict[str, Any], what: str) -> int:
    if args.json:
        _out({"id": res["id"], "name": res["name"]})
    else:
        print(f"account {res['id']} {what}: {res['name']}")
    return 0


def _account_rotate(args: argparse.Namespace, call: Call) -> int:
    overlap = parse_duration(args.overlap)
    res = call("POST", f"/v1/accounts/{_q(args.account)}/rotate-key", {"overlap": overlap})
    if args.json:
        _out(res)
        return 0
    print(f"account {res['name']} ({res['id']}): new ingress URL (keep it secret):")
    print(f"  {res['ingress_url']}")
    if res["previous_key_valid_until"]:
        print(
            f"the previous URL keeps working until {res['previous_key_valid_until']};"
            " change X-on's configuration before then"
        )
    else:
        print("the previous URL stopped working")
    return 0


def _account_remove(args: argparse.Namespace, call: Call) -> int:
    path = f"/v1/accounts/{_q(args.account)}" + ("?force=true" if args.force else "")
    res = call("DELETE", path, None)
    if args.json:
        _out(res)
    else:
        revoked = res["revoked_agents"]
        print(
            f"account {res['name']} ({res['id']}) removed with its event log"
            + (f"; {revoked} agent(s) revoked" if revoked else "")
        )
    return 0


def _agent_show(args: argparse.Namespace, res: dict[str, Any]) -> int:
    if args.json:
        _out(res)
        return 0
    print(f"agent {res['name']} ({res['agent_id']}) of account {res['account_id']}: {res['state']}")
    print(f"  last seen: {res['last_seen'] or '-'}; online since: {res['online_since'] or '-'}")
    print(f"  cursor: {res['cursor']}; backlog: {res['backlog']} event(s)")
    if res.get("withheld"):
        print(f"  withheld: {res['withheld']} event(s), last: {res['withheld_reason']}")
    return 0


def _agent_replay(args: argparse.Namespace, call: Call, progress: IO[str]) -> int:
    """Record the replay, then follow the agent's cursor until it passed the log's head of
    the request (or ``--wait`` ran out, or the agent is offline: it replays when it next
    connects)."""
    wait = parse_duration(args.wait)
    body: dict[str, Any]
    if args.since is not None:
        body = {"since": format_time(parse_since(args.since, now=time.time()))}
    else:
        if args.after_seq < 0:
            raise CommandFailed("--after-seq must be 0 or more")
        body = {"after_seq": args.after_seq}
    path = f"/v1/agents/{_q(args.agent_id)}"
    res = call("POST", f"{path}/replay", body)
    progress.write(
        f"replay of agent {res['agent_id']} recorded: {res['events']} event(s) after seq"
        f" {res['after_seq']}\n"
    )
    progress.flush()
    state = _follow_replay(path, res, call, progress, wait)
    if args.json:
        _out({**res, "state": state})
    elif state == "done":
        print(f"agent {res['agent_id']} has every event through seq {res['through_seq']} again")
    elif state == "pending":
        print(f"agent {res['agent_id']} is offline: the replay starts when it next connects")
    else:
        print(f"agent {res['agent_id']} is still replaying; follow it with: agent show")
    return 0


_POLL = 0.25
"""Seconds between two looks at the agent's cursor while a replay runs."""


def _follow_replay(
    path: str, res: dict[str, Any], call: Call, progress: IO[str], wait: float
) -> str:
    """``done``, ``pending`` (the agent is offline) or ``running`` (``wait`` ran out)."""
    through, start = res["through_seq"], res["after_seq"]
    if not res["disconnected"]:
        return "pending"  # not connected (here): it replays when it next connects
    deadline = time.monotonic() + wait
    shown = None
    while True:
        agent = call("GET", path, None)
        if agent["cursor"] >= through and agent["online"]:
            return "done"
        if time.monotonic() >= deadline:
            return "running" if agent["online"] else "pending"
        if agent["online"] and agent["cursor"] != shown:
            shown = agent["cursor"]
            progress.write(f"replaying: at seq {max(shown, start)} of {through}\n")
            progress.flush()
        time.sleep(_POLL)


def _event_show(args: argparse.Namespace, call: Call) -> int:
    query = "" if args.account is None else "?account=" + _q(args.account)
    res = call("GET", f"/v1/events/{_q(args.event_id)}{query}", None)
    if args.json:
        _out(res)
        return 0
    event = res["event"]
    print(f"event {res['id']}  seq={res['seq']}  account={res['account_id']}")
    print(f"  type: {res['type']}; received: {res['received_at']}; body: {res['bytes']} bytes")
    print(
        f"  request: {event['request']['method']} {event['request']['path'] or '/'}"
        f" ({event['request']['content_type'] or 'no content type'})"
    )
    print(f"  params: {', '.join(sorted(event['params'])) or '(none)'}  (values: --json)")
    return 0


def _event_list(args: argparse.Namespace, call: Call) -> int:
    if not 1 <= args.limit <= 1000:
        raise CommandFailed("--limit must be 1-1000")
    query = f"?limit={args.limit}" + ("" if args.before is None else f"&before={args.before}")
    if args.json:
        query += "&full=true"
    res = call("GET", f"/v1/accounts/{_q(args.account)}/events{query}", None)
    if args.json:
        _out({"events": res["events"], "next": res["next"]})
        return 0
    if not res["events"]:
        print("no events")
    for event in res["events"]:
        print(f"{event['seq']:>8}  {event['received_at']}  {event['type']}  {event['id']}")
    if res["next"] is not None:
        print(f"(older: --before {res['next']})")
    return 0


def _event_export(args: argparse.Namespace, call: Call, progress: IO[str]) -> int:
    if args.json and args.output is None:
        raise CommandFailed("--json prints a summary: give --output for the events")
    path = f"/v1/accounts/{_q(args.account)}/events?full=true&limit={_EXPORT_PAGE}"
    if args.since is not None:
        since = parse_since(args.since, now=time.time())
        path += "&since=" + _q(format_time(since))
    else:
        path += "&after=0"
    try:
        out = sys.stdout if args.output is None else args.output.open("w", encoding="utf-8")
    except OSError as exc:
        raise CommandFailed(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    written = 0
    try:
        res = call("GET", path, None)
        while True:
            for summary in res["events"]:
                out.write(json.dumps(summary["event"]) + "\n")
            written += len(res["events"])
            progress.write(f"exported {written} event(s), {res['remaining']} to go\n")
            progress.flush()
            if res["next"] is None:
                break
            base = f"/v1/accounts/{_q(args.account)}/events?full=true&limit={_EXPORT_PAGE}"
            res = call("GET", f"{base}&after={res['next']}", None)
    finally:
        if out is not sys.stdout:
            out.close()
    if args.json:
        _out({"exported": written, "output": str(args.output)})
    elif args.output is not None:
        print(f"exported {written} event(s) to {args.output}")
    return 0


def _dashboard(args: argparse.Namespace, call: Call) -> int:
    res = call("POST", "/v1/dashboard/login-codes", {})
    if args.json:
        _out({"url": res["url"], "expires_in": res["expires_in"]})
    else:
        print(f"open within {res['expires_in']:.0f} s (works once):")
        print(f"  {res['url']}")
    if args.open:
        webbrowser.open(res["url"])
    return 0
