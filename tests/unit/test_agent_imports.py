"""``xon-relay-agent run`` leaves out what only other commands need (issue 7, agent footprint).

Each module below is imported where it is used, not at the top of a module on the run path;
an eager import creeping back would raise the idle agent's RSS without failing anything else.
A fresh interpreter imports what ``run`` imports at start and reports its ``sys.modules``.
"""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LAZY = {
    "relay_agent.doctor": "doctor's x509 and HTTP checks",
    "xml.etree.ElementTree": "XML ingress bodies: parsed by the relay only (shared.events)",
    "pyexpat": "ElementTree's parser",
    "logging.handlers": "the log file of the Windows service (cli.run_hosted)",
    "cryptography.hazmat.primitives.serialization": "PEM forms other than the agent's own "
    "(shared.crypto.private_key_from_pem)",
    "uvloop": "the agent's event loop is asyncio's unless XON_RELAY_EVENT_LOOP says uvloop",
    "cryptography": "the agent signs with PyNaCl (shared.crypto); cryptography is for "
    "enroll, doctor, other PEM forms and the relay",
}

OPTIONAL = {"uvloop"}
"""Not installed without the ``fast`` extra."""

RUN_PATH = ("relay_agent.cli", "relay_agent.app")
"""What the console script imports before ``run`` starts: the CLI, and through it the agent."""


KEY_PEM = b"\n".join(
    [
        b"-----BEGIN PRIVATE KEY-----",
        base64.b64encode(bytes.fromhex("302e020100300506032b657004220420") + bytes(range(32))),
        b"-----END PRIVATE KEY-----\n",
    ]
)
"""An agent.key as ``enroll`` writes it (PKCS#8), made without importing cryptography."""

RUN_START = (
    "from shared import aio, crypto; "
    f"crypto.sign_auth(crypto.signing_key_from_pem({KEY_PEM!r}), 'relay', 'agent', 'nonce'); "
    "assert aio.loop_factory({}, auto=aio.ASYNCIO) is None"
)
"""What ``run`` does that could import more: load the key and sign with it, pick the event
loop."""


def loaded_modules(*modules: str, then: str = "") -> set[str]:
    code = (
        f"import sys, {', '.join(modules)}; {then or 'pass'}; "
        f"print('\\n'.join(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(done.stdout.split())


def test_run_path_does_not_import_lazy_modules() -> None:
    """Importing the CLI and the agent, loading the key, signing and choosing the event loop
    load none of the modules other commands need."""
    loaded = loaded_modules(*RUN_PATH, then=RUN_START)
    # Not vacuous: the run path's own modules are there.
    assert {"relay_agent.link", "relay_agent.local_api", "shared.events"} <= loaded
    assert {name: why for name, why in LAZY.items() if name in loaded} == {}


def test_lazy_modules_are_importable() -> None:
    """The names above are real modules (a typo would make the check above pass for nothing)."""
    present = {
        name for name in LAZY if name not in OPTIONAL or importlib.util.find_spec(name) is not None
    }
    assert present <= loaded_modules(*present)
