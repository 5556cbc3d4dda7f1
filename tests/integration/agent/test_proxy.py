"""Corporate networks (issue 8): enrollment and doctor through a real CONNECT proxy on loopback
to the real relay behind TLS with a test CA; proxy choice rules."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from relay_agent import cli, net
from relay_agent.doctor import run_checks
from relay_agent.inbox import Inbox
from relay_agent.link import AgentLink, LinkState
from relay_agent.proxyauth import ProxyCredentials
from relay_agent.tunnel import ProxyTimeout, open_tunnel
from relay_server.app import create_public_app
from relay_server.services import Services, open_services
from shared import crypto
from shared.config import AgentConfig, LinkConfig, ServerConfig
from shared.errors import ConfigError
from shared.events import XonEvent
from tests.helpers.connect_proxy import ConnectProxy
from tests.helpers.timing import MS

from .support import REPO, agent_command, agent_env, eventually, make_event

NO_PROXY_ENV = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")


@dataclass
class TlsRelay:
    """The relay's public app on 127.0.0.1 behind TLS, its certificate from a test CA."""

    port: int
    services: Services
    account_id: str
    ca_file: Path

    def url(self, host: str = "relay.test") -> str:
        return f"https://{host}:{self.port}"

    async def new_code(self) -> str:
        code = crypto.new_token()
        await self.services.store.create_agent(
            account_id=self.account_id, name="pc", code_hash=crypto.hash_secret(code),
            code_expires_at=time.time() + 3600)
        return code

    async def add_agent(self) -> tuple[str, crypto.Ed25519PrivateKey]:
        key = crypto.generate_private_key()
        agent = await self.services.store.enroll_agent(
            code_hash=crypto.hash_secret(await self.new_code()),
            public_key=crypto.public_key_b64(key), now=time.time())
        return agent.id, key

    async def append(self, count: int) -> list[int]:
        seqs = []
        for n in range(count):
            event = XonEvent.from_json({**make_event(n, event_id=f"ev-{crypto.new_token(6)}"),
                                        "account": self.account_id})
            seqs.append((await self.services.store.append_event(event, xon_id=None)).stored.seq)
        self.services.hub.notify(self.account_id)
        return seqs


@asynccontextmanager
async def serve_tls_relay(tmp_path: Path) -> AsyncIterator[TlsRelay]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.test", "localhost").configure_cert(server_context)
    ca_file = tmp_path / "test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    data_dir = tmp_path / "relay"
    data_dir.mkdir()
    config = ServerConfig(listen="127.0.0.1:0", data_dir=data_dir,
                          link=LinkConfig(auth_timeout=5000 * MS))
    async with open_services(config, admin_token="admin-test-token") as services:
        account = await services.store.create_account(
            name="acme", ingress_key_hash=crypto.hash_secret(crypto.new_token()))
        runner = web.AppRunner(create_public_app(services), shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context).start()
            yield TlsRelay(runner.addresses[0][1], services, account.id, ca_file)
        finally:
            await services.drain()
            await runner.cleanup()


@pytest.fixture
async def tls_relay(tmp_path: Path) -> AsyncIterator[TlsRelay]:
    async with serve_tls_relay(tmp_path) as running:
        yield running


@pytest.fixture
async def proxy(tls_relay: TlsRelay) -> AsyncIterator[ConnectProxy]:
    """A CONNECT proxy with basic auth that alone knows where relay.test is."""
    async with ConnectProxy(user="alice", password="s3cret",
                            hosts={"relay.test": "127.0.0.1"}) as running:
        yield running


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own proxy settings must not leak into in-process CLI runs."""
    for name in NO_PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


async def enroll(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, ["enroll", *argv])


async def enroll_args(relay: TlsRelay, data_dir: Path, *extra: str) -> list[str]:
    return ["--relay", relay.url(), "--code", await relay.new_code(), "--data-dir",
            str(data_dir), "--listen", "127.0.0.1:0", *extra]


# -- enrollment ----------------------------------------------------------------------------------


async def test_enrollment_goes_through_https_proxy_from_the_environment(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy
) -> None:
    """HTTPS_PROXY with basic auth and ca_file: enrolled through the tunnel (relay.test is known
    to the proxy only); the proxy and its password stay out of config and output."""
    data_dir = tmp_path / "agent"
    args = await enroll_args(tls_relay, data_dir, "--ca-file", str(tls_relay.ca_file), "--json")
    process = await asyncio.create_subprocess_exec(
        *agent_command("enroll", *args), cwd=REPO, env=agent_env(HTTPS_PROXY=proxy.url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30_000 * MS)
    assert process.returncode == 0, err.decode()
    assert json.loads(out)["agent_id"]
    assert proxy.connects == [f"relay.test:{tls_relay.port}"]
    config = (data_dir / "config.toml").read_text()
    assert f'ca_file = "{tls_relay.ca_file.resolve()}"' in config
    assert "\nproxy =" not in config and "s3cret" not in out.decode() + err.decode()


async def test_proxy_setting_is_written_and_doctor_goes_through_it(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--proxy is kept in the config; doctor names that proxy (no password) and passes every
    network check through it, TLS verified with ca_file."""
    data_dir = tmp_path / "agent"
    args = await enroll_args(tls_relay, data_dir, "--proxy", proxy.url, "--ca-file",
                             str(tls_relay.ca_file))
    assert await enroll(*args) == 0, capsys.readouterr().err
    assert f'proxy = "{proxy.url}"' in (data_dir / "config.toml").read_text()
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["doctor", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["proxy"].startswith("ok")
    assert f"via http://alice:***@127.0.0.1:{proxy.port} (from proxy setting)" in lines["proxy"]
    assert "relay.test" in lines["dns"] and lines["dns"].startswith("ok")
    assert lines["tcp"].startswith("ok") and "tunnel" in lines["tcp"]
    assert lines["tls"].startswith("ok") and lines["relay_health"].startswith("ok")
    assert "s3cret" not in out
    assert len(proxy.connects) >= 3  # enroll, then doctor's tcp, tls and health steps


@pytest.mark.parametrize("credentials", ["alice:wrong@", ""], ids=["wrong", "missing"])
async def test_proxy_authentication_failure_is_a_clear_407_line(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy, credentials: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """407 from the proxy: one line naming the proxy and the fix, never the password."""
    proxy_url = f"http://{credentials}127.0.0.1:{proxy.port}"
    args = await enroll_args(tls_relay, tmp_path / "agent", "--proxy", proxy_url,
                             "--ca-file", str(tls_relay.ca_file))
    assert await enroll(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"the proxy http://{credentials.replace('wrong', '***')}127.0.0.1:{proxy.port} " \
        "requires authentication (HTTP 407" in err
    assert "it offers Basic" in err
    if credentials:
        assert "password in the proxy setting is wrong" in err and "alice:***@" in err
        # The challenge, then the final refusal of the password sent in answer to it.
        assert proxy.challenges == 1 and proxy.refused == [407]
    else:
        assert "USER:PASSWORD@HOST:PORT" in err
        assert proxy.challenges == 1 and proxy.refused == []
    assert proxy.connects == []


async def test_a_proxy_refusing_the_connect_is_named(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The proxy's policy forbids the relay: the line says CONNECT was refused, with the status."""
    proxy.deny.add("relay.test")
    args = await enroll_args(tls_relay, tmp_path / "agent", "--proxy", proxy.url,
                             "--ca-file", str(tls_relay.ca_file))
    assert await enroll(*args) == 1
    err = capsys.readouterr().err
    assert (f"refused to connect to relay.test:{tls_relay.port} (CONNECT answered HTTP 403 "
            "Forbidden)") in err
    assert err.count("\n") == 1


async def test_an_unreachable_proxy_is_named(
    tmp_path: Path, tls_relay: TlsRelay, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens at the proxy's address: the line says the proxy cannot be reached."""
    async with ConnectProxy() as gone:
        dead = gone.url
    args = await enroll_args(tls_relay, tmp_path / "agent", "--proxy", dead)
    assert await enroll(*args) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to the proxy {dead}" in err and err.count("\n") == 1


async def test_an_untrusted_certificate_through_the_proxy_is_explained(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without ca_file the test CA is unknown: the line says the certificate is not trusted,
    suspects a TLS-inspecting proxy and names ca_file; doctor adds who issued it."""
    data_dir = tmp_path / "agent"
    args = await enroll_args(tls_relay, data_dir, "--proxy", proxy.url)
    assert await enroll(*args) == 1
    err = capsys.readouterr().err
    assert "the TLS certificate presented for relay.test is not trusted" in err
    assert "TLS-inspecting proxy" in err and "ca_file" in err and err.count("\n") == 1

    # Enrolled with the CA, then the CA is dropped from the config: doctor's tls line.
    args = await enroll_args(tls_relay, data_dir, "--proxy", proxy.url, "--ca-file",
                             str(tls_relay.ca_file))
    assert await enroll(*args) == 0
    config = data_dir / "config.toml"
    config.write_text("\n".join(line for line in config.read_text().splitlines()
                                if not line.startswith("ca_file")) + "\n")
    checks = {c.name: c for c in await asyncio.to_thread(
        run_checks, config_path=config, data_dir=None, env={}, timeout=5.0)}
    assert checks["tcp"].status == "ok"
    assert checks["tls"].status == "fail" and "not trusted" in checks["tls"].detail
    assert "issued by" in checks["tls"].detail and "trustme" in checks["tls"].detail
    assert checks["relay_health"].status == "skip"


async def test_doctor_names_a_proxy_asking_for_credentials(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy
) -> None:
    """HTTPS_PROXY without credentials: the proxy line names it, tcp fails with the 407."""
    config = tmp_path / "config.toml"
    config.write_text(f'relay_url = "{tls_relay.url()}"\nagent_id = "a"\nrelay_id = "r"\n'
                      f'listen = "127.0.0.1:0"\nca_file = "{tls_relay.ca_file}"\n')
    checks = {c.name: c for c in await asyncio.to_thread(
        run_checks, config_path=config, data_dir=tmp_path, env={"HTTPS_PROXY": proxy.bare_url},
        timeout=5.0)}
    assert checks["proxy"].status == "ok" and "from HTTPS_PROXY" in checks["proxy"].detail
    assert checks["tcp"].status == "fail" and "HTTP 407" in checks["tcp"].detail
    assert checks["tls"].status == "skip"


async def test_a_loopback_relay_ignores_the_environment_proxy(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """https://localhost with HTTPS_PROXY set: enrolled directly, the proxy never asked."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    code = await tls_relay.new_code()
    assert await enroll("--relay", tls_relay.url("localhost"), "--code", code, "--data-dir",
                        str(tmp_path / "agent"), "--ca-file", str(tls_relay.ca_file)) == 0, \
        capsys.readouterr().err
    assert proxy.connects == [] and proxy.refused == []


async def test_run_refuses_an_unusable_proxy_or_ca_file(tmp_path: Path) -> None:
    """run exits 2 with one line for a proxy URL it cannot use and a ca_file it cannot load."""
    data_dir = tmp_path / "agent"
    data_dir.mkdir(mode=0o700)
    (data_dir / "agent.key").write_bytes(
        crypto.private_key_to_pem(crypto.generate_private_key()))
    (data_dir / "local-token").write_text("t\n")
    base = (f'relay_url = "https://relay.test:1"\nagent_id = "a"\nrelay_id = "r"\n'
            f'data_dir = "{data_dir}"\nlisten = "127.0.0.1:0"\n')
    cases = [('proxy = "socks5://127.0.0.1:1080"', "http://[USER:PASSWORD@]HOST:PORT"),
             (f'ca_file = "{tmp_path / "missing.pem"}"', "does not exist")]
    for line, expected in cases:
        (data_dir / "config.toml").write_text(base + line + "\n")
        process = await asyncio.create_subprocess_exec(
            *agent_command("run", "--data-dir", str(data_dir)), cwd=REPO, env=agent_env(),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(process.communicate(), 30_000 * MS)
        assert process.returncode == 2, err.decode()
        assert expected in err.decode() and err.decode().count("\n") == 1


# -- the link ----------------------------------------------------------------------------------


async def link_config(relay: TlsRelay, tmp_path: Path, *, proxy: str,
                      ca_file: Path | None) -> tuple[AgentConfig, crypto.Ed25519PrivateKey]:
    agent_id, key = await relay.add_agent()
    return AgentConfig(relay_url=relay.url(), agent_id=agent_id,
                       relay_id=relay.services.relay_id, data_dir=tmp_path, proxy=proxy,
                       ca_file=ca_file, backoff_initial=10 * MS, backoff_max=100 * MS,
                       link=LinkConfig(auth_timeout=5000 * MS)), key


@asynccontextmanager
async def running_link(config: AgentConfig, key: crypto.Ed25519PrivateKey,
                       tmp_path: Path) -> AsyncIterator[tuple[AgentLink, Inbox]]:
    inbox = await Inbox.open(tmp_path / "inbox.db")
    link = AgentLink(config, private_key=key, inbox=inbox)
    task = asyncio.create_task(link.run())
    try:
        yield link, inbox
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await inbox.close()


async def test_the_link_goes_through_the_proxy_with_the_ca_file(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy
) -> None:
    """wss:// through the CONNECT proxy (basic auth), TLS verified with ca_file: events arrive."""
    config, key = await link_config(tls_relay, tmp_path, proxy=proxy.url,
                                    ca_file=tls_relay.ca_file)
    async with running_link(config, key, tmp_path) as (link, inbox):
        seqs = await tls_relay.append(3)
        await eventually(lambda: inbox.last_seq() == seqs[-1], what="events through the proxy")
        assert link.status.state is LinkState.CONNECTED
    assert proxy.connects == [f"relay.test:{tls_relay.port}"]


@pytest.mark.parametrize("case", ["wrong-password", "untrusted"])
async def test_link_failures_name_the_proxy_or_tls_cause(
    tmp_path: Path, tls_relay: TlsRelay, proxy: ConnectProxy, case: str
) -> None:
    """The link's last error says 407 with wrong credentials, or names the untrusted
    certificate without ca_file; it keeps retrying and never shows the password."""
    if case == "wrong-password":
        config, key = await link_config(
            tls_relay, tmp_path, proxy=f"http://alice:wrong@127.0.0.1:{proxy.port}",
            ca_file=tls_relay.ca_file)
        expected = "requires authentication (HTTP 407"
    else:
        config, key = await link_config(tls_relay, tmp_path, proxy=proxy.url, ca_file=None)
        expected = "the TLS certificate presented for relay.test is not trusted"
    async with running_link(config, key, tmp_path) as (link, _):
        await eventually(lambda: expected in (link.status.last_error or ""),
                         what=f"last error {expected!r}")
        assert link.status.state is not LinkState.CONNECTED
        assert "wrong" not in (link.status.last_error or "").replace("is wrong", "")
        assert "s3cret" not in (link.status.last_error or "")


# -- proxy choice (pure) -------------------------------------------------------------------------


def test_the_proxy_setting_wins_over_the_environment() -> None:
    """proxy = URL is used as is; proxy = direct turns proxies off; both ignore NO_PROXY."""
    env = {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "relay.example"}
    chosen = net.resolve_proxy("http://cfg:8080", "https://relay.example", env)
    assert chosen.url == "http://cfg:8080" and chosen.source == "proxy setting"
    assert net.resolve_proxy("direct", "https://relay.example", env).url is None


def test_environment_proxy_rules() -> None:
    """Lower-case names first; NO_PROXY domains, ports and networks; loopback never proxied."""
    relay = "https://relay.example.com"
    upper = {"HTTPS_PROXY": "http://upper:1"}
    assert net.resolve_proxy("", relay, upper).url == "http://upper:1"
    assert net.resolve_proxy("", relay, {**upper, "https_proxy": "http://lower:1"}).url \
        == "http://lower:1"
    assert net.resolve_proxy("", relay, {}).url is None
    for no_proxy in ("example.com", ".example.com", "*.example.com", "*",
                     "other, relay.example.com", "relay.example.com:443"):
        assert net.resolve_proxy("", relay, {**upper, "NO_PROXY": no_proxy}).url is None, no_proxy
    for no_proxy in ("ample.com", "relay.example.com:8443", "other"):
        assert net.resolve_proxy("", relay, {**upper, "NO_PROXY": no_proxy}).url \
            == "http://upper:1", no_proxy
    assert net.bypassed("10.1.2.3", 443, "10.0.0.0/8") and not net.bypassed("11.0.0.1", 443,
                                                                             "10.0.0.0/8")
    local = net.resolve_proxy("", "https://127.0.0.1:8443", upper)
    assert local.url is None and local.loopback_bypass
    # An http relay (insecure) uses HTTPS_PROXY too, HTTP_PROXY when that is all there is.
    assert net.resolve_proxy("", "http://relay.example.com", {"HTTP_PROXY": "http://h:1"}).url \
        == "http://h:1"


@pytest.mark.parametrize("url", ["https://proxy:3128", "socks5://proxy:1080", "proxy:3128",
                                 "http://proxy:3128/path", "http://alice@proxy:3128",
                                 "http://proxy:notaport"])
def test_unusable_proxy_urls_are_refused(url: str) -> None:
    """Only http://[USER:PASSWORD@]HOST[:PORT] CONNECT proxies are accepted."""
    with pytest.raises(ConfigError):
        net.check_proxy_url(url)


def test_proxy_passwords_are_redacted_everywhere() -> None:
    """redact, describe and the tunnel's name for the proxy never show the password; the
    credentials reach the tunnel decoded."""
    url = "http://CORP%5Calice:p%40ss@proxy.example:3128"
    assert net.redact(url) == "http://CORP%5Calice:***@proxy.example:3128"
    assert "p%40ss" not in net.ProxyChoice(url, "proxy setting").describe()
    endpoint = net.proxy_endpoint(url)
    assert (endpoint.host, endpoint.port, endpoint.shown) == (
        "proxy.example", 3128, "http://CORP%5Calice:***@proxy.example:3128")
    assert endpoint.credentials == ProxyCredentials("CORP\\alice", "p@ss")


async def test_websocket_kwargs_direct_pass_no_proxy_and_the_trust() -> None:
    """Direct, the link gets proxy=None (so websockets reads no environment) and, for an https
    relay, the truststore context; no socket is opened."""
    wss = await net.websocket_kwargs(AgentConfig(relay_url="https://relay.example",
                                                 proxy="direct"))
    assert wss["proxy"] is None and isinstance(wss["ssl"], ssl.SSLContext) and "sock" not in wss
    plain = await net.websocket_kwargs(AgentConfig(relay_url="http://127.0.0.1:1",
                                                   proxy="direct"))
    assert plain == {"proxy": None}


async def test_a_proxy_that_never_answers_is_named_after_the_timeout() -> None:
    """A proxy that takes the connection and says nothing: the tunnel gives up at its timeout
    with a line naming the proxy and the target, not a bare TimeoutError."""
    taken: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProxyTimeout) as timed_out:
            await open_tunnel(net.proxy_endpoint(f"http://127.0.0.1:{port}"), "relay.test", 443,
                              timeout=200 * MS)
        assert str(timed_out.value).startswith(
            f"the proxy http://127.0.0.1:{port} opened no tunnel to relay.test:443 within")
        assert taken  # it did connect: the wait was for the answer
    finally:
        for writer in taken:
            writer.close()
        server.close()
        await server.wait_closed()
