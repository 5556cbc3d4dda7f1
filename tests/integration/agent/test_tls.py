"""TLS trust (issue 8): the OS store through truststore plus an optional CA bundle (ca_file),
against a real TLS listener on loopback whose certificate comes from a test CA."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme

from relay_agent import net
from shared.errors import ConfigError


@asynccontextmanager
async def tls_listener(ca: trustme.CA) -> AsyncIterator[int]:
    """A TLS server for relay.test that answers each connection with b"hi" and closes."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.test").configure_cert(context)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def greet(port: int, context: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="relay.test")
    try:
        return await reader.read(2)
    finally:
        writer.close()


async def test_ca_file_adds_a_trusted_ca(tmp_path: Path) -> None:
    """The OS store alone refuses the test CA's certificate; with ca_file it is accepted."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with tls_listener(ca) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await greet(port, net.ssl_context(None))
        assert await greet(port, net.ssl_context(ca_file)) == b"hi"


async def test_ca_file_does_not_skip_the_hostname_check(tmp_path: Path) -> None:
    """A trusted CA still has to have issued the certificate for the name asked for."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with tls_listener(ca) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=net.ssl_context(ca_file), server_hostname="other.test")
            writer.close()


def test_the_context_verifies_by_default() -> None:
    """Certificates and host names are checked (truststore over PROTOCOL_TLS_CLIENT)."""
    context = net.ssl_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "not-pem"])
def test_an_unusable_ca_file_is_a_config_error_naming_it(
    tmp_path: Path, content: bytes | None
) -> None:
    """A missing or non-PEM ca_file is refused at start, naming the file."""
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="ca_file .*ca.pem"):
        net.ssl_context(path)


def test_untrusted_messages_name_the_likely_cause() -> None:
    """Direct: a self-signed certificate or an inspecting proxy; via a proxy: the proxy."""
    direct = net.untrusted("unable to get local issuer certificate", proxy=None,
                           relay_url="https://relay.example")
    assert "relay.example is not trusted" in direct and "self-signed" in direct
    proxied = net.untrusted("x", proxy="http://u:pw@proxy:3128", relay_url="https://r.example")
    assert "TLS-inspecting proxy" in proxied and "ca_file" in proxied and "pw" not in proxied
