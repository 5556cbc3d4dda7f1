"""Ed25519 challenge/response, secret tokens and constant-time comparison.

Agent authentication (DESIGN §Link protocol, Auth): at enrollment the agent makes an Ed25519 key
pair and registers the public key. On every connection the relay sends a fresh nonce with its
own identity; the agent signs :func:`auth_message` over (relay id, agent id, nonce). Binding the
relay id stops a signature made for one relay being replayed to another; the fresh nonce stops a
captured handshake being replayed to the same relay. No reusable secret crosses the wire.

The running agent only signs, so it does not load ``cryptography`` (~6.5 MB of RSS, most of its
idle footprint after aiohttp; issue 7, bench 5): :func:`signing_key_from_pem` signs with PyNaCl
(libsodium, ~1.2 MB). Ed25519 signatures are deterministic, so they are the same bytes either
way. Everything else here (enrollment, the relay's checks, other PEM forms) uses
``cryptography``, imported when first needed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import string
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "Ed25519PrivateKey",
    "SigningKey",
    "generate_private_key",
    "private_key_to_pem",
    "private_key_from_pem",
    "signing_key_from_pem",
    "public_key_b64",
    "auth_message",
    "sign_auth",
    "verify_auth",
    "probe_message",
    "sign_probe",
    "verify_probe",
    "valid_public_key",
    "constant_time_equal",
    "new_token",
    "new_nonce",
    "hash_secret",
]

_AUTH_DOMAIN = b"xon-relay.v1 agent-auth"
_PROBE_DOMAIN = b"xon-relay.v1 agent-probe"
"""docs/protocol.md, Enrollment probe: a domain of its own, so that a probe signature never
passes as a link ``auth`` nor the other way round (the first NUL-separated part differs)."""

_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")
"""DER of an Ed25519 PKCS#8 (v1) private key up to its 32-byte seed, which ends it (RFC 8410)."""

_PEM_BEGIN, _PEM_END = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


class SigningKey(Protocol):
    """What the agent needs of its key: a cryptography ``Ed25519PrivateKey`` is one."""

    def sign(self, data: bytes) -> bytes: ...


def __getattr__(name: str) -> Any:
    # ``crypto.Ed25519PrivateKey`` without importing cryptography with this module.
    if name == "Ed25519PrivateKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def generate_private_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: the form :func:`private_key_from_pem` reads without
    cryptography's serialization package."""
    der = _PKCS8_ED25519 + key.private_bytes_raw()
    # 48 bytes of DER are 64 base64 characters: the one line a PEM body may hold.
    return b"%s\n%s\n%s\n" % (_PEM_BEGIN, base64.b64encode(der), _PEM_END)


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """Load a PEM private key.

    The PKCS#8 form the agent writes is read here; any other PEM goes to cryptography's full
    loader, imported only then: with the key types and ciphers it brings, it would add
    ~1.5 MB to the running agent (issue 7, agent footprint).

    Raises:
        ValueError: not an Ed25519 private key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = _pkcs8_seed(data)
    if seed is not None:
        return Ed25519PrivateKey.from_private_bytes(seed)
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def signing_key_from_pem(data: bytes) -> SigningKey:
    """The key the running agent signs with: PyNaCl's for the agent's own key file (module
    docstring), :func:`private_key_from_pem` for other PEM forms.

    Raises:
        ValueError: not an Ed25519 private key.
    """
    seed = _pkcs8_seed(data)
    if seed is None:
        return private_key_from_pem(data)
    return _NaclKey(seed)


class _NaclKey:
    """An Ed25519 key held by PyNaCl, signing as cryptography's key does (detached)."""

    __slots__ = ("_key",)

    def __init__(self, seed: bytes) -> None:
        from nacl.signing import SigningKey as NaclSigningKey

        self._key = NaclSigningKey(seed)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data).signature


def _pkcs8_seed(data: bytes) -> bytes | None:
    """The seed of an unencrypted Ed25519 PKCS#8 v1 PEM; None for anything else."""
    lines = data.strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != _PEM_BEGIN or lines[-1].strip() != _PEM_END:
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except binascii.Error:
        return None
    if len(der) != len(_PKCS8_ED25519) + 32 or not der.startswith(_PKCS8_ED25519):
        return None
    return der[len(_PKCS8_ED25519) :]


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key, base64url without padding."""
    return _b64e(key.public_key().public_bytes_raw())


def auth_message(relay_id: str, agent_id: str, nonce: str) -> bytes:
    """The bytes an agent signs. NUL separators: none of the parts may contain NUL."""
    parts = (relay_id, agent_id, nonce)
    if any("\x00" in p for p in parts):
        raise ValueError("auth message parts must not contain NUL")
    return b"\x00".join([_AUTH_DOMAIN, *(p.encode() for p in parts)])


def sign_auth(key: SigningKey, relay_id: str, agent_id: str, nonce: str) -> str:
    return _b64e(key.sign(auth_message(relay_id, agent_id, nonce)))


def verify_auth(public_key: str, signature: str, relay_id: str, agent_id: str, nonce: str) -> bool:
    """True only for a valid signature by ``public_key``; never raises on bad input."""
    try:
        message = auth_message(relay_id, agent_id, nonce)
    except ValueError:
        return False
    return _verify(public_key, signature, message)


def probe_message(relay_id: str, agent_id: str, timestamp: int) -> bytes:
    """The bytes an agent signs to prove its enrollment outside the link (``POST
    /v1/agent/probe``): the relay id, the agent id, ``probe`` and the time in milliseconds."""
    parts = (relay_id, agent_id, "probe", str(timestamp))
    if any("\x00" in p for p in parts):
        raise ValueError("probe message parts must not contain NUL")
    return b"\x00".join([_PROBE_DOMAIN, *(p.encode() for p in parts)])


def sign_probe(key: SigningKey, relay_id: str, agent_id: str, timestamp: int) -> str:
    return _b64e(key.sign(probe_message(relay_id, agent_id, timestamp)))


def verify_probe(
    public_key: str, signature: str, relay_id: str, agent_id: str, timestamp: int
) -> bool:
    """True only for a valid probe signature by ``public_key``; never raises on bad input."""
    try:
        message = probe_message(relay_id, agent_id, timestamp)
    except ValueError:
        return False
    return _verify(public_key, signature, message)


def _verify(public_key: str, signature: str, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(_b64d(public_key)).verify(_b64d(signature), message)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def valid_public_key(public_key: str) -> bool:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(_b64d(public_key))
    except (ValueError, binascii.Error):
        return False
    return True


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare secrets without leaking where they differ through timing."""
    a_b = a.encode() if isinstance(a, str) else a
    b_b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_b, b_b)


def new_token(nbytes: int = 32) -> str:
    """A URL-safe random secret (default 256 bits of randomness).

    It starts with a letter so that it never reads as an option on a command line
    (``--code -abc`` would be parsed as a flag).
    """
    return secrets.choice(string.ascii_letters) + secrets.token_urlsafe(nbytes)


def new_nonce() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a high-entropy secret, for storing and indexing it without keeping it."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
