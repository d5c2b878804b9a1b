"""`mcp-sandboxes doctor` as a user runs it: real providers, real images, the real environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import BASE_IMAGE, ROOT

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_available")]


def run_doctor(*args: str, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "MCP_SANDBOXES_"))}
    completed = subprocess.run(
        [sys.executable, "-m", "mcp_sandboxes", "doctor", "--json", *args],
        env={**base, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    return completed.returncode, json.loads(completed.stdout)


def test_doctor_reports_providers_backends_keys_and_clis_per_image() -> None:
    code, report = run_doctor("--image", BASE_IMAGE, "--image", "mcp-sandboxes/agent:latest", env={})
    assert code == 0
    providers = {p["provider"]: p for p in report["providers"]}
    assert providers["docker"]["available"] is True
    assert providers["apple"]["available"] is False and "macOS" in providers["apple"]["reason"]
    assert providers["e2b"]["available"] is False and "E2B_API_KEY" in providers["e2b"]["reason"]
    claude = next(b for b in report["backends"] if b["backend"] == "claude")
    assert claude["missing_env"] == ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"]
    images = {i["image"]: i["cli_found"] for i in report["images"]}
    assert images[BASE_IMAGE]["claude"] is False
    assert images["mcp-sandboxes/agent:latest"]["claude"] is True


def test_doctor_is_satisfied_by_one_api_key_and_names_an_unreachable_engine() -> None:
    code, report = run_doctor(
        "--image",
        BASE_IMAGE,
        env={"ANTHROPIC_API_KEY": "sk-test", "MCP_SANDBOXES_PROVIDERS__DOCKER__URL": "unix:///nonexistent.sock"},
    )
    claude = next(b for b in report["backends"] if b["backend"] == "claude")
    assert claude["missing_env"] == []
    docker = next(p for p in report["providers"] if p["provider"] == "docker")
    assert docker["available"] is False and "dockerd" in (docker["reason"] or "") + (docker["fix"] or "")
    # The default provider is down, so no image could be looked into.
    assert report["images"] == []
    # Other providers (bubblewrap) still work here, but the configured default does not: that fails.
    assert code == 1 and any("default provider 'docker' cannot work" in p for p in report["problems"])


def test_doctor_probes_every_registered_backends_executable_a_custom_one_as_an_argument() -> None:
    # custom's program is its command's argv[0], from config: looked for as an argument, never run.
    configured = {"MCP_SANDBOXES_BACKENDS__CUSTOM__ARGV": json.dumps(["sh", "-c", 'echo "$1"', "sh", "{prompt}"])}
    code, report = run_doctor("--image", BASE_IMAGE, env=configured)
    assert code == 0
    executables = {b["backend"]: b["executable"] for b in report["backends"]}
    assert executables == {
        "claude": "claude",
        "codex": "codex",
        "custom": "sh",
        "factory": "droid",
        "gemini": "gemini",
        "opencode": "opencode",
    }
    (image,) = report["images"]
    assert image["cli_found"] == {name: name == "custom" for name in executables}

    hostile = {"MCP_SANDBOXES_BACKENDS__CUSTOM__ARGV": json.dumps(["sh; echo claude; echo sh #", "{prompt}"])}
    _, report = run_doctor("--image", BASE_IMAGE, env=hostile)
    custom = next(b for b in report["backends"] if b["backend"] == "custom")
    assert custom["executable"] == "sh; echo claude; echo sh #"
    (image,) = report["images"]
    assert image["cli_found"]["custom"] is False and image["cli_found"]["claude"] is False


def test_doctor_exits_non_zero_when_the_default_provider_or_a_configured_backend_cannot_work(tmp_path: Any) -> None:
    code, report = run_doctor("--image", BASE_IMAGE, env={"MCP_SANDBOXES_DEFAULT_PROVIDER": "apple"})
    assert code == 1
    assert any("default provider 'apple' cannot work" in problem for problem in report["problems"])
    missing = str(tmp_path / "no-such-claude")
    code, report = run_doctor("--image", BASE_IMAGE, env={"MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH": missing})
    assert code == 1
    assert any("backend 'claude' is configured but cannot work" in problem for problem in report["problems"])


def test_doctor_reports_whether_network_model_can_work(tmp_path: Any) -> None:
    data = {"MCP_SANDBOXES_DATA_DIR": str(tmp_path / "data")}
    code, report = run_doctor("--image", BASE_IMAGE, env=data)
    assert report["egress_forwarder"] and os.access(report["egress_forwarder"], os.X_OK), report
    assert report["egress_problem"] is None
    # No compiler and no prebuilt forwarder: the default network of the default provider cannot work.
    code, report = run_doctor("--image", BASE_IMAGE, env={**data, "CC": "/nonexistent/cc"} | {
        "MCP_SANDBOXES_DATA_DIR": str(tmp_path / "other")})  # fmt: skip
    assert code == 1 and report["egress_forwarder"] is None
    assert any("network 'model' (the default for docker) cannot work" in p for p in report["problems"]), report
