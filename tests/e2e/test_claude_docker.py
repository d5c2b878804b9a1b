"""The spine, end to end with real parts: the `mcp` SDK client -> our server (subprocess, stdio
or streamable HTTP) -> the real Docker engine -> the real Claude Code CLI in the container ->
the scripted model server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import (
    McpSession,
    Transport,
    container_exists,
    docker_exec,
    mcp_server,
    server_environment,
)
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]


def two_turn_script() -> Script:
    script = Script()
    script.on(
        user_contains="FIRST-TASK",
        reply=Reply(
            tool_calls=[ToolCall(name="Bash", arguments={"command": "echo spine-proof > proof.txt && cat proof.txt"})]
        ),
    )
    script.on(tool_result_contains="spine-proof", reply=Reply(text="DONE-1: wrote proof.txt"))
    script.on(user_contains="SECOND-TASK", reply=Reply(text="DONE-2: still here"))
    return script


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(two_turn_script()) as server:
        yield server


def _texts(events: list[dict[str, Any]], kind: str) -> list[str]:
    return ["".join(block["text"] for block in e["data"]["content"]) for e in events if e["type"] == kind]


async def _create_env(mcp: McpSession, name: str) -> dict[str, Any]:
    return await mcp.call(
        "create_environment",
        {"name": name, "provider": "docker", "image": BASE_IMAGE, "network": "host", "memory_mb": 2048},
    )


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_spawn_follow_resume_read_transcript_and_stop(
    transport: Transport, tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    env = server_environment(tmp_path / "data", model_server.url, claude_bin)
    async with mcp_server(transport, env) as mcp:
        environment = await _create_env(mcp, f"spine-{transport}")
        assert environment["state"] == "ready"

        spawned = await mcp.call(
            "spawn_agent",
            {
                "environment": environment["name"],
                "prompt": "FIRST-TASK: write proof.txt",
                "permission_mode": "bypassPermissions",
            },
        )
        session_id = spawned["session"]["session_id"]
        sandbox_id = spawned["session"]["sandbox_id"]
        assert spawned["completed"] is False

        events = await mcp.events_until_idle(session_id)
        kinds = [e["type"] for e in events]
        assert kinds[0] == "sandbox.provisioned"
        assert "session.status_running" in kinds
        tool_uses = [e for e in events if e["type"] == "agent.tool_use"]
        assert tool_uses and tool_uses[0]["data"]["name"] == "Bash"
        results = [e for e in events if e["type"] == "agent.tool_result"]
        assert results and "spine-proof" in results[0]["data"]["content"]
        assert any("DONE-1" in text for text in _texts(events, "agent.message"))
        assert events[-1]["data"]["stop_reason"]["type"] == "end_turn"
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

        # The real tool ran in the real container, as the unprivileged agent user.
        assert docker_exec(sandbox_id, "cat", "/workspace/proof.txt").strip() == "spine-proof"
        assert docker_exec(sandbox_id, "stat", "-c", "%U", "/workspace/proof.txt").strip() == "agent"

        second = await mcp.call(
            "send_message", {"session_id": session_id, "text": "SECOND-TASK: are you there?", "wait": True}
        )
        assert second["completed"] is True
        assert second["turn_index"] == 1
        assert "DONE-2" in (second["final_message"] or "")
        assert second["stop_reason"] == "end_turn"
        assert second["session"]["status"] == "idle"
        assert second["session"]["agent_session_id"]

        # The second turn resumed the conversation: its model request carried the first turn.
        second_requests = model_server.requests_containing("SECOND-TASK")
        assert second_requests, "the scripted server never saw the second turn"
        history = str(second_requests[-1].body["messages"])
        assert "FIRST-TASK" in history and "spine-proof" in history

        transcript = await mcp.read_text(f"sandboxes://sessions/{session_id}/transcript")
        for expected in ("FIRST-TASK", "Bash", "spine-proof", "DONE-1", "SECOND-TASK", "DONE-2", "Usage"):
            assert expected in transcript, expected

        listed = await mcp.client.list_resources()
        assert f"sandboxes://sessions/{session_id}/transcript" in {str(r.uri) for r in listed.resources}

        stopped = await mcp.call("stop_session", {"session_id": session_id})
        assert stopped["status"] == "stopped"
        assert not container_exists(sandbox_id)
        after = await mcp.call("read_events", {"session_id": session_id, "after": 0, "limit": 1000})
        assert after["events"][-1]["type"] == "session.status_terminated"


async def test_a_restarted_server_keeps_events_transcript_status_and_can_resume(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    env = server_environment(tmp_path / "data", model_server.url, claude_bin)
    async with mcp_server("stdio", env) as mcp:
        environment = await _create_env(mcp, "restart")
        first = await mcp.call(
            "spawn_agent",
            {
                "environment": environment["id"],
                "prompt": "FIRST-TASK: write proof.txt",
                "permission_mode": "bypassPermissions",
                "wait": True,
                "timeout_s": 120,
            },
        )
        session_id = first["session"]["session_id"]
        assert first["completed"] and "DONE-1" in first["final_message"]
        before = await mcp.call("read_events", {"session_id": session_id, "limit": 1000})
        transcript_before = await mcp.read_text(f"sandboxes://sessions/{session_id}/transcript")

    async with mcp_server("stdio", env) as mcp:
        session = await mcp.call("get_session", {"session_id": session_id})
        assert session["status"] == "idle"
        assert session["last_turn"]["final_message"].startswith("DONE-1")
        after = await mcp.call("read_events", {"session_id": session_id, "limit": 1000})
        assert after["events"] == before["events"]
        assert await mcp.read_text(f"sandboxes://sessions/{session_id}/transcript") == transcript_before
        # The sandbox survived the restart, so the conversation continues where it was.
        second = await mcp.call(
            "send_message", {"session_id": session_id, "text": "SECOND-TASK: after restart", "wait": True}
        )
        assert "DONE-2" in second["final_message"]
        await mcp.call("stop_session", {"session_id": session_id})


async def test_interrupt_keeps_the_container_and_the_session_takes_the_next_message(
    tmp_path: Path, claude_bin: Path
) -> None:
    script = Script()
    script.on(
        user_contains="LONG-TASK",
        reply=Reply(tool_calls=[ToolCall(name="Bash", arguments={"command": "sleep 120", "timeout": 300000})]),
    )
    script.on(user_contains="AFTER-INTERRUPT", reply=Reply(text="BACK-AGAIN"))
    with ScriptedModelServer(script) as server:
        env = server_environment(tmp_path / "data", server.url, claude_bin)
        async with mcp_server("stdio", env) as mcp:
            environment = await _create_env(mcp, "interrupt")
            spawned = await mcp.call(
                "spawn_agent",
                {"environment": environment["id"], "prompt": "LONG-TASK", "permission_mode": "bypassPermissions"},
            )
            session_id = spawned["session"]["session_id"]
            sandbox_id = spawned["session"]["sandbox_id"]
            # Wait until the tool is really running in the container.
            with anyio.fail_after(60):
                while True:
                    page = await mcp.call(
                        "read_events", {"session_id": session_id, "types": ["agent.tool_use"], "wait_s": 10}
                    )
                    if page["events"]:
                        break
            interrupted = await mcp.call("interrupt_session", {"session_id": session_id})
            assert interrupted["status"] in ("idle", "running")
            events = await mcp.events_until_idle(session_id, budget_s=60)
            idle = [e for e in events if e["type"] == "session.status_idle"][-1]
            assert idle["data"]["stop_reason"]["type"] == "interrupted"
            assert container_exists(sandbox_id)
            reply = await mcp.call("send_message", {"session_id": session_id, "text": "AFTER-INTERRUPT", "wait": True})
            assert "BACK-AGAIN" in reply["final_message"]
            await mcp.call("stop_session", {"session_id": session_id})
            assert not container_exists(sandbox_id)
