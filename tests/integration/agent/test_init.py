"""``xon-relay-agent init``: a commented config with every setting, that loads as written."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import stat
from pathlib import Path

import pytest

from relay_agent import cli
from relay_agent.configfile import render_config
from shared.config import AGENT_ENV_PREFIX, AgentConfig, load

from .support import RelayUnderTest


def load_file(path: Path) -> AgentConfig:
    return load(AgentConfig, path=path, env={}, flags={}, env_prefix=AGENT_ENV_PREFIX)


def setting_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_init_writes_a_config_that_loads_as_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file loads to the defaults (data dir aside) and is readable by its owner only."""
    data_dir = tmp_path / "agent"
    assert cli.main(["init", "--data-dir", str(data_dir)]) == 0
    path = data_dir / "config.toml"
    assert f"wrote {path}" in capsys.readouterr().out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_file(path) == AgentConfig(data_dir=data_dir.resolve())


def test_init_lists_every_setting_with_a_comment(tmp_path: Path) -> None:
    """Each AgentConfig field, in its table for sections, appears once under a comment."""
    assert cli.main(["init", "--data-dir", str(tmp_path)]) == 0
    lines = (tmp_path / "config.toml").read_text().splitlines()
    written: list[str] = []
    section = ""
    for i, line in enumerate(lines):
        if re.match(r"^\[([a-z_]+)\]$", line):
            section = line[1:-1] + "."
        match = re.match(r"^(?:# )?([a-z_]+) = ", line)
        if match:
            written.append(section + match.group(1))
            assert lines[i - 1].startswith("# ") and " = " not in lines[i - 1], line
    expected: list[str] = []
    defaults = AgentConfig()
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            expected += [f"{f.name}.{name}" for name in setting_names(type(value))]
        else:
            expected.append(f.name)
    assert sorted(written) == sorted(expected)


def test_init_defaults_load_when_uncommented(tmp_path: Path) -> None:
    """Uncommenting every "# name = default" line gives a valid config with the same values."""
    assert cli.main(["init", "--data-dir", str(tmp_path)]) == 0
    path = tmp_path / "config.toml"
    text = re.sub(r"(?m)^# ([a-z_]+ = )", r"\1", path.read_text())
    path.write_text(text)
    assert load_file(path) == AgentConfig(data_dir=tmp_path.resolve())


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second init fails in one line and leaves the file alone; --force keeps its settings."""
    path = tmp_path / "config.toml"
    assert cli.main(["init", "--data-dir", str(tmp_path)]) == 0
    edited = path.read_text().replace('# listen = "127.0.0.1:8765"', 'listen = "127.0.0.1:9911"')
    path.write_text(edited)
    capsys.readouterr()

    assert cli.main(["init", "--data-dir", str(tmp_path)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert path.read_text() == edited

    assert cli.main(["init", "--data-dir", str(tmp_path), "--force"]) == 0
    assert load_file(path).listen == "127.0.0.1:9911"


def test_render_keeps_section_values_and_writes_none_as_text() -> None:
    """Section values are live keys of their table; None is written as "none"."""
    text = render_config({"retention_max_age": None, "link": {"window": 8}})
    assert 'retention_max_age = "none"' in text
    assert re.search(r"(?ms)^\[link\]$.*^window = 8$", text)


async def test_enroll_after_init_keeps_the_commented_file(
    tmp_path: Path, relay: RelayUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """init then enroll needs no --force; the result has the comments, the edits and the ids."""
    data_dir = tmp_path / "agent"
    assert cli.main(["init", "--data-dir", str(data_dir)]) == 0
    path = data_dir / "config.toml"
    path.write_text(path.read_text().replace("# max_wait = 60.0", "max_wait = 5.0")
                    .replace('# listen = "127.0.0.1:8765"', 'listen = "127.0.0.1:0"'))
    agent_id, code = await relay.new_code()
    argv = ["enroll", "--relay", relay.url, "--code", code, "--data-dir", str(data_dir)]
    assert await asyncio.to_thread(cli.main, argv) == 0, capsys.readouterr().err
    text = path.read_text()
    assert f'agent_id = "{agent_id}"' in text and "# backoff_max = 30.0" in text
    config = load_file(path)
    assert (config.agent_id, config.max_wait, config.listen) == (agent_id, 5.0, "127.0.0.1:0")
    assert config.relay_id == relay.services.relay_id
