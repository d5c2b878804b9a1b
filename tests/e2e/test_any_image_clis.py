"""Every backend's CLI reaches any image with nothing configured: no `cli_path`, a plain Debian
image (debootstrap, no agent CLI, no node, no `agent` user) runs the real Claude Code, Codex and
Gemini CLI from the server's own installation (mounted read-only under /opt/mcp-sandboxes/tools),
each calling its shell tool in the container against the scripted model. A busybox image, which
has no glibc, is refused at spawn with the reason, and no container is left."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import BUSYBOX_IMAGE
from tests.e2e.backend_cases import BackendCase, discover_cases
from tests.e2e.harness import ToolCallError, docker_exec, mcp_server, owned_containers, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

DEBIAN_IMAGE = "mcp-sandboxes/debian:bookworm"
BACKENDS = ("claude", "codex", "gemini")
CASES = [replace(case, image=DEBIAN_IMAGE) for case in discover_cases() if case.backend in BACKENDS]


def _bare_environment(tmp_path: Path, case: BackendCase, model_url: str) -> dict[str, str]:
    """The server's environment with no CLI configured for any backend."""
    env = server_environment(tmp_path / "data", model_url, Path("/nonexistent"))
    env.pop("MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH")
    env.pop("ANTHROPIC_BASE_URL")
    env.update(case.server_env(model_url))
    return env


def _image_lacks(image: str, program: str) -> bool:
    completed = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", image, "sh", "-c", f"command -v {program}"],
        capture_output=True,
        timeout=60,
    )
    return completed.returncode != 0


@pytest.mark.parametrize("case", CASES, ids=[c.backend for c in CASES])
async def test_a_plain_debian_image_runs_the_cli_from_the_host_with_nothing_configured(
    case: BackendCase, tmp_path: Path
) -> None:
    executable = {"claude": "claude", "codex": "codex", "gemini": "gemini"}[case.backend]
    # The image really has neither the CLI nor node: the server brings them.
    assert _image_lacks(DEBIAN_IMAGE, executable) and _image_lacks(DEBIAN_IMAGE, "node")
    script = Script(fallback=Reply(text="ok"))
    script.on(
        user_contains="PLAIN-IMAGE",
        reply=Reply(tool_calls=[case.shell_call(f"id -un && echo {case.backend}-plain > plain.txt && cat plain.txt")]),
    )
    script.on(tool_result_contains=f"{case.backend}-plain", reply=Reply(text="DONE-PLAIN"))
    with ScriptedModelServer(script, vendors=list(case.vendors)) as model:
        async with mcp_server("stdio", _bare_environment(tmp_path, case, model.url)) as mcp:
            await mcp.call("create_environment", {"name": "plain", "image": DEBIAN_IMAGE, "network": "host"})
            done = await mcp.call(
                "spawn_agent",
                {
                    "environment": "plain",
                    "backend": case.backend,
                    "prompt": "PLAIN-IMAGE: write plain.txt with the shell",
                    "wait": True,
                    "timeout_s": 90,
                    **case.spawn_args,
                },
            )
            assert done["completed"] and "DONE-PLAIN" in (done["final_message"] or ""), done
            container = done["session"]["sandbox_id"]
            assert docker_exec(container, "cat", "/workspace/plain.txt").strip() == f"{case.backend}-plain"
            # The CLI that ran is the host's, mounted read-only beside the image's own PATH.
            mounts = docker_exec(container, "sh", "-c", "grep ' /opt/mcp-sandboxes/tools' /proc/mounts")
            assert " ro," in mounts, mounts
            assert not script.misses, script.misses
            await mcp.call("stop_session", {"session_id": done["session"]["session_id"]})


async def test_a_busybox_image_is_refused_with_the_reason_and_nothing_is_left(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.backend == "claude")
    before = owned_containers()
    with ScriptedModelServer(Script(fallback=Reply(text="never"))) as model:
        async with mcp_server("stdio", _bare_environment(tmp_path, case, model.url)) as mcp:
            await mcp.call("create_environment", {"name": "tiny", "image": BUSYBOX_IMAGE, "network": "host"})
            with pytest.raises(ToolCallError) as refused:
                await mcp.call("spawn_agent", {"environment": "tiny", "prompt": "hello"})
            message = str(refused.value)
            assert f"image '{BUSYBOX_IMAGE}' cannot run the claude CLI" in message, message
            assert "no glibc loader /lib64/ld-linux-x86-64.so.2" in message, message
            assert "use an image with glibc" in message, message
            assert (await mcp.call("list_sessions", {}))["sessions"] == []
        assert not model.requests_containing("hello")
    assert owned_containers() == before
