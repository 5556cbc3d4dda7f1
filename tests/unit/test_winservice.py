"""The Windows service: command lines and decisions, built and tested on any platform.

The Windows registry is the one part that cannot be produced on Linux: ``doctor --service``
tests give the CLI a fake one through ``winservice.windows_registry``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_agent import cli, winservice
from relay_agent.winservice import Registration, ServiceSpec

# On Windows these commands would really run: their refusals are Linux behaviour.
off_windows = pytest.mark.skipif(sys.platform == "win32", reason="would run sc.exe for real")

EXE = r"C:\Program Files\xon-relay-agent\xon-relay-agent.exe"
PYTHON = r"C:\Program Files\Python311\python.exe"
DATA = r"C:\ProgramData\xon-relay-agent"
WINDOWS_ENV = {"ProgramFiles": r"C:\Program Files", "ProgramFiles(x86)": r"C:\Program Files (x86)"}


def spec(*, data_dir: str = DATA, start: Literal["auto", "delayed-auto"] = "auto",
         frozen: bool = True) -> ServiceSpec:
    program = winservice.agent_program(EXE if frozen else PYTHON, frozen=frozen)
    return ServiceSpec(program=program, data_dir=data_dir, start=start)


def test_program_data_dir_follows_the_environment() -> None:
    """The data dir is %PROGRAMDATA%\\xon-relay-agent, C:\\ProgramData when unset."""
    assert str(winservice.program_data_dir({"PROGRAMDATA": r"D:\Data"})) == \
        r"D:\Data\xon-relay-agent"
    assert str(winservice.program_data_dir({})) == DATA


def test_the_service_runs_the_executable_itself() -> None:
    """A single-file agent registers itself; an agent in a Python registers python -m."""
    assert spec().argv == [EXE, "service", "run", "--data-dir", DATA]
    assert spec(frozen=False).argv == [PYTHON, "-m", "relay_agent", "service", "run",
                                       "--data-dir", DATA]


def test_bin_path_quotes_paths_with_spaces() -> None:
    """The service command line quotes the exe (no unquoted service path) and the data dir."""
    assert spec().bin_path == f'"{EXE}" service run --data-dir {DATA}'
    spaced = spec(data_dir=r"C:\Program Data\agent").bin_path
    assert spaced.endswith(r'--data-dir "C:\Program Data\agent"')


def test_install_commands_set_the_acl_then_create_an_automatic_service() -> None:
    """icacls on the data dir, create (auto start, LocalService), description, restart 5/10/30
    s, failure flag."""
    acl, create, description, failure, flag = winservice.install_commands(spec())
    assert acl == ["icacls", DATA, "/inheritance:r", "/grant:r", "*S-1-5-18:(OI)(CI)F",
                   "/grant:r", "*S-1-5-32-544:(OI)(CI)F", "/grant:r", "*S-1-5-19:(OI)(CI)M"]
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


def test_install_over_an_existing_service_reconfigures_it() -> None:
    """A second install (a new location, another start mode) is sc.exe config, not create,
    with the same options."""
    fresh = winservice.install_commands(spec())
    again = winservice.install_commands(spec(), exists=True)
    assert again[1][:3] == ["sc.exe", "config", "XonRelayAgent"]
    assert again[1][3:] == fresh[1][3:]
    assert again[2:] == fresh[2:]


def test_install_command_line_keeps_sc_syntax() -> None:
    """Joined for cmd.exe, each option is "name= value" and the binPath stays one argument."""
    line = subprocess.list2cmdline(winservice.install_commands(spec(start="delayed-auto"))[1])
    assert line.startswith("sc.exe create XonRelayAgent binPath= ")
    assert "start= delayed-auto" in line
    assert (r'binPath= "\"C:\Program Files\xon-relay-agent\xon-relay-agent.exe\" service run'
            in line)


def test_uninstall_start_and_stop_commands() -> None:
    """uninstall stops then deletes; start and stop are one sc.exe call each."""
    assert winservice.uninstall_commands("Svc") == [["sc.exe", "stop", "Svc"],
                                                    ["sc.exe", "delete", "Svc"]]
    assert winservice.start_commands() == [["sc.exe", "start", "XonRelayAgent"]]
    assert winservice.stop_commands() == [["sc.exe", "stop", "XonRelayAgent"]]


def test_only_a_runtime_failure_triggers_recovery() -> None:
    """Exit 1 fails (restart); 0, 2 (config) and 3 (refused by the relay) stop cleanly."""
    assert winservice.service_outcome(cli.EXIT_FAILURE) == "failed"
    for code in (cli.EXIT_OK, cli.EXIT_CONFIG, cli.EXIT_REFUSED):
        assert winservice.service_outcome(code) == "stopped"


def test_the_executable_must_live_where_only_administrators_write() -> None:
    """Under Program Files (any case) is fine; a profile's Downloads is refused with the
    folder to copy it to."""
    assert winservice.location_problem(EXE, WINDOWS_ENV) is None
    assert winservice.location_problem(EXE.upper(), WINDOWS_ENV) is None
    assert winservice.location_problem(r"C:\Program Files (x86)\a\b.exe", WINDOWS_ENV) is None
    problem = winservice.location_problem(r"C:\Users\it\Downloads\xon-relay-agent.exe",
                                          WINDOWS_ENV)
    assert problem is not None
    assert r"copy it to C:\Program Files\xon-relay-agent" in problem


@given(st.lists(st.text(alphabet=st.sampled_from('ab \\"\t:.'), max_size=8), min_size=1,
                max_size=5))
def test_split_command_line_inverts_list2cmdline(argv: list[str]) -> None:
    """Whatever list2cmdline quotes, the registration reader splits back into the same argv
    (spaces, tabs, quotes, backslashes before quotes, empty arguments)."""
    assert winservice.split_command_line(subprocess.list2cmdline(argv)) == argv


def test_split_command_line_follows_the_c_runtime() -> None:
    """The C runtime's rules, on lines sc.exe or a person may have written."""
    assert winservice.split_command_line(r'"C:\a b\x.exe" service run --data-dir "D:\d e\\"') \
        == [r"C:\a b\x.exe", "service", "run", "--data-dir", "D:\\d e\\"]
    assert winservice.split_command_line('a  "b""c" d') == ["a", 'b"c', "d"]
    assert winservice.split_command_line("  ") == []


def test_registration_names_program_and_data_dir() -> None:
    """The data dir and the program come back from the registered command line."""
    registration = Registration(name="S", image_path=spec(data_dir=r"D:\x y").bin_path,
                                account=winservice.SERVICE_ACCOUNT)
    assert registration.program == EXE
    assert registration.data_dir == r"D:\x y"
    other = Registration(name="S", image_path=r"C:\other.exe --flag", account="LocalSystem")
    assert other.data_dir is None


def test_service_environment_drops_the_users_settings() -> None:
    """The service sees the system-wide proxy and XON_RELAY_* variables, not the admin's."""
    current = {"PATH": "p", "HTTPS_PROXY": "http://mine:8080", "https_proxy": "x",
               "XON_RELAY_AGENT_PROXY": "http://mine:8080", "NO_PROXY": "a", "ALL_PROXY": "b"}
    machine = {"HTTPS_PROXY": "http://office:3128", "Path": "sys", "TEMP": "t"}
    assert winservice.service_environment(current, machine) == {
        "PATH": "p", "HTTPS_PROXY": "http://office:3128"}


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


def test_winservice_does_not_import_the_cli() -> None:
    """No import cycle: the CLI hands the service host the function that runs the agent."""
    source = Path(winservice.__file__).read_text(encoding="utf-8")
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.endswith("cli")}


@off_windows
def test_service_run_refuses_off_windows(capsys: pytest.CaptureFixture[str]) -> None:
    """service run on Linux exits 2 with one line naming the console command."""
    assert cli.main(["service", "run", "--data-dir", "/tmp/x"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run --data-dir /tmp/x" in err


def test_cli_dry_run_prints_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """service install --dry-run prints the plan and the five commands, on any platform."""
    code = cli.main(["service", "install", "--dry-run", "--data-dir", DATA,
                     "--proxy", "http://proxy:3128", "--ca-file", "corp.pem"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    plan = [line for line in lines if line.startswith("#")]
    commands = [line for line in lines if not line.startswith("#")]
    assert any("corp.pem" in line and "ca.pem" in line for line in plan)
    assert [line.split()[:2] for line in commands] == [
        ["icacls", DATA], ["sc.exe", "create"], ["sc.exe", "description"],
        ["sc.exe", "failure"], ["sc.exe", "failureflag"]]
    assert cli.main(["service", "uninstall", "--dry-run", "--name", "Other"]) == 0
    assert capsys.readouterr().out.splitlines() == ["sc.exe stop Other", "sc.exe delete Other"]


@off_windows
def test_cli_service_commands_refuse_off_windows(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    """Without --dry-run on Linux: exit 2, one line pointing at the systemd units, and
    nothing written."""
    for action in ("uninstall", "start", "stop"):
        assert cli.main(["service", action]) == cli.EXIT_CONFIG
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "systemd" in err
    data_dir = tmp_path / "svc"
    assert cli.main(["service", "install", "--data-dir", str(data_dir), "--proxy",
                     "http://p:1"]) == cli.EXIT_CONFIG
    assert "systemd" in capsys.readouterr().err
    assert not data_dir.exists()


# -- the config the service reads ------------------------------------------------------------


def ca_pem(tmp_path: Path) -> Path:
    trustme = pytest.importorskip("trustme")
    path = tmp_path / "corp-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_install_writes_proxy_and_a_copy_of_the_ca_into_the_service_config(
        tmp_path: Path) -> None:
    """The proxy and the CA go into the data dir's config.toml (keeping an enrollment's keys),
    the CA as a copy the service account can read; the config loads."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "config.toml").write_text('relay_url = "https://relay.example"\n'
                                          'agent_id = "agt_1"\n', encoding="utf-8")
    ca = ca_pem(tmp_path)
    path = cli._write_service_settings(data_dir, proxy="http://proxy.office:3128", ca_file=ca)
    config = cli.load(cli.AgentConfig, path=path, env={}, flags={},
                      env_prefix=cli.AGENT_ENV_PREFIX)
    assert config.proxy == "http://proxy.office:3128"
    assert config.ca_file == data_dir / "ca.pem"
    assert (data_dir / "ca.pem").read_bytes() == ca.read_bytes()
    assert config.agent_id == "agt_1" and config.relay_url == "https://relay.example"
    assert config.data_dir == data_dir
    assert "# Base URL of the relay" in path.read_text(encoding="utf-8")
    # '' removes the proxy again; the CA stays.
    cli._write_service_settings(data_dir, proxy="", ca_file=None)
    again = cli.load(cli.AgentConfig, path=path, env={}, flags={},
                     env_prefix=cli.AGENT_ENV_PREFIX)
    assert again.proxy == "" and again.ca_file == data_dir / "ca.pem"


def test_install_refuses_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    """A file that holds no certificate is refused (exit 2) before anything is written."""
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello", encoding="utf-8")
    data_dir = tmp_path / "data"
    with pytest.raises(cli._Fail) as failure:
        cli._write_service_settings(data_dir, proxy=None, ca_file=bad)
    assert failure.value.exit_code == cli.EXIT_CONFIG
    assert not data_dir.exists()


# -- doctor --service ----------------------------------------------------------------------------


class FakeRegistry:
    """Stands in for the Windows registry, which Linux has not."""

    def __init__(self, registration: Registration | None, machine: dict[str, str]) -> None:
        self.registration = registration
        self.machine = machine

    def service(self, name: str) -> Registration | None:
        if self.registration is None or self.registration.name != name:
            return None
        return self.registration

    def machine_environment(self) -> dict[str, str]:
        return self.machine


def registered(program: Path, data_dir: Path) -> Registration:
    argv = [str(program), "service", "run", "--data-dir", str(data_dir)]
    return Registration(name=winservice.SERVICE_NAME, image_path=subprocess.list2cmdline(argv),
                        account=winservice.SERVICE_ACCOUNT)


def doctor_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str]]:
    code = cli.main(["doctor", "--json", "--timeout", "1", *args])
    out = json.loads(capsys.readouterr().out)
    return code, {c["check"]: f"{c['status']} {c['detail']}" for c in out["checks"]}


def test_doctor_service_reads_the_registered_data_dir_and_the_system_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """doctor --service checks the config in the service's data dir (not the admin's), with
    the system-wide proxy variables (not the admin's own)."""
    data_dir = tmp_path / "service-data"
    data_dir.mkdir()
    (data_dir / "config.toml").write_text('relay_url = "https://relay.example"\n',
                                          encoding="utf-8")
    program = Path(sys.executable)
    registry = FakeRegistry(registered(program, data_dir),
                            {"HTTPS_PROXY": "http://127.0.0.1:9"})
    monkeypatch.setattr(winservice, "windows_registry", lambda: registry)
    monkeypatch.setenv("ProgramFiles", str(program.parent))
    # The administrator's own settings, which the service does not see.
    monkeypatch.setenv("XON_RELAY_AGENT_LISTEN", "127.0.0.1:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.2:9")
    code, checks = doctor_json(capsys, "--service")
    assert code == cli.EXIT_FAILURE  # not enrolled
    assert checks["service"] == (f"ok XonRelayAgent runs {program} as "
                                 f"{winservice.SERVICE_ACCOUNT}, data in {data_dir}")
    assert checks["config"] == f"ok loaded {data_dir / 'config.toml'}"
    assert checks["enrollment"].startswith("fail not enrolled")
    assert "127.0.0.1:8765" in checks["local_port"]  # the file's default, not the admin's
    assert "127.0.0.1:9" in checks["proxy"] and "127.0.0.2" not in checks["proxy"]


def test_doctor_service_fails_when_the_service_cannot_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Not installed: exit 1, one line; a registered program that is gone: a fail line."""
    monkeypatch.setattr(winservice, "windows_registry", lambda: FakeRegistry(None, {}))
    assert cli.main(["doctor", "--service"]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "service install" in err
    gone = registered(tmp_path / "moved.exe", tmp_path / "data")
    monkeypatch.setattr(winservice, "windows_registry", lambda: FakeRegistry(gone, {}))
    code, checks = doctor_json(capsys, "--service")
    assert code == cli.EXIT_FAILURE
    assert checks["service"].startswith("fail ") and "does not exist" in checks["service"]


@off_windows
def test_doctor_service_refuses_off_windows_and_with_a_data_dir(
        capsys: pytest.CaptureFixture[str]) -> None:
    """On Linux --service exits 2 with one line; with --data-dir it is a usage error."""
    assert cli.main(["doctor", "--service"]) == cli.EXIT_CONFIG
    assert "Windows service registration" in capsys.readouterr().err
    assert cli.main(["doctor", "--service", "--data-dir", "/tmp/x"]) == cli.EXIT_CONFIG
    assert "neither" in capsys.readouterr().err
