"""deploy/: the files parse and keep the properties the deployment guide promises.

No Docker engine or systemd is needed; `systemd-analyze verify` is used when present.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose" / "single"
UNITS = {
    "server": DEPLOY / "systemd" / "xon-relay-server.service",
    "agent": DEPLOY / "systemd" / "xon-relay-agent.service",
    "user": DEPLOY / "systemd" / "user" / "xon-relay-agent.service",
}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section → key → values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_dockerfile_runs_the_relay_as_a_non_root_user() -> None:
    """python:3.11-slim, USER not root, /data volume, port 8080, the documented CMD."""
    stage = final_stage()
    words = dict(stage)
    assert words["FROM"] == "python:3.11-slim"
    user = words["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert "/data" in words["VOLUME"] and words["EXPOSE"] == "8080"
    cmd = json.loads(words["CMD"])
    assert cmd == ["xon-relay-server", "run", "--listen", "0.0.0.0:8080", "--admin-listen",
                   "127.0.0.1:8081", "--data-dir", "/data"]
    assert [w for w, _ in stage].index("USER") < [w for w, _ in stage].index("CMD")


def test_dockerfile_healthcheck_is_valid_python_on_healthz() -> None:
    """The HEALTHCHECK runs python -c (no curl in slim) against /healthz; the code compiles."""
    check = dict(final_stage())["HEALTHCHECK"]
    argv = json.loads(check[check.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"]
    assert "/healthz" in argv[2] and "127.0.0.1:8080" in argv[2]
    compile(argv[2], "healthcheck", "exec")


def test_docker_context_allows_what_the_build_copies() -> None:
    """Every path the Dockerfile COPYs exists and is allowed by the dockerignore allow-list."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for word, args in dockerfile_instructions():
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source in allowed, source
                assert (REPO / source).exists(), source


def test_compose_publishes_only_the_tls_proxy() -> None:
    """The relay keeps a data volume and publishes nothing; Caddy publishes 80/443."""
    text = (COMPOSE / "compose.yaml").read_text(encoding="utf-8")
    assert "8081" not in text
    assert "relay-data:/data" in text
    assert "reverse_proxy relay:8080" in (COMPOSE / "Caddyfile").read_text(encoding="utf-8")


@pytest.mark.skipif(importlib.util.find_spec("yaml") is None, reason="PyYAML not installed")
def test_compose_parses_as_yaml() -> None:
    """The compose file is YAML with the relay and caddy services and the named volumes."""
    import yaml  # type: ignore[import-untyped,unused-ignore]

    data = yaml.safe_load((COMPOSE / "compose.yaml").read_text(encoding="utf-8"))
    relay, caddy = data["services"]["relay"], data["services"]["caddy"]
    assert "ports" not in relay and relay["build"]["dockerfile"] == "deploy/Dockerfile"
    assert set(caddy["ports"]) == {"80:80", "443:443"}
    assert {"relay-data", "caddy-data", "caddy-config"} <= set(data["volumes"])


@pytest.mark.skipif(importlib.util.find_spec("yaml") is None, reason="PyYAML not installed")
def test_shipped_proxies_are_trusted_for_x_forwarded_for() -> None:
    """Each compose file trusts exactly its network's range (where Caddy is) and Kubernetes
    trusts a range with a NetworkPolicy that admits only the ingress controller; every value
    is one the relay's config accepts (docs/deployment.md, The client behind a proxy)."""
    import yaml  # type: ignore[import-untyped,unused-ignore]

    from shared.config import LimitsConfig

    def default(value: str) -> str:  # "${VAR:-x}" as compose expands it with VAR unset
        match = re.fullmatch(r"\$\{\w+:-(.+)\}", value)
        return match.group(1) if match else value

    for name, services in (("single", ["relay"]), ("ha", ["relay-a", "relay-b"])):
        data = yaml.safe_load((DEPLOY / "compose" / name / "compose.yaml").read_text("utf-8"))
        (subnet,) = [default(c["subnet"]) for c in data["networks"]["default"]["ipam"]["config"]]
        for service in services:
            trusted = default(data["services"][service]["environment"][
                "XON_RELAY_LIMITS_TRUSTED_PROXIES"])
            assert trusted == subnet, (name, service)
            LimitsConfig(trusted_proxies=trusted.split(","))
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "relay.yaml").read_text("utf-8")))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    LimitsConfig(trusted_proxies=env["XON_RELAY_LIMITS_TRUSTED_PROXIES"].split(","))
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"] == deployment["spec"]["selector"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]


def test_systemd_units_have_the_expected_sections() -> None:
    """Unit, Service and Install in every unit; ExecStart runs the right command."""
    for name, path in UNITS.items():
        sections = unit(path)
        assert {"Unit", "Service", "Install"} <= set(sections), name
        (exec_start,) = sections["Service"]["ExecStart"]
        command = "xon-relay-server run" if name == "server" else "xon-relay-agent run"
        assert command in exec_start, name


def test_relay_unit_is_hardened() -> None:
    """The relay runs as a dynamic user in its state directory, locked down."""
    service = unit(UNITS["server"])["Service"]
    expected = {"DynamicUser": "yes", "StateDirectory": "xon-relay", "NoNewPrivileges": "yes",
                "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes"}
    for key, value in expected.items():
        assert service[key] == [value], key
    assert "--data-dir %S/xon-relay" in service["ExecStart"][0]
    assert service["CapabilityBoundingSet"] == [""]


def test_agent_units_do_not_restart_a_refused_agent() -> None:
    """Exit 3 (revoked/unknown) and 2 (config) stop the agent for good; failures restart."""
    for name in ("agent", "user"):
        service = unit(UNITS[name])["Service"]
        assert service["Restart"] == ["on-failure"]
        assert set(service["RestartPreventExitStatus"][0].split()) == {"2", "3"}
    assert unit(UNITS["agent"])["Service"]["User"] == ["xon-relay-agent"]
    assert unit(UNITS["user"])["Install"]["WantedBy"] == ["default.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_system_units_pass_systemd_analyze(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the system units (with a stand-in executable)."""
    for name in ("server", "agent"):
        path = tmp_path / UNITS[name].name
        path.write_text(re.sub(r"/opt/xon-relay/bin/xon-relay-\w+", "/bin/true",
                               UNITS[name].read_text(encoding="utf-8")))
        done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0 and "Failed to initialize manager" in done.stderr:
            pytest.skip("systemd-analyze cannot run here")
        assert done.returncode == 0, done.stderr


def test_windows_script_wraps_the_executable() -> None:
    """The PowerShell script only runs the executable's own commands: service install (with
    the proxy and CA), enroll, service start and doctor --service; no Python, no sc.exe."""
    text = (DEPLOY / "windows" / "install-agent-service.ps1").read_text(encoding="utf-8")
    for needle in ("$env:ProgramData", "xon-relay-agent.exe", '"service", "install"',
                   '"--proxy"', '"--ca-file"', "& $Exe enroll", "service start",
                   "doctor --service", "$LASTEXITCODE"):
        assert needle in text, needle
    for absent in ("python", "sc.exe", "relay_agent"):
        assert absent not in text.lower(), absent
    assert text.count("{") == text.count("}") and text.count("(") == text.count(")")


def test_deployment_guide_documents_the_docker_build() -> None:
    """docs/deployment.md gives the build command matching the Dockerfile's location."""
    guide = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert "docker build -f deploy/Dockerfile" in guide
    for topic in ("TLS", "ingress URL", ".backup", "WAL", "Upgrad", "Windows", "systemd"):
        assert topic in guide, topic
