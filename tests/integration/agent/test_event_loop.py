"""``xon-relay-agent run`` on the event loop XON_RELAY_EVENT_LOOP picks (shared/aio.py, issue 7).

The agent's ``auto`` is asyncio's loop (uvloop would cost its idle RSS ~2 MB, bench 5);
``uvloop`` still selects uvloop, and an unknown value is a configuration error (exit 2).
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from shared import crypto
from tests.helpers.timing import MS

from .support import REPO, agent_command, agent_env, agent_process

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def write_agent(data_dir: Path) -> Path:
    """An enrolled-looking agent (its relay is never reached: the loop is picked before)."""
    data_dir.mkdir(mode=0o700)
    (data_dir / "agent.key").write_bytes(crypto.private_key_to_pem(crypto.generate_private_key()))
    (data_dir / "local-token").write_text("t\n")
    config = data_dir / "config.toml"
    config.write_text(
        f'relay_url = "http://127.0.0.1:9"\nagent_id = "a"\nrelay_id = "r"\n'
        f'data_dir = "{data_dir}"\nlisten = "127.0.0.1:0"\nlog_level = "debug"\n'
    )
    return config


@pytest.mark.parametrize(
    "value, loop",
    [
        ("", "asyncio"),
        ("auto", "asyncio"),
        pytest.param(
            "uvloop",
            "uvloop",
            marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"),
        ),
    ],
)
async def test_agent_runs_on_asyncio_unless_told_uvloop(
    tmp_path: Path, value: str, loop: str
) -> None:
    """Unset or ``auto``: asyncio's loop; ``uvloop``: uvloop (the DEBUG start-up line)."""
    config = write_agent(tmp_path / "agent")
    env = agent_env(**({"XON_RELAY_EVENT_LOOP": value} if value else {}))
    async with agent_process(
        "--config",
        str(config),
        data_dir=tmp_path / "agent",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    ) as proc:
        pass
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    lines = [line for line in err.splitlines() if "event_loop.selected" in line]
    assert len(lines) == 1 and f"loop={loop}" in lines[0], err


async def test_unknown_loop_is_a_one_line_config_error(tmp_path: Path) -> None:
    """Exit 2 (configuration, as the relay), one line naming the variable, no traceback."""
    config = write_agent(tmp_path / "agent")
    proc = await asyncio.create_subprocess_exec(
        *agent_command("run", "--config", str(config)),
        cwd=REPO,
        env=agent_env(XON_RELAY_EVENT_LOOP="fastest"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20_000 * MS)
    text = err.decode()
    assert proc.returncode == 2, text
    assert "Traceback" not in text and not (tmp_path / "agent" / "agent.json").exists()
    errors = [line for line in text.splitlines() if "XON_RELAY_EVENT_LOOP" in line]
    assert len(errors) == 1 and "'fastest'" in errors[0], text
