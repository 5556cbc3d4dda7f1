"""What the agent asks of the operating system: an exclusive loopback listener, a live pid.

Both differ between Windows and POSIX in ways that matter for security and safety, so they live
in one place that the local API, ``status`` and ``doctor`` share.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import urllib.error
import urllib.request

__all__ = ["AddressInUse", "bind_local", "pid_alive"]

_IN_USE = {errno.EADDRINUSE, 10048}  # 10048: WSAEADDRINUSE


class AddressInUse(OSError):
    """The local API's address is taken; the message names it, and the holder when it is an
    agent (its local API answers like ours)."""

    def __init__(self, host: str, port: int, *, agent: bool) -> None:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        holder = (
            "another xon-relay-agent (with another data dir) listens there"
            if agent
            else "another program listens there"
        )
        super().__init__(
            errno.EADDRINUSE, f"cannot listen on {address}: {holder}; choose another --listen"
        )

_BACKLOG = 128


def bind_local(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` that no other process can share.

    On Windows ``SO_EXCLUSIVEADDRUSE``: without it another local program could bind the same
    port with ``SO_REUSEADDR`` and take over connections meant for the agent, bearer token
    included (DESIGN §Agent local API: only the local token's holder may read events). On
    POSIX ``SO_REUSEADDR`` (what aiohttp sets): it lets a restarted agent bind at once while
    old connections sit in TIME_WAIT, and never lets a second listener share the port.

    Raises:
        AddressInUse: the port is taken.
        OSError: the address cannot be resolved or bound otherwise.
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
    except OSError as exc:
        sock.close()
        if exc.errno in _IN_USE:
            raise AddressInUse(host, port, agent=_agent_listens(host, port)) from exc
        raise
    return sock


def _agent_listens(host: str, port: int) -> bool:
    """Whether what listens on ``host:port`` answers like an agent's local API: a tokenless
    ``/v1/health`` gets 401 with our error object and a Bearer challenge."""
    url = f"http://[{host}]:{port}/v1/health" if ":" in host else f"http://{host}:{port}/v1/health"
    # No proxy: this is a loopback probe, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2):
            return False
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read(4096))
        except ValueError:
            return False
        finally:
            exc.close()
        return (
            exc.code == 401
            and exc.headers.get("WWW-Authenticate", "").startswith("Bearer")
            and isinstance(body, dict)
            and isinstance(body.get("error"), dict)
            and body["error"].get("code") == "unauthorized"
        )
    except (OSError, ValueError):
        return False


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
