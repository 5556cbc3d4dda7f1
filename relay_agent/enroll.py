"""Enrollment: register this PC's public key with the relay and write the agent's data dir.

The one-time code proves the operator's intent; the key pair is made here and the private key
never leaves the data dir (DESIGN §Link protocol, Auth). Files holding secrets are 0600 and the
directory 0700 (README, Local API security: the token is readable by its user only); on Windows,
where modes do nothing, explicit access lists do the same (:mod:`.acl`).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from shared import crypto
from shared.errors import ApiError, ConfigError, UpstreamError
from shared.files import ensure_private_dir, write_private_file

from . import acl, refusal
from .acl import AclApi
from .net import TunnelConnector, explain, is_loopback_host
from .winacl import system_api

__all__ = [
    "Enrollment",
    "check_relay_url",
    "is_loopback_host",
    "is_enrolled",
    "register",
    "write_enrollment",
    "KEY_FILE",
    "TOKEN_FILE",
    "CONFIG_FILE",
    "STATE_FILE",
    "LOCK_FILE",
    "INBOX_FILE",
]

log = logging.getLogger(__name__)

KEY_FILE = "agent.key"
TOKEN_FILE = "local-token"
CONFIG_FILE = "config.toml"
STATE_FILE = "agent.json"
LOCK_FILE = "agent.lock"
"""Held by the running agent for its whole life: one agent per data dir."""
"""Written by ``run`` once listening: the local API URL and the pid (for ``status``)."""
INBOX_FILE = "inbox.db"


@dataclass(frozen=True, slots=True)
class Enrollment:
    agent_id: str
    account_id: str
    relay_id: str


def check_relay_url(url: str, *, insecure: bool) -> bool:
    """Refuse a relay URL the agent must not use; return True when it is plain http.

    DESIGN §Command line: https for any relay host; http only for a loopback relay or with
    ``--insecure``.

    Raises:
        ConfigError: not an http(s) URL with a host, or http to a non-loopback host without
            ``insecure``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"relay URL must be https://HOST[:PORT], got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"relay URL must not have a query or fragment, got {url!r}")
    plain = parts.scheme == "http"
    if plain and not insecure and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"refusing plain http:// to {parts.hostname}: use https://, or --insecure to "
            "accept an unencrypted link"
        )
    return plain


def is_enrolled(data_dir: Path) -> bool:
    return (data_dir / KEY_FILE).exists() or (data_dir / CONFIG_FILE).exists()


async def register(
    relay_url: str,
    *,
    code: str,
    public_key: str,
    name: str = "",
    timeout: float = 30.0,
    proxy: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Enrollment:
    """POST the code and public key to ``<relay>/v1/enroll``.

    Args:
        proxy: the HTTP CONNECT proxy to go through (:func:`relay_agent.net.resolve_proxy`);
            None: directly (the environment is not read here).
        ssl_context: for an https relay (:func:`relay_agent.net.ssl_context`); None: the
            default context.

    Raises:
        ApiError: the relay refused (e.g. 400 ``invalid_code``), with its code and message.
        UpstreamError: the relay, or the proxy, is unreachable or answered something unusable;
            the message names a proxy or TLS cause (:func:`relay_agent.net.explain`).
    """
    body: dict[str, Any] = {"code": code, "public_key": public_key}
    if name:
        body["name"] = name
    url = relay_url.rstrip("/") + "/v1/enroll"
    # Through a proxy, the connector opens the CONNECT tunnel (NTLM, Negotiate or Basic).
    connector = (None if proxy is None else
                 TunnelConnector(proxy, context=ssl_context, timeout=timeout))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                         connector=connector) as http:
            async with http.post(url, json=body, ssl=ssl_context or True) as response:
                status = response.status
                try:
                    data = await response.json(content_type=None)
                except ValueError:
                    data = None
    except (aiohttp.ClientError, OSError) as exc:  # OSError: the tunnel, TLS, timeouts
        detail = explain(exc, proxy=proxy, relay_url=relay_url)
        raise UpstreamError(f"cannot reach the relay at {relay_url}: {detail}") from exc
    if status >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            raise ApiError(status, str(error.get("code", "error")), str(error.get("message", "")))
        raise ApiError(status, "enroll_failed", f"the relay answered HTTP {status}")
    if not isinstance(data, dict):
        raise UpstreamError("the relay's enrollment answer is not a JSON object")
    try:
        return Enrollment(
            agent_id=_text(data, "agent_id"),
            account_id=_text(data, "account_id"),
            relay_id=_text(data, "relay_id"),
        )
    except (KeyError, TypeError) as exc:
        raise UpstreamError(f"the relay's enrollment answer is malformed ({exc})") from exc


def _text(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key} must be a non-empty string")
    return value


def _toml_str(value: str) -> str:
    # A JSON string is a valid TOML basic string for everything json.dumps emits.
    return json.dumps(value, ensure_ascii=False)


def write_enrollment(
    data_dir: Path,
    *,
    key: crypto.Ed25519PrivateKey,
    enrollment: Enrollment,
    relay_url: str,
    listen: str,
    insecure: bool,
    token_readers: Sequence[str] = (),
    acl_api: AclApi | None = None,
) -> None:
    """Write agent.key, local-token (kept if present) and config.toml into ``data_dir``.

    On Windows the data dir and both secrets get explicit access lists (:mod:`.acl`), the
    dir's first, so every file is private from the moment it exists.

    Args:
        token_readers: SIDs that may also read local-token (Windows: the local apps'
            account); the ones a kept token already granted stay.
        acl_api: the ACL calls; None: the system's (:func:`relay_agent.winacl.system_api`).

    Raises:
        OSError: a file or an access list cannot be written.
    """
    api = acl_api or system_api()
    ensure_private_dir(data_dir)
    data_dir.chmod(0o700)
    if api is not None:
        acl.protect_data_dir(data_dir, api)
    write_private_file(data_dir / KEY_FILE, crypto.private_key_to_pem(key))
    if api is not None:
        acl.protect_secret(data_dir / KEY_FILE, api)
    token = data_dir / TOKEN_FILE
    if not token.exists():
        write_private_file(token, crypto.new_token() + "\n")
    elif api is not None:
        token_readers = [*acl.kept_readers(token, api), *token_readers]
    if api is not None:
        acl.protect_secret(token, api, readers=token_readers)
    refusal.clear(data_dir)
    lines = [
        f"relay_url = {_toml_str(relay_url.rstrip('/'))}",
        f"agent_id = {_toml_str(enrollment.agent_id)}",
        f"relay_id = {_toml_str(enrollment.relay_id)}",
        f"data_dir = {_toml_str(str(data_dir.resolve()))}",
        f"listen = {_toml_str(listen)}",
    ]
    if insecure:
        lines.append("insecure = true")
    write_private_file(data_dir / CONFIG_FILE, "\n".join(lines) + "\n")
    log.info("agent.enrolled", extra={"agent_id": enrollment.agent_id})
