"""Reaching the relay from a corporate network: which proxy, which certificates, which error.

Enrollment (aiohttp), the link (websockets) and ``doctor`` (blocking sockets) all ask this
module, so the three agree (docs/corporate-networks.md):

- **Proxy** (:func:`resolve_proxy`): the ``proxy`` setting when it names a proxy (``direct``
  means none; ``pac:URL`` runs that PAC file, :mod:`.pac`); otherwise ``HTTPS_PROXY``
  (``HTTP_PROXY`` for an ``http://`` relay), lower-case names first as curl and urllib do,
  unless ``NO_PROXY`` covers the relay host; otherwise the Windows proxy settings
  (:mod:`.winproxy`: WPAD, a PAC file, a manual proxy); ``auto`` adds WPAD by DNS
  (:func:`wpad_urls`). A relay on loopback is never proxied by these automatic sources (a
  proxy cannot reach this PC's loopback). Only ``cli.py`` reads the environment: it resolves
  the choice once and hands the layers below a config whose ``proxy`` is explicit (a URL,
  ``direct``, or ``pac:URL``, which the link runs again at each connection), so neither
  library consults the environment behind our back.
- **Tunnel**: through a proxy the agent opens the CONNECT tunnel itself (:mod:`.tunnel`),
  answering Negotiate, NTLM or Basic challenges (:mod:`.proxyauth`), and hands the socket to
  websockets (``sock=``) or aiohttp (:class:`TunnelConnector`); neither library's own proxy
  support can answer NTLM.
- **Trust** (:func:`ssl_context`): the operating system's certificate store through
  ``truststore`` (the one a corporate IT department manages, e.g. by group policy on
  Windows), plus the ``ca_file`` bundle for a TLS-inspecting proxy's CA.
- **Errors** (:func:`explain`): a proxy that wants credentials (407, explained from the
  schemes it offers), a proxy that refuses the CONNECT, a proxy that cannot be reached and a
  certificate that is not trusted each get a sentence naming the cause and the setting that
  fixes it. Proxy passwords never appear in messages or logs (:func:`redact`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import truststore
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.tracing import Trace

from shared.config import AgentConfig
from shared.errors import ConfigError

from . import pac, winproxy
from .proxyauth import ProxyCredentials
from .tunnel import ProxyEndpoint, ProxyError, open_tunnel

__all__ = [
    "DIRECT",
    "AUTO",
    "PAC_PREFIX",
    "pac_proxy",
    "link_proxy",
    "wpad_urls",
    "ProxyChoice",
    "is_loopback_host",
    "check_proxy_url",
    "resolve_proxy",
    "bypassed",
    "config_proxy",
    "ssl_context",
    "websocket_kwargs",
    "proxy_endpoint",
    "TunnelConnector",
    "redact",
    "explain",
    "untrusted",
    "link_error",
]

DIRECT = "direct"
"""The ``proxy`` value that turns proxies off, whatever the environment says."""
AUTO = "auto"
"""The ``proxy`` value that adds WPAD discovery to the default (module docstring)."""
PAC_PREFIX = "pac:"
"""``proxy = "pac:URL"``: the PAC file at URL chooses."""
PAC_TIMEOUT = 10.0
"""Seconds to fetch a PAC file."""
WPAD_TIMEOUT = 3.0
"""Seconds to fetch each WPAD candidate (:func:`wpad_urls`)."""


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ProxyChoice:
    """How the agent reaches the relay."""

    url: str | None
    """The proxy (``http://[USER:PASSWORD@]HOST:PORT``); None: directly."""
    source: str
    """Why, for ``doctor`` and the logs: ``proxy setting``, ``HTTPS_PROXY``, ..."""
    loopback_bypass: bool = False
    """The environment names a proxy, left unused because the relay is on loopback."""
    pac: str | None = None
    """The PAC file the choice came from (the link runs it again at each connection)."""

    def describe(self) -> str:
        """One line without the proxy's password."""
        if self.url is None:
            return f"direct ({self.source})"
        return f"{redact(self.url)} (from {self.source})"


def check_proxy_url(url: str, *, source: str = "proxy") -> None:
    """Refuse a proxy URL the agent cannot use.

    Raises:
        ConfigError: not ``http://[USER:PASSWORD@]HOST[:PORT]``, naming ``source``.
    """
    shown = redact(url)
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{source}: {shown!r} is not a URL ({exc})") from exc
    if parts.scheme != "http" or not parts.hostname:
        others = ", or pac:URL, auto or direct" if source == "proxy" else ""
        raise ConfigError(f"{source} must be http://[USER:PASSWORD@]HOST:PORT (an HTTP CONNECT "
                          f"proxy){others}, got {shown!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{source} must not have a path, query or fragment, got {shown!r}")
    if parts.username is not None and parts.password is None:
        raise ConfigError(f"{source}: a proxy user needs a password (USER:PASSWORD@), got "
                          f"{shown!r}")


def _env(env: Mapping[str, str], name: str) -> str:
    # curl and urllib prefer the lower-case name when both are set.
    return (env.get(name.lower()) or env.get(name.upper()) or "").strip()


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Does ``NO_PROXY`` cover ``host:port``?

    Entries as curl reads them: ``*`` (everything), a domain and its subdomains (a leading
    ``.`` or ``*.`` is ignored), an IP address or network (``10.0.0.0/8``), each optionally
    with ``:PORT``.
    """
    host = host.strip("[]").lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        name, want = entry, None
        if entry.count(":") == 1 or entry.startswith("["):
            head, _, tail = entry.rpartition(":")
            if tail.isdigit() and head:
                name, want = head, int(tail)
        name = name.strip("[]").removeprefix("*").lstrip(".").rstrip(".")
        if not name or (want is not None and want != port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
        elif host == name or host.endswith("." + name):
            return True
    return False


def resolve_proxy(setting: str, relay_url: str, env: Mapping[str, str], *,
                  system: Callable[[], winproxy.SystemSettings | None] = winproxy.read,
                  wpad: Callable[[], list[str]] | None = None, ca_file: Path | None = None,
                  timeout: float = PAC_TIMEOUT) -> ProxyChoice:
    """The proxy for ``relay_url`` (module docstring, Proxy).

    Args:
        setting: the ``proxy`` setting: a URL, ``direct``, ``pac:URL``, ``auto`` or empty.
        relay_url: the relay's base URL.
        env: the environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``).
        system: the Windows system proxy settings (:func:`relay_agent.winproxy.read`).
        wpad: the WPAD URLs to try (default: :func:`wpad_urls` of this computer's name).
        ca_file: extra trust for an https PAC URL.
        timeout: seconds to fetch a PAC file.

    Raises:
        ConfigError: the chosen proxy URL is unusable (naming where it came from).
        pac.PacError: the PAC file named by the setting or the system settings cannot be
            fetched or run (its ``url`` says which).
    """
    setting = setting.strip()
    kind = setting.lower()
    if kind == DIRECT:
        return ProxyChoice(None, "proxy = direct")
    if kind.startswith(PAC_PREFIX):
        return _from_pac(setting[len(PAC_PREFIX):].strip(), relay_url, "proxy = pac:",
                         ca_file=ca_file, timeout=timeout)
    if setting and kind != AUTO:
        check_proxy_url(setting)
        return ProxyChoice(setting, "proxy setting")
    from_env = _from_environment(relay_url, env)
    if from_env is not None:
        return from_env
    parts = urlsplit(relay_url)
    host = parts.hostname or ""
    if is_loopback_host(host):
        return ProxyChoice(None, "the relay is on loopback")
    settings = system()
    if settings is not None:
        for candidate in winproxy.candidates(settings, host=host, scheme=parts.scheme):
            if candidate.kind == "wpad":
                found = _from_wpad(relay_url, wpad, candidate.source, ca_file=ca_file,
                                   timeout=timeout)
                if found is not None:
                    return found
            elif candidate.kind == "pac":
                return _from_pac(candidate.value, relay_url, candidate.source,
                                 ca_file=ca_file, timeout=timeout)
            elif candidate.kind == "proxy":
                check_proxy_url(candidate.value, source=candidate.source)
                return ProxyChoice(candidate.value, candidate.source)
            else:
                return ProxyChoice(None, candidate.source)
    if kind == AUTO:
        found = _from_wpad(relay_url, wpad, "proxy = auto", ca_file=ca_file, timeout=timeout)
        if found is not None:
            return found
        return ProxyChoice(None, "proxy = auto: no HTTPS_PROXY, no system proxy settings, no "
                           "WPAD file found")
    if settings is not None:
        return ProxyChoice(None, "no HTTPS_PROXY set, no Windows proxy settings")
    return ProxyChoice(None, "no HTTPS_PROXY set")


def _from_environment(relay_url: str, env: Mapping[str, str]) -> ProxyChoice | None:
    """The environment's proxy for the relay; None when it names none."""
    parts = urlsplit(relay_url)
    host = parts.hostname or ""
    # The link is a CONNECT tunnel whatever the relay's scheme, so HTTPS_PROXY comes first even
    # for an http relay (as websockets does); HTTP_PROXY is the fallback there.
    name = "https_proxy"
    found = _env(env, name)
    if not found and parts.scheme == "http" and _env(env, "http_proxy"):
        name = "http_proxy"
        found = _env(env, name)
    if not found:
        return None
    if bypassed(host, parts.port or (443 if parts.scheme == "https" else 80),
                _env(env, "no_proxy")):
        return ProxyChoice(None, f"{name.upper()} is set, but NO_PROXY covers {host}")
    if is_loopback_host(host):
        # A proxy elsewhere cannot reach this PC's loopback (Go's ProxyFromEnvironment agrees).
        return ProxyChoice(None, f"{name.upper()} is set ({redact(found)}), but not used: the "
                           "relay is on loopback", loopback_bypass=True)
    check_proxy_url(found, source=name.upper())
    return ProxyChoice(found, name.upper())


def _pac_target(relay_url: str) -> str:
    # What browsers pass for an https URL: scheme, host and port, no path (a PAC file must
    # not see paths, which may carry secrets).
    parts = urlsplit(relay_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"


def pac_proxy(pac_url: str, relay_url: str, *, ca_file: Path | None = None,
              timeout: float = PAC_TIMEOUT) -> tuple[str | None, str]:
    """Fetch and run the PAC file at ``pac_url`` for the relay: the proxy URL it chooses
    (None: direct) and its whole answer.

    Raises:
        pac.PacError: the file cannot be fetched or run, or it names no usable entry.
        ConfigError: the proxy it names is not a usable URL.
    """
    source = f"the PAC file {pac_url}"
    try:
        context = ssl_context(ca_file) if pac_url.lower().startswith("https:") else None
        script = pac.fetch(pac_url, timeout=timeout, context=context)
        answer = pac.evaluate(script, _pac_target(relay_url), source=source)
        chosen = pac.first_usable(pac.parse_result(answer), source=source)
        if chosen is not None:
            check_proxy_url(chosen, source=source)
    except pac.PacError as exc:
        exc.url = pac_url
        raise
    return chosen, answer


def _from_pac(pac_url: str, relay_url: str, source: str, *, ca_file: Path | None,
              timeout: float) -> ProxyChoice:
    if not pac_url:
        raise ConfigError("proxy = pac:URL needs the PAC file's URL (http://, https:// or "
                          "file://)")
    chosen, answer = pac_proxy(pac_url, relay_url, ca_file=ca_file, timeout=timeout)
    return ProxyChoice(chosen, f"{source} {pac_url}, which answered {answer!r}", pac=pac_url)


def wpad_urls(fqdn: str) -> list[str]:
    """Where WPAD by DNS looks for this computer (``pc.branch.corp.example``):
    ``http://wpad.branch.corp.example/wpad.dat``, then each parent domain down to two labels
    (a ``wpad`` host directly under a public suffix is not looked for)."""
    labels = fqdn.lower().rstrip(".").split(".")[1:]
    urls: list[str] = []
    while len(labels) >= 2 and len(urls) < 3:
        urls.append(f"http://wpad.{'.'.join(labels)}/wpad.dat")
        labels = labels[1:]
    return urls


def _from_wpad(relay_url: str, wpad: Callable[[], list[str]] | None, source: str, *,
               ca_file: Path | None, timeout: float) -> ProxyChoice | None:
    urls = wpad() if wpad is not None else wpad_urls(socket.getfqdn())
    for url in urls:
        try:
            # A short wait each: a WPAD name that resolves but does not answer must not hold
            # the start of a service (which Windows gives 30 s) for the full PAC timeout.
            return _from_pac(url, relay_url, f"{source}: WPAD found", ca_file=ca_file,
                             timeout=min(timeout, WPAD_TIMEOUT))
        except pac.PacError:
            continue  # no WPAD server there: the next domain, then direct
    return None


def config_proxy(config: AgentConfig) -> str | None:
    """The proxy a config resolved by the CLI names; None: direct, or a PAC file's choice
    (:func:`link_proxy` runs it).

    An empty setting reads as direct here: the environment is the CLI's to read.
    """
    setting = config.proxy.strip()
    if not setting or setting.lower() in (DIRECT, AUTO) or setting.lower().startswith(PAC_PREFIX):
        return None
    check_proxy_url(setting)
    return setting


async def link_proxy(config: AgentConfig) -> str | None:
    """:func:`config_proxy`, with a ``pac:URL`` setting run now (in a worker thread), so that
    each connection attempt follows the PAC file as it is then."""
    setting = config.proxy.strip()
    if setting.lower().startswith(PAC_PREFIX):
        chosen, _ = await asyncio.to_thread(pac_proxy, setting[len(PAC_PREFIX):].strip(),
                                            config.relay_url, ca_file=config.ca_file)
        return chosen
    return config_proxy(config)


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context trusting the OS certificate store, plus ``ca_file`` if given.

    Raises:
        ConfigError: ``ca_file`` cannot be read or holds no usable certificate.
    """
    context = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except FileNotFoundError as exc:
            raise ConfigError(f"ca_file {ca_file} does not exist") from exc
        except OSError as exc:
            raise ConfigError(f"ca_file {ca_file} cannot be read: {exc.strerror or exc}") from exc
        except ssl.SSLError as exc:
            raise ConfigError(f"ca_file {ca_file} holds no usable PEM certificate "
                              f"({exc.reason or exc})") from exc
    return context


def proxy_endpoint(url: str) -> ProxyEndpoint:
    """The proxy ``url`` names, with its credentials (:mod:`.tunnel`)."""
    parts = urlsplit(url)
    return ProxyEndpoint(host=parts.hostname or "", port=parts.port or 80,
                         credentials=ProxyCredentials.from_url(url), shown=redact(url))


def _relay_address(relay_url: str) -> tuple[str, int]:
    parts = urlsplit(relay_url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


async def websocket_kwargs(config: AgentConfig) -> dict[str, Any]:
    """Keyword arguments for ``websockets.asyncio.client.connect`` to reach the relay.

    Through a proxy, the tunnel is opened here (:func:`relay_agent.tunnel.open_tunnel`, which
    answers NTLM, Negotiate and Basic challenges) and handed over as ``sock``: websockets'
    own proxy support does Basic only. ``proxy=None`` keeps websockets from reading the
    environment itself. ``ssl`` is passed for an https relay only (websockets refuses it for
    ``ws://``).

    Raises:
        ConfigError: an unusable proxy or ``ca_file``.
        ProxyError, OSError, TimeoutError: the tunnel could not be opened.
    """
    kwargs: dict[str, Any] = {"proxy": None}
    if urlsplit(config.relay_url).scheme == "https":
        kwargs["ssl"] = ssl_context(config.ca_file)
    proxy = await link_proxy(config)
    if proxy is not None:
        host, port = _relay_address(config.relay_url)
        kwargs["sock"] = await open_tunnel(proxy_endpoint(proxy), host, port,
                                           timeout=config.link.auth_timeout)
    return kwargs


class TunnelConnector(aiohttp.BaseConnector):
    """An aiohttp connector whose connections go through the CONNECT tunnel of
    :func:`relay_agent.tunnel.open_tunnel`, TLS on top with ``context``.

    aiohttp's own proxy support sends one CONNECT and gives up on a 407, so NTLM's second leg
    could never be sent; like aiohttp's Unix-socket connector, this one only says how a
    connection is made.
    """

    def __init__(self, proxy: str, *, context: ssl.SSLContext | None,
                 timeout: float | None) -> None:
        super().__init__(force_close=True)
        self._endpoint = proxy_endpoint(proxy)
        self._context = context
        self._timeout = timeout

    async def _create_connection(self, req: ClientRequest, traces: list[Trace],
                                 timeout: aiohttp.ClientTimeout) -> ResponseHandler:
        host, port = req.url.host or "", req.url.port or 443
        sock = await open_tunnel(self._endpoint, host, port, timeout=self._timeout)
        tls = req.url.scheme == "https"
        try:
            _, protocol = await self._loop.create_connection(
                self._factory, sock=sock, ssl=(self._context or True) if tls else None,
                server_hostname=host if tls else None)
        except BaseException:
            sock.close()
            raise
        return protocol


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (user names are kept: they help)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
    except ValueError:
        return "<unparsable URL>"
    netloc = f"{user}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# -- errors --------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _cert_problem(chain: list[BaseException]) -> str | None:
    for exc in chain:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            inner = exc.certificate_error
            if isinstance(inner, ssl.SSLCertVerificationError):
                return str(inner.verify_message or inner.reason or inner)
            return str(inner)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return str(exc.verify_message or exc.reason or exc)
    return None


def _target(relay_url: str) -> tuple[str, str]:
    parts = urlsplit(relay_url)
    host = parts.hostname or relay_url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return host, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def untrusted(problem: str, *, proxy: str | None, relay_url: str) -> str:
    """The relay's certificate failed verification with ``problem``: why, and what to do."""
    cause = ("a TLS-inspecting proxy replacing the certificate?" if proxy else
             "a self-signed certificate or a TLS-inspecting proxy?")
    return (f"the TLS certificate presented for {_target(relay_url)[0]} is not trusted "
            f"({problem}); {cause} Set ca_file to the PEM file of the CA that issued it, or add "
            "that CA to this computer's certificate store")


def explain(exc: BaseException, *, proxy: str | None, relay_url: str) -> str:
    """Why connecting to ``relay_url`` (through ``proxy``, if any) failed, in one sentence.

    Names the proxy (without its password) or the TLS problem and the setting that fixes it;
    other failures keep their own message.
    """
    specific = _cause(exc, proxy=proxy, relay_url=relay_url)
    if specific is not None:
        return specific
    text = str(exc) or type(exc).__name__
    return f"{text} (through the proxy {redact(proxy)})" if proxy else text


def _cause(exc: BaseException, *, proxy: str | None, relay_url: str) -> str | None:
    shown = redact(proxy) if proxy else ""
    chain = _chain(exc)
    refusal = next((e for e in chain if isinstance(e, ProxyError)), None)
    if refusal is not None:
        return str(refusal)  # the tunnel's message names the proxy, the cause and the fix
    problem = _cert_problem(chain)
    if problem is not None:
        return untrusted(problem, proxy=proxy, relay_url=relay_url)
    if proxy is not None and isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
        # Through a proxy, the only TCP connections the agent opens are to the proxy.
        reason = next((e.strerror for e in chain if isinstance(e, OSError) and e.strerror),
                      str(exc) or type(exc).__name__)
        return f"cannot connect to the proxy {shown}: {reason}"
    return None


def link_error(exc: BaseException, config: AgentConfig) -> str:
    """:func:`explain` for the link, from a config whose proxy the CLI resolved."""
    try:
        proxy = config_proxy(config)
    except ConfigError:
        proxy = None
    specific = _cause(exc, proxy=proxy, relay_url=config.relay_url)
    if specific is not None:
        return specific
    # The type names what the message often does not (ConnectionRefusedError, InvalidMessage).
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} (through the proxy {redact(proxy)})" if proxy else text
