"""The Windows system proxy settings with canned values (relay_agent/winproxy.py), and how the
proxy choice follows them, PAC files and WPAD (relay_agent/net.py resolve_proxy)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from relay_agent import net, pac, winproxy
from relay_agent.winproxy import Candidate, SystemSettings, UserSettings
from shared.errors import ConfigError

RELAY = "https://relay.example.com"


@pytest.mark.parametrize("value, scheme, expected", [
    ("proxy.corp:8080", "https", "http://proxy.corp:8080"),
    ("http=h.corp:80;https=s.corp:8443;socks=k.corp:1080", "https", "http://s.corp:8443"),
    ("http=h.corp:80;socks=k.corp:1080", "https", "http://h.corp:80"),
    ("http=h.corp:80;https=s.corp:8443", "http", "http://h.corp:80"),
    ("socks=k.corp:1080", "https", None),
    ("http://proxy.corp:3128/", "https", "http://proxy.corp:3128"),
    ("https://proxy.corp:3128", "https", None),
    ("proxy.corp", "https", "http://proxy.corp:80"),
    ("", "https", None),
])
def test_proxy_strings_per_scheme(value: str, scheme: str, expected: str | None) -> None:
    """WinINET/WinHTTP proxy strings: one proxy for all, or per scheme; SOCKS is not used."""
    assert winproxy.proxy_for(value, scheme) == expected


@pytest.mark.parametrize("host, bypass, expected", [
    ("intranet", "<local>", True),
    ("relay.example.com", "<local>", False),
    ("relay.example.com", "*.example.com;<local>", True),
    ("RELAY.example.com", "*.EXAMPLE.com", True),
    ("10.1.2.3", "10.*", True),
    ("relay.example.com", "https://relay.example.com", True),
    ("relay.example.com", "*.example.org; other", False),
])
def test_bypass_lists(host: str, bypass: str, expected: bool) -> None:
    """Wildcards, <local> for dotless names, case-insensitive, scheme prefixes ignored."""
    assert winproxy.bypassed(host, bypass) is expected


def test_candidates_follow_windows_order() -> None:
    """Automatic detection, then the script, then the manual proxy; the machine's WinHTTP
    proxy only when the user's settings say nothing."""
    user = UserSettings(auto_detect=True, auto_config_url="http://pac.corp/p.pac",
                        proxy="proxy.corp:8080", bypass="<local>")
    found = winproxy.candidates(SystemSettings(user, "machine.corp:3128"),
                                host="relay.example.com", scheme="https")
    assert [(c.kind, c.value) for c in found] == [
        ("wpad", ""), ("pac", "http://pac.corp/p.pac"), ("proxy", "http://proxy.corp:8080")]
    machine = winproxy.candidates(SystemSettings(UserSettings(), "machine.corp:3128",
                                                 "*.example.com"),
                                  host="relay.other.com", scheme="https")
    assert machine == [Candidate("proxy", "http://machine.corp:3128",
                                 "WinHTTP proxy setting (netsh winhttp)")]
    bypassed = winproxy.candidates(SystemSettings(None, "machine.corp:3128", "*.example.com"),
                                   host="relay.example.com", scheme="https")
    assert [c.kind for c in bypassed] == ["direct"]
    assert winproxy.candidates(SystemSettings(), host="relay.example.com", scheme="https") == []


def test_read_gives_nothing_outside_windows() -> None:
    """The seam: only Windows has these settings."""
    if sys.platform == "win32":  # pragma: no cover - the Windows CI runs the real calls
        assert isinstance(winproxy.read(), SystemSettings | None)
    else:
        assert winproxy.read() is None


def write_pac(tmp_path: Path, answer: str) -> str:
    path = tmp_path / "proxy.pac"
    path.write_text(f'function FindProxyForURL(url, host) {{ return "{answer}"; }}\n')
    return path.as_uri()


def test_the_default_follows_the_environment_then_the_windows_settings(tmp_path: Path) -> None:
    """proxy empty: HTTPS_PROXY wins; else the user's manual proxy; else the script; a relay
    in the bypass list goes direct; nothing set is direct."""
    manual = SystemSettings(UserSettings(proxy="proxy.corp:8080"))
    choice = net.resolve_proxy("", RELAY, {"HTTPS_PROXY": "http://env:1"}, system=lambda: manual)
    assert choice.url == "http://env:1"
    choice = net.resolve_proxy("", RELAY, {}, system=lambda: manual)
    assert choice.url == "http://proxy.corp:8080"
    assert choice.source == "Windows proxy settings (WinINET)"
    script = SystemSettings(UserSettings(auto_config_url=write_pac(tmp_path, "PROXY p.corp:1")))
    choice = net.resolve_proxy("", RELAY, {}, system=lambda: script)
    assert choice.url == "http://p.corp:1" and choice.pac is not None
    assert "automatic configuration script" in choice.source and "PROXY p.corp:1" in choice.source
    bypass = SystemSettings(UserSettings(proxy="proxy.corp:8080", bypass="*.example.com"))
    assert net.resolve_proxy("", RELAY, {}, system=lambda: bypass).url is None
    empty = net.resolve_proxy("", RELAY, {}, system=lambda: SystemSettings())
    assert empty.url is None and "no Windows proxy settings" in empty.source
    loopback = net.resolve_proxy("", "https://127.0.0.1:8443", {}, system=lambda: manual)
    assert loopback.url is None


def test_automatic_detection_tries_wpad_then_the_next_setting(tmp_path: Path) -> None:
    """Windows' "automatically detect": a WPAD file that exists chooses; none found falls to
    the manual proxy, as Windows does."""
    settings = SystemSettings(UserSettings(auto_detect=True, proxy="manual.corp:8080"))
    wpad = write_pac(tmp_path, "PROXY wpad-chosen.corp:3128; DIRECT")
    choice = net.resolve_proxy("", RELAY, {}, system=lambda: settings, wpad=lambda: [wpad])
    assert choice.url == "http://wpad-chosen.corp:3128" and "WPAD found" in choice.source
    missing = (tmp_path / "none.dat").as_uri()
    choice = net.resolve_proxy("", RELAY, {}, system=lambda: settings, wpad=lambda: [missing])
    assert choice.url == "http://manual.corp:8080"


def test_auto_adds_wpad_and_pac_names_a_file(tmp_path: Path) -> None:
    """proxy = auto looks for WPAD even without system settings (the default does not);
    proxy = pac:URL runs that file and says what it answered."""
    wpad = write_pac(tmp_path, "PROXY w.corp:3128")
    choice = net.resolve_proxy("auto", RELAY, {}, system=lambda: None, wpad=lambda: [wpad])
    assert choice.url == "http://w.corp:3128"
    assert net.resolve_proxy("", RELAY, {}, system=lambda: None, wpad=lambda: [wpad]).url is None
    nothing = net.resolve_proxy("auto", RELAY, {}, system=lambda: None, wpad=lambda: [])
    assert nothing.url is None and "no WPAD file found" in nothing.source
    choice = net.resolve_proxy(f"pac:{write_pac(tmp_path, 'DIRECT')}", RELAY, {})
    assert choice.url is None and "which answered 'DIRECT'" in choice.source


def test_a_broken_pac_setting_names_the_file() -> None:
    """pac: with a file that is not there: a PacError carrying the URL; pac: alone: refused."""
    with pytest.raises(pac.PacError, match="cannot be fetched") as failed:
        net.resolve_proxy("pac:file:///nonexistent/proxy.pac", RELAY, {})
    assert failed.value.url == "file:///nonexistent/proxy.pac"
    with pytest.raises(pac.PacError, match="http://, https:// or file://"):
        net.resolve_proxy("pac:ftp://x/p.pac", RELAY, {})
    with pytest.raises(ConfigError, match="needs the PAC file's URL"):
        net.resolve_proxy("pac:", RELAY, {})


def test_wpad_urls_walk_up_to_two_labels() -> None:
    """WPAD by DNS: each parent domain of this computer's, never a bare public suffix."""
    assert net.wpad_urls("pc1.branch.corp.example") == [
        "http://wpad.branch.corp.example/wpad.dat", "http://wpad.corp.example/wpad.dat"]
    assert net.wpad_urls("pc1.example") == []
    assert net.wpad_urls("pc1") == []
