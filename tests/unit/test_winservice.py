"""The Windows service: command lines and decisions, built and tested on any platform."""

from __future__ import annotations

import subprocess
import threading
from typing import Literal

import pytest

from relay_agent import cli, winservice
from relay_agent.winservice import ServiceSpec

PYTHON = r"C:\Program Files\Python311\python.exe"
DATA = r"C:\ProgramData\xon-relay-agent"


def spec(*, data_dir: str = DATA, start: Literal["auto", "delayed-auto"] = "auto") -> ServiceSpec:
    return ServiceSpec(python=PYTHON, data_dir=data_dir, start=start)


def test_program_data_dir_follows_the_environment() -> None:
    """The data dir is %PROGRAMDATA%\\xon-relay-agent, C:\\ProgramData when unset."""
    assert str(winservice.program_data_dir({"PROGRAMDATA": r"D:\Data"})) == \
        r"D:\Data\xon-relay-agent"
    assert str(winservice.program_data_dir({})) == DATA


def test_bin_path_quotes_paths_with_spaces() -> None:
    """The service command line quotes the exe (no unquoted service path) and runs the host."""
    bin_path = spec().bin_path
    assert bin_path == (f'"{PYTHON}" -m relay_agent.winservice --data-dir {DATA}')
    spaced = spec(data_dir=r"C:\Program Data\agent").bin_path
    assert spaced.endswith(r'--data-dir "C:\Program Data\agent"')


def test_install_commands_create_an_automatic_service_with_recovery() -> None:
    """create (auto start, LocalService), description, restart 5/10/30 s, failure flag."""
    create, description, failure, flag = winservice.install_commands(spec())
    assert create[:3] == ["sc.exe", "create", "XonRelayAgent"]
    options = dict(zip(create[3::2], create[4::2]))
    assert options == {
        "binPath=": spec().bin_path,
        "start=": "auto",
        "DisplayName=": "X-on relay agent",
        "obj=": r"NT AUTHORITY\LocalService",
        "password=": "",
    }
    assert description[:3] == ["sc.exe", "description", "XonRelayAgent"]
    assert failure == ["sc.exe", "failure", "XonRelayAgent", "reset=", "86400",
                       "actions=", "restart/5000/restart/10000/restart/30000"]
    assert flag == ["sc.exe", "failureflag", "XonRelayAgent", "1"]


def test_install_command_line_keeps_sc_syntax() -> None:
    """Joined for cmd.exe, each option is "name= value" and the binPath stays one argument."""
    line = subprocess.list2cmdline(winservice.install_commands(spec(start="delayed-auto"))[0])
    assert line.startswith("sc.exe create XonRelayAgent binPath= ")
    assert "start= delayed-auto" in line
    assert r'binPath= "\"C:\Program Files\Python311\python.exe\" -m relay_agent.winservice' in line


def test_uninstall_start_and_stop_commands() -> None:
    """uninstall stops then deletes; start and stop are one sc.exe call each."""
    assert winservice.uninstall_commands("Svc") == [["sc.exe", "stop", "Svc"],
                                                    ["sc.exe", "delete", "Svc"]]
    assert winservice.start_commands() == [["sc.exe", "start", "XonRelayAgent"]]
    assert winservice.stop_commands() == [["sc.exe", "stop", "XonRelayAgent"]]


def test_only_a_runtime_failure_triggers_recovery() -> None:
    """Exit 1 fails (restart); 0, 2 (config) and 3 (refused by the relay) stop cleanly."""
    assert winservice.service_outcome(1) == "failed"
    for code in (0, cli.EXIT_CONFIG, cli.EXIT_REFUSED):
        assert winservice.service_outcome(code) == "stopped"


def test_stop_switch_delivers_a_stop_requested_before_attach() -> None:
    """A service stop that arrives before the agent's loop is ready still stops it."""
    switch = winservice.StopSwitch()
    calls: list[str] = []
    switch.request()
    assert calls == []
    switch.attach(lambda: calls.append("stop"))
    assert calls == ["stop"]


def test_stop_switch_delivers_a_stop_from_another_thread() -> None:
    """The control handler's thread calls the attached stop function."""
    switch = winservice.StopSwitch()
    stopped = threading.Event()
    switch.attach(stopped.set)
    thread = threading.Thread(target=switch.request)
    thread.start()
    thread.join()
    assert stopped.is_set()


def test_service_host_refuses_to_run_off_windows(capsys: pytest.CaptureFixture[str]) -> None:
    """python -m relay_agent.winservice on Linux exits 2 with one line."""
    assert winservice.main(["--data-dir", "/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Windows only" in err


def test_cli_dry_run_prints_the_sc_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """service install --dry-run prints the four sc.exe commands, on any platform."""
    code = cli.main(["service", "install", "--dry-run", "--python", PYTHON, "--data-dir", DATA])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["create", "description", "failure",
                                                   "failureflag"]
    assert cli.main(["service", "uninstall", "--dry-run", "--name", "Other"]) == 0
    assert capsys.readouterr().out.splitlines() == ["sc.exe stop Other", "sc.exe delete Other"]


def test_cli_service_commands_refuse_off_windows(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --dry-run on Linux: exit 2, one line pointing at the systemd units."""
    for action in ("install", "uninstall", "start", "stop"):
        assert cli.main(["service", action]) == cli.EXIT_CONFIG
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "systemd" in err
