"""``xon-relay-server``: run the relay, and manage accounts and agents (DESIGN §Command line).

The only module of the server that reads argv, the environment and files (STYLE §5). ``run``
writes ``admin.json`` (admin URL, token, public URL, pid; 0600) into the data dir; the admin
commands read it and call the running server's admin API, so they never open the store behind
the server's back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import getpass
import json
import logging
import os
import signal
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from shared import aio, crypto, logs
from shared.config import SERVER_ENV_PREFIX, ServerConfig, default_data_dir, load, parse_hostport
from shared.errors import ConfigError, RelayError
from shared.files import NotOurs, ensure_private_dir, restrict_mode, write_private_file

from . import admin_cli
from .admin import xon_api_key_problem
from .app import create_admin_app, create_public_app, server_options
from .services import open_services
from .store import Store

__all__ = ["main"]

log = logging.getLogger(__name__)

PROG = "xon-relay-server"
ADMIN_FILE = "admin.json"
TOKEN_FILE = "admin-token"
ADMIN_URL_ENV = "XON_RELAY_ADMIN_URL"
XON_API_KEY_ENV = "XON_RELAY_XON_API_KEY"
_KEY_FILE_MAX = 64 * 1024
"""Bytes read from an X-on API key file or standard input at most."""
_HTTP_TIMEOUT = 30.0


class CliFailure(RelayError):
    """A command could not do its job; the message is the one line the user sees."""

    code = "cli_error"


# -- argument parsing ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML config file")
    common.add_argument("--data-dir", help="data directory (store, admin URL and token)")

    admin = argparse.ArgumentParser(add_help=False, parents=[common])
    admin.add_argument(
        "--admin-url", help=f"admin API URL (default: from the data dir; env {ADMIN_URL_ENV})"
    )
    admin.add_argument("--admin-token-file", type=Path, help="file holding the admin token")
    admin.add_argument("--json", action="store_true", help="print one JSON object")

    parser = argparse.ArgumentParser(prog=PROG, description="X-on relay server")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the relay server")
    run.add_argument("--listen", help="public HOST:PORT (ingress, agents, enrollment)")
    run.add_argument("--admin-listen", help="admin HOST:PORT (loopback by default)")
    run.add_argument("--store", help="sqlite:///PATH or redis://HOST:PORT/DB")
    run.add_argument("--public-url", help="base URL printed in ingress URLs")
    run.add_argument("--log-level", help="debug, info, warning, error or critical")
    run.add_argument("--log-format", choices=("text", "json"))

    account = sub.add_parser("account", help="manage accounts")
    account_sub = account.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = account_sub.add_parser("add", parents=[admin], help="create an account")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--xon-api-url", default="")
    _api_key_arguments(add)
    account_set = account_sub.add_parser(
        "set", parents=[admin], help="change an account's X-on API URL or key"
    )
    account_set.add_argument("account", metavar="ACCOUNT", help="account id or name")
    account_set.add_argument("--xon-api-url", default=None, help="X-on API base URL ('' clears)")
    _api_key_arguments(account_set, clears=True)

    agent = sub.add_parser("agent", help="manage agents")
    agent_sub = agent.add_subparsers(dest="action", required=True, metavar="ACTION")
    agent_add = agent_sub.add_parser("add", parents=[admin], help="create an enrollment code")
    agent_add.add_argument("account", metavar="ACCOUNT", help="account id or name")
    agent_add.add_argument("--name", default=None)
    agent_list = agent_sub.add_parser("list", parents=[admin], help="list agents")
    agent_list.add_argument("account", metavar="ACCOUNT", nargs="?")
    revoke = agent_sub.add_parser("revoke", parents=[admin], help="revoke an agent")
    revoke.add_argument("agent_id", metavar="AGENT_ID")
    admin_cli.add_commands(sub, account_sub, agent_sub, admin)
    return parser


def _api_key_arguments(parser: argparse.ArgumentParser, *, clears: bool = False) -> None:
    """The X-on API key's sources (docs/deployment.md, X-on API keys): a file, standard input
    or the environment keep it out of the process list that every local user can read."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--xon-api-key-file",
        metavar="FILE",
        help="read the X-on API key from FILE, or from standard input for '-'"
        f" (or set {XON_API_KEY_ENV})",
    )
    source.add_argument(
        "--xon-api-key",
        metavar="KEY",
        help="the X-on API key itself: other local users can see it while the command runs"
        + (" ('' clears)" if clears else ""),
    )


def _xon_api_key(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """The X-on API key from ``--xon-api-key``, ``--xon-api-key-file`` or the environment, in
    that order (``None``: none given; an empty environment variable is none).

    Raises:
        CliFailure: the file cannot be read, or the key is not one (admin.xon_api_key_problem).
    """
    key: str
    source: str
    if args.xon_api_key is not None:
        key, source = str(args.xon_api_key), "--xon-api-key"
    elif args.xon_api_key_file is not None:
        source = str(args.xon_api_key_file)
        key = _read_key_file(source)
        if not key:
            raise CliFailure(f"no X-on API key in {_key_source(source)}")
    elif env.get(XON_API_KEY_ENV, "").strip():
        key, source = env[XON_API_KEY_ENV].strip(), XON_API_KEY_ENV
    else:
        return None
    problem = xon_api_key_problem(key)
    if problem is not None:
        raise CliFailure(f"{problem} (from {_key_source(source)})")
    return key


def _key_source(source: str) -> str:
    return "standard input" if source == "-" else source


def _read_key_file(name: str) -> str:
    """The key in file ``name`` ('-': standard input, prompted for without echo on a
    terminal), without surrounding whitespace."""
    try:
        if name == "-":
            if sys.stdin.isatty():
                return getpass.getpass("X-on API key: ").strip()
            raw = sys.stdin.buffer.read(_KEY_FILE_MAX + 1)
        else:
            with open(name, "rb") as handle:
                raw = handle.read(_KEY_FILE_MAX + 1)
    except OSError as exc:
        reason = exc.strerror or exc
        raise CliFailure(f"cannot read the X-on API key from {name}: {reason}") from exc
    if len(raw) > _KEY_FILE_MAX:
        raise CliFailure(f"{_key_source(name)} holds more than {_KEY_FILE_MAX} bytes: not a key")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise CliFailure(f"{_key_source(name)} is not UTF-8 text") from exc


def _load_config(args: argparse.Namespace, env: Mapping[str, str]) -> ServerConfig:
    flags: dict[str, object] = {
        name: getattr(args, name, None)
        for name in (
            "listen",
            "admin_listen",
            "data_dir",
            "store",
            "public_url",
            "log_level",
            "log_format",
        )
    }
    path: Path | None = args.config
    if path is None:
        # data_dir/config.toml is read when it exists; data_dir itself then comes from a flag,
        # the environment or the default.
        data_dir = args.data_dir or env.get(SERVER_ENV_PREFIX + "DATA_DIR")
        candidate = (Path(data_dir).expanduser() if data_dir else _default_dir()) / "config.toml"
        path = candidate if candidate.is_file() else None
    return load(ServerConfig, path=path, env=env, flags=flags, env_prefix=SERVER_ENV_PREFIX)


def _default_dir() -> Path:
    return default_data_dir("xon-relay-server")


# -- run -------------------------------------------------------------------------------------


def _bind(address: str, what: str) -> socket.socket:
    host, port = parse_hostport(address, what=what)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CliFailure(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        # A reconnect storm of thousands of agents overflows a 128 backlog (bench/scale).
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise CliFailure(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    return sock


def _sock_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url(address: str) -> str:
    host, port = parse_hostport(address)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _admin_token(data_dir: Path) -> str:
    """The admin token, made once and reused across restarts."""
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    except OSError as exc:
        raise CliFailure(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not token:
        token = crypto.new_token(32)
        _write_private(path, token + "\n")
    return token


def _write_private(path: Path, text: str) -> None:
    try:
        write_private_file(path, text)
    except OSError as exc:  # a full disk, a read-only data dir
        raise CliFailure(f"cannot write {path}: {exc.strerror or exc}") from exc


def _private_data_dir(path: Path) -> Path:
    """The data dir, created owner-only (0700) or tightened to it when an older version or an
    operator left it open; one we do not own is refused (docs/deployment.md, Files and modes).
    """
    try:
        data_dir = ensure_private_dir(path)
        old = restrict_mode(data_dir, 0o700)
    except NotOurs as exc:
        raise CliFailure(f"data dir {exc}") from exc
    except OSError as exc:
        raise CliFailure(f"cannot use data dir {path}: {exc.strerror or exc}") from exc
    if old is not None:
        log.warning("server.data_dir_tightened", extra={"path": str(path), "mode": f"{old:04o}"})
    return data_dir


async def _until_stopped(
    stop: asyncio.Event, failed: Awaitable[BaseException]
) -> BaseException | None:
    """Wait for a stop signal (``None``) or for the store to fail for good (why)."""
    signalled = asyncio.ensure_future(stop.wait())
    failure = asyncio.ensure_future(failed)
    try:
        await asyncio.wait({signalled, failure}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        failure.cancel()
    return failure.result() if failure.done() and not failure.cancelled() else None


async def _serve(config: ServerConfig, *, store: Store | None = None) -> int:
    """Serve until SIGTERM/SIGINT (0) or until the store fails for good (:class:`CliFailure`);
    ``store``: an open store to serve instead of ``config.store_url``'s (tests)."""
    data_dir = _private_data_dir(config.data_dir)
    token = _admin_token(data_dir)
    public_sock = _bind(config.listen, "listen")
    try:
        admin_sock = _bind(config.admin_listen, "admin_listen")
    except CliFailure:
        public_sock.close()
        raise
    # Port 0 means "any": ingress URLs and enrollment commands must print the real port.
    config = dataclasses.replace(
        config,
        listen=_sock_address(public_sock),
        admin_listen=_sock_address(admin_sock),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # Windows: KeyboardInterrupt instead
            loop.add_signal_handler(signum, stop.set)

    admin_file = data_dir / ADMIN_FILE
    async with open_services(config, admin_token=token, store=store) as services:
        public_app = create_public_app(services)
        # Drain already waited for the requests in flight; this bounds any that slipped in
        # after it, before the listening socket closed.
        grace = config.shutdown_grace
        public = web.AppRunner(public_app, shutdown_timeout=grace, **server_options(config))
        admin = web.AppRunner(create_admin_app(services), access_log=None, shutdown_timeout=grace)
        await public.setup()
        await admin.setup()
        try:
            # SockSite listens again with its own backlog (aiohttp's default is 128), which
            # would undo _bind()'s: pass the same one.
            await web.SockSite(public, public_sock, backlog=socket.SOMAXCONN).start()
            await web.SockSite(admin, admin_sock, backlog=socket.SOMAXCONN).start()
            admin_url = _url(config.admin_listen)
            _write_private(
                admin_file,
                json.dumps(
                    {
                        "admin_url": admin_url,
                        "token": token,
                        "public_url": config.base_url,
                        "pid": os.getpid(),
                    }
                ),
            )
            log.info(
                "server.started",
                extra={
                    "listen": config.listen,
                    "admin_listen": config.admin_listen,
                    "public_url": config.base_url,
                    "relay_id": services.relay_id,
                    "pid": os.getpid(),
                },
            )
            failure = await _until_stopped(stop, services.store.wait_failed())
            # A failed store was logged with its cause; the exit status tells the supervisor
            # to restart the relay rather than leave it half alive (docs/operations.md).
            log.info("server.stopping", extra={"reason": "store failed" if failure else "signal"})
            # Readiness fails first, requests in flight finish (within shutdown_grace), then
            # agents are told to go elsewhere, then the listeners stop; the store closes last
            # (leaving open_services). Issue 6: graceful shutdown, 0 lost.
            await services.drain()
        finally:
            await admin.cleanup()
            await public.cleanup()
            with contextlib.suppress(FileNotFoundError):
                admin_file.unlink()
    log.info("server.stopped")
    if failure is not None:
        raise CliFailure(f"stopped: {failure}")
    return 0


_GC_THRESHOLDS = (50_000, 20, 10)
"""The cyclic collector's thresholds in the relay (Python's defaults: 700, 10, 10). With the
defaults, 10,000 links' objects are scanned whole every second or two in a reconnect storm,
each pass holding the event loop up to 1.5 s, mostly to find nothing: short-lived request and
handshake objects reach the oldest generation after 7,000 allocations and soon make up the
quarter of it that triggers a full pass. A larger youngest generation lets them die young
(docs/performance.md, reconnect storm). Cyclic garbage waits a little longer for its pass."""


def _cmd_run(config: ServerConfig) -> int:
    try:
        logs.setup(config.log_level, config.log_format)
    except ValueError as exc:
        raise ConfigError(f"log_level: unknown level {config.log_level!r}") from exc
    gc.set_threshold(*_GC_THRESHOLDS)
    return aio.run(_serve(config))


# -- admin commands --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Admin:
    url: str
    token: str
    public_url: str


def _admin_endpoint(
    args: argparse.Namespace, config: ServerConfig, env: Mapping[str, str]
) -> _Admin:
    url = args.admin_url or env.get(ADMIN_URL_ENV)
    if url:
        token_file = args.admin_token_file or config.data_dir / TOKEN_FILE
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliFailure(
                f"cannot read the admin token from {token_file} ({exc.strerror or exc});"
                " pass --admin-token-file"
            ) from exc
        return _Admin(url.rstrip("/"), token, config.base_url)
    path = config.data_dir / ADMIN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _Admin(
            str(data["admin_url"]).rstrip("/"), str(data["token"]), str(data["public_url"])
        )
    except FileNotFoundError as exc:
        raise CliFailure(
            f"relay server not running (no {path}); start it with `{PROG} run` or pass --admin-url"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliFailure(f"cannot read {path}: {exc}") from exc


def _call(admin: _Admin, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        admin.url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {admin.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise CliFailure(_error_message(exc)) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            raise CliFailure(
                f"relay server not running at {admin.url} (connection refused)"
            ) from exc
        raise CliFailure(f"cannot reach the relay admin API at {admin.url}: {exc.reason}") from exc
    except OSError as exc:  # timeouts, resets
        raise CliFailure(f"cannot reach the relay admin API at {admin.url}: {exc}") from exc
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CliFailure(f"unexpected answer from the relay admin API at {admin.url}") from exc


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
        return f"{error['message']} ({error['code']})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"relay admin API answered HTTP {exc.code}"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj))


def _cmd_account_add(args: argparse.Namespace, admin: _Admin, api_key: str | None) -> int:
    body = {"name": args.name, "xon_api_url": args.xon_api_url, "xon_api_key": api_key or ""}
    res = _call(admin, "POST", "/v1/accounts", body)
    if args.json:
        _print_json({"id": res["id"], "name": res["name"], "ingress_url": res["ingress_url"]})
    else:
        print(f"account {res['name']} created: {res['id']}")
        print("ingress URL (keep it secret: anyone who has it can post events):")
        print(f"  {res['ingress_url']}")
    return 0


def _cmd_account_set(args: argparse.Namespace, admin: _Admin, api_key: str | None) -> int:
    body = {
        name: value
        for name, value in (("xon_api_url", args.xon_api_url), ("xon_api_key", api_key))
        if value is not None
    }
    if not body:
        raise CliFailure(
            "nothing to change: give --xon-api-url and/or the X-on API key"
            f" (--xon-api-key-file, {XON_API_KEY_ENV} or --xon-api-key)"
        )
    res = _call(admin, "PATCH", f"/v1/accounts/{_quote(args.account)}", body)
    summary = {
        "id": res["id"],
        "name": res["name"],
        "xon_api_url": res["xon_api_url"],
        "xon_api_key_set": res["xon_api_key_set"],
    }
    if args.json:
        _print_json(summary)
    else:
        key_state = "set" if res["xon_api_key_set"] else "not set"
        print(f"account {res['name']} ({res['id']}) updated")
        print(f"  X-on API URL: {res['xon_api_url'] or '(none)'}; X-on API key: {key_state}")
    return 0


def _cmd_agent_add(args: argparse.Namespace, admin: _Admin) -> int:
    body = {} if args.name is None else {"name": args.name}
    res = _call(admin, "POST", f"/v1/accounts/{_quote(args.account)}/agents", body)
    if args.json:
        _print_json(
            {
                "agent_id": res["agent_id"],
                "code": res["code"],
                "expires_at": res["expires_at"],
                "account_id": res["account_id"],
            }
        )
    else:
        print(f"agent {res['agent_id']} created for account {res['account_id']}")
        print(f"one-time enrollment code (valid until {res['expires_at']}); on the office PC run:")
        print(f"  xon-relay-agent enroll --relay {admin.public_url} --code {res['code']}")
    return 0


def _cmd_agent_list(args: argparse.Namespace, admin: _Admin) -> int:
    query = "" if args.account is None else "?account=" + _quote(args.account)
    res = _call(admin, "GET", "/v1/agents" + query)
    if args.json:
        _print_json({"agents": res["agents"]})
        return 0
    if not res["agents"]:
        print("no agents")
    for agent in res["agents"]:
        if agent["revoked"]:
            state = "revoked"
        elif not agent["enrolled"]:
            state = "pending"
        else:
            state = "online" if agent["online"] else "offline"
        print(
            f"{agent['agent_id']}  {agent['account_id']}  {agent['name']}  {state}"
            f"  cursor={agent['cursor']}  backlog={agent['backlog']}"
            f"  last_seen={agent['last_seen'] or '-'}"
        )
    return 0


def _cmd_agent_revoke(args: argparse.Namespace, admin: _Admin) -> int:
    res = _call(admin, "POST", f"/v1/agents/{_quote(args.agent_id)}/revoke")
    if args.json:
        _print_json(
            {
                "agent_id": res["agent_id"],
                "revoked": res["revoked"],
                "disconnected": res["disconnected"],
            }
        )
    else:
        print(
            f"agent {res['agent_id']} revoked"
            + (" and disconnected" if res["disconnected"] else "")
        )
    return 0


def _dispatch(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = _load_config(args, env)
    if args.command == "run":
        return _cmd_run(config)
    # Before any call: a key that cannot be read fails the command with nothing changed.
    keyed = args.command == "account" and args.action in ("add", "set")
    api_key = _xon_api_key(args, env) if keyed else None
    admin = _admin_endpoint(args, config, env)
    done = admin_cli.dispatch(args, lambda method, path, body: _call(admin, method, path, body))
    if done is not None:
        return done
    match (args.command, args.action):
        case ("account", "add"):
            return _cmd_account_add(args, admin, api_key)
        case ("account", "set"):
            return _cmd_account_set(args, admin, api_key)
        case ("agent", "add"):
            return _cmd_agent_add(args, admin)
        case ("agent", "list"):
            return _cmd_agent_list(args, admin)
        case ("agent", "revoke"):
            return _cmd_agent_revoke(args, admin)
    raise CliFailure(f"unknown command {args.command} {args.action}")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry point; exits 0, 1 (failure) or 2 (usage or configuration)."""
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args, os.environ)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        code = 2
    except RelayError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug: still one line, never a traceback (DESIGN principle 6)
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
