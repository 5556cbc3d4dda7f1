"""``xon-relay-agent``: enroll, run and status (DESIGN §Command line).

The only module of the agent that reads argv, the environment and files by name. Errors are one
line on stderr; exit codes: 0 ok, 1 failure (relay unreachable, refused enrollment, runtime
failure), 2 bad configuration or usage, 3 the relay refused this agent (revoked/unauthorized).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shared import crypto, logs
from shared.config import (
    AGENT_ENV_PREFIX,
    AgentConfig,
    default_data_dir,
    load,
    parse_hostport,
)
from shared.errors import ConfigError, RelayError, Revoked, Unauthorized

from .app import local_url, run_agent
from .enroll import (
    CONFIG_FILE,
    INBOX_FILE,
    KEY_FILE,
    STATE_FILE,
    TOKEN_FILE,
    check_relay_url,
    is_enrolled,
    is_loopback_host,
    register,
    write_enrollment,
)
from .inbox import offline_stats

__all__ = ["main", "EXIT_OK", "EXIT_FAILURE", "EXIT_CONFIG", "EXIT_REFUSED"]

log = logging.getLogger("relay_agent")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3
APP_NAME = "xon-relay-agent"


class _Fail(Exception):
    """A one-line CLI failure with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=APP_NAME, description="X-on relay agent")
    sub = parser.add_subparsers(dest="command", required=True)

    enroll = sub.add_parser("enroll", help="make a key pair, register with the relay")
    enroll.add_argument("--relay", required=True, metavar="URL")
    enroll.add_argument("--code", required=True)
    enroll.add_argument("--data-dir", type=Path)
    enroll.add_argument("--name", default="")
    enroll.add_argument("--listen", default=AgentConfig().listen, metavar="HOST:PORT")
    enroll.add_argument("--insecure", action="store_true", help="allow http:// to a remote relay")
    enroll.add_argument("--force", action="store_true", help="replace an existing enrollment")
    enroll.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="run the link and the local API")
    run.add_argument("--config", type=Path, metavar="FILE")
    run.add_argument("--data-dir", type=Path)
    run.add_argument("--listen", metavar="HOST:PORT")

    status = sub.add_parser("status", help="link state, local API URL, backlog")
    status.add_argument("--data-dir", type=Path)
    status.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "enroll":
            return _enroll(args)
        if args.command == "run":
            return _run(args)
        return _status(args)
    except _Fail as exc:
        print(f"{APP_NAME}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK


def _data_dir(args: argparse.Namespace) -> Path:
    value: Path | None = args.data_dir
    return (value or default_data_dir(APP_NAME)).expanduser()


def _check_listen(listen: str) -> None:
    try:
        host, _ = parse_hostport(listen, what="listen")
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_CONFIG) from exc
    # DESIGN principle 3: nothing listens on the office PC except on loopback.
    if not is_loopback_host(host):
        raise _Fail(f"listen must be a loopback address, got {listen!r}", EXIT_CONFIG)


# -- enroll ------------------------------------------------------------------------------------


def _enroll(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    _check_listen(args.listen)
    try:
        plain = check_relay_url(args.relay, insecure=args.insecure)
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_FAILURE) from exc
    if plain and args.insecure:
        print(f"{APP_NAME}: warning: the link to {args.relay} is not encrypted", file=sys.stderr)
    if is_enrolled(data_dir) and not args.force:
        raise _Fail(f"{data_dir} already holds an enrollment (use --force to replace it)",
                    EXIT_FAILURE)
    key = crypto.generate_private_key()
    try:
        enrollment = asyncio.run(
            register(args.relay, code=args.code, public_key=crypto.public_key_b64(key),
                     name=args.name)
        )
    except RelayError as exc:
        raise _Fail(f"enrollment failed: {exc}", EXIT_FAILURE) from exc
    try:
        write_enrollment(data_dir, key=key, enrollment=enrollment, relay_url=args.relay,
                         listen=args.listen, insecure=args.insecure)
    except OSError as exc:
        raise _Fail(f"cannot write {data_dir}: {exc}", EXIT_FAILURE) from exc
    host, port = parse_hostport(args.listen)
    url = local_url(host, port)
    if args.json:
        print(json.dumps({"agent_id": enrollment.agent_id, "account_id": enrollment.account_id,
                          "local_url": url, "data_dir": str(data_dir.resolve())}))
    else:
        print(f"enrolled agent {enrollment.agent_id} (account {enrollment.account_id})")
        print(f"local API: {url} (token in {data_dir / TOKEN_FILE})")
        print(f"start it with: {APP_NAME} run --data-dir {data_dir}")
    return EXIT_OK


# -- run ---------------------------------------------------------------------------------------


def _load_config(args: argparse.Namespace) -> AgentConfig:
    flags: dict[str, object] = {"data_dir": args.data_dir, "listen": getattr(args, "listen", None)}
    path: Path | None = getattr(args, "config", None)
    if path is None:
        path = _data_dir(args) / CONFIG_FILE
        if not path.exists():
            raise _Fail(f"{path} not found: enroll first ({APP_NAME} enroll --relay URL "
                        "--code CODE)", EXIT_CONFIG)
    try:
        return load(AgentConfig, path=path, env=os.environ, flags=flags,
                    env_prefix=AGENT_ENV_PREFIX)
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_CONFIG) from exc


def _read_secret(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Fail(f"cannot read {path}: {exc.strerror}", EXIT_CONFIG) from exc


def _run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    logs.setup(config.log_level, config.log_format)
    _check_listen(config.listen)
    if not config.agent_id or not config.relay_url or not config.relay_id:
        raise _Fail("relay_url, agent_id and relay_id must be set: enroll first", EXIT_CONFIG)
    try:
        check_relay_url(config.relay_url, insecure=config.insecure)
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_CONFIG) from exc
    if config.insecure:
        log.warning("agent.insecure", extra={"relay_url": config.relay_url,
                                             "detail": "plain http to the relay is allowed"})
    try:
        key = crypto.private_key_from_pem(_read_secret(config.data_dir / KEY_FILE))
    except ValueError as exc:
        raise _Fail(f"{config.data_dir / KEY_FILE}: {exc}", EXIT_CONFIG) from exc
    token = _read_secret(config.data_dir / TOKEN_FILE).decode().strip()
    if not token:
        raise _Fail(f"{config.data_dir / TOKEN_FILE} is empty", EXIT_CONFIG)
    try:
        asyncio.run(_serve(config, token, key))
    except Revoked as exc:
        log.error("agent.revoked", extra={"agent_id": config.agent_id, "reason": str(exc)})
        return EXIT_REFUSED
    except Unauthorized as exc:
        log.error("agent.unauthorized", extra={"agent_id": config.agent_id, "reason": str(exc)})
        return EXIT_REFUSED
    except (RelayError, OSError) as exc:
        log.error("agent.failed", extra={"error": str(exc)})
        return EXIT_FAILURE
    log.info("agent.stopped", extra={"agent_id": config.agent_id})
    return EXIT_OK


async def _serve(config: AgentConfig, token: str, key: crypto.Ed25519PrivateKey) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover - Windows: Ctrl-C raises instead
            pass
    await run_agent(config, token=token, private_key=key, stop=stop)


# -- status ------------------------------------------------------------------------------------


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _health(url: str, token: str) -> dict[str, Any] | None:
    request = urllib.request.Request(url + "/v1/health",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            data = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _status(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    relay_url = ""
    try:
        relay_url = _load_config(args).relay_url
    except _Fail:
        pass
    state: dict[str, Any] = {}
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        pass
    health = None
    if isinstance(state, dict) and _pid_alive(state.get("pid")):
        token = (data_dir / TOKEN_FILE).read_text().strip() if (data_dir / TOKEN_FILE).exists() \
            else ""
        health = _health(str(state.get("local_url", "")), token)
    if health is not None:
        out: dict[str, Any] = {"running": True, "pid": state["pid"],
                               "local_url": state.get("local_url"), **health}
    else:
        try:
            stats = offline_stats(data_dir / INBOX_FILE)
        except RelayError as exc:
            raise _Fail(str(exc), EXIT_FAILURE) from exc
        out = {"running": False, "link": "not running", "relay_url": relay_url,
               "local_url": None,
               "inbox": {"events": stats.events if stats else 0,
                         "last_cursor": str(stats.last_cursor) if stats else "0",
                         "last_seq": stats.last_seq if stats else 0}}
    if args.json:
        print(json.dumps(out))
        return EXIT_OK
    inbox = out["inbox"]
    if out["running"]:
        print(f"running (pid {out['pid']}), link {out['link']}")
        print(f"relay: {out.get('relay_url')}")
        print(f"local API: {out['local_url']}")
        if out.get("last_error"):
            print(f"last error: {out['last_error']}")
    else:
        print("not running")
        if relay_url:
            print(f"relay: {relay_url}")
    print(f"inbox: {inbox['events']} events, last cursor {inbox['last_cursor']}, "
          f"last seq {inbox['last_seq']}")
    return EXIT_OK
