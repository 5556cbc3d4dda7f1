"""The agent as a Windows service, run by the agent's own executable (docs/install-agent.md).

``xon-relay-agent.exe service install`` registers the executable itself: the service command
line is ``"C:\\Program Files\\xon-relay-agent\\xon-relay-agent.exe" service run --data-dir
C:\\ProgramData\\xon-relay-agent`` (``python.exe -m relay_agent service run …`` for an agent
installed into a Python). It is started automatically at boot, runs as LocalService (not
SYSTEM: the agent only needs its data dir and outbound network), and is restarted after 5 s,
10 s and 30 s when it fails. ``service run`` hosts the same code as ``run`` in that process; a
service stop sets the agent's stop event, so the inbox and the link close cleanly.

Everything that builds command lines, reads the registration back and decides is plain Python,
tested on Linux. Only :func:`host` and :func:`windows_registry` touch Windows (pywin32 and
``winreg``), on Windows alone. This module never imports the CLI: the CLI hands :func:`host`
the function that runs the agent.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Literal, Protocol

from shared.errors import RelayError

__all__ = [
    "SERVICE_NAME",
    "DISPLAY_NAME",
    "DESCRIPTION",
    "SERVICE_ACCOUNT",
    "RECOVERY_DELAYS",
    "RECOVERY_RESET",
    "LOG_FILE",
    "CA_FILE",
    "ServiceSpec",
    "Registration",
    "Registry",
    "StopSwitch",
    "ServiceError",
    "program_data_dir",
    "agent_program",
    "install_commands",
    "uninstall_commands",
    "start_commands",
    "stop_commands",
    "service_outcome",
    "split_command_line",
    "service_environment",
    "location_problem",
    "windows_registry",
    "host",
]

SERVICE_NAME = "XonRelayAgent"
DISPLAY_NAME = "X-on relay agent"
DESCRIPTION = ("Receives X-on events through the X-on relay and serves them to local apps on "
               "127.0.0.1 (xon-relay-agent).")
SERVICE_ACCOUNT = r"NT AUTHORITY\LocalService"
RECOVERY_DELAYS = (5.0, 10.0, 30.0)
"""Seconds before the 1st, 2nd and 3rd (and later) restart after a failure."""
RECOVERY_RESET = 24 * 3600
"""Seconds without failure after which the failure count starts again from the first delay."""
LOG_FILE = "agent.log"
"""In the data dir: a service has no console, so the agent's log goes to this file."""
CA_FILE = "ca.pem"
"""In the data dir: ``service install --ca-file`` copies the CA there, where the service
account can read it (a file in an administrator's profile is out of its reach)."""
APP_DIR = "xon-relay-agent"
EXIT_FAILURE = 1

# SIDs, not names, so that the ACL works in every display language of Windows.
_SID_SYSTEM = "*S-1-5-18"
_SID_ADMINISTRATORS = "*S-1-5-32-544"
_SID_LOCAL_SERVICE = "*S-1-5-19"

Start = Literal["auto", "delayed-auto", "demand"]


def program_data_dir(env: Mapping[str, str]) -> PureWindowsPath:
    """``%PROGRAMDATA%\\xon-relay-agent``: machine-wide, as a service's data must be."""
    return PureWindowsPath(env.get("PROGRAMDATA") or r"C:\ProgramData") / APP_DIR


def agent_program(executable: str, *, frozen: bool) -> tuple[str, ...]:
    """The command that starts this agent: the single-file executable itself, or the Python
    it is installed into with ``-m relay_agent``."""
    return (executable,) if frozen else (executable, "-m", "relay_agent")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    """What ``sc.exe`` registers."""

    program: tuple[str, ...]
    """:func:`agent_program`: the executable, or ``python.exe -m relay_agent``."""
    data_dir: str
    name: str = SERVICE_NAME
    display_name: str = DISPLAY_NAME
    description: str = DESCRIPTION
    account: str = SERVICE_ACCOUNT
    start: Start = "auto"
    recovery_delays: tuple[float, ...] = RECOVERY_DELAYS
    recovery_reset: int = RECOVERY_RESET

    @property
    def argv(self) -> list[str]:
        return [*self.program, "service", "run", "--data-dir", self.data_dir]

    @property
    def bin_path(self) -> str:
        """The service command line, every path with a space quoted: an unquoted path is the
        classic "unquoted service path" hole (C:\\Program.exe runs instead)."""
        return subprocess.list2cmdline(self.argv)

    @property
    def recovery_actions(self) -> str:
        """``sc.exe failure`` syntax: ``restart/5000/restart/10000/restart/30000``."""
        return "/".join(f"restart/{round(delay * 1000)}" for delay in self.recovery_delays)


def install_commands(spec: ServiceSpec, *, exists: bool = False) -> list[list[str]]:
    """The commands that give the service its data dir, register it (or, when it ``exists``,
    point it at this program and data dir again) and set its description and recovery."""
    # The data dir: no inherited access; full control for SYSTEM and Administrators, modify
    # for the service account, inherited by the files the agent writes there.
    acl = ["icacls", spec.data_dir, "/inheritance:r",
           "/grant:r", f"{_SID_SYSTEM}:(OI)(CI)F",
           "/grant:r", f"{_SID_ADMINISTRATORS}:(OI)(CI)F",
           "/grant:r", f"{_SID_LOCAL_SERVICE}:(OI)(CI)M"]
    # sc.exe wants "option= value" as two arguments: the space after "=" is its syntax.
    options = ["binPath=", spec.bin_path, "start=", spec.start, "DisplayName=",
               spec.display_name, "obj=", spec.account, "password=", ""]
    register = ["sc.exe", "config" if exists else "create", spec.name, *options]
    return [
        acl,
        register,
        ["sc.exe", "description", spec.name, spec.description],
        ["sc.exe", "failure", spec.name, "reset=", str(spec.recovery_reset),
         "actions=", spec.recovery_actions],
        # Also count a stop with a non-zero exit code as a failure, not only a crash.
        ["sc.exe", "failureflag", spec.name, "1"],
    ]


def uninstall_commands(name: str = SERVICE_NAME) -> list[list[str]]:
    """Stop (may fail: not running) then delete."""
    return [*stop_commands(name), ["sc.exe", "delete", name]]


def start_commands(name: str = SERVICE_NAME) -> list[list[str]]:
    return [["sc.exe", "start", name]]


def stop_commands(name: str = SERVICE_NAME) -> list[list[str]]:
    return [["sc.exe", "stop", name]]


def service_outcome(exit_code: int) -> Literal["stopped", "failed"]:
    """How the service ends for an agent exit code (``relay_agent.cli`` EXIT_*).

    Only a runtime failure (1) is reported as a failure, which makes the service manager
    restart it. A configuration error (2) and a refusal by the relay (3: revoked or unknown)
    stop it cleanly: restarting cannot fix them, and a refused agent must not retry in a loop
    (docs/deployment.md, Windows).
    """
    return "failed" if exit_code == EXIT_FAILURE else "stopped"


def location_problem(executable: str, env: Mapping[str, str]) -> str | None:
    """Why a service should not run the executable from where it is, or None.

    The service runs it as LocalService, which cannot read a user's profile; and a service
    binary that a non-administrator can replace runs their code with the service's rights.
    Program Files is readable by all and writable by administrators only.
    """
    path = PureWindowsPath(executable)
    roots = [env.get(name) for name in ("ProgramFiles", "ProgramW6432", "ProgramFiles(x86)")]
    for root in filter(None, roots):
        if path.is_relative_to(PureWindowsPath(root)):
            return None
    folder = env.get("ProgramFiles") or r"C:\Program Files"
    return (f"{executable} is not under {folder}: copy it to {folder}\\{APP_DIR}\\ first (the "
            "service account must read it, and only administrators may replace it)")


# -- reading the registration back (doctor --service) ------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """What the service manager holds for the service (its registry key)."""

    name: str
    image_path: str
    """The command line the service manager runs (``binPath``)."""
    account: str

    @property
    def argv(self) -> list[str]:
        return split_command_line(self.image_path)

    @property
    def program(self) -> str:
        argv = self.argv
        return argv[0] if argv else ""

    @property
    def data_dir(self) -> str | None:
        """The ``--data-dir`` the service runs with; None when the command line has none (not
        a service this program installed)."""
        argv = self.argv
        for i, word in enumerate(argv[:-1]):
            if word == "--data-dir":
                return argv[i + 1]
        return None


class Registry(Protocol):
    """The two things ``doctor --service`` reads from the Windows registry."""

    def service(self, name: str) -> Registration | None:
        """The service's registration, None when no such service is installed."""

    def machine_environment(self) -> dict[str, str]:
        """The system environment variables, which a service gets (not a user's)."""


# Settings a user may hold in their own environment that a service started at boot does not
# see: the agent's overrides and the proxy variables (docs/deployment.md, Windows).
_USER_SETTING = re.compile(r"^(XON_RELAY_|(HTTPS?|ALL|NO)_PROXY$)", re.IGNORECASE)


def service_environment(current: Mapping[str, str], machine: Mapping[str, str]
                        ) -> dict[str, str]:
    """The environment the service's agent reads its settings from: this process's, with every
    agent setting and proxy variable replaced by the system-wide ones."""
    env = {k: v for k, v in current.items() if not _USER_SETTING.match(k)}
    env.update({k: v for k, v in machine.items() if _USER_SETTING.match(k)})
    return env


def split_command_line(line: str) -> list[str]:
    """Split a Windows command line as the C runtime does (the inverse of
    :func:`subprocess.list2cmdline`): spaces and tabs separate arguments outside quotes;
    ``2n`` backslashes before a quote are ``n`` backslashes and the quote toggles quoting,
    ``2n+1`` are ``n`` and a literal quote; other backslashes are literal."""
    args: list[str] = []
    current: list[str] = []
    quoted = False
    pending = False  # an argument has started (it may be empty: "")
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\":
            j = i
            while j < len(line) and line[j] == "\\":
                j += 1
            count = j - i
            if j < len(line) and line[j] == '"':
                current.append("\\" * (count // 2))
                if count % 2:
                    current.append('"')
                    i = j + 1
                else:
                    i = j
            else:
                current.append("\\" * count)
                i = j
            pending = True
            continue
        if char == '"':
            if quoted and line[i + 1:i + 2] == '"':
                current.append('"')
                i += 2
                continue
            quoted = not quoted
            pending = True
        elif char in " \t" and not quoted:
            if pending:
                args.append("".join(current))
                current, pending = [], False
        else:
            current.append(char)
            pending = True
        i += 1
    if pending:
        args.append("".join(current))
    return args


# -- the running service -------------------------------------------------------------------------


class StopSwitch:
    """Carries a stop request from the service-control thread to the agent's event loop.

    Either side may come first: a stop requested before the loop attached its stop function
    is delivered as soon as it does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop: Callable[[], None] | None = None
        self._requested = False

    def attach(self, stop: Callable[[], None]) -> None:
        with self._lock:
            self._stop = stop
            requested = self._requested
        if requested:
            stop()

    def request(self) -> None:
        with self._lock:
            self._requested = True
            stop = self._stop
        if stop is not None:
            stop()


class ServiceError(RelayError):
    """``service run`` outside the service manager, or the agent stopped with a failure."""

    code = "service_failed"


class HostedRun(Protocol):
    """``relay_agent.cli.run_hosted``: run the agent of a data dir until stopped."""

    def __call__(self, data_dir: Path, *, attach_stop: Callable[[Callable[[], None]], None],
                 log_file: Path | None = None) -> int: ...


def windows_registry() -> Registry | None:
    """The registry of this machine; None off Windows."""
    if sys.platform == "win32":  # pragma: no cover - needs Windows
        return _WinRegistry()
    return None


def host(data_dir: Path, run: HostedRun) -> int:
    """Hand this process to the service manager, which then runs the agent of ``data_dir``
    through ``run`` until the service is stopped.

    Raises:
        ServiceError: not on Windows, or this process was not started by the service manager.
    """
    if sys.platform == "win32":  # pragma: no cover - needs Windows and pywin32
        return _host(data_dir, run)
    raise ServiceError("service run is started by the Windows service manager; here use: "
                       f"xon-relay-agent run --data-dir {data_dir}")


if sys.platform == "win32":  # pragma: no cover - needs Windows and pywin32
    import winreg

    import pywintypes  # type: ignore[import-untyped,unused-ignore]
    import servicemanager  # type: ignore[import-untyped,unused-ignore]
    import win32service  # type: ignore[import-untyped,unused-ignore]
    import win32serviceutil  # type: ignore[import-untyped,unused-ignore]

    _NOT_A_SERVICE = 1063  # ERROR_FAILED_SERVICE_CONTROLLER_CONNECT

    class _WinRegistry:
        def service(self, name: str) -> Registration | None:
            key_name = rf"SYSTEM\CurrentControlSet\Services\{name}"
            try:
                with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key_name) as key:
                    image_path, _ = winreg.QueryValueEx(key, "ImagePath")
                    try:
                        account, _ = winreg.QueryValueEx(key, "ObjectName")
                    except FileNotFoundError:
                        account = "LocalSystem"
            except FileNotFoundError:
                return None
            return Registration(name=name, image_path=str(image_path), account=str(account))

        def machine_environment(self) -> dict[str, str]:
            key_name = r"SYSTEM\CurrentControlSet\Control\Session Manager\Environment"
            env: dict[str, str] = {}
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key_name) as key:
                for i in range(winreg.QueryInfoKey(key)[1]):
                    name, value, _ = winreg.EnumValue(key, i)
                    env[str(name)] = str(value)
            return env

    class AgentService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION
        # Set by _host before the dispatcher starts: the service manager constructs the class.
        data_dir: Path
        run: HostedRun

        def __init__(self, args: list[str]) -> None:
            super().__init__(args)
            self._switch = StopSwitch()

        def SvcStop(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=30_000)
            self._switch.request()

        SvcShutdown = SvcStop

        def SvcRun(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_RUNNING)
            data_dir = self.data_dir
            code = type(self).run(data_dir, attach_stop=self._switch.attach,
                                  log_file=data_dir / LOG_FILE)
            if code != 0:
                servicemanager.LogErrorMsg(
                    f"{DISPLAY_NAME} stopped with exit code {code}; see {data_dir / LOG_FILE}")
            if service_outcome(code) == "failed":
                # Raised to the pywin32 host so that the service manager records a failure
                # and applies the recovery actions.
                raise ServiceError(f"the agent stopped with exit code {code}")
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)

    def _host(data_dir: Path, run: HostedRun) -> int:
        AgentService.data_dir = data_dir
        AgentService.run = staticmethod(run)
        servicemanager.Initialize()
        servicemanager.PrepareToHostSingle(AgentService)
        try:
            servicemanager.StartServiceCtrlDispatcher()
        except pywintypes.error as exc:
            if exc.winerror == _NOT_A_SERVICE:
                raise ServiceError(
                    "service run is started by the Windows service manager (service start); "
                    f"in a console use: xon-relay-agent run --data-dir {data_dir}") from exc
            raise
        return 0
