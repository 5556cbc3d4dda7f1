"""``xon-relay-agent doctor``: check, one line each, what the agent needs to work on this PC.

The checks run in order and a check that needs an earlier one (TCP needs DNS, TLS needs TCP)
is skipped when that one failed, so the first ``fail`` line names the cause. They use plain
blocking sockets with a timeout: the doctor runs alone, from a console.

Network checks connect directly, not through a proxy; when ``HTTPS_PROXY`` is set the
``proxy`` line says so.
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from shared import crypto
from shared.config import AGENT_ENV_PREFIX, AgentConfig, load, parse_hostport
from shared.errors import ConfigError

from .enroll import KEY_FILE, STATE_FILE, TOKEN_FILE, check_relay_url, is_loopback_host
from .system import bind_local, pid_alive

__all__ = ["Check", "Status", "run_checks", "format_text", "format_json", "all_ok"]

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str


def all_ok(checks: list[Check]) -> bool:
    """No check failed (``warn`` and ``skip`` do not fail the doctor)."""
    return all(c.status != "fail" for c in checks)


def format_text(checks: list[Check]) -> str:
    return "\n".join(f"{c.status:<4}  {c.name:<13} {c.detail}" for c in checks)


def format_json(checks: list[Check]) -> str:
    return json.dumps({
        "ok": all_ok(checks),
        "checks": [{"check": c.name, "status": c.status, "detail": c.detail} for c in checks],
    })


@dataclass
class _Relay:
    """What the network checks learn, each from the one before."""

    url: str
    host: str
    port: int
    tls: bool
    addresses: list[tuple[int, tuple[object, ...]]] = field(default_factory=list)
    connected: tuple[int, tuple[object, ...]] | None = None


def run_checks(
    *, config_path: Path, data_dir: Path | None, env: Mapping[str, str], timeout: float = 5.0
) -> list[Check]:
    """All checks, in order.

    Args:
        config_path: the agent's config file (``--config``, else ``config.toml`` in the data
            dir).
        data_dir: ``--data-dir`` if given (it overrides the file's ``data_dir``, as for
            ``run``).
        env: the environment (config overrides, ``HTTPS_PROXY``/``NO_PROXY``).
        timeout: seconds for each network step.
    """
    checks: list[Check] = []
    config: AgentConfig | None = None
    if not config_path.exists():
        checks.append(Check("config", "fail", f"{config_path} not found: run "
                            "xon-relay-agent init, or enroll"))
    else:
        try:
            config = load(AgentConfig, path=config_path, env=env,
                          flags={"data_dir": data_dir}, env_prefix=AGENT_ENV_PREFIX)
        except ConfigError as exc:
            checks.append(Check("config", "fail", str(exc)))
        else:
            checks.append(Check("config", "ok", f"loaded {config_path}"))
    files_dir = config.data_dir if config is not None else (data_dir or config_path.parent)
    checks.append(_enrollment(config, files_dir))
    checks.append(_secret_file("local_token", files_dir / TOKEN_FILE))
    checks.append(_local_port(config, files_dir))
    checks += _network(config, env, timeout)
    return checks


# -- files ---------------------------------------------------------------------------------------


def _mode_problem(path: Path) -> str | None:
    """Why a secret file's permissions are wrong, or None (DESIGN: readable by its user only)."""
    if sys.platform == "win32":  # pragma: no cover - Windows: ACLs, not mode bits
        return None
    else:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            return f"{path} is readable by other users (mode {mode:04o}): chmod 600 {path}"
        return None


def _enrollment(config: AgentConfig | None, data_dir: Path) -> Check:
    if config is None:
        return Check("enrollment", "skip", "no usable config")
    missing = [name for name in ("relay_url", "agent_id", "relay_id") if not getattr(config, name)]
    if missing:
        return Check("enrollment", "fail", f"not enrolled ({', '.join(missing)} not set): run "
                     "xon-relay-agent enroll --relay URL --code CODE")
    key = data_dir / KEY_FILE
    try:
        crypto.private_key_from_pem(key.read_bytes())
    except FileNotFoundError:
        return Check("enrollment", "fail", f"key file {key} is missing: enroll again (--force)")
    except (OSError, ValueError) as exc:
        return Check("enrollment", "fail", f"key file {key} is unusable: {exc}")
    problem = _mode_problem(key)
    if problem:
        return Check("enrollment", "fail", problem)
    return Check("enrollment", "ok", f"agent {config.agent_id}, key {key}")


def _secret_file(name: str, path: Path) -> Check:
    try:
        empty = not path.read_text().strip()
    except FileNotFoundError:
        return Check(name, "fail", f"{path} is missing: enroll first")
    except (OSError, UnicodeDecodeError) as exc:
        return Check(name, "fail", f"cannot read {path}: {exc}")
    if empty:
        return Check(name, "fail", f"{path} is empty")
    problem = _mode_problem(path)
    return Check(name, "fail", problem) if problem else Check(name, "ok", f"{path} (0600)")


def _local_port(config: AgentConfig | None, data_dir: Path) -> Check:
    if config is None:
        return Check("local_port", "skip", "no usable config")
    host, port = parse_hostport(config.listen, what="listen")
    if not is_loopback_host(host):
        # DESIGN principle 3: nothing listens on the office PC except on loopback.
        return Check("local_port", "fail", f"listen {config.listen} is not a loopback address")
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = None
    if isinstance(state, dict) and pid_alive(state.get("pid")):
        return Check("local_port", "ok", f"held by this agent (pid {state['pid']}, "
                     f"{state.get('local_url')})")
    if port == 0:
        return Check("local_port", "ok", "listen port 0: a free port is picked at start")
    try:
        bind_local(host, port).close()
    except OSError as exc:
        return Check("local_port", "fail", f"{config.listen} is in use by another program "
                     f"({exc.strerror or exc}): stop it, or set listen in the config")
    return Check("local_port", "ok", f"{config.listen} is free")


# -- network -------------------------------------------------------------------------------------


def _network(config: AgentConfig | None, env: Mapping[str, str], timeout: float) -> list[Check]:
    names = ("dns", "tcp", "tls", "relay_health")
    if config is None or not config.relay_url:
        return [Check("relay_url", "skip", "no relay_url configured"), _proxy(None, env),
                *(Check(name, "skip", "no relay_url configured") for name in names)]
    try:
        plain = check_relay_url(config.relay_url, insecure=config.insecure)
    except ConfigError as exc:
        return [Check("relay_url", "fail", str(exc)), _proxy(None, env),
                *(Check(name, "skip", "relay_url refused") for name in names)]
    parts = urlsplit(config.relay_url)
    assert parts.hostname is not None  # check_relay_url insists on a host
    relay = _Relay(url=config.relay_url.rstrip("/"), host=parts.hostname,
                   port=parts.port or (80 if plain else 443), tls=not plain)
    if plain and is_loopback_host(relay.host):
        first = Check("relay_url", "ok", f"{config.relay_url} (plain http to a loopback relay)")
    elif plain:
        first = Check("relay_url", "warn", f"{config.relay_url}: plain http, the link is not "
                      "encrypted (insecure = true)")
    else:
        first = Check("relay_url", "ok", config.relay_url)
    checks = [first, _proxy(relay.host, env)]
    steps: list[tuple[str, Callable[[_Relay, float], Check], str]] = [
        ("dns", _dns, ""),
        ("tcp", _tcp, "dns"),
        ("tls", _tls, "tcp"),
        ("relay_health", _health, "tls" if relay.tls else "tcp"),
    ]
    failed: set[str] = set()
    for name, step, needs in steps:
        if needs in failed:
            failed.add(name)
            checks.append(Check(name, "skip", f"{needs} failed"))
            continue
        check = step(relay, timeout)
        if check.status == "fail":
            failed.add(name)
        checks.append(check)
    return checks


def _env(env: Mapping[str, str], name: str) -> str:
    # curl and Python's urllib prefer the lower-case name when both are set.
    return env.get(name.lower()) or env.get(name.upper()) or ""


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, "***@" + netloc, parts.path, parts.query, parts.fragment))


def _bypassed(host: str, no_proxy: str) -> bool:
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        entry = entry.lstrip(".").rsplit(":", 1)[0] if entry.count(":") == 1 else entry
        if entry and (host.lower() == entry or host.lower().endswith("." + entry)):
            return True
    return False


def _proxy(host: str | None, env: Mapping[str, str]) -> Check:
    proxy = _env(env, "https_proxy")
    if not proxy:
        return Check("proxy", "ok", "no HTTPS_PROXY set: connecting directly")
    shown = _without_credentials(proxy)
    if host is not None and _bypassed(host, _env(env, "no_proxy")):
        return Check("proxy", "ok", f"HTTPS_PROXY is {shown}, but NO_PROXY covers {host}: direct")
    return Check("proxy", "warn", f"HTTPS_PROXY is set ({shown}); the checks below connect "
                 "directly, not through it (proxy support is still to come)")


def _dns(relay: _Relay, timeout: float) -> Check:
    try:
        infos = socket.getaddrinfo(relay.host, relay.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return Check("dns", "fail", f"cannot resolve {relay.host}: {exc.strerror or exc} "
                     "(check the relay URL and this PC's DNS)")
    seen: list[str] = []
    for family, _, _, _, address in infos:
        relay.addresses.append((family, address))
        if str(address[0]) not in seen:
            seen.append(str(address[0]))
    return Check("dns", "ok", f"{relay.host} -> {', '.join(seen)}")


def _tcp(relay: _Relay, timeout: float) -> Check:
    errors: list[str] = []
    for family, address in relay.addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except TimeoutError:
            errors.append(f"{address[0]}: no answer within {timeout:g} s (a firewall dropping "
                          f"outbound port {relay.port}?)")
        except ConnectionRefusedError:
            errors.append(f"{address[0]}: connection refused (is the relay running on port "
                          f"{relay.port}?)")
        except OSError as exc:
            errors.append(f"{address[0]}: {exc.strerror or exc}")
        else:
            relay.connected = (family, address)
            return Check("tcp", "ok", f"connected to {address[0]} port {relay.port}")
        finally:
            sock.close()
    if len(errors) == 1 and errors[0].startswith(f"{relay.host}: "):
        errors = [errors[0].removeprefix(f"{relay.host}: ")]
    return Check("tcp", "fail", f"cannot connect to {relay.host}:{relay.port}: "
                 + "; ".join(errors))


def _tls(relay: _Relay, timeout: float) -> Check:
    if not relay.tls:
        return Check("tls", "skip", "plain http: no TLS")
    assert relay.connected is not None
    family, address = relay.connected
    context = ssl.create_default_context()
    try:
        with socket.socket(family, socket.SOCK_STREAM) as raw:
            raw.settimeout(timeout)
            raw.connect(address)
            with context.wrap_socket(raw, server_hostname=relay.host) as tls:
                version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        return Check("tls", "fail", f"the certificate of {relay.host} is not trusted: "
                     f"{exc.verify_message}; a TLS-inspecting proxy or a self-signed "
                     "certificate? (a custom CA bundle is still to come)")
    except ssl.SSLError as exc:
        return Check("tls", "fail", f"TLS handshake with {relay.host} failed: "
                     f"{exc.reason or exc}")
    except TimeoutError:
        return Check("tls", "fail", f"TLS handshake with {relay.host} got no answer within "
                     f"{timeout:g} s")
    except OSError as exc:
        return Check("tls", "fail", f"TLS handshake with {relay.host} failed: "
                     f"{exc.strerror or exc}")
    return Check("tls", "ok", f"{version}, certificate valid for {relay.host}")


def _health(relay: _Relay, timeout: float) -> Check:
    url = relay.url + "/healthz"
    # Direct, like the checks before it; the default opener would follow HTTPS_PROXY.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
    )
    try:
        with opener.open(url, timeout=timeout) as response:
            body = response.read(4096)
            status = response.status
    except urllib.error.HTTPError as exc:
        return Check("relay_health", "fail", f"{url} answered HTTP {exc.code}: is this the relay, "
                     "and is it healthy?")
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return Check("relay_health", "fail", f"{url}: {reason}")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or answer.get("status") != "ok":
        return Check("relay_health", "fail", f"{url} answered HTTP {status} but not as the relay "
                     "does: is the relay URL right?")
    return Check("relay_health", "ok", f"{url} answered ok")
