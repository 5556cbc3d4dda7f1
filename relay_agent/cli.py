"""``xon-relay-agent``: enroll, run, status, token, open, init, doctor and service (DESIGN
§Command line).

The only module of the agent that reads argv, the environment and files by name. Errors are one
line on stderr; exit codes: 0 ok, 1 failure (relay unreachable, refused enrollment, runtime
failure), 2 bad configuration or usage, 3 the relay refused this agent (revoked/unauthorized).
``status`` maps its answer onto the same codes: 0 an agent runs, 1 none runs, 2 not enrolled,
3 the relay refused the last run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import aio, crypto, logs, oslock
from shared.config import (
    AGENT_ENV_PREFIX,
    AgentConfig,
    default_data_dir,
    load,
    parse_hostport,
)
from shared.errors import ConfigError, RelayError, Revoked, Unauthorized
from shared.files import ensure_private_dir, write_private_file

from . import net, page, refusal, security, tokens, winacl, winservice
from .app import local_url, run_agent
from .configfile import render_config, unknown_keys
from .enroll import (
    CONFIG_FILE,
    INBOX_FILE,
    KEY_FILE,
    LOCK_FILE,
    STATE_FILE,
    TOKEN_FILE,
    check_relay_url,
    register,
    write_enrollment,
)
from .inbox import offline_stats
from .pac import PacError
from .system import AddressInUse, pid_alive

if TYPE_CHECKING:
    from .doctor import Check

__all__ = ["main", "run_hosted", "EXIT_OK", "EXIT_FAILURE", "EXIT_CONFIG", "EXIT_REFUSED"]

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
    enroll.add_argument("--listen", metavar="HOST:PORT",
                        help=f"local API address (default: the config's, else "
                             f"{AgentConfig().listen})")
    enroll.add_argument("--insecure", action="store_true", help="allow http:// to a remote relay")
    enroll.add_argument("--allow-non-loopback", action="store_true", default=None,
                        help="let --listen name a non-loopback address (written to the config)")
    enroll.add_argument("--proxy", metavar="URL",
                        help="HTTP CONNECT proxy http://[USER:PASSWORD@]HOST:PORT, pac:URL, "
                             "auto or direct (default: HTTPS_PROXY/NO_PROXY, then the Windows "
                             "proxy settings; written to the config)")
    enroll.add_argument("--ca-file", type=Path, metavar="FILE",
                        help="PEM CA certificates to trust besides the OS store (written to "
                             "the config)")
    enroll.add_argument("--force", action="store_true", help="replace an existing enrollment")
    enroll.add_argument("--token-reader", action="append", default=[], metavar="ACCOUNT",
                        help="Windows: an account (DOMAIN\\user or a group) that may also read "
                             "local-token, for the local apps; repeatable")
    enroll.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="run the link and the local API")
    run.add_argument("--config", type=Path, metavar="FILE")
    run.add_argument("--data-dir", type=Path)
    run.add_argument("--listen", metavar="HOST:PORT")
    run.add_argument("--allow-non-loopback", action="store_true", default=None,
                     help="let listen name a non-loopback address (DESIGN principle 3 says "
                          "loopback only)")

    status = sub.add_parser("status", help="link state, local API URL, backlog")
    status.add_argument("--data-dir", type=Path)
    status.add_argument("--json", action="store_true")

    token = sub.add_parser("token", help="manage the local API token")
    token_sub = token.add_subparsers(dest="action", required=True)
    rotate = token_sub.add_parser("rotate", help="write a new local token; a running agent "
                                  "takes it at once and refuses the old one")
    rotate.add_argument("--data-dir", type=Path)

    open_page = sub.add_parser("open", help="open the status page with a one-time login link")
    open_page.add_argument("--data-dir", type=Path)
    open_page.add_argument("--no-browser", action="store_true",
                           help="only print the link (it works once, within a minute)")

    init = sub.add_parser("init", help="write a commented config.toml with every default")
    init.add_argument("--data-dir", type=Path)
    init.add_argument("--force", action="store_true",
                      help="rewrite an existing config.toml (its settings are kept)")

    check = sub.add_parser("doctor", help="check config, enrollment, network and local port")
    check.add_argument("--config", type=Path, metavar="FILE")
    check.add_argument("--data-dir", type=Path)
    check.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="for each network step (default 5)")
    check.add_argument("--json", action="store_true")
    check.add_argument("--service", nargs="?", const=winservice.SERVICE_NAME, metavar="NAME",
                       help="check as the Windows service would run: the data dir and config "
                            "of its registration, the system-wide environment (default name "
                            f"{winservice.SERVICE_NAME})")

    service = sub.add_parser("service", help="the Windows service (install, uninstall, start, "
                             "stop)")
    service_sub = service.add_subparsers(dest="action", required=True)
    for action in ("install", "uninstall", "start", "stop"):
        one = service_sub.add_parser(action)
        one.add_argument("--name", default=winservice.SERVICE_NAME, help="service name")
        one.add_argument("--dry-run", action="store_true",
                         help="print the commands instead of running them")
        if action == "install":
            one.add_argument("--data-dir", help="default: %%PROGRAMDATA%%\\xon-relay-agent")
            one.add_argument("--proxy", metavar="URL",
                             help="the proxy the service uses, written to the data dir's "
                                  "config.toml ('' removes it)")
            one.add_argument("--ca-file", type=Path, metavar="FILE",
                             help=f"PEM CA certificates to trust, copied into the data dir as "
                                  f"{winservice.CA_FILE} (the service account cannot read "
                                  "your profile)")
            one.add_argument("--start", choices=("auto", "delayed-auto", "demand"),
                             default="auto")
    host = service_sub.add_parser("run", help="run as the service (the service manager "
                                  "starts this; in a console use run)")
    host.add_argument("--data-dir", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "enroll": _enroll, "run": _run, "status": _status, "token": _token, "open": _open,
        "init": _init, "doctor": _doctor, "service": _service,
    }
    try:
        return commands[args.command](args)
    except _Fail as exc:
        print(f"{APP_NAME}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK


def _data_dir(args: argparse.Namespace) -> Path:
    value: Path | None = args.data_dir
    return (value or default_data_dir(APP_NAME)).expanduser()


def _check_listen(listen: str, allow_non_loopback: bool = False) -> None:
    try:
        security.check_listen(listen, allow_non_loopback=allow_non_loopback)
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_CONFIG) from exc


# -- enroll ------------------------------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any] | None:
    """The raw settings of a config file; None when it is missing or not valid TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _holds_enrollment(data_dir: Path) -> bool:
    """A key, or a config naming an agent (or unreadable): not a fresh ``init`` config."""
    if (data_dir / KEY_FILE).exists():
        return True
    path = data_dir / CONFIG_FILE
    if not path.exists():
        return False
    values = _read_toml(path)
    return values is None or bool(values.get("agent_id"))


def _setting(flag: object, previous: dict[str, Any], name: str) -> str:
    """An enrollment setting: flag > environment > the earlier config file (DESIGN §Command
    line); empty when none gives it."""
    if flag is not None:
        return str(flag)
    env_name = AGENT_ENV_PREFIX + name.upper()
    if env_name in os.environ:
        return os.environ[env_name]
    value = previous.get(name)
    return str(value) if isinstance(value, str) else ""


def _enroll_network(args: argparse.Namespace, previous: dict[str, Any]
                    ) -> tuple[net.ProxyChoice, ssl.SSLContext]:
    """The proxy and TLS trust enrollment uses: the ones ``run`` will use."""
    ca_text = _setting(args.ca_file, previous, "ca_file").strip()
    ca_file = Path(ca_text).expanduser() if ca_text.lower() not in ("", "none") else None
    try:
        context = net.ssl_context(ca_file)
        choice = net.resolve_proxy(_setting(args.proxy, previous, "proxy"), args.relay,
                                   os.environ, ca_file=ca_file)
        return choice, context
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_CONFIG) from exc


def _token_readers(accounts: list[str]) -> list[str]:
    """The SIDs of ``--token-reader`` accounts (docs/deployment.md, Secrets on Windows)."""
    if not accounts:
        return []
    try:
        api = winacl.system_api()
        if api is None:
            raise _Fail("--token-reader sets a Windows access list; on this system the token "
                        "is readable by the agent's user only (run the local apps as that "
                        "user)", EXIT_CONFIG)
        return [api.lookup(account) for account in accounts]
    except OSError as exc:
        raise _Fail(f"--token-reader: {exc.strerror or exc}", EXIT_CONFIG) from exc


def _enroll(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    previous = _read_toml(data_dir / CONFIG_FILE) or {}
    listen = args.listen or str(previous.get("listen") or AgentConfig().listen)
    allow_non_loopback = bool(args.allow_non_loopback) or previous.get("allow_non_loopback") is True
    _check_listen(listen, allow_non_loopback=allow_non_loopback)
    try:
        plain = check_relay_url(args.relay, insecure=args.insecure)
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_FAILURE) from exc
    if plain and args.insecure:
        print(f"{APP_NAME}: warning: the link to {args.relay} is not encrypted", file=sys.stderr)
    if _holds_enrollment(data_dir) and not args.force:
        raise _Fail(f"{data_dir} already holds an enrollment (use --force to replace it)",
                    EXIT_FAILURE)
    if (data_dir / LOCK_FILE).exists():
        # Replacing the key and config under a running agent would leave it running as an
        # agent that no longer exists: stop it first.
        with _one_agent(data_dir):
            pass
    choice, context = _enroll_network(args, previous)
    readers = _token_readers(args.token_reader)  # before the code is spent on a typo
    key = crypto.generate_private_key()
    try:
        enrollment = asyncio.run(
            register(args.relay, code=args.code, public_key=crypto.public_key_b64(key),
                     name=args.name, proxy=choice.url, ssl_context=context)
        )
    except RelayError as exc:
        raise _Fail(f"enrollment failed: {exc}", EXIT_FAILURE) from exc
    try:
        write_enrollment(data_dir, key=key, enrollment=enrollment, relay_url=args.relay,
                         listen=listen, insecure=args.insecure, token_readers=readers)
        # The commented form (what init writes), keeping the settings of an earlier file.
        settings = {**previous, **(_read_toml(data_dir / CONFIG_FILE) or {})}
        if not args.insecure:
            settings.pop("insecure", None)
        if args.allow_non_loopback:
            settings["allow_non_loopback"] = True
        if args.proxy is not None:
            settings["proxy"] = args.proxy
        if args.ca_file is not None:
            settings["ca_file"] = str(args.ca_file.expanduser().resolve())
        write_private_file(data_dir / CONFIG_FILE, render_config(settings))
    except OSError as exc:
        raise _Fail(f"cannot write {data_dir}: {exc}", EXIT_FAILURE) from exc
    host, port = parse_hostport(listen)
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
    flags: dict[str, object] = {
        "data_dir": args.data_dir,
        "listen": getattr(args, "listen", None),
        "allow_non_loopback": True if getattr(args, "allow_non_loopback", None) else None,
    }
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


StopFunction = Callable[[], None]


def _run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    logs.setup(config.log_level, config.log_format)
    return _run_config(config, attach_stop=None)


def run_hosted(
    data_dir: Path, *, attach_stop: Callable[[StopFunction], None], log_file: Path | None = None
) -> int:
    """``run --data-dir DIR`` for a host that is not a console (the Windows service).

    Args:
        data_dir: the agent's data dir (its ``config.toml`` is read).
        attach_stop: called once the agent runs, with a function that stops it and may be
            called from any thread.
        log_file: log there (rotated at 10 MB, 5 kept) instead of stderr.

    Returns:
        The exit code ``run`` would have (0, 1, 2 or 3); errors are logged, never raised.
    """
    args = argparse.Namespace(data_dir=data_dir, config=None, listen=None)
    config: AgentConfig | None = None
    failure: _Fail | None = None
    try:
        config = _load_config(args)
    except _Fail as exc:
        failure = exc
    if config is not None:
        logs.setup(config.log_level, config.log_format)
    else:
        logs.setup()
    handler = _log_to_file(log_file) if log_file is not None else None
    try:
        if config is not None:
            try:
                return _run_config(config, attach_stop=attach_stop)
            except _Fail as exc:
                failure = exc
        assert failure is not None
        log.error("agent.config_error", extra={"error": str(failure)})
        return failure.exit_code
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _log_to_file(path: Path) -> logging.Handler:
    # Only the Windows service logs to a file: ``run`` on a console need not load the module.
    import logging.handlers

    root = logging.getLogger()
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 1024 * 1024,
                                                   backupCount=5, encoding="utf-8")
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers[:] = [handler]
    return handler


def _run_config(config: AgentConfig, *, attach_stop: Callable[[StopFunction], None] | None
                ) -> int:
    _check_listen(config.listen, allow_non_loopback=config.allow_non_loopback)
    if not config.agent_id or not config.relay_url or not config.relay_id:
        raise _Fail("relay_url, agent_id and relay_id must be set: enroll first", EXIT_CONFIG)
    with _one_agent(config.data_dir):
        return _start(config, attach_stop)


def _start(config: AgentConfig, attach_stop: Callable[[StopFunction], None] | None) -> int:
    try:
        check_relay_url(config.relay_url, insecure=config.insecure)
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_CONFIG) from exc
    if config.insecure:
        log.warning("agent.insecure", extra={"relay_url": config.relay_url,
                                             "detail": "plain http to the relay is allowed"})
    config = _resolve_network(config)
    refusal.clear(config.data_dir)  # an old refusal; a new one is recorded below
    try:
        key = crypto.signing_key_from_pem(_read_secret(config.data_dir / KEY_FILE))
    except ValueError as exc:
        raise _Fail(f"{config.data_dir / KEY_FILE}: {exc}", EXIT_CONFIG) from exc
    token = _read_secret(config.data_dir / TOKEN_FILE).decode().strip()
    if not token:
        raise _Fail(f"{config.data_dir / TOKEN_FILE} is empty", EXIT_CONFIG)
    try:
        # asyncio's loop unless XON_RELAY_EVENT_LOOP says otherwise: uvloop would cost the
        # idle agent ~2 MB RSS for CPU it does not spend (shared/aio.py).
        aio.run(_serve(config, token, key, attach_stop), auto=aio.ASYNCIO)
    except ConfigError as exc:
        # A bad XON_RELAY_EVENT_LOOP: aio.run refuses it before anything starts.
        raise _Fail(str(exc), EXIT_CONFIG) from exc
    except (Revoked, Unauthorized) as exc:
        kind: refusal.Kind = "revoked" if isinstance(exc, Revoked) else "unauthorized"
        refusal.record(config.data_dir, kind, str(exc))
        log.error(f"agent.{kind}", extra={
            "agent_id": config.agent_id, "reason": str(exc),
            "detail": refusal.message(kind, agent_id=config.agent_id,
                                      relay_url=config.relay_url, data_dir=config.data_dir)})
        return EXIT_REFUSED
    except AddressInUse as exc:
        raise _Fail(exc.strerror or str(exc), EXIT_FAILURE) from exc
    except (RelayError, OSError) as exc:
        log.error("agent.failed", extra={"error": str(exc)})
        return EXIT_FAILURE
    log.info("agent.stopped", extra={"agent_id": config.agent_id})
    return EXIT_OK


@contextlib.contextmanager
def _one_agent(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock while the agent runs (docs/deployment.md, One agent per data
    dir): a second agent would share inbox.db, knock the first off the link and deliver every
    event twice."""
    try:
        handle = oslock.hold(data_dir / LOCK_FILE)
    except oslock.LockHeld as exc:
        raise _Fail(_running_agent(data_dir, exc.pid), EXIT_FAILURE) from exc
    except OSError as exc:
        raise _Fail(f"cannot lock {data_dir / LOCK_FILE}: {exc.strerror}", EXIT_FAILURE) from exc
    try:
        yield
    finally:
        handle.close()


def _running_agent(data_dir: Path, pid: int | None) -> str:
    """One line naming the agent that holds ``data_dir``: its pid and local API URL."""
    url = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        state = json.loads((data_dir / STATE_FILE).read_text())
        if pid is None or state.get("pid") == pid:
            pid, url = state.get("pid"), state.get("local_url")
    holder = f"pid {pid}" if pid else "pid unknown"
    where = f", local API {url}" if url else ", still starting"
    return f"another agent is already running on {data_dir} ({holder}{where})"


def _resolve_network(config: AgentConfig) -> AgentConfig:
    """Settle the proxy (the environment is read here only) and check ``ca_file`` loads."""
    try:
        net.ssl_context(config.ca_file)
        choice = net.resolve_proxy(config.proxy, config.relay_url, os.environ,
                                   ca_file=config.ca_file)
    except PacError as exc:
        if exc.url is None:
            raise _Fail(str(exc), EXIT_CONFIG) from exc
        # The PAC server may come up after this PC (docs/corporate-networks.md): the link
        # fetches it again at each attempt, and its last error says why it cannot.
        log.warning("agent.network", extra={"proxy": f"PAC file {exc.url}", "error": str(exc)})
        return dataclasses.replace(config, proxy=f"{net.PAC_PREFIX}{exc.url}")
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_CONFIG) from exc
    trust = {"ca_file": str(config.ca_file)} if config.ca_file else {}
    log.info("agent.network", extra={"proxy": choice.describe(), **trust})
    # The layers below never read the environment: they get an explicit proxy, "direct", or
    # the PAC file to run at each connection.
    proxy = f"{net.PAC_PREFIX}{choice.pac}" if choice.pac else (choice.url or net.DIRECT)
    return dataclasses.replace(config, proxy=proxy)


async def _serve(config: AgentConfig, token: str, key: crypto.SigningKey,
                 attach_stop: Callable[[StopFunction], None] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        # Windows, or a service's non-main thread (asyncio raises RuntimeError there, uvloop
        # ValueError): Ctrl-C raises / the host stops us instead.
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
            pass
    if attach_stop is not None:
        attach_stop(lambda: _call_soon(loop, stop.set))
    await run_agent(config, token=token, private_key=key, stop=stop)


def _call_soon(loop: asyncio.AbstractEventLoop, function: StopFunction) -> None:
    # A stop that arrives after the agent ended finds the loop closed: nothing left to stop.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(function)


# -- status ------------------------------------------------------------------------------------


def _health(url: str, token: str) -> dict[str, Any] | None:
    request = urllib.request.Request(url + "/v1/health",
                                     headers={"Authorization": f"Bearer {token}"})
    # No proxy: the token must go to the local agent only, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            data = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _status(args: argparse.Namespace) -> int:
    """Exit 0 while an agent runs (whatever its link), else 1 (enrolled, not running), 2 (not
    enrolled) or 3 (its last run was refused by the relay: re-enroll), as documented in
    docs/deployment.md, Status."""
    data_dir = _data_dir(args)
    relay_url, agent_id = "", ""
    try:
        config = _load_config(args)
        relay_url, agent_id = config.relay_url, config.agent_id
    except _Fail:
        pass
    state: dict[str, Any] = {}
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        pass
    health = None
    if isinstance(state, dict) and pid_alive(state.get("pid")):
        token = (data_dir / TOKEN_FILE).read_text().strip() if (data_dir / TOKEN_FILE).exists() \
            else ""
        health = _health(str(state.get("local_url", "")), token)
    code = EXIT_OK
    if health is not None:
        out: dict[str, Any] = {"running": True, "enrolled": True, "state": "running",
                               "pid": state["pid"], "local_url": state.get("local_url"),
                               **health}
    else:
        try:
            stats = offline_stats(data_dir / INBOX_FILE)
        except RelayError as exc:
            raise _Fail(str(exc), EXIT_FAILURE) from exc
        enrolled = _holds_enrollment(data_dir)
        refused = refusal.read(data_dir) if enrolled else None
        out = {"running": False, "enrolled": enrolled,
               "state": "refused" if refused else "not running" if enrolled else "not enrolled",
               "link": "not running", "relay_url": relay_url, "local_url": None,
               "inbox": {"events": stats.events if stats else 0,
                         "last_cursor": str(stats.last_cursor) if stats else "0",
                         "last_seq": stats.last_seq if stats else 0}}
        if refused is not None:
            out["refused"] = {"kind": refused.kind, "reason": refused.reason, "at": refused.at,
                              "action": refusal.message(refused.kind, agent_id=agent_id,
                                                        relay_url=relay_url, data_dir=data_dir)}
            code = EXIT_REFUSED
        elif not enrolled:
            out["action"] = (f"enroll this agent: {APP_NAME} enroll --relay URL --code CODE "
                             f"--data-dir {data_dir}")
            code = EXIT_CONFIG
        else:
            out["action"] = f"start it: {APP_NAME} run --data-dir {data_dir} (or its service)"
            code = EXIT_FAILURE
    print(json.dumps(out) if args.json else page.status_text(out))
    return code


# -- token, open ---------------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    try:
        tokens.rotate_token(data_dir)
    except OSError as exc:
        raise _Fail(f"cannot write {data_dir / TOKEN_FILE}: {exc.strerror or exc}",
                    EXIT_FAILURE) from exc
    print(f"wrote a new local token to {data_dir / TOKEN_FILE}; a running agent uses it from "
          "now on and refuses the old one")
    return EXIT_OK


def _open(args: argparse.Namespace) -> int:
    try:
        return page.open_page(_data_dir(args), browser=not args.no_browser)
    except RelayError as exc:
        raise _Fail(str(exc), EXIT_FAILURE) from exc


# -- init --------------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    path = data_dir / CONFIG_FILE
    values: dict[str, Any] = {}
    if path.exists():
        if not args.force:
            raise _Fail(f"{path} already exists (--force rewrites it, keeping its settings)",
                        EXIT_FAILURE)
        old = _read_toml(path)
        if old is None:
            print(f"{APP_NAME}: warning: {path} is not valid TOML; its settings are not kept",
                  file=sys.stderr)
        else:
            values = old
            dropped = unknown_keys(old)
            if dropped:
                print(f"{APP_NAME}: warning: dropping unknown settings: {', '.join(dropped)}",
                      file=sys.stderr)
    values["data_dir"] = str(data_dir.resolve())
    try:
        ensure_private_dir(data_dir)
        write_private_file(path, render_config(values))
    except OSError as exc:
        raise _Fail(f"cannot write {path}: {exc.strerror or exc}", EXIT_FAILURE) from exc
    try:
        load(AgentConfig, path=path, env={}, flags={}, env_prefix=AGENT_ENV_PREFIX)
    except ConfigError as exc:
        raise _Fail(f"wrote {path}, but it does not load: {exc}", EXIT_CONFIG) from exc
    print(f"wrote {path}")
    if not values.get("agent_id"):
        print(f"next: {APP_NAME} enroll --relay URL --code CODE --data-dir {data_dir}")
    return EXIT_OK


# -- doctor ------------------------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    # Imported here: its x509 and http.client cost the running agent ~2 MB RSS for nothing
    # (issue 7, agent footprint).
    from . import doctor

    if args.timeout <= 0:
        raise _Fail("--timeout must be positive", EXIT_CONFIG)
    if args.service is not None:
        if args.config is not None or args.data_dir is not None:
            raise _Fail("--service reads the config and data dir of the service: give neither "
                        "--config nor --data-dir", EXIT_CONFIG)
        registration, data_dir, env = _service_view(args.service)
        checks = [_service_check(registration, data_dir),
                  *doctor.run_checks(config_path=data_dir / CONFIG_FILE, data_dir=data_dir,
                                     env=env, timeout=args.timeout)]
    else:
        config_path: Path = args.config or _data_dir(args) / CONFIG_FILE
        checks = doctor.run_checks(config_path=config_path, data_dir=args.data_dir,
                                   env=os.environ, timeout=args.timeout)
    print(doctor.format_json(checks) if args.json else doctor.format_text(checks))
    return EXIT_OK if doctor.all_ok(checks) else EXIT_FAILURE


def _service_view(name: str) -> tuple[winservice.Registration, Path, dict[str, str]]:
    """The registration of service ``name``, its data dir and the environment its agent starts
    with, so that ``doctor --service`` sees what the service sees, not what the administrator
    sees."""
    registry = winservice.windows_registry()
    if registry is None:
        raise _Fail("--service reads the Windows service registration; on Linux run doctor as "
                    "the service's user with its --data-dir (docs/deployment.md, Linux)",
                    EXIT_CONFIG)
    registration = registry.service(name)
    if registration is None:
        raise _Fail(f"no service named {name} is installed: {APP_NAME} service install",
                    EXIT_FAILURE)
    if registration.data_dir is None:
        raise _Fail(f"service {name} runs {registration.image_path!r}, which names no "
                    f"--data-dir: reinstall it with {APP_NAME} service install", EXIT_FAILURE)
    env = winservice.service_environment(os.environ, registry.machine_environment())
    return registration, Path(registration.data_dir), env


def _service_check(registration: winservice.Registration, data_dir: Path) -> Check:
    """The ``service`` line of ``doctor --service``: what the service runs, and whether it
    can."""
    from .doctor import Check

    program = registration.program
    runs = f"{registration.name} runs {program} as {registration.account}, data in {data_dir}"
    if not Path(program).exists():
        return Check("service", "fail", f"{runs}; that program does not exist: run service "
                     "install again from the agent's new location")
    if getattr(sys, "frozen", False) and \
            os.path.normcase(program) != os.path.normcase(sys.executable):
        return Check("service", "warn", f"{runs}; this is {sys.executable}: after an upgrade, "
                     "run service install from the new file")
    problem = winservice.location_problem(program, os.environ)
    return Check("service", "warn", problem) if problem else Check("service", "ok", runs)


# -- service (Windows) -------------------------------------------------------------------------


def _service(args: argparse.Namespace) -> int:
    if args.action == "run":
        try:
            return winservice.host(args.data_dir, run_hosted)
        except winservice.ServiceError as exc:
            raise _Fail(str(exc), EXIT_CONFIG) from exc
    if args.action == "install":
        return _service_install(args)
    if args.action == "uninstall":
        commands = winservice.uninstall_commands(args.name)
    elif args.action == "start":
        commands = winservice.start_commands(args.name)
    else:
        commands = winservice.stop_commands(args.name)
    if args.dry_run:
        _print_commands(commands)
        return EXIT_OK
    _on_windows()
    return _run_sc(args, commands)


def _service_install(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or str(winservice.program_data_dir(os.environ))
    frozen = bool(getattr(sys, "frozen", False))
    spec = winservice.ServiceSpec(
        name=args.name,
        program=winservice.agent_program(sys.executable, frozen=frozen),
        data_dir=data_dir,
        start=args.start,
    )
    registry = winservice.windows_registry()
    exists = registry is not None and registry.service(args.name) is not None
    commands = winservice.install_commands(spec, exists=exists)
    if args.dry_run:
        for line in _service_settings_plan(Path(data_dir), args.proxy, args.ca_file):
            print(f"# {line}")
        _print_commands(commands)
        return EXIT_OK
    _on_windows()
    problem = winservice.location_problem(sys.executable, os.environ) if frozen else None
    if problem is not None:
        raise _Fail(problem, EXIT_CONFIG)
    if not frozen and importlib.util.find_spec("win32serviceutil") is None:
        raise _Fail("pywin32 is not installed in this Python: pip install pywin32",
                    EXIT_CONFIG)
    _write_service_settings(Path(data_dir), proxy=args.proxy, ca_file=args.ca_file)
    return _run_sc(args, commands)


def _service_settings_plan(data_dir: Path, proxy: str | None, ca_file: Path | None
                           ) -> list[str]:
    plan = [f"creates {data_dir}"]
    if ca_file is not None:
        plan.append(f"copies {ca_file} to {data_dir / winservice.CA_FILE}")
    if proxy is not None or ca_file is not None:
        plan.append(f"writes proxy and ca_file into {data_dir / CONFIG_FILE}")
    return plan


def _write_service_settings(data_dir: Path, *, proxy: str | None, ca_file: Path | None) -> Path:
    """Write what ``service install`` was given into the data dir's ``config.toml``, the file
    the service reads: ``proxy`` (``''`` removes it) and a copy of ``ca_file`` in the data dir.

    Returns:
        The config file's path.

    Raises:
        _Fail: an unreadable or invalid CA file (exit 2), a directory that cannot be written
            (exit 1), or a config that no longer loads (exit 2).
    """
    path = data_dir / CONFIG_FILE
    previous = _read_toml(path) if path.exists() else {}
    if previous is None:
        raise _Fail(f"{path} is not valid TOML: fix or remove it first", EXIT_CONFIG)
    settings: dict[str, Any] = {**previous, "data_dir": str(data_dir)}
    ca_pem = None
    if ca_file is not None:
        try:
            net.ssl_context(ca_file.expanduser())
            ca_pem = ca_file.expanduser().read_bytes()
        except ConfigError as exc:
            raise _Fail(str(exc), EXIT_CONFIG) from exc
        except OSError as exc:
            raise _Fail(f"cannot read {ca_file}: {exc.strerror or exc}", EXIT_CONFIG) from exc
        settings["ca_file"] = str(data_dir / winservice.CA_FILE)
    if proxy is not None:
        settings["proxy"] = proxy
        if not proxy:
            del settings["proxy"]
    try:
        ensure_private_dir(data_dir)
        if ca_pem is not None:
            write_private_file(data_dir / winservice.CA_FILE, ca_pem)
        write_private_file(path, render_config(settings))
    except OSError as exc:
        raise _Fail(f"cannot write {data_dir}: {exc.strerror or exc}", EXIT_FAILURE) from exc
    try:
        load(AgentConfig, path=path, env={}, flags={}, env_prefix=AGENT_ENV_PREFIX)
    except ConfigError as exc:
        raise _Fail(f"wrote {path}, but it does not load: {exc}", EXIT_CONFIG) from exc
    return path


def _print_commands(commands: list[list[str]]) -> None:
    for command in commands:
        print(subprocess.list2cmdline(command))


def _on_windows() -> None:
    if sys.platform != "win32":
        raise _Fail("service commands manage a Windows service; on Linux use the systemd units "
                    "in deploy/systemd (--dry-run prints the commands)", EXIT_CONFIG)


def _run_sc(args: argparse.Namespace, commands: list[list[str]]) -> int:
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        # uninstall stops first; a service that is not running is not an error there.
        if done.returncode != 0 and not (args.action == "uninstall" and command[1] == "stop"):
            detail = (done.stdout + done.stderr).strip().splitlines()
            raise _Fail(f"{subprocess.list2cmdline(command[:3])} failed (exit "
                        f"{done.returncode}): {detail[-1] if detail else 'no output'}",
                        EXIT_FAILURE)
    print(f"service {args.name}: {args.action} done")
    return EXIT_OK
