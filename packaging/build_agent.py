"""Build the single-file agent, ``dist/xon-relay-agent`` (``.exe`` on Windows): ``make agent-exe``.

    python packaging/build_agent.py [--force]

Runs PyInstaller on packaging/agent.spec for the platform it runs on, then writes
``dist/xon-relay-agent[.exe].sha256`` (``sha256sum`` format) beside it. A build whose inputs
have not changed is skipped: the inputs are the agent's sources (``relay_agent/``,
``shared/``), the spec and entry files, ``pyproject.toml``, the Python version and every
installed distribution's version; their digest is kept in ``build/agent-exe.stamp`` with the
executable's own digest, so a changed source, an upgraded library or a replaced executable all
rebuild. Prints one line: the path, its size, its SHA-256 and the build time (or "up to date").
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "packaging" / "agent.spec"
DIST = ROOT / "dist"
WORK = ROOT / "build" / "pyinstaller"
STAMP = ROOT / "build" / "agent-exe.stamp"
NAME = "xon-relay-agent"
SOURCES = ("relay_agent", "shared")
FILES = ("packaging/agent.spec", "packaging/agent_entry.py", "pyproject.toml")


def executable_path() -> Path:
    return DIST / (NAME + (".exe" if sys.platform == "win32" else ""))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inputs_digest() -> str:
    """What the executable is made of: source files, build files, interpreter, libraries."""
    digest = hashlib.sha256()
    paths = [ROOT / name for name in FILES]
    for package in SOURCES:
        paths += sorted(p for p in (ROOT / package).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
    for path in paths:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    installed = sorted(f"{d.metadata['Name']}=={d.version}"
                       for d in importlib.metadata.distributions())
    digest.update(json.dumps([sys.version, platform.machine(), installed]).encode())
    return digest.hexdigest()


def up_to_date(exe: Path, inputs: str) -> bool:
    try:
        stamp = json.loads(STAMP.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(stamp, dict) and stamp.get("inputs") == inputs and exe.exists()
            and stamp.get("sha256") == file_digest(exe))


def build() -> None:
    # The process's own Python runs PyInstaller, so the executable holds exactly the
    # libraries installed beside it (the [build] extra brings PyInstaller).
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean",
                    "--log-level", "WARN", "--distpath", str(DIST), "--workpath", str(WORK),
                    str(SPEC)], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build even when up to date")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("PyInstaller") is None:
        print(f"build_agent: PyInstaller is not installed in {sys.executable}: "
              "pip install -e '.[build]'", file=sys.stderr)
        return 2
    exe = executable_path()
    inputs = inputs_digest()
    if not args.force and up_to_date(exe, inputs):
        print(f"{exe.relative_to(ROOT)} is up to date")
        return 0
    started = time.monotonic()
    try:
        build()
    except subprocess.CalledProcessError as exc:
        print(f"build_agent: PyInstaller failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    sha256 = file_digest(exe)
    exe.with_name(exe.name + ".sha256").write_text(f"{sha256}  {exe.name}\n", encoding="utf-8")
    STAMP.write_text(json.dumps({"inputs": inputs, "sha256": sha256}), encoding="utf-8")
    size = exe.stat().st_size / 1e6
    print(f"built {exe.relative_to(ROOT)}: {size:.1f} MB, sha256 {sha256}, in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
