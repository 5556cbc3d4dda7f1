"""relay_agent/acl.py: the Windows access lists of the agent's secrets, built and judged as SDDL.

The Windows calls sit behind ``AclApi`` (relay_agent/winacl.py); here a fake holds each path's
SDDL in a dict, since Windows cannot be produced on this machine. The last test applies and
reads back a real access list, on Windows only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from relay_agent import acl, tokens, winacl
from relay_agent.enroll import KEY_FILE, TOKEN_FILE, Enrollment, write_enrollment
from shared import crypto

ME = "S-1-5-21-1111-2222-3333-1001"
APP = "S-1-5-21-1111-2222-3333-1105"
OTHER = "S-1-5-21-1111-2222-3333-1200"
PROGRAM_DATA = "O:BAD:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;OICIID;0x1200a9;;;BU)"
"""What a new folder or file under %PROGRAMDATA% inherits: every local user may read it."""


class FakeAcl:
    """The OS side of acl.AclApi: descriptors in a dict, accounts in another."""

    def __init__(self) -> None:
        self.sddl: dict[Path, str] = {}
        self.accounts = {"OFFICE\\reception": APP, "OFFICE\\other": OTHER}

    def current_user(self) -> str:
        return ME

    def lookup(self, account: str) -> str:
        if account not in self.accounts:
            raise OSError(1332, f"no account named {account!r}: No mapping between account "
                          "names and security IDs was done")
        return self.accounts[account]

    def name(self, sid: str) -> str:
        names = {v: k for k, v in self.accounts.items()} | {ME: "OFFICE\\admin"}
        return names.get(sid, sid)

    def read(self, path: Path) -> str:
        if not path.exists():
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self.sddl.get(path, PROGRAM_DATA)

    def write(self, path: Path, sddl: str) -> None:
        assert path.exists(), path
        self.sddl[path] = f"O:{ME}" + sddl


# -- construction --------------------------------------------------------------------------------


def test_data_dir_acl_is_protected_and_inherited() -> None:
    """Owner, SYSTEM, Administrators full control, LocalService modify, all inherited; no
    parent ACE leaks in (P)."""
    assert acl.data_dir_sddl(ME) == (
        f"D:P(A;OICI;FA;;;S-1-5-18)(A;OICI;FA;;;S-1-5-32-544)(A;OICI;FA;;;{ME})"
        "(A;OICI;0x1301bf;;;S-1-5-19)")


def test_secret_acl_grants_read_to_the_service_and_named_readers() -> None:
    """A secret: full control for owner/SYSTEM/Administrators, read for the service and each
    reader once, nothing inherited."""
    assert acl.secret_sddl(ME, readers=[APP, APP]) == (
        f"D:P(A;;FA;;;S-1-5-18)(A;;FA;;;S-1-5-32-544)(A;;FA;;;{ME})(A;;FR;;;S-1-5-19)"
        f"(A;;FR;;;{APP})")


def test_an_owner_that_is_system_or_the_service_is_not_listed_twice() -> None:
    """Enrolled by the service itself (LocalService) or as SYSTEM: each account once."""
    as_service = acl.secret_sddl(acl.LOCAL_SERVICE)
    assert as_service.count("S-1-5-19") == 1 and "(A;;FA;;;S-1-5-19)" in as_service
    assert acl.data_dir_sddl(acl.SYSTEM).count("S-1-5-18") == 1
    assert "S-1-5-19" not in acl.secret_sddl(ME, service=None)


# -- reading -------------------------------------------------------------------------------------


def test_parse_reads_windows_output() -> None:
    """Owner alias, flags, hex and lettered rights, inherited ACEs and a SACL after the DACL."""
    descriptor = acl.parse(f"O:BAG:SYD:PAI(A;;FA;;;SY)(A;ID;0x1200a9;;;BU)(D;;FR;;;{OTHER})"
                           "(A;OICIIO;GA;;;CO)S:AI(AU;SA;FA;;;WD)")
    assert descriptor.owner == acl.ADMINISTRATORS and descriptor.protected
    assert [(a.kind, a.sid) for a in descriptor.aces] == [
        ("A", acl.SYSTEM), ("A", "S-1-5-32-545"), ("D", OTHER), ("A", "S-1-3-0")]
    assert descriptor.aces[1].mask == 0x1200A9
    # Deny ACEs and inherit-only ones (they apply to children) read nothing here.
    assert acl.readers(descriptor) == [acl.SYSTEM, "S-1-5-32-545"]


def test_parse_refuses_what_is_no_dacl() -> None:
    """No D: part or a cut ACE: ValueError (the doctor reports it)."""
    for text in ("O:BA", "D:P(A;;FA;;;SY", "D:(A;;FA)"):
        with pytest.raises(ValueError):
            acl.parse(text)


def test_round_trip_of_what_the_agent_writes() -> None:
    """parse(secret_sddl) finds exactly the accounts it granted."""
    descriptor = acl.parse(acl.secret_sddl(ME, readers=[APP]))
    assert descriptor.protected
    assert acl.readers(descriptor) == [acl.SYSTEM, acl.ADMINISTRATORS, ME, acl.LOCAL_SERVICE, APP]


# -- judging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sddl", [
    PROGRAM_DATA,
    "D:(A;;FA;;;WD)",
    "D:P(A;;FA;;;SY)(A;;FR;;;AU)",
    "D:P(A;;FA;;;SY)(A;;GR;;;S-1-5-21-1111-2222-3333-513)",
    "D:P(A;;FA;;;SY)(A;;WD;;;IU)",  # WRITE_DAC: can grant itself read
    "D:NO_ACCESS_CONTROL",
])
def test_a_secret_any_local_user_may_read_fails(sddl: str) -> None:
    """Users, Everyone, Authenticated Users, Domain Users, Interactive, no DACL: fail."""
    verdict = acl.judge(acl.parse(sddl), trusted=[ME], kind="token")
    assert verdict.status == "fail"
    assert "every" in verdict.detail


def test_what_the_agent_writes_passes_and_names_the_readers() -> None:
    """Its own ACL: ok, naming who may read (accounts by name where known)."""
    verdict = acl.judge(acl.parse(acl.secret_sddl(ME)), trusted=[ME, acl.LOCAL_SERVICE],
                        kind="key", api=FakeAcl())
    assert verdict.status == "ok"
    assert verdict.detail == ("readable by: SYSTEM, Administrators, OFFICE\\admin, "
                              "LOCAL SERVICE")


def test_a_named_reader_is_fine_for_the_token_but_warned_for_the_key() -> None:
    """The local apps' account may read local-token; on agent.key it is a warning."""
    descriptor = acl.parse(acl.secret_sddl(ME, readers=[APP]))
    trusted = [ME, acl.LOCAL_SERVICE]
    assert acl.judge(descriptor, trusted=trusted, kind="token").status == "ok"
    verdict = acl.judge(descriptor, trusted=trusted, kind="key", api=FakeAcl())
    assert verdict.status == "warn" and "OFFICE\\reception" in verdict.detail


# -- operations on files -------------------------------------------------------------------------


def enroll_into(data_dir: Path, api: FakeAcl, readers: tuple[str, ...] = ()) -> None:
    write_enrollment(data_dir, key=crypto.generate_private_key(),
                     enrollment=Enrollment("agt_1", "acc_1", "rly_1"),
                     relay_url="https://relay.example", listen="127.0.0.1:0", insecure=False,
                     token_readers=readers, acl_api=api)


def test_enrollment_protects_the_dir_and_both_secrets(tmp_path: Path) -> None:
    """write_enrollment sets the dir's inherited ACL and each secret's own; the token also
    for --token-reader."""
    api = FakeAcl()
    data_dir = tmp_path / "agent"
    enroll_into(data_dir, api, (APP,))
    assert api.sddl[data_dir] == f"O:{ME}" + acl.data_dir_sddl(ME)
    assert api.sddl[data_dir / KEY_FILE] == f"O:{ME}" + acl.secret_sddl(ME)
    assert api.sddl[data_dir / TOKEN_FILE] == f"O:{ME}" + acl.secret_sddl(ME, readers=[APP])


def test_token_rotation_and_re_enrollment_keep_the_token_reader(tmp_path: Path) -> None:
    """token rotate and enroll --force keep the local apps' account on local-token."""
    api = FakeAcl()
    data_dir = tmp_path / "agent"
    enroll_into(data_dir, api, (APP,))
    token = data_dir / TOKEN_FILE
    old = token.read_text()
    tokens.rotate_token(data_dir, acl_api=api)
    assert token.read_text() != old
    assert acl.readers(acl.parse(api.sddl[token]))[-1] == APP
    enroll_into(data_dir, api, (OTHER,))
    assert acl.readers(acl.parse(api.sddl[token]))[-2:] == [APP, OTHER]


def test_rotation_drops_every_user_access_it_finds(tmp_path: Path) -> None:
    """A token that inherited "Users may read" from ProgramData comes back private."""
    api = FakeAcl()
    (tmp_path / TOKEN_FILE).write_text("old\n")
    assert acl.kept_readers(tmp_path / TOKEN_FILE, api) == []
    tokens.rotate_token(tmp_path, acl_api=api)
    verdict = acl.check_secret(tmp_path / TOKEN_FILE, api, kind="token")
    assert verdict.status == "ok" and "Users" not in verdict.detail


@pytest.mark.skipif(sys.platform != "win32", reason="sets a real Windows access list")
def test_windows_applies_and_reads_back_a_private_acl(tmp_path: Path) -> None:
    """The real calls: a protected ACL set on a file reads back as the agent's, judged ok."""
    api = winacl.system_api()
    assert api is not None
    path = tmp_path / "secret"
    path.write_text("x")
    acl.protect_secret(path, api)
    descriptor = acl.parse(api.read(path))
    assert descriptor.protected
    assert set(acl.readers(descriptor)) == {acl.SYSTEM, acl.ADMINISTRATORS,
                                            api.current_user(), acl.LOCAL_SERVICE}
    assert acl.check_secret(path, api, kind="key").status == "ok"
