"""What the agent asks of the operating system: an exclusive loopback listener, a live pid.

Both differ between Windows and POSIX in ways that matter for security and safety, so they live
in one place that the local API, ``status`` and ``doctor`` share.
"""

from __future__ import annotations

import os
import socket
import sys

__all__ = ["bind_local", "pid_alive"]

_BACKLOG = 128


def bind_local(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` that no other process can share.

    On Windows ``SO_EXCLUSIVEADDRUSE``: without it another local program could bind the same
    port with ``SO_REUSEADDR`` and take over connections meant for the agent, bearer token
    included (DESIGN §Agent local API: only the local token's holder may read events). On
    POSIX ``SO_REUSEADDR`` (what aiohttp sets): it lets a restarted agent bind at once while
    old connections sit in TIME_WAIT, and never lets a second listener share the port.

    Raises:
        OSError: the address cannot be resolved or the port is taken.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def pid_alive(pid: object) -> bool:
    """Whether a process with this id runs (``agent.json`` names the agent's pid).

    Windows is asked through OpenProcess: ``os.kill(pid, 0)`` there would send CTRL_C_EVENT
    (signal 0) to a console process group instead of probing it.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return _windows_pid_alive(pid)
    else:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, owned by another user
            return True
        return True


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import ctypes
    from ctypes import wintypes

    _PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
    _STILL_ACTIVE = 259
    _ERROR_ACCESS_DENIED = 5

    def _windows_pid_alive(pid: int) -> bool:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
        if not handle:
            # Access denied means it exists (another user's, e.g. the service account's).
            return bool(ctypes.get_last_error() == _ERROR_ACCESS_DENIED)
        try:
            code = wintypes.DWORD()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return False
            return bool(code.value == _STILL_ACTIVE)
        finally:
            kernel32.CloseHandle(handle)
