"""packaging/ and .github/workflows/: the floors constraints and the release workflows keep what
docs/install-agent.md promises."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"


def lowest_constraints() -> ModuleType:
    # By path: the folder is not a package, and its name would shadow PyPI's "packaging".
    spec = importlib.util.spec_from_file_location(
        "lowest_constraints", REPO / "packaging" / "lowest_constraints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project(dependencies: list[str], **extras: list[str]) -> dict[str, Any]:
    return {"project": {"name": "xon-relay", "dependencies": dependencies,
                        "optional-dependencies": extras}}


def test_floors_become_exact_pins_with_their_markers() -> None:
    """name>=X (with extras, an upper bound or a marker) pins name==X and keeps the marker."""
    module = lowest_constraints()
    assert module.pin("aiohttp>=3.14") == "aiohttp==3.14"
    assert module.pin("uvicorn[standard] >= 0.30, <1") == "uvicorn==0.30"
    assert module.pin("pywin32>=306; sys_platform == 'win32'") == \
        "pywin32==306; sys_platform == 'win32'"


def test_extras_are_followed_through_the_project_itself() -> None:
    """--extra pins that extra's requirements, and the extras it names as xon-relay[...]."""
    module = lowest_constraints()
    data = project(["a>=1"], fast=["b>=2"], dev=["xon-relay[fast]", "c>=3"], other=["d>=4"])
    assert module.lowest_constraints(data, ["dev"]) == ["a==1", "b==2", "c==3"]


def test_a_requirement_without_a_floor_is_refused() -> None:
    """Nothing would say which release the tests proved: no floor, or two, is an error."""
    module = lowest_constraints()
    for requirement in ("a", "a<2", "a>=1,>=2", "a==1"):
        with pytest.raises(module.FloorError):
            module.lowest_constraints(project([requirement]), [])
    with pytest.raises(module.FloorError, match="no extra named 'nope'"):
        module.lowest_constraints(project([]), ["nope"])


def test_the_projects_floors_are_all_pinned() -> None:
    """Every runtime requirement of pyproject.toml, and of the redis and fast extras, has a
    floor and appears in the constraints make test-floors installs."""
    module = lowest_constraints()
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    lines = module.lowest_constraints(data, ["redis", "fast"])
    names = {line.split("==")[0] for line in lines}
    assert {"aiohttp", "websockets", "truststore", "redis", "uvloop"} <= names
    assert "truststore==0.9.0" not in lines  # yanked
    assert all("==" in line for line in lines)
    assert "pyinstaller" not in {n.lower() for n in names}  # a build tool, not a runtime floor


def steps(job: dict[str, Any]) -> str:
    return "\n".join(f"{step.get('run', '')}{step.get('uses', '')}{step.get('with', '')}"
                     for step in job["steps"])


def test_windows_workflow_builds_tests_and_publishes_the_exe() -> None:
    """On windows-latest: the same build script and spec, the unit tests, the smoke tests
    (--help, init, doctor --json), the artifact with its SHA-256, and the service job."""
    flow = yaml.safe_load((WORKFLOWS / "agent-windows.yml").read_text(encoding="utf-8"))
    build = flow["jobs"]["build"]
    assert build["runs-on"] == "windows-latest"
    text = steps(build)
    for needle in ("packaging/build_agent.py", "pytest tests/unit", "--help", "init --data-dir",
                   "doctor --data-dir $data --json", "dist/xon-relay-agent.exe.sha256",
                   "actions/upload-artifact"):
        assert needle in text, needle
    service = steps(flow["jobs"]["service"])
    for needle in ("service install", "service start", "doctor --service", "service uninstall"):
        assert needle in service, needle


def test_floors_workflow_runs_make_test_floors_with_redis() -> None:
    """The floors job runs the make target, with the Redis the redis-marked tests need."""
    flow = yaml.safe_load((WORKFLOWS / "floors.yml").read_text(encoding="utf-8"))
    job = flow["jobs"]["floors"]
    assert "make test-floors" in steps(job)
    assert "redis" in job["services"]
