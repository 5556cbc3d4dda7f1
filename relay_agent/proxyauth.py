"""Authenticating to an HTTP proxy: which scheme, which token, and why a 407 stays a 407.

A proxy answering ``407`` names the schemes it accepts in ``Proxy-Authenticate`` (RFC 9110
§11.7.1). The agent can answer three (docs/corporate-networks.md, Proxy authentication):

- **Negotiate** (Kerberos, RFC 4559) and **NTLM**: the tokens come from ``pyspnego``. On
  Windows it uses SSPI with the logon of the account the agent runs as (the user, or the
  service account), so no password is configured; elsewhere it needs the user and password
  from the proxy URL, ``NTLM_USER_FILE`` (pyspnego's NTLM credential file) or, for Kerberos,
  a ticket cache with the optional ``gssapi`` package installed.
- **Basic**: the user and password from the proxy URL, sent only when the proxy asks for it.

NTLM takes two round trips on one kept-alive connection (negotiate, challenge, authenticate);
Negotiate with Kerberos takes one. :class:`Authenticator` holds one exchange's state and the
CONNECT client (:mod:`.tunnel`) drives it. :func:`explain_407` turns a refusal into one line:
what the proxy offers, what the agent can do, and the setting that fixes it.
"""

from __future__ import annotations

import base64
import importlib.util
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import spnego

__all__ = [
    "Challenge",
    "ProxyCredentials",
    "Authenticator",
    "AuthUnavailable",
    "parse_challenges",
    "choose_scheme",
    "explain_407",
    "SCHEME_NAMES",
]

SCHEME_NAMES = {"negotiate": "Negotiate", "ntlm": "NTLM", "basic": "Basic"}
"""The schemes the agent can answer, by their lower-case token."""

_MAX_CHALLENGES = 16


@dataclass(frozen=True, slots=True)
class ProxyCredentials:
    """The user and password in the proxy URL (``DOMAIN\\USER`` or ``user@REALM`` for NTLM)."""

    user: str
    password: str

    @classmethod
    def from_url(cls, url: str) -> ProxyCredentials | None:
        parts = urlsplit(url)
        if parts.username is None:
            return None
        return cls(unquote(parts.username), unquote(parts.password or ""))


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge of a ``Proxy-Authenticate`` header."""

    scheme: str
    """Lower-case scheme token (``ntlm``, ``negotiate``, ``basic``, ...)."""
    token: bytes | None = None
    """A base64 token after the scheme (NTLM's and Negotiate's continuation); None: none."""

    @property
    def name(self) -> str:
        return SCHEME_NAMES.get(self.scheme, self.scheme.title())


def parse_challenges(values: list[str]) -> list[Challenge]:
    """The challenges in ``Proxy-Authenticate`` header values, in order (at most 16).

    A value may hold several challenges separated by commas; parameters (``realm="a, b"``)
    are skipped, quoted strings included. A token that is not valid base64 is dropped.
    """
    found: list[Challenge] = []
    for value in values:
        for item in _split_commas(value):
            head, _, rest = item.strip().partition(" ")
            if not head or "=" in head:
                continue  # a parameter of the challenge before it
            rest = rest.strip()
            token: bytes | None = None
            if rest and "=" not in rest.rstrip("="):
                try:
                    token = base64.b64decode(rest, validate=True)
                except ValueError:
                    token = None
            found.append(Challenge(head.lower(), token))
            if len(found) >= _MAX_CHALLENGES:
                return found
    return found


def _split_commas(value: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _kerberos_available() -> bool:
    # pyspnego does Kerberos outside Windows only through the optional gssapi package.
    return importlib.util.find_spec("gssapi") is not None


def choose_scheme(offered: list[str], *, credentials: ProxyCredentials | None,
                  windows: bool | None = None, kerberos: bool | None = None) -> str | None:
    """The scheme to answer among ``offered`` (lower-case), or None when none fits.

    Negotiate comes first where it can be Kerberos (Windows SSPI, or gssapi installed);
    elsewhere NTLM first, since pyspnego's Negotiate would only wrap the same NTLM.
    Basic only with credentials: the agent never sends a password in clear text unasked.
    """
    windows = sys.platform == "win32" if windows is None else windows
    kerberos = _kerberos_available() if kerberos is None else kerberos
    order = ["negotiate", "ntlm"] if windows or kerberos else ["ntlm", "negotiate"]
    if credentials is not None:
        order.append("basic")
    return next((scheme for scheme in order if scheme in offered), None)


class AuthUnavailable(Exception):
    """pyspnego could not start or continue the exchange (no credentials, a bad token)."""


class Authenticator:
    """One authentication exchange with the proxy, in the chosen scheme.

    Args:
        scheme: ``negotiate``, ``ntlm`` or ``basic``.
        proxy_host: the proxy's host name (the Kerberos service name is ``HTTP/proxy_host``).
        credentials: from the proxy URL; None: the logon (SSPI), ``NTLM_USER_FILE`` or a
            Kerberos ticket cache.
    """

    def __init__(self, scheme: str, *, proxy_host: str,
                 credentials: ProxyCredentials | None) -> None:
        self.scheme = scheme
        self.credentials = credentials
        self._context: spnego.ContextProxy | None = None
        if scheme in ("negotiate", "ntlm"):
            # Imported here: pyspnego brings cryptography, which the running agent otherwise
            # does without (its footprint) unless a proxy asks for NTLM or Negotiate.
            import spnego

            try:
                self._context = spnego.client(
                    credentials.user if credentials else None,
                    credentials.password if credentials else None,
                    hostname=proxy_host, service="HTTP", protocol=scheme)
            except Exception as exc:  # pyspnego raises several unrelated types here
                raise AuthUnavailable(_spnego_reason(exc, credentials)) from exc

    @property
    def name(self) -> str:
        return SCHEME_NAMES[self.scheme]

    def header(self, challenge: Challenge | None) -> str:
        """The ``Proxy-Authorization`` value answering ``challenge`` (None: the first leg).

        Raises:
            AuthUnavailable: no credentials, or the proxy's token is unusable.
        """
        if self.scheme == "basic":
            assert self.credentials is not None
            pair = f"{self.credentials.user}:{self.credentials.password}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        assert self._context is not None
        try:
            token = self._context.step(challenge.token if challenge else None)
        except Exception as exc:  # SpnegoError, FeatureMissingError, ValueError, ...
            raise AuthUnavailable(_spnego_reason(exc, self.credentials)) from exc
        if not token:
            raise AuthUnavailable(f"{self.name} produced no token to send")
        return f"{self.name} {base64.b64encode(token).decode('ascii')}"


def _spnego_reason(exc: BaseException, credentials: ProxyCredentials | None) -> str:
    import spnego.exceptions

    if credentials is None and isinstance(exc, spnego.exceptions.SpnegoError):
        # Typically "No username or password was specified and the credential cache did
        # not exist": said shortly, the explanation names what to set.
        return "no credentials found"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:100]


# -- explanations --------------------------------------------------------------------------------


def _names(schemes: list[str]) -> str:
    shown = [SCHEME_NAMES.get(s, s.title()) for s in dict.fromkeys(schemes)]
    return ", ".join(shown) if shown else "no scheme"


def explain_407(*, shown_proxy: str, answer: str, offered: list[str], tried: str | None,
                credentials: ProxyCredentials | None, problem: str | None = None,
                windows: bool | None = None) -> str:
    """Why the proxy keeps answering 407, and what to set (docs/corporate-networks.md).

    Args:
        shown_proxy: the proxy URL without its password.
        answer: ``HTTP 407 <reason>``.
        offered: the schemes of ``Proxy-Authenticate`` (lower-case).
        tried: the scheme the agent answered with; None: it could answer none.
        credentials: the proxy URL's user and password, if any.
        problem: why pyspnego could not produce a token, if that is what stopped it.
    """
    windows = sys.platform == "win32" if windows is None else windows
    offers = (f"it offers {_names(offered)}" if offered else
              "it names no scheme (no Proxy-Authenticate header)")
    head = f"the proxy {shown_proxy} requires authentication ({answer}; {offers})"
    url_form = ('proxy = "http://DOMAIN%5CUSER:PASSWORD@HOST:PORT"' if
                {"ntlm", "negotiate"} & set(offered) else
                'proxy = "http://USER:PASSWORD@HOST:PORT"')
    if tried is None:
        if offered and not {"ntlm", "negotiate", "basic"} & set(offered):
            return (f"{head}, the agent can do Negotiate, NTLM and Basic: ask the network "
                    "administrator to allow one of them for this computer, or use another proxy")
        return f"{head}: put the user and password in the proxy setting: {url_form}"
    name = SCHEME_NAMES[tried]
    if problem is not None:
        if windows:
            fix = f"run the service as a domain user, or set {url_form}"
        elif tried == "negotiate" and "ntlm" not in offered:
            fix = (f"put the user and password in the proxy setting ({url_form}), or get a "
                   "Kerberos ticket (kinit) with pyspnego[kerberos] installed")
        else:
            fix = f"put the user and password in the proxy setting: {url_form}"
        return f"{head}: the agent cannot answer {name} ({problem}): {fix}"
    if credentials is not None:
        return (f"{head}: it rejected {name} for the user {credentials.user!r}: the user or "
                "password in the proxy setting is wrong, or that user may not use the proxy")
    if not windows:
        return (f"{head}: it rejected {name} with the credentials from NTLM_USER_FILE or the "
                f"Kerberos ticket cache: fix those, or put the user and password in the proxy "
                f"setting: {url_form}")
    # Kept short: the link's last error (status page) holds about 300 characters.
    return (f"{head}: it rejected {name} for the Windows logon the agent runs as: run the "
            f"service as a domain user that may use the proxy, or set {url_form}")
