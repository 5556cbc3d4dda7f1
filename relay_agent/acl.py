"""Who may read the agent's secrets on Windows: ACLs built and judged as SDDL text.

On Windows the 0600/0700 modes of shared/files.py do nothing, and a data dir made under
``%PROGRAMDATA%`` inherits read access for every local user. So the agent gives the data dir
and its secrets explicit, protected (not inherited) access lists (docs/deployment.md, Secrets
on Windows):

- the data dir: full control for its owner (the account that enrolled), SYSTEM and
  Administrators, modify for the service account (LocalService), inherited by every file made
  inside, so a file is private from the moment it exists (the temporary file of an atomic
  write included);
- ``agent.key`` and ``local-token``: full control for the owner, SYSTEM and Administrators,
  read for the service account; ``local-token`` also read for the accounts named with
  ``enroll --token-reader`` (the local apps' account), kept when the token is rotated.

This module is plain text processing, tested on any OS. The operations take an
:class:`AclApi` that reads and writes a path's descriptor as SDDL and turns names into SIDs:
:mod:`.winacl` on Windows, a fake in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "AclApi",
    "Ace",
    "Descriptor",
    "Verdict",
    "SYSTEM",
    "ADMINISTRATORS",
    "LOCAL_SERVICE",
    "data_dir_sddl",
    "secret_sddl",
    "parse",
    "readers",
    "judge",
    "protect_data_dir",
    "protect_secret",
    "kept_readers",
    "check_secret",
]

SYSTEM = "S-1-5-18"
ADMINISTRATORS = "S-1-5-32-544"
LOCAL_SERVICE = "S-1-5-19"
"""The Windows service's account (relay_agent/winservice.py)."""

FILE_ALL_ACCESS = 0x1F01FF
FILE_MODIFY = 0x1301BF
FILE_GENERIC_READ = 0x120089

_ALIASES = {
    "SY": SYSTEM, "BA": ADMINISTRATORS, "LS": LOCAL_SERVICE, "NS": "S-1-5-20",
    "WD": "S-1-1-0", "AU": "S-1-5-11", "BU": "S-1-5-32-545", "BG": "S-1-5-32-546",
    "IU": "S-1-5-4", "AN": "S-1-5-7", "NU": "S-1-5-2", "PU": "S-1-5-32-547",
    "RD": "S-1-5-32-555", "CO": "S-1-3-0", "OW": "S-1-3-4", "AC": "S-1-15-2-1",
    "BO": "S-1-5-32-551", "SO": "S-1-5-32-549", "PS": "S-1-5-10", "RC": "S-1-5-12",
    # Domain-relative aliases: the machine's domain is not known here, the RID is enough.
    "DU": "domain-513", "DG": "domain-514", "DC": "domain-515", "DA": "domain-512",
}
_NAMES = {SYSTEM: "SYSTEM", ADMINISTRATORS: "Administrators", LOCAL_SERVICE: "LOCAL SERVICE",
          "S-1-1-0": "Everyone", "S-1-5-11": "Authenticated Users", "S-1-5-32-545": "Users",
          "S-1-5-32-546": "Guests", "S-1-5-4": "INTERACTIVE", "S-1-5-7": "ANONYMOUS LOGON",
          "S-1-5-2": "NETWORK", "S-1-5-32-547": "Power Users",
          "S-1-5-32-555": "Remote Desktop Users", "S-1-15-2-1": "ALL APPLICATION PACKAGES",
          "domain-513": "Domain Users", "domain-514": "Domain Guests",
          "domain-515": "Domain Computers"}
_BROAD = frozenset({"S-1-1-0", "S-1-5-11", "S-1-5-32-545", "S-1-5-32-546", "S-1-5-4", "S-1-5-7",
                    "S-1-5-2", "S-1-5-32-547", "S-1-5-32-555", "S-1-15-2-1", "domain-513",
                    "domain-514", "domain-515"})
"""Groups that stand for "every local user" (or more): none of them may read a secret."""
_DOMAIN_RID = re.compile(r"^S-1-5-21-\d+-\d+-\d+-(51[345])$")

_RIGHTS = {
    "GA": 0x10000000, "GX": 0x20000000, "GW": 0x40000000, "GR": 0x80000000,
    "FA": FILE_ALL_ACCESS, "FR": FILE_GENERIC_READ, "FW": 0x120116, "FX": 0x1200A0,
    "SD": 0x10000, "RC": 0x20000, "WD": 0x40000, "WO": 0x80000,
    "CC": 0x1, "DC": 0x2, "LC": 0x4, "SW": 0x8, "RP": 0x10, "WP": 0x20, "DT": 0x40,
    "LO": 0x80, "CR": 0x100, "KA": 0xF003F, "KR": 0x20019, "KW": 0x20006, "KX": 0x20019,
}
_EXPOSING = 0x1 | 0x80000000 | 0x10000000 | 0x40000 | 0x80000
"""Rights that let an account read a file's data, or grant itself that (FILE_READ_DATA,
GENERIC_READ, GENERIC_ALL, WRITE_DAC, WRITE_OWNER)."""
_INHERIT_ONLY = "IO"


class AclApi(Protocol):
    """The operating system's side (:mod:`.winacl`)."""

    def current_user(self) -> str:
        """The SID of the account this process runs as."""
        ...

    def lookup(self, account: str) -> str:
        """The SID of an account name (``DOMAIN\\user``, ``user``, a group).

        Raises:
            OSError: no such account.
        """
        ...

    def name(self, sid: str) -> str:
        """``DOMAIN\\name`` of a SID, or the SID when it has no name."""
        ...

    def read(self, path: Path) -> str:
        """The owner and DACL of ``path`` as SDDL (``O:…D:…``).

        Raises:
            OSError: the path or its descriptor cannot be read.
        """
        ...

    def write(self, path: Path, sddl: str) -> None:
        """Set the DACL of ``path`` from ``sddl``, protected from inheritance.

        Raises:
            OSError: it cannot be set.
        """
        ...


@dataclass(frozen=True, slots=True)
class Ace:
    kind: str
    """``A`` allow, ``D`` deny (others are kept but grant nothing here)."""
    flags: str
    mask: int
    sid: str


@dataclass(frozen=True, slots=True)
class Descriptor:
    owner: str | None
    protected: bool
    """``P``: the DACL does not inherit from the parent."""
    aces: tuple[Ace, ...]
    null_dacl: bool
    """No DACL at all (``D:NO_ACCESS_CONTROL``): everyone has full access."""


def _sid(text: str) -> str:
    text = text.strip()
    match = _DOMAIN_RID.match(text)
    if match:
        return f"domain-{match.group(1)}"
    return _ALIASES.get(text, text)


def _mask(text: str) -> int:
    if text.lower().startswith("0x"):
        return int(text, 16)
    if text.isdigit():
        return int(text)
    mask = 0
    for i in range(0, len(text), 2):
        mask |= _RIGHTS.get(text[i:i + 2], 0)
    return mask


def _entry(sid: str, mask: int, inherit: bool) -> str:
    rights = {FILE_ALL_ACCESS: "FA", FILE_GENERIC_READ: "FR"}.get(mask, f"0x{mask:x}")
    return f"(A;{'OICI' if inherit else ''};{rights};;;{sid})"


def _unique(sids: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for sid in sids:
        if sid not in seen:
            seen.append(sid)
    return seen


def data_dir_sddl(owner: str, *, service: str | None = LOCAL_SERVICE) -> str:
    """The data dir's protected DACL, inherited by files and folders made inside it."""
    full = _unique([SYSTEM, ADMINISTRATORS, owner])
    aces = [_entry(sid, FILE_ALL_ACCESS, True) for sid in full]
    if service is not None and service not in full:
        aces.append(_entry(service, FILE_MODIFY, True))
    return "D:P" + "".join(aces)


def secret_sddl(owner: str, *, service: str | None = LOCAL_SERVICE,
                readers: Sequence[str] = ()) -> str:
    """A secret file's protected DACL: full control for the owner, SYSTEM and Administrators;
    read for the service account and ``readers`` (SIDs)."""
    full = _unique([SYSTEM, ADMINISTRATORS, owner])
    aces = [_entry(sid, FILE_ALL_ACCESS, False) for sid in full]
    extra = [s for s in _unique([*([service] if service else []), *readers]) if s not in full]
    aces += [_entry(sid, FILE_GENERIC_READ, False) for sid in extra]
    return "D:P" + "".join(aces)


def parse(sddl: str) -> Descriptor:
    """The owner and DACL of an SDDL string (other parts are ignored).

    Raises:
        ValueError: no DACL part, or a malformed ACE.
    """
    owner = None
    match = re.search(r"O:([A-Z]{2}|S-[0-9-]+)", sddl)
    if match:
        owner = _sid(match.group(1))
    start = sddl.find("D:")
    if start < 0:
        raise ValueError("no DACL in the security descriptor")
    # The DACL part is its flags, then consecutive "(…)" ACEs; whatever follows (S:) is not.
    rest = sddl[start + 2:]
    head = re.match(r"[A-Z_]*", rest)
    flags = head.group(0) if head else ""
    if flags == "NO_ACCESS_CONTROL":
        return Descriptor(owner=owner, protected=False, aces=(), null_dacl=True)
    aces = []
    position = len(flags)
    while position < len(rest) and rest[position] == "(":
        close = rest.find(")", position)
        if close < 0:
            raise ValueError("unterminated ACE")
        fields = rest[position + 1:close].split(";")
        if len(fields) < 6:
            raise ValueError(f"malformed ACE ({rest[position + 1:close]})")
        aces.append(Ace(kind=fields[0], flags=fields[1], mask=_mask(fields[2]),
                        sid=_sid(fields[5])))
        position = close + 1
    return Descriptor(owner=owner, protected="P" in flags, aces=tuple(aces), null_dacl=False)


def readers(descriptor: Descriptor) -> list[str]:
    """SIDs an allow ACE lets read the object's data (or grant themselves that), in order.

    Deny ACEs are not subtracted: the answer errs towards "readable".
    """
    found = [ace.sid for ace in descriptor.aces
             if ace.kind == "A" and ace.mask & _EXPOSING and _INHERIT_ONLY not in ace.flags]
    return _unique(found)


def _display(sid: str, api: AclApi | None) -> str:
    if sid in _NAMES:
        return _NAMES[sid]
    if api is None or sid.startswith("domain-"):
        return sid
    return api.name(sid)


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Literal["ok", "warn", "fail"]
    detail: str


def judge(descriptor: Descriptor, *, trusted: Iterable[str], kind: Literal["key", "token"],
          api: AclApi | None = None) -> Verdict:
    """Whether a secret's ACL is private enough.

    ``fail`` when any group standing for every local user (Users, Everyone, Authenticated
    Users, …) may read it, or it has no DACL; ``warn`` when ``agent.key`` is readable by an
    account outside ``trusted`` (``local-token`` may be: the local apps' account); else ``ok``.
    The detail names who may read it.
    """
    if descriptor.null_dacl:
        return Verdict("fail", "has no access list: every user may read it")
    who = readers(descriptor)
    names = ", ".join(_display(sid, api) for sid in who) or "nobody"
    broad = [sid for sid in who if sid in _BROAD]
    if broad:
        groups = ", ".join(_display(sid, api) for sid in broad)
        return Verdict("fail", f"is readable by every local user ({groups}); readable by: "
                       f"{names}")
    trusted_set = {SYSTEM, ADMINISTRATORS, *trusted}
    if descriptor.owner is not None:
        trusted_set.add(descriptor.owner)
    others = [sid for sid in who if sid not in trusted_set]
    if others and kind == "key":
        extra = ", ".join(_display(sid, api) for sid in others)
        return Verdict("warn", f"is also readable by {extra} (only the agent needs its key); "
                       f"readable by: {names}")
    return Verdict("ok", f"readable by: {names}")


# -- operations ----------------------------------------------------------------------------------


def protect_data_dir(path: Path, api: AclApi, *, service: str | None = LOCAL_SERVICE) -> None:
    """Give the data dir its private, inherited DACL (module docstring).

    Raises:
        OSError: the OS refused.
    """
    api.write(path, data_dir_sddl(api.current_user(), service=service))


def protect_secret(path: Path, api: AclApi, *, readers: Sequence[str] = (),
                   service: str | None = LOCAL_SERVICE) -> None:
    """Give a secret file its private DACL, readable by ``readers`` (SIDs) as well.

    Raises:
        OSError: the OS refused.
    """
    api.write(path, secret_sddl(api.current_user(), service=service, readers=readers))


def kept_readers(path: Path, api: AclApi, *, service: str | None = LOCAL_SERVICE) -> list[str]:
    """The accounts besides the standard ones that may read ``path`` now: what a rewrite of
    the file keeps (``token rotate``). Groups of every local user are never kept. A missing or
    unreadable file keeps none."""
    try:
        descriptor = parse(api.read(path))
    except (OSError, ValueError):
        return []
    standard = {SYSTEM, ADMINISTRATORS, api.current_user(), descriptor.owner, service}
    return [sid for sid in readers(descriptor) if sid not in standard and sid not in _BROAD
            and not sid.startswith("domain-")]


def check_secret(path: Path, api: AclApi, *, kind: Literal["key", "token"],
                 service: str | None = LOCAL_SERVICE) -> Verdict:
    """The doctor's reading of a secret's ACL (:func:`judge`), naming the accounts.

    Raises:
        OSError: the descriptor cannot be read.
    """
    try:
        descriptor = parse(api.read(path))
    except ValueError as exc:
        return Verdict("fail", f"has an access list the agent cannot read ({exc})")
    trusted = [api.current_user(), *([service] if service else [])]
    return judge(descriptor, trusted=trusted, kind=kind, api=api)
