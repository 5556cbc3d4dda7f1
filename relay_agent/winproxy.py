"""The Windows system proxy settings, and what they say about the relay.

Two places hold them (docs/corporate-networks.md, Windows system proxy):

- **WinINET, per user** ("Internet Options", or group policy): automatically detect
  settings (WPAD), an automatic configuration script (a PAC URL), a manual proxy and its
  bypass list. Read with ``WinHttpGetIEProxyConfigForCurrentUser``: the settings of the
  account the agent runs as (a service account usually has none).
- **WinHTTP, per machine** (``netsh winhttp set proxy``): a proxy and its bypass list, the
  setting meant for services. Read with ``WinHttpGetDefaultProxyConfiguration``.

:func:`read` is the only part that calls Windows (through ``ctypes``); everything else takes
its :class:`SystemSettings` and is tested on any platform with canned values.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass

__all__ = ["UserSettings", "SystemSettings", "Candidate", "read", "candidates",
           "proxy_for", "bypassed"]


@dataclass(frozen=True, slots=True)
class UserSettings:
    """WinINET's settings for the current user."""

    auto_detect: bool = False
    auto_config_url: str = ""
    proxy: str = ""
    """``host:port``, or per scheme: ``http=host:port;https=host:port;socks=host:port``."""
    bypass: str = ""
    """``;``-separated: host names with ``*`` wildcards, ``<local>`` for dotless names."""


@dataclass(frozen=True, slots=True)
class SystemSettings:
    user: UserSettings | None = None
    machine_proxy: str = ""
    """WinHTTP's named proxy, in the same form as :attr:`UserSettings.proxy`."""
    machine_bypass: str = ""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way the settings say to reach the relay, tried in order."""

    kind: str
    """``wpad`` (discover a PAC file), ``pac`` (``value`` is its URL), ``proxy`` (``value`` is
    the proxy URL) or ``direct``."""
    value: str
    source: str
    """For ``doctor`` and the log: which setting said so."""


def read() -> SystemSettings | None:
    """The settings, or None on other systems or when Windows will not say."""
    if sys.platform == "win32":  # pragma: no cover - Windows only
        return _read_windows()
    return None


def _read_windows() -> SystemSettings | None:  # pragma: no cover - Windows only
    import ctypes
    from ctypes import wintypes

    class IeConfig(ctypes.Structure):
        _fields_ = [("auto_detect", wintypes.BOOL), ("auto_config_url", ctypes.c_void_p),
                    ("proxy", ctypes.c_void_p), ("bypass", ctypes.c_void_p)]

    class ProxyInfo(ctypes.Structure):
        _fields_ = [("access_type", wintypes.DWORD), ("proxy", ctypes.c_void_p),
                    ("bypass", ctypes.c_void_p)]

    winhttp = ctypes.WinDLL("winhttp")  # type: ignore[attr-defined,unused-ignore]
    kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined,unused-ignore]
    kernel32.GlobalFree.argtypes = [ctypes.c_void_p]

    def take(pointer: int | None) -> str:
        # The strings are the caller's to free (GlobalFree), per the WinHTTP documentation.
        if not pointer:
            return ""
        try:
            return str(ctypes.wstring_at(pointer))
        finally:
            kernel32.GlobalFree(pointer)

    user: UserSettings | None = None
    config = IeConfig()
    if winhttp.WinHttpGetIEProxyConfigForCurrentUser(ctypes.byref(config)):
        user = UserSettings(bool(config.auto_detect), take(config.auto_config_url),
                            take(config.proxy), take(config.bypass))
    info = ProxyInfo()
    machine_proxy = machine_bypass = ""
    if winhttp.WinHttpGetDefaultProxyConfiguration(ctypes.byref(info)):
        proxy, bypass = take(info.proxy), take(info.bypass)
        if info.access_type == 3:  # WINHTTP_ACCESS_TYPE_NAMED_PROXY
            machine_proxy, machine_bypass = proxy, bypass
    return SystemSettings(user, machine_proxy, machine_bypass)


def proxy_for(value: str, scheme: str) -> str | None:
    """The proxy URL a WinINET/WinHTTP proxy string names for a ``scheme`` (``https``/``http``)
    relay, or None.

    ``host:port`` serves every scheme; in the per-scheme form the relay's scheme is used, else
    ``http=`` (a CONNECT proxy either way); ``socks=`` is not an HTTP proxy.
    """
    named: dict[str, str] = {}
    plain = ""
    for item in value.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, address = item.partition("=")
        if sep:
            named.setdefault(key.strip().lower(), address.strip())
        elif not plain:
            plain = item
    chosen = plain or named.get(scheme) or named.get("http") or ""
    if not chosen:
        return None
    chosen = chosen.removeprefix("http://").rstrip("/")
    if "://" in chosen:
        return None  # https:// or socks:// proxies: not an HTTP CONNECT proxy
    host, sep, port = chosen.rpartition(":")
    return f"http://{chosen}" if sep and host and port.isdigit() else f"http://{chosen}:80"


def bypassed(host: str, bypass: str) -> bool:
    """Does a WinINET bypass list cover ``host``? ``*`` wildcards, case-insensitive;
    ``<local>`` covers names without a dot (and loopback is always bypassed by the caller)."""
    host = host.lower().strip("[]")
    for entry in bypass.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "<local>":
            if "." not in host and ":" not in host:
                return True
            continue
        entry = entry.split("://", 1)[-1]
        if fnmatch.fnmatchcase(host, entry):
            return True
    return False


def candidates(settings: SystemSettings, *, host: str, scheme: str) -> list[Candidate]:
    """What the settings say for a relay at ``host``, in the order Windows tries them:
    automatic detection, the configuration script, the manual proxy; then the machine's
    WinHTTP proxy when the user has none of these. Empty: the settings say nothing."""
    found: list[Candidate] = []
    user = settings.user
    if user is not None:
        if user.auto_detect:
            found.append(Candidate("wpad", "", "Windows setting: automatically detect settings"))
        if user.auto_config_url:
            found.append(Candidate("pac", user.auto_config_url,
                                   "Windows setting: automatic configuration script"))
        if user.proxy:
            if bypassed(host, user.bypass):
                found.append(Candidate("direct", "", "Windows proxy settings: the relay is in "
                                                     "the bypass list"))
            else:
                url = proxy_for(user.proxy, scheme)
                if url is not None:
                    found.append(Candidate("proxy", url, "Windows proxy settings (WinINET)"))
    if not found and settings.machine_proxy:
        if bypassed(host, settings.machine_bypass):
            found.append(Candidate("direct", "", "WinHTTP proxy setting: the relay is in the "
                                                 "bypass list"))
        else:
            url = proxy_for(settings.machine_proxy, scheme)
            if url is not None:
                found.append(Candidate("proxy", url, "WinHTTP proxy setting (netsh winhttp)"))
    return found
