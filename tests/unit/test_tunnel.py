"""The CONNECT handshake without sockets (relay_agent/tunnel.py) and the choice of proxy
authentication scheme (relay_agent/proxyauth.py): canned proxy answers, hostile ones included."""

from __future__ import annotations

import base64

import pytest

from relay_agent.proxyauth import (
    Challenge,
    ProxyCredentials,
    choose_scheme,
    explain_407,
    parse_challenges,
)
from relay_agent.tunnel import (
    ESTABLISHED,
    MAX_BODY,
    MAX_HEAD,
    Handshake,
    ProxyAnswerInvalid,
    ProxyEndpoint,
    ProxyRefused,
    Send,
)

ALICE = ProxyCredentials("alice", "s3cret")
CHALLENGE_BASIC = (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                   b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 5\r\n\r\nhello')


def handshake(credentials: ProxyCredentials | None = ALICE) -> Handshake:
    proxy = ProxyEndpoint("proxy.corp", 3128, credentials, "http://proxy.corp:3128")
    return Handshake(proxy, "relay.example", 443, windows=False, kerberos=False)


def test_the_first_request_carries_no_credentials() -> None:
    """A password goes only to a proxy that asks for Basic: the first CONNECT has none."""
    request = handshake().start()
    assert request.startswith(b"CONNECT relay.example:443 HTTP/1.1\r\nHost: relay.example:443\r\n")
    assert b"Proxy-Authorization" not in request


def test_a_2xx_opens_the_tunnel_and_split_reads_are_collected() -> None:
    """The answer may arrive in pieces; 200 is the tunnel."""
    shake = handshake()
    shake.start()
    assert shake.receive_data(b"HTTP/1.1 200 Connection") is None
    assert shake.receive_data(b" established\r\n\r\n") is ESTABLISHED


def test_basic_is_answered_on_the_kept_connection_and_a_second_407_is_a_rejection() -> None:
    """407 Basic with a body: the body is skipped, Basic is sent on the same connection; a
    second 407 says the credentials were rejected, for that user."""
    shake = handshake()
    shake.start()
    step = shake.receive_data(CHALLENGE_BASIC[:60])
    assert step is None
    step = shake.receive_data(CHALLENGE_BASIC[60:])
    assert isinstance(step, Send) and not step.reconnect
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:s3cret") in step.data
    with pytest.raises(ProxyRefused) as refused:
        shake.receive_data(CHALLENGE_BASIC)
    assert refused.value.status == 407
    assert "it offers Basic" in str(refused.value)
    assert "rejected Basic for the user 'alice'" in str(refused.value)


def test_without_credentials_basic_is_not_answered() -> None:
    """No credentials and only Basic offered: a refusal saying to put them in the URL."""
    shake = handshake(credentials=None)
    shake.start()
    with pytest.raises(ProxyRefused) as refused:
        shake.receive_data(CHALLENGE_BASIC)
    assert 'proxy = "http://USER:PASSWORD@HOST:PORT"' in str(refused.value)


def test_a_close_delimited_or_oversized_407_body_means_a_fresh_connection() -> None:
    """A 407 without a length, with Connection: close, or a body over the bound: the next leg
    goes on a new connection (the body is not read)."""
    for answer in (b"HTTP/1.1 407 No\r\nProxy-Authenticate: Basic\r\n\r\n",
                   b"HTTP/1.1 407 No\r\nProxy-Authenticate: Basic\r\nConnection: close\r\n"
                   b"Content-Length: 0\r\n\r\n",
                   b"HTTP/1.1 407 No\r\nProxy-Authenticate: Basic\r\nContent-Length: "
                   + str(MAX_BODY + 1).encode() + b"\r\n\r\n",
                   b"HTTP/1.0 407 No\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n"):
        shake = handshake()
        shake.start()
        step = shake.receive_data(answer)
        assert isinstance(step, Send) and step.reconnect, answer


def test_a_chunked_407_body_is_skipped() -> None:
    """Chunked bodies (with an extension and a trailer) are read to their end, then answered."""
    shake = handshake()
    shake.start()
    head = b"HTTP/1.1 407 No\r\nProxy-Authenticate: Basic\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert shake.receive_data(head + b"5;x=1\r\nhello\r\n") is None
    assert shake.receive_data(b"0\r\nX-Trailer: 1\r\n") is None
    assert isinstance(shake.receive_data(b"\r\n"), Send)


def test_other_statuses_are_refusals_naming_the_target() -> None:
    """403 from a proxy policy: the message names the relay target and the status."""
    shake = handshake()
    shake.start()
    with pytest.raises(ProxyRefused) as refused:
        shake.receive_data(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert refused.value.status == 403
    assert "refused to connect to relay.example:443 (CONNECT answered HTTP 403 Forbidden)" \
        in str(refused.value)


@pytest.mark.parametrize("answer, expected", [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "is it an HTTP proxy?"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "is it an HTTP proxy?"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * MAX_HEAD, f"over {MAX_HEAD} bytes"),
    (b"HTTP/1.1 200 OK\r\n\r\nextra", "sent data after opening the tunnel"),
    (b"", "closed the connection without answering"),
])
def test_a_hostile_or_broken_proxy_answer_is_refused(answer: bytes, expected: str) -> None:
    """Not HTTP, a status that is not three digits, an endless head, bytes pushed after 200, a
    close before answering: each a clear error, none read beyond the bounds."""
    shake = handshake()
    shake.start()
    with pytest.raises(ProxyAnswerInvalid, match=expected.replace("?", r"\?")):
        shake.receive_data(answer)


def test_a_garbled_ntlm_challenge_is_a_clear_refusal() -> None:
    """NTLM's second leg gets a token pyspnego cannot read: a 407 explanation naming NTLM,
    not an exception from the library."""
    shake = handshake(credentials=ProxyCredentials("CORP\\alice", "pw"))
    shake.start()
    step = shake.receive_data(b"HTTP/1.1 407 No\r\nProxy-Authenticate: NTLM\r\n"
                              b"Content-Length: 0\r\n\r\n")
    assert isinstance(step, Send) and b"Proxy-Authorization: NTLM TlRMTVNTUAAB" in step.data
    with pytest.raises(ProxyRefused) as refused:
        shake.receive_data(b"HTTP/1.1 407 No\r\nProxy-Authenticate: NTLM "
                           + base64.b64encode(b"not an ntlm message")
                           + b"\r\nContent-Length: 0\r\n\r\n")
    assert "cannot answer NTLM" in str(refused.value)


def test_an_ntlm_exchange_cut_by_the_proxy_is_explained() -> None:
    """The proxy closes after its NTLM challenge: the third leg cannot be sent elsewhere."""
    shake = handshake(credentials=ProxyCredentials("CORP\\alice", "pw"))
    shake.start()
    shake.receive_data(b"HTTP/1.1 407 No\r\nProxy-Authenticate: NTLM\r\n"
                       b"Content-Length: 0\r\n\r\n")
    # Cut before the token is read: its content does not matter.
    challenge = base64.b64encode(b"NTLMSSP\x00\x02\x00\x00\x00")
    with pytest.raises(ProxyRefused) as refused:
        shake.receive_data(b"HTTP/1.1 407 No\r\nProxy-Authenticate: NTLM " + challenge
                           + b"\r\nConnection: close\r\n\r\n")
    text = str(refused.value)
    assert "cannot answer NTLM" in text and "kept-alive" in text


def test_challenges_are_parsed_from_lists_and_quoted_parameters() -> None:
    """Several challenges per header, commas inside quotes, tokens, junk tokens dropped."""
    found = parse_challenges(['Basic realm="a, b", Negotiate', "NTLM TlRMTVNTUA==",
                              "Digest realm=x, nonce=\"y\"", "NTLM !!notbase64"])
    assert found == [Challenge("basic"), Challenge("negotiate"),
                     Challenge("ntlm", b"NTLMSSP"), Challenge("digest"), Challenge("ntlm")]
    assert len(parse_challenges(["Basic, " * 100])) == 16


def test_the_scheme_follows_what_this_computer_can_do() -> None:
    """Negotiate first where it can be Kerberos (Windows, gssapi); NTLM first elsewhere; Basic
    only with credentials."""
    both = ["negotiate", "ntlm", "basic"]
    assert choose_scheme(both, credentials=None, windows=True, kerberos=False) == "negotiate"
    assert choose_scheme(both, credentials=None, windows=False, kerberos=True) == "negotiate"
    assert choose_scheme(both, credentials=ALICE, windows=False, kerberos=False) == "ntlm"
    assert choose_scheme(["basic"], credentials=None, windows=True, kerberos=True) is None
    assert choose_scheme(["basic"], credentials=ALICE, windows=False, kerberos=False) == "basic"
    assert choose_scheme(["digest"], credentials=ALICE, windows=True, kerberos=True) is None


def test_407_explanations_on_windows_speak_of_the_logon() -> None:
    """On Windows, with no credentials in the URL, a rejection is of the account's logon and
    the fix names the service account; a failing SSPI says to run as a domain account."""
    common = {"shown_proxy": "http://proxy.corp:8080", "answer": "HTTP 407 Denied",
              "offered": ["negotiate", "ntlm"], "credentials": None, "windows": True}
    rejected = explain_407(tried="negotiate", **common)
    assert "it offers Negotiate, NTLM" in rejected
    assert "rejected Negotiate for the Windows logon the agent runs as" in rejected
    assert "run the service as a domain user that may use the proxy" in rejected
    assert len(rejected) < 300  # the link's last error keeps about that much
    failed = explain_407(tried="negotiate", problem="no logon session", **common)
    assert "cannot answer Negotiate (no logon session)" in failed
    assert "run the service as a domain user, or set proxy = " in failed
    elsewhere = explain_407(**{**common, "windows": False}, tried="ntlm")
    assert "NTLM_USER_FILE" in elsewhere
    kerberos_only = explain_407(**{**common, "windows": False, "offered": ["negotiate"]},
                                tried="negotiate", problem="no credentials found")
    assert "kinit" in kerberos_only and "pyspnego[kerberos]" in kerberos_only
