"""shared/crypto.py (agent auth signatures, secrets) and shared/files.py (secret files)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared import crypto
from shared.files import NotOurs, ensure_private_dir, restrict_mode, write_private_file

RELAY, AGENT, NONCE = "relay-1", "agent-1", "nonce-1"


@pytest.fixture
def key() -> crypto.Ed25519PrivateKey:
    return crypto.generate_private_key()


def test_signature_verifies(key: crypto.Ed25519PrivateKey) -> None:
    """A signature over (relay id, agent id, nonce) verifies with the agent's public key."""
    sig = crypto.sign_auth(key, RELAY, AGENT, NONCE)
    assert crypto.verify_auth(crypto.public_key_b64(key), sig, RELAY, AGENT, NONCE)


@pytest.mark.parametrize(
    ("relay", "agent", "nonce"),
    [("relay-2", AGENT, NONCE), (RELAY, "agent-2", NONCE), (RELAY, AGENT, "nonce-2")],
)
def test_signature_is_bound_to_relay_agent_and_nonce(
    key: crypto.Ed25519PrivateKey, relay: str, agent: str, nonce: str
) -> None:
    """Changing the relay id, the agent id or the nonce makes the signature fail."""
    sig = crypto.sign_auth(key, RELAY, AGENT, NONCE)
    assert not crypto.verify_auth(crypto.public_key_b64(key), sig, relay, agent, nonce)


def test_parts_cannot_be_shifted_across_separators(key: crypto.Ed25519PrivateKey) -> None:
    """("ab", "c") and ("a", "bc") sign different messages."""
    sig = crypto.sign_auth(key, "ab", "c", NONCE)
    assert not crypto.verify_auth(crypto.public_key_b64(key), sig, "a", "bc", NONCE)


def test_another_key_does_not_verify(key: crypto.Ed25519PrivateKey) -> None:
    """A signature by one key does not verify under another agent's public key."""
    other = crypto.generate_private_key()
    sig = crypto.sign_auth(key, RELAY, AGENT, NONCE)
    assert not crypto.verify_auth(crypto.public_key_b64(other), sig, RELAY, AGENT, NONCE)


@pytest.mark.parametrize("public_key", ["", "!!!", "abc", "A" * 43 + "é", "AAAA" * 20])
def test_garbage_public_key_is_false(key: crypto.Ed25519PrivateKey, public_key: str) -> None:
    """A malformed public key gives False, never an exception."""
    sig = crypto.sign_auth(key, RELAY, AGENT, NONCE)
    assert not crypto.verify_auth(public_key, sig, RELAY, AGENT, NONCE)
    assert not crypto.valid_public_key(public_key)


@pytest.mark.parametrize("signature", ["", "!!!", "abc", "é", "A" * 86, "A" * 200])
def test_garbage_signature_is_false(key: crypto.Ed25519PrivateKey, signature: str) -> None:
    """A malformed or wrong signature gives False, never an exception."""
    assert not crypto.verify_auth(crypto.public_key_b64(key), signature, RELAY, AGENT, NONCE)


def test_nul_in_a_part_is_false_not_an_error(key: crypto.Ed25519PrivateKey) -> None:
    """A nonce or id containing NUL cannot be signed, and verifying it answers False."""
    with pytest.raises(ValueError):
        crypto.auth_message(RELAY, AGENT, "a\x00b")
    sig = crypto.sign_auth(key, RELAY, AGENT, NONCE)
    assert not crypto.verify_auth(crypto.public_key_b64(key), sig, RELAY, "x\x00", NONCE)


def test_public_key_is_valid(key: crypto.Ed25519PrivateKey) -> None:
    """public_key_b64 is 32 raw bytes in unpadded base64url."""
    pub = crypto.public_key_b64(key)
    assert crypto.valid_public_key(pub)
    assert len(pub) == 43
    assert "=" not in pub


def test_private_key_pem_round_trip(key: crypto.Ed25519PrivateKey) -> None:
    """A key written as PEM loads back as the same key."""
    loaded = crypto.private_key_from_pem(crypto.private_key_to_pem(key))
    assert crypto.public_key_b64(loaded) == crypto.public_key_b64(key)


def test_private_key_pem_is_what_cryptography_writes(key: crypto.Ed25519PrivateKey) -> None:
    """The PEM written without cryptography's serialization package is byte for byte the
    unencrypted PKCS#8 it writes (agent.key files keep their format)."""
    assert crypto.private_key_to_pem(key) == key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_private_key_from_pem_reads_other_ed25519_forms(key: crypto.Ed25519PrivateKey) -> None:
    """CRLF line ends and text before the block load the same key: what the quick path does
    not read goes to cryptography's full loader."""
    pem = crypto.private_key_to_pem(key)
    for variant in (pem.replace(b"\n", b"\r\n"), b"agent key\n" + pem):
        loaded = crypto.private_key_from_pem(variant)
        assert loaded.private_bytes_raw() == key.private_bytes_raw()


def test_signing_key_signs_as_cryptography_does(key: crypto.Ed25519PrivateKey) -> None:
    """The agent's key (PyNaCl) makes the same deterministic Ed25519 signatures as
    cryptography's key, and the relay's check accepts them."""
    signer = crypto.signing_key_from_pem(crypto.private_key_to_pem(key))
    assert not isinstance(signer, crypto.Ed25519PrivateKey)  # not vacuous: PyNaCl's key
    for size in (0, 1, 64, 1000):
        message = os.urandom(size)
        assert signer.sign(message) == key.sign(message)
    sig = crypto.sign_auth(signer, RELAY, AGENT, NONCE)
    assert crypto.verify_auth(crypto.public_key_b64(key), sig, RELAY, AGENT, NONCE)


def test_signing_key_reads_other_pem_forms_with_cryptography(
    key: crypto.Ed25519PrivateKey,
) -> None:
    """A PEM the quick reader does not take still gives a key that signs the same; garbage
    raises ValueError."""
    other_form = b"agent key\n" + crypto.private_key_to_pem(key)
    signer = crypto.signing_key_from_pem(other_form)
    assert isinstance(signer, crypto.Ed25519PrivateKey)
    assert signer.sign(b"x") == key.sign(b"x")
    with pytest.raises(ValueError):
        crypto.signing_key_from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n")


def test_private_key_from_pem_refuses_other_keys() -> None:
    """A PEM file holding an EC key, or garbage, raises ValueError."""
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError):
        crypto.private_key_from_pem(ec_pem)
    with pytest.raises(ValueError):
        crypto.private_key_from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n")
    # The PKCS#8 prefix of an Ed25519 key with one seed byte missing.
    short = crypto.private_key_to_pem(crypto.generate_private_key()).splitlines()
    der = base64.b64decode(short[1])[:-1]
    with pytest.raises(ValueError):
        crypto.private_key_from_pem(b"\n".join([short[0], base64.b64encode(der), short[2]]))


def test_constant_time_equal() -> None:
    """Equal secrets compare equal, as str or bytes; different ones do not."""
    assert crypto.constant_time_equal("s3cret", "s3cret")
    assert crypto.constant_time_equal("s3cret", b"s3cret")
    assert crypto.constant_time_equal("café", "café")
    assert not crypto.constant_time_equal("s3cret", "s3creT")
    assert not crypto.constant_time_equal("s3cret", "s3cret!")
    assert not crypto.constant_time_equal(b"", b"x")


def test_tokens_and_nonces_are_fresh_and_long() -> None:
    """new_token/new_nonce carry at least 128 bits and do not repeat."""
    tokens = {crypto.new_token() for _ in range(50)} | {crypto.new_nonce() for _ in range(50)}
    assert len(tokens) == 100
    assert all(len(t) >= 22 for t in tokens)


def test_hash_secret() -> None:
    """hash_secret is SHA-256 hex: stable, 64 characters, not the secret."""
    h = crypto.hash_secret("key")
    assert h == crypto.hash_secret("key")
    assert len(h) == 64
    assert h != crypto.hash_secret("key2")


# -- shared/files.py ---------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_file_is_0600(tmp_path: Path) -> None:
    """A secret file is written owner-only, with its content, and no temp file left."""
    path = tmp_path / "local-token"
    write_private_file(path, "t0ken")
    assert path.read_text() == "t0ken"
    assert _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["local-token"]


def test_private_file_rewrite_tightens_mode(tmp_path: Path) -> None:
    """Rewriting a world-readable file leaves it 0600 with the new bytes."""
    path = tmp_path / "agent.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private_file(path, b"\x00new")
    assert path.read_bytes() == b"\x00new"
    assert _mode(path) == 0o600


def test_private_file_ignores_a_stale_temp_file(tmp_path: Path) -> None:
    """A leftover world-readable temp file from a crash does not make the secret readable."""
    stale = tmp_path / ".secret.tmp"
    stale.write_bytes(b"junk")
    stale.chmod(0o666)
    write_private_file(tmp_path / "secret", b"s")
    assert _mode(tmp_path / "secret") == 0o600


def test_private_dir_is_0700(tmp_path: Path) -> None:
    """A new data directory (with parents) is owner-only."""
    path = ensure_private_dir(tmp_path / "a" / "data")
    assert path.is_dir()
    assert _mode(path) & 0o077 == 0


# -- the enrollment probe (docs/protocol.md, Enrollment probe) -----------------------------------

TS = 1_700_000_000_123


def test_probe_signature_verifies() -> None:
    """A probe signed by the agent's key verifies for the same relay, agent and time."""
    key = crypto.generate_private_key()
    sig = crypto.sign_probe(key, RELAY, AGENT, TS)
    assert crypto.verify_probe(crypto.public_key_b64(key), sig, RELAY, AGENT, TS)
    for relay, agent, ts in (("other", AGENT, TS), (RELAY, "other", TS), (RELAY, AGENT, TS + 1)):
        assert not crypto.verify_probe(crypto.public_key_b64(key), sig, relay, agent, ts)


def test_probe_and_link_auth_signatures_never_pass_for_each_other() -> None:
    """Distinct domains: a probe signature is no link auth, and a link auth is no probe, even
    for a nonce that spells the probe's remaining parts."""
    key = crypto.generate_private_key()
    public = crypto.public_key_b64(key)
    probe = crypto.sign_probe(key, RELAY, AGENT, TS)
    assert not crypto.verify_auth(public, probe, RELAY, AGENT, "probe")
    assert not crypto.verify_auth(public, probe, RELAY, AGENT, f"probe\x00{TS}")
    auth = crypto.sign_auth(key, RELAY, AGENT, "probe")
    assert not crypto.verify_probe(public, auth, RELAY, AGENT, TS)
    assert crypto.probe_message(RELAY, AGENT, TS) != crypto.auth_message(RELAY, AGENT, "probe")


def test_probe_verify_never_raises_on_garbage() -> None:
    """Bad keys, bad signatures and NUL in a part answer False."""
    key = crypto.generate_private_key()
    public = crypto.public_key_b64(key)
    sig = crypto.sign_probe(key, RELAY, AGENT, TS)
    assert not crypto.verify_probe("!!", sig, RELAY, AGENT, TS)
    assert not crypto.verify_probe(public, "é", RELAY, AGENT, TS)
    assert not crypto.verify_probe(public, sig, RELAY, "a\x00b", TS)


def test_a_failed_private_write_leaves_no_temp_file(tmp_path: Path) -> None:
    """When the write cannot complete (here the target is a directory), the old state stays
    and no half-written copy of the secret is left beside it."""
    (tmp_path / "secret").mkdir()
    with pytest.raises(OSError):
        write_private_file(tmp_path / "secret", b"s")
    assert sorted(os.listdir(tmp_path)) == ["secret"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_restrict_mode_tightens_what_is_ours(tmp_path: Path) -> None:
    """A path of ours looser than asked is chmod'ed (its old mode returned); a private or
    missing one is left alone (None)."""
    loose = tmp_path / "data"
    loose.mkdir()
    loose.chmod(0o755)
    assert restrict_mode(loose, 0o700) == 0o755
    assert _mode(loose) == 0o700
    assert restrict_mode(loose, 0o700) is None
    assert restrict_mode(tmp_path / "missing", 0o600) is None
    narrow = tmp_path / "relay.db"
    narrow.write_bytes(b"")
    narrow.chmod(0o400)
    assert restrict_mode(narrow, 0o600) is None
    assert _mode(narrow) == 0o400


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root to chown")
def test_restrict_mode_refuses_what_is_not_ours(tmp_path: Path) -> None:
    """A loose path owned by another user is not changed: NotOurs says whose and what to do."""
    theirs = tmp_path / "data"
    theirs.mkdir()
    theirs.chmod(0o750)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(NotOurs, match="mode 0750.*uid 65534.*make it 0700"):
        restrict_mode(theirs, 0o700)
    assert _mode(theirs) == 0o750
