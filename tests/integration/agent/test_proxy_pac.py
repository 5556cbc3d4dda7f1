"""PAC files end to end: a PAC file served on loopback by a real aiohttp server chooses the
proxy for the relay; enrollment, doctor and the link follow it (docs/corporate-networks.md,
PAC and WPAD)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from relay_agent import cli, net, pac
from relay_agent.doctor import run_checks
from relay_agent.link import LinkState
from relay_agent.winproxy import SystemSettings, UserSettings
from shared.config import AgentConfig, LinkConfig
from tests.helpers.connect_proxy import ConnectProxy
from tests.helpers.timing import MS

from .support import eventually
from .test_proxy import (
    NO_PROXY_ENV,
    TlsRelay,
    enroll,
    enroll_args,
    link_config,
    running_link,
    serve_tls_relay,
)


@dataclass
class PacServer:
    """Serves ``script`` at /proxy.pac (or ``status`` instead of 200), counting requests."""

    script: str = ""
    status: int = 200
    hits: int = 0
    port: int = 0
    runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/proxy.pac"

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        return web.Response(text=self.script,
                            content_type="application/x-ns-proxy-autoconfig")


def routing(proxy: ConnectProxy) -> str:
    """Names only: relay.test through the proxy, anything else direct (no lookup needed)."""
    return ('function FindProxyForURL(url, host) {\n'
            f'  if (dnsDomainIs(host, ".test") || host == "relay.test")\n'
            f'    return "PROXY 127.0.0.1:{proxy.port}; DIRECT";\n'
            '  return "DIRECT";\n}\n')


@pytest.fixture
async def tls_relay(tmp_path: Path) -> AsyncIterator[TlsRelay]:
    async with serve_tls_relay(tmp_path) as running:
        yield running


@pytest.fixture
async def proxy(tls_relay: TlsRelay) -> AsyncIterator[ConnectProxy]:
    async with ConnectProxy(hosts={"relay.test": "127.0.0.1"}) as running:
        yield running


@pytest.fixture
async def pac_server() -> AsyncIterator[PacServer]:
    server = PacServer()
    app = web.Application()
    app.router.add_get("/proxy.pac", server.handle)
    server.runner = web.AppRunner(app)
    await server.runner.setup()
    site = web.TCPSite(server.runner, "127.0.0.1", 0)
    await site.start()
    server.port = server.runner.addresses[0][1]
    try:
        yield server
    finally:
        await server.runner.cleanup()


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NO_PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


async def test_the_pac_file_sends_enrollment_doctor_and_the_link_through_its_proxy(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy, pac_server: PacServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """proxy = "pac:URL": the PAC file names the proxy for relay.test (which only the proxy can
    resolve): enrollment gets through and keeps the setting, doctor names the PAC answer,
    and the link fetches the file again and receives events through that proxy."""
    pac_server.script = routing(proxy)
    data_dir = tmp_path / "agent"
    setting = f"pac:{pac_server.url}"
    args = await enroll_args(tls_relay, data_dir, "--proxy", setting, "--ca-file",
                             str(tls_relay.ca_file))
    assert await enroll(*args) == 0, capsys.readouterr().err
    assert f'proxy = "{setting}"' in (data_dir / "config.toml").read_text()
    assert proxy.connects == [f"relay.test:{tls_relay.port}"] and pac_server.hits == 1
    capsys.readouterr()

    assert await asyncio.to_thread(cli.main, ["doctor", "--data-dir", str(data_dir)]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert f"via http://127.0.0.1:{proxy.port} (from proxy = pac: {pac_server.url}, which " \
        f"answered 'PROXY 127.0.0.1:{proxy.port}; DIRECT')" in lines["proxy"]
    assert lines["relay_health"].startswith("ok")

    hits = pac_server.hits
    config, key = await link_config(tls_relay, tmp_path, proxy=setting,
                                    ca_file=tls_relay.ca_file)
    async with running_link(config, key, tmp_path) as (link, inbox):
        seqs = await tls_relay.append(2)
        await eventually(lambda: inbox.last_seq() == seqs[-1], what="events via the PAC proxy")
        assert link.status.state is LinkState.CONNECTED
    assert pac_server.hits == hits + 1
    assert proxy.connects[-1] == f"relay.test:{tls_relay.port}"


async def test_a_pac_file_saying_direct_goes_direct(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy, pac_server: PacServer,
) -> None:
    """The PAC file answers DIRECT for localhost: the link connects without the proxy."""
    pac_server.script = routing(proxy)
    agent_id, key = await tls_relay.add_agent()
    config = AgentConfig(relay_url=tls_relay.url("localhost"), agent_id=agent_id,
                         relay_id=tls_relay.services.relay_id, data_dir=tmp_path,
                         proxy=f"pac:{pac_server.url}", ca_file=tls_relay.ca_file,
                         backoff_initial=10 * MS, backoff_max=100 * MS,
                         link=LinkConfig(auth_timeout=5000 * MS))
    async with running_link(config, key, tmp_path) as (link, inbox):
        seqs = await tls_relay.append(1)
        await eventually(lambda: inbox.last_seq() == seqs[-1], what="events, direct")
    assert pac_server.hits >= 1 and proxy.connects == [] and proxy.challenges == 0


@pytest.mark.parametrize("case, expected", [
    ("missing", "cannot be fetched: HTTP 404"),
    ("syntax", "failed: SyntaxError"),
    ("socks", "answered 'SOCKS5 127.0.0.1:1080': the agent can use only PROXY"),
    ("huge", "is over 1024 KiB: not a PAC file?"),
])
async def test_a_broken_pac_file_is_a_clear_doctor_failure(
    tmp_path: Path, tls_relay: TlsRelay, pac_server: PacServer, case: str, expected: str,
) -> None:
    """Not served, not JavaScript, naming only a SOCKS proxy, or too big to be one (not read
    past the bound): the proxy line fails naming the PAC file and the cause; the network
    checks after it are skipped, not run direct."""
    pac_server.status = 404 if case == "missing" else 200
    pac_server.script = {
        "syntax": "function FindProxyForURL(url, host) { return (; }",
        "huge": "//" + "x" * pac.MAX_SCRIPT,
    }.get(case, 'function FindProxyForURL(u, h) { return "SOCKS5 127.0.0.1:1080"; }')
    config = tmp_path / "config.toml"
    config.write_text(f'relay_url = "{tls_relay.url()}"\nagent_id = "a"\nrelay_id = "r"\n'
                      f'listen = "127.0.0.1:0"\nproxy = "pac:{pac_server.url}"\n')
    checks = {c.name: c for c in await asyncio.to_thread(
        run_checks, config_path=config, data_dir=tmp_path, env={}, timeout=5.0)}
    assert checks["proxy"].status == "fail"
    assert f"the PAC file {pac_server.url}" in checks["proxy"].detail
    assert expected in checks["proxy"].detail
    assert checks["tcp"].status == "skip" and checks["tcp"].detail == "proxy unusable"


async def test_the_link_waits_out_a_hostile_pac_file_and_follows_it_once_fixed(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy, pac_server: PacServer,
) -> None:
    """A PAC file that loops forever is cut at its CPU bound at each attempt and the link's
    last error says so, while another agent's link keeps receiving; once the file is fixed,
    the next attempt goes through the proxy it names."""
    pac_server.script = "function FindProxyForURL(url, host) { while (true) {} }"
    config, key = await link_config(tls_relay, tmp_path / "a", proxy=f"pac:{pac_server.url}",
                                    ca_file=tls_relay.ca_file)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    other, other_key = await link_config(tls_relay, tmp_path / "b", proxy=proxy.url,
                                         ca_file=tls_relay.ca_file)
    async with running_link(config, key, tmp_path / "a") as (link, inbox), \
            running_link(other, other_key, tmp_path / "b") as (_, other_inbox):
        await eventually(lambda: "ran longer than 1 s of CPU time" in
                         (link.status.last_error or ""), what="the PAC bound in last_error",
                         limit=20_000 * MS)
        seqs = await tls_relay.append(2)
        await eventually(lambda: other_inbox.last_seq() == seqs[-1], what="the other agent's "
                         "events", limit=20_000 * MS)
        assert link.status.state is not LinkState.CONNECTED
        pac_server.script = routing(proxy)
        await eventually(lambda: inbox.last_seq() == seqs[-1], what="events once fixed",
                         limit=20_000 * MS)


async def test_the_windows_script_setting_is_followed(
    tls_relay: TlsRelay, proxy: ConnectProxy, pac_server: PacServer,
) -> None:
    """The user's "automatic configuration script" (from the Windows settings seam) is
    fetched from loopback and run like pac:URL."""
    pac_server.script = routing(proxy)
    settings = SystemSettings(UserSettings(auto_config_url=pac_server.url))
    choice = await asyncio.to_thread(net.resolve_proxy, "", tls_relay.url(), {},
                                     system=lambda: settings)
    assert choice.url == f"http://127.0.0.1:{proxy.port}" and choice.pac == pac_server.url
    assert pac_server.hits == 1


async def test_run_starts_when_the_pac_file_is_down_and_keeps_it_for_the_link(
    pac_server: PacServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """At start the PAC server answers 503 (it may come up after the PC): run does not stop,
    it warns naming the file and hands the link the PAC file to fetch again at each attempt."""
    pac_server.status = 503
    config = AgentConfig(relay_url="https://relay.test:1", proxy=f"pac:{pac_server.url}")
    with caplog.at_level("WARNING", logger="relay_agent.cli"):
        resolved = await asyncio.to_thread(cli._resolve_network, config)
    assert resolved.proxy == f"pac:{pac_server.url}"
    warning = next(r for r in caplog.records if r.levelname == "WARNING")
    assert "cannot be fetched: HTTP 503" in warning.__dict__["error"]
    assert net.config_proxy(resolved) is None  # the link runs the file itself (link_proxy)
