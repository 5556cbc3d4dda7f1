"""PAC files run in a bounded QuickJS context (relay_agent/pac.py): the helper functions,
DNS answered from a table, and scripts that misbehave."""

from __future__ import annotations

import datetime
import json

import pytest

from relay_agent import pac

TUESDAY_10AM = datetime.datetime(2026, 12, 8, 10, 0)
TABLE = {"relay.example.com": "203.0.113.5", "in.corp.example": "10.1.2.3"}


def run(body: str, url: str = "https://relay.example.com/", *,
        table: dict[str, str | None] | None = None, lookups: list[str] | None = None,
        now: datetime.datetime = TUESDAY_10AM) -> str:
    names = TABLE if table is None else table

    def resolve(name: str) -> str | None:
        if lookups is not None:
            lookups.append(name)
        return names.get(name)

    return pac.evaluate(f"function FindProxyForURL(url, host) {{ {body} }}", url,
                        resolve=resolve, now=now, my_address="10.9.8.7")


@pytest.mark.parametrize("expression, expected", [
    ('isPlainHostName("intranet")', True),
    ('isPlainHostName("relay.example.com")', False),
    ('dnsDomainIs("relay.example.com", ".example.com")', True),
    ('dnsDomainIs("relay.example.org", ".example.com")', False),
    ('localHostOrDomainIs("www", "www.corp.example")', True),
    ('localHostOrDomainIs("www.other.example", "www.corp.example")', False),
    ('dnsDomainLevels("relay.example.com")', 2),
    ('shExpMatch("relay.example.com", "*.example.*")', True),
    ('shExpMatch("relay.example.com", "relay.?xample.com")', True),
    ('shExpMatch("relayXexample.com", "relay.example.com")', False),
    ('isInNet(host, "203.0.113.0", "255.255.255.0")', True),
    ('isInNet("in.corp.example", "10.0.0.0", "255.0.0.0")', True),
    ('isInNet("192.168.1.9", "10.0.0.0", "255.0.0.0")', False),
    ('isInNetEx(host, "203.0.113.0/24")', True),
    ('dnsResolve(host)', "203.0.113.5"),
    ('isResolvable("nowhere.invalid")', False),
    ('myIpAddress()', "10.9.8.7"),
    ('convert_addr("10.0.0.1")', 167772161),
    ('weekdayRange("MON", "FRI")', True),
    ('weekdayRange("SAT", "MON")', False),
    ('weekdayRange("TUE")', True),
    ('timeRange(9, 17)', True),
    ('timeRange(10)', True),
    ('timeRange(18, 8)', False),
    ('timeRange(9, 30, 10, 30)', True),
    ('dateRange("DEC")', True),
    ('dateRange("JAN", "MAR")', False),
    ('dateRange(1, "DEC", 2026, 31, "DEC", 2026)', True),
    ('dateRange(2027)', False),
])
def test_the_standard_helpers(expression: str, expected: object) -> None:
    """Each PAC helper answers as browsers' do (at Tuesday 10:00, December 2026)."""
    answer = run(f"return JSON.stringify({expression});")
    assert json.loads(answer) == expected, expression


def test_the_url_is_passed_as_given_with_its_lower_case_host() -> None:
    """FindProxyForURL(url, host): the host without port, lower-case, as browsers pass it."""
    assert run("return url + ' ' + host;", "https://Relay.Example.com:8443/") == \
        "https://Relay.Example.com:8443/ relay.example.com"


def test_names_the_script_asks_for_are_resolved_then_it_runs_again() -> None:
    """A name missing from the table is resolved once and the script run again with it;
    nothing else is looked up, not even the relay's host."""
    lookups: list[str] = []
    table: dict[str, str | None] = {**TABLE, "wpad-check.corp.example": "10.0.0.1"}
    answer = run('if (isResolvable("wpad-check.corp.example")) return "PROXY inside:3128";'
                 ' return "DIRECT";', table=table, lookups=lookups)
    assert answer == "PROXY inside:3128"
    assert lookups == ["wpad-check.corp.example"]


def test_my_address_is_the_route_to_the_relay_when_asked_for() -> None:
    """myIpAddress() without a given address: this computer's address towards the relay's
    (here loopback), found only because the script asked."""
    lookups: list[str] = []
    answer = pac.evaluate('function FindProxyForURL(u, h) { return "PROXY " + myIpAddress(); }',
                          "https://relay.example.com/", resolve=lambda n: lookups.append(n)
                          or "127.0.0.1")
    assert answer == "PROXY 127.0.0.1" and lookups == ["relay.example.com"]
    assert pac.evaluate('function FindProxyForURL(u, h) { return "DIRECT"; }',
                        "https://relay.example.com/", resolve=lambda n: lookups.append(n)
                        or None) == "DIRECT"
    assert lookups == ["relay.example.com"]


def test_lookups_are_bounded_in_number() -> None:
    """A script asking for endless names gets at most MAX_NAMES lookups, then an answer."""
    lookups: list[str] = []
    answer = run('for (var i = 0; i < 1000; i++) dnsResolve("n" + i + ".example");'
                 ' return "DIRECT";', table={}, lookups=lookups)
    assert answer == "DIRECT" and len(lookups) <= pac.MAX_NAMES


@pytest.mark.parametrize("body, expected", [
    ("while (true) {}", "ran longer than 1 s of CPU time"),
    ("var a = []; while (true) a.push(new Array(100000).fill(1));", "used more than 32 MiB"),
    ("return 42;", "answered int, not a string"),
    ('throw new Error("no proxy for you");', "Error: no proxy for you"),
    ("return (;", "SyntaxError"),
])
def test_a_misbehaving_script_is_a_clear_error(body: str, expected: str) -> None:
    """Endless loops and memory hogs are cut at their bounds; errors name themselves."""
    with pytest.raises(pac.PacError, match=expected):
        run(body)


def test_a_script_without_the_function_or_too_big_is_refused() -> None:
    """No FindProxyForURL: a reference error; over MAX_SCRIPT: refused unread."""
    with pytest.raises(pac.PacError, match="FindProxyForURL is not defined"):
        pac.evaluate("var x = 1;", "https://relay.example.com/", resolve=lambda _: None,
                     my_address="10.0.0.1")
    with pytest.raises(pac.PacError, match="over 1024 KiB"):
        pac.evaluate("//" + "x" * pac.MAX_SCRIPT, "https://r/", resolve=lambda _: None)


def test_answers_are_read_and_the_first_usable_entry_chosen() -> None:
    """PROXY (and HTTP) entries become http:// URLs, DIRECT means none; SOCKS and HTTPS
    proxies are passed over; nothing usable is an error quoting the answer."""
    first = pac.first_usable
    assert first(pac.parse_result("PROXY a.corp:3128; DIRECT"), source="s") == \
        "http://a.corp:3128"
    assert first(pac.parse_result("SOCKS s:1080; HTTPS h:443; HTTP b:8080"), source="s") == \
        "http://b:8080"
    assert first(pac.parse_result(" DIRECT "), source="s") is None
    assert first(pac.parse_result("PROXY nohost"), source="s") == "http://nohost:80"
    with pytest.raises(pac.PacError, match="'SOCKS5 s:1080'"):
        first(pac.parse_result("SOCKS5 s:1080"), source="s")
    with pytest.raises(pac.PacError, match="'nothing'"):
        first(pac.parse_result(""), source="s")
