"""``xon-relay-agent doctor``: check, one line each, what the agent needs to work on this PC.

The checks run in order and a check that needs an earlier one (TCP needs DNS, TLS needs TCP)
is skipped when that one failed, so the first ``fail`` line names the cause. They use plain
blocking sockets with a timeout: the doctor runs alone, from a console.

The network checks connect as the agent does (:mod:`.net`): through the proxy it would use
(the ``proxy`` line names it; DNS then resolves the proxy, and TCP includes the CONNECT), and
verifying TLS against the OS store plus ``ca_file``. An untrusted certificate's issuer is named,
so a TLS-inspecting proxy shows itself.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from cryptography import x509

from shared import crypto
from shared.config import AGENT_ENV_PREFIX, AgentConfig, load, parse_hostport
from shared.errors import ConfigError, UpstreamError

from . import acl, net, refusal, tunnel
from .acl import AclApi
from .enroll import KEY_FILE, STATE_FILE, TOKEN_FILE, check_relay_url, is_loopback_host
from .system import bind_local, pid_alive
from .winacl import system_api

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
    proxy: str | None = None
    """The proxy the agent would use (None: direct)."""
    context: ssl.SSLContext | None = None
    """The agent's TLS trust (OS store plus ca_file) for an https relay."""
    addresses: list[tuple[int, tuple[object, ...]]] = field(default_factory=list)
    """Of the first hop: the proxy, or the relay."""
    connected: tuple[int, tuple[object, ...]] | None = None

    @property
    def first_hop(self) -> tuple[str, int]:
        if self.proxy is None:
            return self.host, self.port
        parts = urlsplit(self.proxy)
        return parts.hostname or "", parts.port or 80


def run_checks(
    *, config_path: Path, data_dir: Path | None, env: Mapping[str, str], timeout: float = 5.0,
    clock: Callable[[], float] = time.time, acl_api: AclApi | None = None,
) -> list[Check]:
    """All checks, in order.

    Args:
        config_path: the agent's config file (``--config``, else ``config.toml`` in the data
            dir).
        data_dir: ``--data-dir`` if given (it overrides the file's ``data_dir``, as for
            ``run``).
        env: the environment (config overrides, ``HTTPS_PROXY``/``NO_PROXY``).
        timeout: seconds for each network step.
        clock: Unix time, for the enrollment probe's timestamp.
        acl_api: the ACL calls that judge the secrets on Windows; None: the system's
            (:func:`relay_agent.winacl.system_api`, None off Windows: the mode bits).
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
    api: AclApi | None
    try:
        api = system_api() if acl_api is None else acl_api
    except OSError as exc:
        api = _NoAcl(exc)
    checks.append(_enrollment(config, files_dir, api))
    checks.append(_secret_file("local_token", files_dir / TOKEN_FILE, api))
    checks.append(_local_port(config, files_dir))
    checks += _network(config, env, timeout, clock)
    return checks


# -- files ---------------------------------------------------------------------------------------


class _NoAcl:
    """The ACL calls of a Windows that cannot make them (pywin32 missing): every call fails
    with why, so the secrets' lines say it rather than judge the mode bits."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def current_user(self) -> str:
        raise self.error

    def lookup(self, account: str) -> str:
        raise self.error

    def name(self, sid: str) -> str:
        return sid

    def read(self, path: Path) -> str:
        raise self.error

    def write(self, path: Path, sddl: str) -> None:
        raise self.error


def _protection(path: Path, kind: Literal["key", "token"], api: AclApi | None
                ) -> tuple[Status, str]:
    """Whether only the agent's user may read a secret (README, Local API security): its mode
    bits, or on Windows, where those do nothing, its access list (relay_agent/acl.py)."""
    if api is None:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            return "fail", f"{path} is readable by other users (mode {mode:04o}): chmod 600 {path}"
        return "ok", f"mode {mode:04o}"
    try:
        verdict = acl.check_secret(path, api, kind=kind)
    except OSError as exc:
        return "fail", f"{path}: {exc.strerror or exc}"
    if verdict.status == "ok":
        return "ok", f"access list: {verdict.detail}"
    fix = ("run xon-relay-agent token rotate (the new file gets a private access list)"
           if kind == "token" else "remove that access (icacls), or enroll again with --force")
    return verdict.status, f"{path} {verdict.detail}: {fix}"


def _enrollment(config: AgentConfig | None, data_dir: Path, api: AclApi | None) -> Check:
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
    status, detail = _protection(key, "key", api)
    if status != "ok":
        return Check("enrollment", status, detail)
    return Check("enrollment", "ok", f"agent {config.agent_id}, key {key} ({detail})")


def _secret_file(name: str, path: Path, api: AclApi | None) -> Check:
    try:
        empty = not path.read_text().strip()
    except FileNotFoundError:
        return Check(name, "fail", f"{path} is missing: enroll first")
    except (OSError, UnicodeDecodeError) as exc:
        return Check(name, "fail", f"cannot read {path}: {exc}")
    if empty:
        return Check(name, "fail", f"{path} is empty")
    status, detail = _protection(path, "token", api)
    return Check(name, status, detail if status != "ok" else f"{path} ({detail})")


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


def _network(config: AgentConfig | None, env: Mapping[str, str], timeout: float,
             clock: Callable[[], float]) -> list[Check]:
    names = ("dns", "tcp", "tls", "relay_health", "relay_auth")
    if config is None or not config.relay_url:
        return [Check("relay_url", "skip", "no relay_url configured"),
                Check("proxy", "skip", "no relay_url configured"),
                *(Check(name, "skip", "no relay_url configured") for name in names)]
    try:
        plain = check_relay_url(config.relay_url, insecure=config.insecure)
    except ConfigError as exc:
        return [Check("relay_url", "fail", str(exc)), Check("proxy", "skip", "relay_url refused"),
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
    proxy = _proxy(config, relay, env, timeout)
    checks = [first, proxy]
    if proxy.status == "fail":
        return [*checks, *(Check(name, "skip", "proxy unusable") for name in names)]
    steps: list[tuple[str, Callable[[_Relay, float], Check], str]] = [
        ("dns", _dns, ""),
        ("tcp", _tcp, "dns"),
        ("tls", _tls, "tcp"),
        ("relay_health", _health, "tls" if relay.tls else "tcp"),
        ("relay_auth", lambda r, t: _relay_auth(config, r, t, clock), "relay_health"),
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


def _proxy(config: AgentConfig, relay: _Relay, env: Mapping[str, str], timeout: float) -> Check:
    """The proxy the agent uses (net.resolve_proxy), and the TLS trust it adds (ca_file)."""
    try:
        if relay.tls:
            relay.context = net.ssl_context(config.ca_file)
        choice = net.resolve_proxy(config.proxy, config.relay_url, env, ca_file=config.ca_file,
                                   timeout=timeout)
    except ConfigError as exc:  # a PAC file that cannot be fetched or run, too
        return Check("proxy", "fail", str(exc))
    relay.proxy = choice.url
    trust = f"; also trusting {config.ca_file}" if config.ca_file and relay.tls else ""
    if choice.url is None:
        status: Status = "warn" if choice.loopback_bypass else "ok"
        return Check("proxy", status, f"direct: {choice.source}{trust}")
    return Check("proxy", "ok", f"via {net.redact(choice.url)} (from {choice.source}); the "
                 f"checks below go through it{trust}")


def _dns(relay: _Relay, timeout: float) -> Check:
    host, port = relay.first_hop
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        what = "the proxy" if relay.proxy else "the relay URL"
        return Check("dns", "fail", f"cannot resolve {host}: {exc.strerror or exc} "
                     f"(check {what} and this PC's DNS)")
    seen: list[str] = []
    for family, _, _, _, address in infos:
        relay.addresses.append((family, address))
        if str(address[0]) not in seen:
            seen.append(str(address[0]))
    note = f" (the proxy resolves {relay.host})" if relay.proxy else ""
    return Check("dns", "ok", f"{host} -> {', '.join(seen)}{note}")


def _tcp(relay: _Relay, timeout: float) -> Check:
    host, port = relay.first_hop
    errors: list[str] = []
    for family, address in relay.addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            if relay.proxy:
                sock = _tunnel(sock, relay, timeout)
        except UpstreamError as exc:  # the proxy refused (the message says why) or is not HTTP
            return Check("tcp", "fail", str(exc))
        except TimeoutError:
            errors.append(f"{address[0]}: no answer within {timeout:g} s (a firewall dropping "
                          f"outbound port {port}?)")
        except ConnectionRefusedError:
            what = "the proxy" if relay.proxy else "the relay"
            errors.append(f"{address[0]}: connection refused (is {what} running on port "
                          f"{port}?)")
        except OSError as exc:
            errors.append(f"{address[0]}: {exc.strerror or exc}")
        else:
            relay.connected = (family, address)
            if relay.proxy:
                return Check("tcp", "ok", f"connected to the proxy {address[0]} port {port}; "
                             f"it opened a tunnel to {relay.host}:{relay.port}")
            return Check("tcp", "ok", f"connected to {address[0]} port {port}")
        finally:
            sock.close()
    if len(errors) == 1 and errors[0].startswith(f"{host}: "):
        errors = [errors[0].removeprefix(f"{host}: ")]
    what = "the proxy " if relay.proxy else ""
    return Check("tcp", "fail", f"cannot connect to {what}{host}:{port}: " + "; ".join(errors))


def _tunnel(sock: socket.socket, relay: _Relay, timeout: float) -> socket.socket:
    """The tunnel to the relay through the proxy ``sock`` is connected to, as the agent opens
    it (:mod:`.tunnel`: NTLM, Negotiate and Basic challenges answered).

    Raises:
        tunnel.ProxyRefused: a non-2xx answer (its message explains it).
        tunnel.ProxyAnswerInvalid: no HTTP answer.
        OSError: the connection failed.
    """
    assert relay.proxy is not None
    first: list[socket.socket] = [sock]
    address = sock.getpeername()

    def connect() -> socket.socket:
        # The first leg uses the connection already made; a leg the proxy wants on a fresh
        # connection goes to the same address.
        if first:
            return first.pop()
        fresh = socket.socket(sock.family, socket.SOCK_STREAM)
        fresh.settimeout(timeout)
        try:
            fresh.connect(address)
        except BaseException:
            fresh.close()
            raise
        return fresh

    return tunnel.open_tunnel_sync(connect, net.proxy_endpoint(relay.proxy), relay.host,
                                   relay.port)


def _open(relay: _Relay, timeout: float) -> socket.socket:
    """A connection to the relay as the agent makes it: through the proxy, then TLS."""
    assert relay.connected is not None
    family, address = relay.connected
    raw = socket.socket(family, socket.SOCK_STREAM)
    try:
        raw.settimeout(timeout)
        raw.connect(address)
        if relay.proxy:
            raw = _tunnel(raw, relay, timeout)
        if relay.context is None:
            return raw
        return relay.context.wrap_socket(raw, server_hostname=relay.host)
    except BaseException:
        raw.close()
        raise


def _issuer(relay: _Relay, timeout: float) -> str:
    """Who issued the certificate the relay's address presents (unverified), for the hint."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    saved, relay.context = relay.context, probe
    try:
        with _open(relay, timeout) as tls:
            der = tls.getpeercert(binary_form=True) if isinstance(tls, ssl.SSLSocket) else None
        if not der:
            return ""
        return x509.load_der_x509_certificate(der).issuer.rfc4514_string()
    except (OSError, UpstreamError, ValueError):
        return ""
    finally:
        relay.context = saved


def _tls(relay: _Relay, timeout: float) -> Check:
    if not relay.tls:
        return Check("tls", "skip", "plain http: no TLS")
    try:
        with _open(relay, timeout) as tls:
            version = tls.version() if isinstance(tls, ssl.SSLSocket) else None
    except ssl.SSLCertVerificationError as exc:
        issuer = _issuer(relay, timeout)
        problem = str(exc.verify_message or exc.reason or exc)
        if issuer:
            problem += f"; issued by {issuer}"
        return Check("tls", "fail", net.untrusted(problem, proxy=relay.proxy,
                                                  relay_url=relay.url))
    except ssl.SSLError as exc:
        return Check("tls", "fail", f"TLS handshake with {relay.host} failed: "
                     f"{exc.reason or exc}")
    except TimeoutError:
        return Check("tls", "fail", f"TLS handshake with {relay.host} got no answer within "
                     f"{timeout:g} s")
    except (OSError, UpstreamError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return Check("tls", "fail", f"TLS handshake with {relay.host} failed: {detail}")
    return Check("tls", "ok", f"{version}, certificate valid for {relay.host}")


def _health(relay: _Relay, timeout: float) -> Check:
    url = relay.url + "/healthz"
    host = f"[{relay.host}]" if ":" in relay.host else relay.host
    default_port = 443 if relay.tls else 80
    host_header = host if relay.port == default_port else f"{host}:{relay.port}"
    try:
        with _open(relay, timeout) as sock:
            sock.sendall(f"GET {urlsplit(relay.url).path}/healthz HTTP/1.1\r\nHost: "
                         f"{host_header}\r\nConnection: close\r\n\r\n".encode("ascii"))
            response = http.client.HTTPResponse(sock)
            response.begin()
            status = response.status
            body = response.read(4096)
    except (OSError, http.client.HTTPException, UpstreamError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return Check("relay_health", "fail", f"{url}: {detail or type(exc).__name__}")
    if status >= 400:
        return Check("relay_health", "fail", f"{url} answered HTTP {status}: is this the relay, "
                     "and is it healthy?")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or answer.get("status") != "ok":
        return Check("relay_health", "fail", f"{url} answered HTTP {status} but not as the relay "
                     "does: is the relay URL right?")
    return Check("relay_health", "ok", f"{url} answered ok")


# -- enrollment at the relay ---------------------------------------------------------------------


def _post_json(relay: _Relay, path: str, body: dict[str, object], timeout: float
               ) -> tuple[int, object]:
    """POST ``body`` to the relay as the agent connects (proxy, TLS): status and JSON answer.

    Raises:
        OSError, http.client.HTTPException, UpstreamError: no HTTP answer.
    """
    host = f"[{relay.host}]" if ":" in relay.host else relay.host
    default_port = 443 if relay.tls else 80
    host_header = host if relay.port == default_port else f"{host}:{relay.port}"
    payload = json.dumps(body).encode()
    with _open(relay, timeout) as sock:
        sock.sendall(f"POST {urlsplit(relay.url).path}{path} HTTP/1.1\r\nHost: {host_header}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                     "Connection: close\r\n\r\n".encode("ascii") + payload)
        response = http.client.HTTPResponse(sock)
        response.begin()
        status, raw = response.status, response.read(16384)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _relay_auth(config: AgentConfig, relay: _Relay, timeout: float,
                clock: Callable[[], float]) -> Check:
    """Prove the enrollment with a signed probe (docs/protocol.md, Enrollment probe): not a
    link login, which would replace a running agent's link."""
    name = "relay_auth"
    if not config.agent_id or not config.relay_id:
        return Check(name, "skip", "not enrolled")
    try:
        key = crypto.signing_key_from_pem((config.data_dir / KEY_FILE).read_bytes())
    except (OSError, ValueError):
        return Check(name, "skip", "no usable key file (see enrollment)")
    timestamp = int(clock() * 1000)
    body: dict[str, object] = {
        "agent_id": config.agent_id, "timestamp": timestamp,
        "signature": crypto.sign_probe(key, config.relay_id, config.agent_id, timestamp)}
    url = relay.url + "/v1/agent/probe"
    try:
        status, answer = _post_json(relay, "/v1/agent/probe", body, timeout)
    except (OSError, http.client.HTTPException, UpstreamError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return Check(name, "fail", f"{url}: {detail or type(exc).__name__}")
    error = answer.get("error") if isinstance(answer, dict) else None
    said = str(error.get("message", "")) if isinstance(error, dict) else ""
    code = str(error.get("code", "")) if isinstance(error, dict) else ""
    def reenroll(kind: refusal.Kind) -> Check:
        return Check(name, "fail", refusal.message(kind, agent_id=config.agent_id,
                                                   relay_url=config.relay_url,
                                                   data_dir=config.data_dir))

    if status == 200 and isinstance(answer, dict) and answer.get("status") == "active":
        return Check(name, "ok", f"the relay knows agent {config.agent_id} (account "
                     f"{answer.get('account_id')}) and accepts its key")
    if status == 403 and code == "revoked":
        return reenroll("revoked")
    if status == 401:
        return reenroll("unauthorized")
    if status == 400 and code == "bad_timestamp":
        return Check(name, "fail", f"this PC's clock is wrong: {said}")
    if status == 404:
        return Check(name, "warn", f"{url} answered HTTP 404: the relay is older than this "
                     "agent and cannot check the enrollment")
    if status == 429:
        return Check(name, "warn", f"the relay refuses probes from this address for now "
                     f"({said or 'too many requests'}); try again later")
    return Check(name, "fail", f"{url} answered HTTP {status}" + (f": {said}" if said else ""))
