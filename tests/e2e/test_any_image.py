"""Any image runs a real agent: a plain Debian image (debootstrap, no `agent` user, no
/workspace) runs the real Claude Code (mounted from the host) as an unprivileged user the server
adds, against the scripted model server, with a real Bash tool call in the container."""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest

from tests.e2e.harness import ToolCallError, docker_exec, mcp_server, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

DEBIAN_IMAGE = "mcp-sandboxes/debian:bookworm"
PROBE = "id -un && pwd && echo made > made.txt && echo any-image-ok"


async def test_claude_code_runs_in_a_plain_debian_image_that_has_no_agent_user(
    tmp_path: Path, claude_bin: Path
) -> None:
    # The image really lacks the user: the server, not the image, provides it.
    assert "no such user" in id_of_agent_in_the_bare_image()
    script = Script(fallback=Reply(text="ok"))
    script.on(user_contains="ANY-IMAGE", reply=Reply(tool_calls=[ToolCall(name="Bash", arguments={"command": PROBE})]))
    script.on(tool_result_contains="any-image-ok", reply=Reply(text="DONE-ANY"))
    with ScriptedModelServer(script) as model:
        environment = server_environment(
            tmp_path / "data",
            model.url,
            claude_bin,
            {"MCP_SANDBOXES_WORKSPACES__ALLOWED_ROOTS": str(tmp_path / "projects")},
        )
        async with mcp_server("stdio", environment) as mcp:
            await mcp.call(
                "create_environment", {"name": "debian", "image": DEBIAN_IMAGE, "network": "host", "memory_mb": 2048}
            )
            done = await mcp.call(
                "spawn_agent",
                {
                    "environment": "debian",
                    "prompt": "ANY-IMAGE: who are you",
                    "permission_mode": "bypassPermissions",
                    "wait": True,
                    "timeout_s": 90,
                },
            )
            assert done["completed"] and "DONE-ANY" in (done["final_message"] or ""), done
            session_id = done["session"]["session_id"]
            events = await mcp.call("read_events", {"session_id": session_id, "types": ["agent.tool_result"]})
            output = str(events["events"][0]["data"]["content"])
            assert "agent" in output and "/workspace" in output and "any-image-ok" in output, output
            container = done["session"]["sandbox_id"]
            assert docker_exec(container, "stat", "-c", "%U", "/workspace/made.txt").strip() == "agent"
            assert docker_exec(container, "id", "-u", "agent").strip() != "0"
            await mcp.call("stop_session", {"session_id": session_id})

            # A git workspace needs git in the image: this one has none, and the spawn says so.
            repo = tmp_path / "projects" / "repo"
            repo.mkdir(parents=True)
            await anyio.run_process(["git", "init", "--quiet", str(repo)])
            await mcp.call(
                "create_environment",
                {"name": "debian-git", "image": DEBIAN_IMAGE, "workspace": {"kind": "git", "url": str(repo)}},
            )
            with pytest.raises(ToolCallError, match="workspace: a git workspace needs git"):
                await mcp.call("spawn_agent", {"environment": "debian-git", "prompt": "ANY-IMAGE"})


def id_of_agent_in_the_bare_image() -> str:
    completed = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", DEBIAN_IMAGE, "id", "agent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return completed.stderr
