"""The agent as a Windows service: ``xon-relay-agent run`` hosted by the service manager.

``xon-relay-agent service install`` registers ``python.exe -m relay_agent.winservice
--data-dir %PROGRAMDATA%\\xon-relay-agent`` with ``sc.exe``: started automatically at boot,
running as LocalService (not SYSTEM: the agent only needs its data dir and outbound network),
restarted after 5 s, 10 s and 30 s when it fails. The service runs the same code as ``run`` in
this process, and a service stop sets the agent's stop event, so the inbox and the link close
cleanly.

Everything that builds command lines and decisions is plain Python, tested on Linux. Only
:class:`AgentService` and :func:`main` need pywin32 (``pywin32; sys_platform == "win32"``),
imported on Windows alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Literal

from shared.errors import RelayError

__all__ = [
    "SERVICE_NAME",
    "DISPLAY_NAME",
    "DESCRIPTION",
    "SERVICE_ACCOUNT",
    "RECOVERY_DELAYS",
    "RECOVERY_RESET",
    "LOG_FILE",
    "ServiceSpec",
    "StopSwitch",
    "program_data_dir",
    "install_commands",
    "uninstall_commands",
    "start_commands",
    "stop_commands",
    "service_outcome",
    "main",
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
APP_DIR = "xon-relay-agent"
EXIT_FAILURE = 1


def program_data_dir(env: Mapping[str, str]) -> PureWindowsPath:
    """``%PROGRAMDATA%\\xon-relay-agent``: machine-wide, as a service's data must be."""
    return PureWindowsPath(env.get("PROGRAMDATA") or r"C:\ProgramData") / APP_DIR


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    """What ``sc.exe`` registers."""

    python: str
    """The ``python.exe`` that hosts the service (a system-wide install with pywin32)."""
    data_dir: str
    name: str = SERVICE_NAME
    display_name: str = DISPLAY_NAME
    description: str = DESCRIPTION
    account: str = SERVICE_ACCOUNT
    start: Literal["auto", "delayed-auto", "demand"] = "auto"
    recovery_delays: tuple[float, ...] = RECOVERY_DELAYS
    recovery_reset: int = RECOVERY_RESET

    @property
    def argv(self) -> list[str]:
        return [self.python, "-m", "relay_agent.winservice", "--data-dir", self.data_dir]

    @property
    def bin_path(self) -> str:
        """The service command line, every path with a space quoted: an unquoted path is the
        classic "unquoted service path" hole (C:\\Program.exe runs instead)."""
        return subprocess.list2cmdline(self.argv)

    @property
    def recovery_actions(self) -> str:
        """``sc.exe failure`` syntax: ``restart/5000/restart/10000/restart/30000``."""
        return "/".join(f"restart/{round(delay * 1000)}" for delay in self.recovery_delays)


def install_commands(spec: ServiceSpec) -> list[list[str]]:
    """``sc.exe`` commands that register the service, its description and its recovery."""
    # sc.exe wants "option= value" as two arguments: the space after "=" is its syntax.
    return [
        ["sc.exe", "create", spec.name, "binPath=", spec.bin_path, "start=", spec.start,
         "DisplayName=", spec.display_name, "obj=", spec.account, "password=", ""],
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
    stop it cleanly: restarting cannot fix them, and DESIGN says a refused agent must not
    retry in a loop.
    """
    return "failed" if exit_code == EXIT_FAILURE else "stopped"


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


class ServiceFailed(RelayError):
    """The agent stopped with a failure; raised to the pywin32 host so the service manager
    records the failure and applies the recovery actions."""

    code = "service_failed"

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"the agent stopped with exit code {self.exit_code}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m relay_agent.winservice",
                                     description="host the agent as a Windows service")
    parser.add_argument("--data-dir", type=Path, required=True)
    return parser


if sys.platform == "win32":  # pragma: no cover - needs Windows and pywin32
    import servicemanager  # type: ignore[import-untyped,unused-ignore]
    import win32service  # type: ignore[import-untyped,unused-ignore]
    import win32serviceutil  # type: ignore[import-untyped,unused-ignore]

    class AgentService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION
        data_dir: Path  # set by _host from --data-dir before the dispatcher starts

        def __init__(self, args: list[str]) -> None:
            super().__init__(args)
            self._switch = StopSwitch()

        def SvcStop(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=30_000)
            self._switch.request()

        SvcShutdown = SvcStop

        def SvcRun(self) -> None:
            from .cli import run_hosted

            self.ReportServiceStatus(win32service.SERVICE_RUNNING)
            data_dir = self.data_dir
            code = run_hosted(data_dir, attach_stop=self._switch.attach,
                              log_file=data_dir / LOG_FILE)
            if code != 0:
                servicemanager.LogErrorMsg(
                    f"{DISPLAY_NAME} stopped with exit code {code}; see {data_dir / LOG_FILE}")
            if service_outcome(code) == "failed":
                raise ServiceFailed(code)
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)


    def _host(data_dir: Path) -> int:
        AgentService.data_dir = data_dir
        servicemanager.Initialize()
        servicemanager.PrepareToHostSingle(AgentService)
        servicemanager.StartServiceCtrlDispatcher()
        return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the service process the service manager starts."""
    args = _parser().parse_args(argv)
    if sys.platform == "win32":  # pragma: no cover - needs Windows and pywin32
        return _host(args.data_dir)
    else:
        print("relay_agent.winservice: Windows only; on Linux use the systemd units",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
