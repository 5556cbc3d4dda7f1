"""NTLM proxy authentication end to end: a real CONNECT proxy on loopback whose NTLM side is
pyspnego's acceptor (tests/helpers/connect_proxy.py), the real relay behind TLS; enrollment,
doctor and the link all authenticate through it (docs/corporate-networks.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay_agent import cli
from relay_agent.doctor import run_checks
from relay_agent.link import LinkState
from tests.helpers.connect_proxy import ConnectProxy

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


@pytest.fixture
async def tls_relay(tmp_path: Path) -> AsyncIterator[TlsRelay]:
    async with serve_tls_relay(tmp_path) as running:
        yield running


@pytest.fixture
async def ntlm_proxy(tls_relay: TlsRelay) -> AsyncIterator[ConnectProxy]:
    """A proxy that lets through only CORP\\alice, by NTLM, and alone knows relay.test."""
    async with ConnectProxy(user="alice", password="s3cret", scheme="ntlm",
                            hosts={"relay.test": "127.0.0.1"}) as running:
        yield running


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*NO_PROXY_ENV, "NTLM_USER_FILE"):
        monkeypatch.delenv(name, raising=False)


async def test_enroll_doctor_and_link_authenticate_by_ntlm(
    tmp_path: Path, tls_relay: TlsRelay, ntlm_proxy: ConnectProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """DOMAIN\\user and password in the proxy URL: enrollment, every doctor check and the link
    go through the NTLM proxy (three legs each), and events arrive."""
    data_dir = tmp_path / "agent"
    args = await enroll_args(tls_relay, data_dir, "--proxy", ntlm_proxy.ntlm_url, "--ca-file",
                             str(tls_relay.ca_file))
    assert await enroll(*args) == 0, capsys.readouterr().err
    assert ntlm_proxy.users == ["CORP\\alice"]
    assert ntlm_proxy.connects == [f"relay.test:{tls_relay.port}"]
    capsys.readouterr()

    assert await asyncio.to_thread(cli.main, ["doctor", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["tcp"].startswith("ok") and "tunnel" in lines["tcp"]
    assert lines["tls"].startswith("ok") and lines["relay_health"].startswith("ok")

    before = len(ntlm_proxy.users)
    config, key = await link_config(tls_relay, tmp_path, proxy=ntlm_proxy.ntlm_url,
                                    ca_file=tls_relay.ca_file)
    async with running_link(config, key, tmp_path) as (link, inbox):
        seqs = await tls_relay.append(2)
        await eventually(lambda: inbox.last_seq() == seqs[-1], what="events through NTLM")
        assert link.status.state is LinkState.CONNECTED
    assert len(ntlm_proxy.users) == before + 1
    # The challenge with the negotiate message, then the authenticate message: no refusal.
    assert ntlm_proxy.refused == []


async def test_a_wrong_ntlm_password_is_a_clear_407_line(
    tmp_path: Path, tls_relay: TlsRelay, ntlm_proxy: ConnectProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The proxy rejects the NTLM answer: enroll, doctor and the link say it rejected NTLM for
    that user and that the user or password is wrong, never "Basic", never the password."""
    wrong = ntlm_proxy.ntlm_url.replace(":s3cret@", ":wrong-pw@")
    args = await enroll_args(tls_relay, tmp_path / "agent", "--proxy", wrong, "--ca-file",
                             str(tls_relay.ca_file))
    assert await enroll(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "wrong-pw" not in err
    assert "requires authentication (HTTP 407 Proxy Authentication Required; it offers NTLM)" \
        in err
    assert "it rejected NTLM for the user 'CORP\\\\alice'" in err
    assert "the user or password in the proxy setting is wrong" in err
    assert ntlm_proxy.connects == [] and ntlm_proxy.refused == [407]

    config = tmp_path / "config.toml"
    config.write_text(f'relay_url = "{tls_relay.url()}"\nagent_id = "a"\nrelay_id = "r"\n'
                      f'listen = "127.0.0.1:0"\nca_file = "{tls_relay.ca_file}"\n'
                      f'proxy = "{wrong}"\n')
    checks = {c.name: c for c in await asyncio.to_thread(
        run_checks, config_path=config, data_dir=tmp_path, env={}, timeout=5.0)}
    assert checks["tcp"].status == "fail" and "rejected NTLM" in checks["tcp"].detail
    assert checks["tls"].status == "skip"

    link_cfg, key = await link_config(tls_relay, tmp_path, proxy=wrong,
                                      ca_file=tls_relay.ca_file)
    async with running_link(link_cfg, key, tmp_path) as (link, _):
        await eventually(lambda: "rejected NTLM" in (link.status.last_error or ""),
                         what="the link's 407 explanation")
        assert "wrong-pw" not in (link.status.last_error or "")
        assert link.status.state is not LinkState.CONNECTED


async def test_an_ntlm_proxy_without_credentials_says_what_to_set(
    tmp_path: Path, tls_relay: TlsRelay, ntlm_proxy: ConnectProxy,
) -> None:
    """No credentials outside Windows (no logon to use): the link's error names NTLM as what
    the proxy offers and the DOMAIN%5CUSER:PASSWORD form to set; Basic is never sent."""
    config, key = await link_config(tls_relay, tmp_path, proxy=ntlm_proxy.bare_url,
                                    ca_file=tls_relay.ca_file)
    async with running_link(config, key, tmp_path) as (link, _):
        await eventually(lambda: "cannot answer NTLM" in (link.status.last_error or ""),
                         what="the missing-credentials explanation")
        error = link.status.last_error or ""
        assert "it offers NTLM" in error and "DOMAIN%5CUSER:PASSWORD@HOST:PORT" in error
    assert ntlm_proxy.connects == [] and ntlm_proxy.users == []


@pytest.mark.parametrize("offer, expected", [
    (["Negotiate", "NTLM"], None),
    (['Digest realm="corp", nonce="x"', "Bearer"],
     "it offers Digest, Bearer), the agent can do Negotiate, NTLM and Basic"),
])
async def test_schemes_are_chosen_from_what_the_proxy_offers(
    tmp_path: Path, tls_relay: TlsRelay, offer: list[str], expected: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Offered Negotiate and NTLM without Kerberos here: NTLM is answered and enrollment
    passes. Offered only schemes the agent cannot do: the line lists both sides."""
    async with ConnectProxy(user="alice", password="s3cret", scheme="ntlm", offer=offer,
                            hosts={"relay.test": "127.0.0.1"}) as proxy:
        args = await enroll_args(tls_relay, tmp_path / "agent", "--proxy", proxy.ntlm_url,
                                 "--ca-file", str(tls_relay.ca_file))
        code = await enroll(*args)
        err = capsys.readouterr().err
        if expected is None:
            assert code == 0, err
            assert proxy.users == ["CORP\\alice"]
        else:
            assert code == 1 and expected in err and err.count("\n") == 1
            assert proxy.connects == [] and proxy.challenges == 1


async def test_a_negotiate_only_proxy_is_answered_with_spnego(
    tmp_path: Path, tls_relay: TlsRelay,
) -> None:
    """A proxy offering only Negotiate (SPNEGO; NTLM inside it, as without a Kerberos realm):
    the link answers it over several legs and receives events."""
    async with ConnectProxy(user="alice", password="s3cret", scheme="negotiate",
                            hosts={"relay.test": "127.0.0.1"}) as proxy:
        config, key = await link_config(tls_relay, tmp_path, proxy=proxy.ntlm_url,
                                        ca_file=tls_relay.ca_file)
        async with running_link(config, key, tmp_path) as (link, inbox):
            seqs = await tls_relay.append(1)
            await eventually(lambda: inbox.last_seq() == seqs[-1], what="events by Negotiate")
        assert proxy.users == ["CORP\\alice"] and proxy.refused == []
