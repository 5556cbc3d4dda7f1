"""Proxy auto-config (PAC) files: fetch one, run its ``FindProxyForURL`` for the relay, read
the answer (docs/corporate-networks.md, PAC and WPAD).

A PAC file is JavaScript. It runs in QuickJS (the ``quickjs-ng`` package: the maintained fork
of QuickJS, with wheels for Windows, Linux and macOS, and per-context CPU-time and memory
limits), in a fresh context per evaluation, with the standard helper functions written in
:data:`_HELPERS`. Bounds: a script of at most 1 MiB, 1 s of CPU time and 32 MiB of memory per
run, at most 16 distinct host names looked up, each lookup given 2 s.

QuickJS refuses calls into Python while a time limit is set, so the script cannot resolve
names itself. It runs against a table of names already resolved; a name missing there is
recorded and answered "unresolvable", then resolved here and the script run again from the
start (``FindProxyForURL`` is a function of its inputs; at most four runs). The same goes for
``myIpAddress()``. A script that only matches names costs no lookup at all.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import ConfigError

__all__ = [
    "PacError",
    "PacEntry",
    "fetch",
    "evaluate",
    "parse_result",
    "first_usable",
    "MAX_SCRIPT",
    "CPU_LIMIT",
    "MEMORY_LIMIT",
    "MAX_NAMES",
]

MAX_SCRIPT = 1024 * 1024
CPU_LIMIT = 1.0
MEMORY_LIMIT = 32 * 1024 * 1024
MAX_NAMES = 16
LOOKUP_TIMEOUT = 2.0
_MAX_RUNS = 4
_MY_ADDRESS = "\x00myIpAddress"
"""Recorded in the wanted names when the script asks for this computer's address."""
_MAX_RESULT = 4096

Resolver = Callable[[str], str | None]


class PacError(ConfigError):
    """The PAC file cannot be fetched, or running it failed; the message says which."""

    url: str | None = None
    """The PAC file's URL, once known."""


@dataclass(frozen=True, slots=True)
class PacEntry:
    """One entry of a ``FindProxyForURL`` answer."""

    kind: str
    """``PROXY`` (``HTTP`` is read as the same), ``DIRECT``, or one the agent cannot use
    (``HTTPS``, ``SOCKS``, ``SOCKS5``, ...)."""
    address: str = ""
    """``host:port`` for a proxy."""


def fetch(url: str, *, timeout: float, context: ssl.SSLContext | None = None) -> str:
    """The PAC script at ``url`` (``http://``, ``https://`` or ``file://``), never through a
    proxy (the PAC file is what names the proxy).

    Raises:
        PacError: unreachable, not 2xx, over :data:`MAX_SCRIPT` bytes.
    """
    parts = urlsplit(url)
    try:
        if parts.scheme == "file":
            # url2pathname: file:///C:/corp/proxy.pac is C:\corp\proxy.pac on Windows, and
            # file://server/share/proxy.pac a UNC path there.
            remote = parts.netloc not in ("", "localhost")
            path = Path(urllib.request.url2pathname(
                f"//{parts.netloc}{parts.path}" if remote else parts.path))
            with path.open("rb") as file:
                data = file.read(MAX_SCRIPT + 1)
        elif parts.scheme in ("http", "https"):
            handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
            if context is not None:
                handlers.append(urllib.request.HTTPSHandler(context=context))
            opener = urllib.request.build_opener(*handlers)
            with opener.open(url, timeout=timeout) as response:
                data = response.read(MAX_SCRIPT + 1)
        else:
            raise PacError(f"the PAC URL must be http://, https:// or file://, got {url!r}")
    except urllib.error.HTTPError as exc:
        raise PacError(f"the PAC file {url} cannot be fetched: HTTP {exc.code}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
        raise PacError(f"the PAC file {url} cannot be fetched: {reason or exc}") from exc
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise PacError(f"the PAC file {url} cannot be fetched: {detail}") from exc
    if len(data) > MAX_SCRIPT:
        raise PacError(f"the PAC file {url} is over {MAX_SCRIPT // 1024} KiB: not a PAC file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _lookup(name: str) -> str | None:
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return str(infos[0][4][0]) if infos else None


def _my_address(relay_ip: str | None) -> str:
    """This computer's address towards the relay (no packet is sent: a UDP connect only
    picks the route), else the host name's, else 127.0.0.1."""
    if relay_ip is not None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((relay_ip, 9))
            return str(probe.getsockname()[0])
        except OSError:
            pass
        finally:
            probe.close()
    return _lookup(socket.gethostname()) or "127.0.0.1"


class _Lookups:
    """Names resolved for one evaluation: bounded in number and in time each."""

    def __init__(self, resolve: Resolver) -> None:
        self.resolve = resolve
        self.table: dict[str, str | None] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                           thread_name_prefix="pac-dns")

    def add(self, names: list[str]) -> None:
        wanted = [n for n in dict.fromkeys(names) if n not in self.table]
        wanted = wanted[:max(0, MAX_NAMES - len(self.table))]
        futures = {name: self._pool.submit(self.resolve, name) for name in wanted}
        for name, future in futures.items():
            try:
                self.table[name] = future.result(timeout=LOOKUP_TIMEOUT)
            except concurrent.futures.TimeoutError:
                self.table[name] = None  # the lookup thread ends on its own

    @property
    def full(self) -> bool:
        return len(self.table) >= MAX_NAMES

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def evaluate(script: str, url: str, *, resolve: Resolver = _lookup,
             now: datetime.datetime | None = None, my_address: str | None = None,
             source: str = "the PAC file") -> str:
    """``FindProxyForURL(url, host)`` of ``script`` (module docstring), as a string.

    Args:
        resolve: name → IPv4 address or None (tests pass a table).
        now: local time for ``weekdayRange``/``dateRange``/``timeRange``.
        my_address: for ``myIpAddress()``; None: this computer's address towards the host.
        source: how messages name the script (its URL).

    Raises:
        PacError: the script does not compile, throws, runs out of time or memory, or does
            not answer a string.
    """
    if len(script.encode()) > MAX_SCRIPT:
        raise PacError(f"{source} is over {MAX_SCRIPT // 1024} KiB: not a PAC file?")
    host = (urlsplit(url).hostname or "").lower()
    lookups = _Lookups(resolve)
    address = my_address
    try:
        for _ in range(_MAX_RUNS):
            answer, wanted = _run(script, url, host, lookups.table, address,
                                  now or datetime.datetime.now(), source)
            again = False
            if _MY_ADDRESS in wanted and address is None:
                lookups.add([host])
                address = _my_address(lookups.table.get(host))
                again = True
            names = [n for n in wanted if n != _MY_ADDRESS and n not in lookups.table]
            if names and not lookups.full:
                lookups.add(names)
                again = True
            if not again:
                return answer
        return answer
    finally:
        lookups.close()


def _run(script: str, url: str, host: str, table: dict[str, str | None], address: str | None,
         now: datetime.datetime, source: str) -> tuple[str, list[str]]:
    import quickjs  # type: ignore[import-untyped]  # imported when a PAC file is run

    context = quickjs.Context()
    context.set_memory_limit(MEMORY_LIMIT)
    context.set_max_stack_size(1024 * 1024)
    clock = [now.year, now.month, now.day, now.hour, now.minute, now.second, now.weekday()]
    utc = now.astimezone(datetime.timezone.utc) if now.tzinfo else now
    clock_gmt = [utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.weekday()]
    inputs = json.dumps({"dns": table, "my": address, "now": clock, "gmt": clock_gmt})
    try:
        context.eval(f"var __in = {inputs};\n{_HELPERS}")
        context.set_time_limit(CPU_LIMIT)
        context.eval(script)
        answer = context.eval(f"FindProxyForURL({json.dumps(url)}, {json.dumps(host)})")
        wanted = json.loads(context.eval("JSON.stringify(__wanted)"))
    except quickjs.JSException as exc:
        raise PacError(f"{source} failed: {_js_problem(exc)}") from exc
    except (MemoryError, quickjs.StackOverflow) as exc:
        raise PacError(f"{source} failed: it used more than {MEMORY_LIMIT >> 20} MiB") from exc
    if not isinstance(answer, str):
        raise PacError(f"{source} failed: FindProxyForURL answered {type(answer).__name__}, "
                       "not a string")
    return answer[:_MAX_RESULT], [str(n) for n in wanted if isinstance(n, str)]


def _js_problem(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if "interrupted" in first:
        return f"it ran longer than {CPU_LIMIT:g} s of CPU time"
    if not first or first == "null" or "out of memory" in first:
        return f"it used more than {MEMORY_LIMIT >> 20} MiB"
    return first[:200]


def parse_result(answer: str) -> list[PacEntry]:
    """The entries of a ``FindProxyForURL`` answer (``"PROXY a:3128; DIRECT"``)."""
    entries = []
    for item in answer.split(";"):
        kind, _, address = item.strip().partition(" ")
        if kind:
            kind = "PROXY" if kind.upper() == "HTTP" else kind.upper()
            entries.append(PacEntry(kind, address.strip()))
    return entries


def first_usable(entries: list[PacEntry], *, source: str) -> str | None:
    """The proxy URL to use (None: direct): the first ``PROXY`` or ``DIRECT`` entry.

    No failover to later entries: the choice is made once per connection attempt.

    Raises:
        PacError: no entry the agent can use (only HTTPS or SOCKS proxies, or nothing).
    """
    for entry in entries:
        if entry.kind == "DIRECT":
            return None
        if entry.kind == "PROXY" and entry.address:
            host, _, port = entry.address.rpartition(":")
            if host and port.isdigit():
                return f"http://{entry.address}"
            return f"http://{entry.address}:80"
    shown = "; ".join(f"{e.kind} {e.address}".strip() for e in entries) or "nothing"
    raise PacError(f"{source} answered {shown!r}: the agent can use only PROXY (an HTTP "
                   "CONNECT proxy) or DIRECT entries")


# The PAC helper functions (as browsers define them), written for this engine. DNS answers
# come from __in.dns; a missing name is recorded in __wanted (module docstring).
_HELPERS = r"""
var __wanted = [];
var __months = ["JAN","FEB","MAR","APR","MAY","JUN","JUL","AUG","SEP","OCT","NOV","DEC"];
var __days = ["SUN","MON","TUE","WED","THU","FRI","SAT"];
function alert(message) {}
function dnsResolve(host) {
    var name = String(host).toLowerCase();
    if (/^\d+\.\d+\.\d+\.\d+$/.test(name)) return name;
    if (Object.prototype.hasOwnProperty.call(__in.dns, name)) return __in.dns[name];
    if (__wanted.indexOf(name) < 0) __wanted.push(name);
    return null;
}
function dnsResolveEx(host) { return dnsResolve(host) || ""; }
function isResolvable(host) { return dnsResolve(host) !== null; }
function isResolvableEx(host) { return isResolvable(host); }
function myIpAddress() {
    if (__in.my === null) { __wanted.push("\u0000myIpAddress"); return "127.0.0.1"; }
    return __in.my;
}
function myIpAddressEx() { return myIpAddress(); }
function isPlainHostName(host) { return String(host).indexOf(".") < 0; }
function dnsDomainIs(host, domain) {
    host = String(host).toLowerCase(); domain = String(domain).toLowerCase();
    return host.length >= domain.length &&
        host.substring(host.length - domain.length) === domain;
}
function localHostOrDomainIs(host, hostdom) {
    host = String(host).toLowerCase(); hostdom = String(hostdom).toLowerCase();
    return host === hostdom || (host.indexOf(".") < 0 && hostdom.indexOf(host + ".") === 0);
}
function dnsDomainLevels(host) { return String(host).split(".").length - 1; }
function shExpMatch(text, pattern) {
    var source = "";
    pattern = String(pattern);
    for (var i = 0; i < pattern.length; i++) {
        var c = pattern.charAt(i);
        if (c === "*") source += ".*";
        else if (c === "?") source += ".";
        else source += c.replace(/[\\^$.|+()\[\]{}\/]/g, "\\$&");
    }
    return new RegExp("^" + source + "$").test(String(text));
}
function convert_addr(ip) {
    var parts = String(ip).split(".");
    if (parts.length !== 4) return 0;
    var value = 0;
    for (var i = 0; i < 4; i++) {
        var n = parseInt(parts[i], 10);
        if (isNaN(n) || n < 0 || n > 255) return 0;
        value = value * 256 + n;
    }
    return value;
}
function isInNet(host, pattern, mask) {
    var ip = dnsResolve(host);
    if (ip === null) return false;
    var m = convert_addr(mask);
    return ((convert_addr(ip) & m) >>> 0) === ((convert_addr(pattern) & m) >>> 0);
}
function isInNetEx(host, prefix) {
    var parts = String(prefix).split("/");
    var bits = parseInt(parts[1], 10);
    if (isNaN(bits) || bits < 0 || bits > 32) return false;
    var mask = bits === 0 ? 0 : (0xFFFFFFFF << (32 - bits)) >>> 0;
    var ip = dnsResolve(host);
    if (ip === null) return false;
    return ((convert_addr(ip) & mask) >>> 0) === ((convert_addr(parts[0]) & mask) >>> 0);
}
function __clock(args) {
    var gmt = args.length > 0 && args[args.length - 1] === "GMT";
    return { gmt: gmt, now: gmt ? __in.gmt : __in.now };
}
function weekdayRange() {
    var c = __clock(arguments), n = arguments.length - (c.gmt ? 1 : 0);
    var today = (c.now[6] + 1) % 7;  // Python's Monday=0 to Sunday=0
    var a = __days.indexOf(String(arguments[0]).toUpperCase());
    var b = n > 1 ? __days.indexOf(String(arguments[1]).toUpperCase()) : a;
    if (a < 0 || b < 0) return false;
    return a <= b ? (today >= a && today <= b) : (today >= a || today <= b);
}
function timeRange() {
    var c = __clock(arguments), n = arguments.length - (c.gmt ? 1 : 0), a = arguments;
    var now = c.now[3] * 3600 + c.now[4] * 60 + c.now[5], from, to;
    if (n === 1) { from = a[0] * 3600; to = from + 3599; }
    else if (n === 2) { from = a[0] * 3600; to = a[1] * 3600 - 1; }
    else if (n === 4) { from = a[0] * 3600 + a[1] * 60; to = a[2] * 3600 + a[3] * 60 - 1; }
    else if (n === 6) {
        from = a[0] * 3600 + a[1] * 60 + a[2]; to = a[3] * 3600 + a[4] * 60 + a[5];
    }
    else return false;
    return from <= to ? (now >= from && now <= to) : (now >= from || now <= to);
}
function dateRange() {
    var c = __clock(arguments), n = arguments.length - (c.gmt ? 1 : 0), parts = [];
    for (var i = 0; i < n; i++) {
        var v = arguments[i], month = __months.indexOf(String(v).toUpperCase());
        if (month >= 0) parts.push(["m", month + 1]);
        else if (typeof v === "number" && v > 31) parts.push(["y", v]);
        else if (typeof v === "number") parts.push(["d", v]);
        else return false;
    }
    var half = parts.length === 1 ? 1 : parts.length / 2;
    if (parts.length !== 1 && parts.length % 2 !== 0) return false;
    function key(list, fill) {
        var y = fill[0], m = fill[1], d = fill[2];
        for (var j = 0; j < list.length; j++) {
            if (list[j][0] === "y") y = list[j][1];
            else if (list[j][0] === "m") m = list[j][1];
            else d = list[j][1];
        }
        return y * 10000 + m * 100 + d;
    }
    var kinds = {};
    for (var k = 0; k < half; k++) kinds[parts[k][0]] = true;
    var now = c.now;
    var today = (kinds.y ? now[0] * 10000 : 0) + (kinds.m ? now[1] * 100 : 0) +
        (kinds.d ? now[2] : 0);
    var zero = [0, 0, 0];
    var from = key(parts.slice(0, half), zero);
    var to = parts.length === 1 ? from : key(parts.slice(half), zero);
    return from <= to ? (today >= from && today <= to) : (today >= from || today <= to);
}
"""
