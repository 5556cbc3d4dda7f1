"""The Windows side of :mod:`.acl`: read and set access lists with pywin32.

Only :func:`system_api` is called elsewhere; it answers ``None`` on other systems, where the
0600/0700 modes of shared/files.py protect the secrets. Every pywin32 failure becomes an
``OSError`` naming the call, so callers handle one exception type on every OS.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .acl import AclApi

__all__ = ["system_api"]


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import contextlib
    from collections.abc import Iterator

    try:
        import ntsecuritycon
        import pywintypes
        import win32api
        import win32security
    except ImportError as exc:  # pragma: no cover
        _MISSING: ImportError | None = exc
    else:
        _MISSING = None

    @contextlib.contextmanager
    def _as_oserror(what: str) -> Iterator[None]:
        try:
            yield
        except pywintypes.error as exc:
            raise OSError(exc.winerror, f"{what}: {exc.strerror}") from exc

    class _Win32Acl:
        _INFO_DACL = win32security.DACL_SECURITY_INFORMATION if _MISSING is None else 0

        def __init__(self) -> None:
            if _MISSING is not None:
                raise OSError(f"pywin32 is missing ({_MISSING}): the secrets' access lists "
                              "cannot be set")
            self._user: str | None = None

        def current_user(self) -> str:
            if self._user is None:
                with _as_oserror("OpenProcessToken"):
                    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(),
                                                           ntsecuritycon.TOKEN_QUERY)
                    sid, _ = win32security.GetTokenInformation(token, win32security.TokenUser)
                    self._user = str(win32security.ConvertSidToStringSid(sid))
            return self._user

        def lookup(self, account: str) -> str:
            with _as_oserror(f"no account named {account!r}"):
                sid, _, _ = win32security.LookupAccountName(None, account)
                return str(win32security.ConvertSidToStringSid(sid))

        def name(self, sid: str) -> str:
            try:
                found = win32security.ConvertStringSidToSid(sid)
                name, domain, _ = win32security.LookupAccountSid(None, found)
            except pywintypes.error:
                return sid
            return f"{domain}\\{name}" if domain else str(name)

        def read(self, path: Path) -> str:
            info = win32security.OWNER_SECURITY_INFORMATION | self._INFO_DACL
            with _as_oserror(f"cannot read the access list of {path}"):
                descriptor = win32security.GetNamedSecurityInfo(
                    str(path), win32security.SE_FILE_OBJECT, info)
                return str(win32security.ConvertSecurityDescriptorToStringSecurityDescriptor(
                    descriptor, win32security.SDDL_REVISION_1, info))

        def write(self, path: Path, sddl: str) -> None:
            with _as_oserror(f"cannot set the access list of {path}"):
                descriptor = win32security.ConvertStringSecurityDescriptorToSecurityDescriptor(
                    sddl, win32security.SDDL_REVISION_1)
                win32security.SetNamedSecurityInfo(
                    str(path), win32security.SE_FILE_OBJECT,
                    self._INFO_DACL | win32security.PROTECTED_DACL_SECURITY_INFORMATION,
                    None, None, descriptor.GetSecurityDescriptorDacl(), None)

    def system_api() -> AclApi | None:
        """The running system's ACL calls (module docstring).

        Raises:
            OSError: pywin32 is missing (a broken installation).
        """
        return _Win32Acl()

else:

    def system_api() -> AclApi | None:
        """None: not Windows, the file modes protect the secrets (module docstring)."""
        return None
