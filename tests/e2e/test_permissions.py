"""Permission prompts routed to someone who can answer: a real Claude Code in Docker in its
default (asking) mode, spawned with ask_permissions, asks this server before a Bash call; the
human answers through MCP elicitation, or the caller with resolve_permission, or nobody and
the timeout denies it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import McpSession, ToolCallError, docker_exec, mcp_server, server_environment
from tests.e2e.test_subagents import as_agent
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

COMMAND = "echo approved > /workspace/ok.txt"
MCP_CONFIG = "/home/agent/.mcp-sandboxes/claude-mcp.json"


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    script = Script()
    script.on(
        user_contains="WRITE-FILE", reply=Reply(tool_calls=[ToolCall(name="Bash", arguments={"command": COMMAND})])
    )
    script.on(tool_result_contains="", reply=Reply(text="done"))
    with ScriptedModelServer(script) as server:
        yield server


def written(container: str) -> str:
    return docker_exec(container, "sh", "-c", "cat /workspace/ok.txt 2>/dev/null || true").strip()


async def spawn(mcp: McpSession, wait: bool) -> dict[str, Any]:
    await mcp.call("create_environment", {"name": "ask", "image": BASE_IMAGE, "network": "host"})
    return await mcp.call(
        "spawn_agent",
        {"environment": "ask", "prompt": "WRITE-FILE please", "ask_permissions": True, "wait": wait, "timeout_s": 90},
    )


async def confirmations(mcp: McpSession, session_id: str) -> list[dict[str, Any]]:
    page = await mcp.call(
        "read_events", {"session_id": session_id, "types": ["session.requires_action", "user.tool_confirmation"]}
    )
    return [event["data"] for event in page["events"]]


@pytest.mark.parametrize("era", ["legacy", "auto"])
async def test_the_human_allows_a_sub_agents_tool_call_through_elicitation(
    era: str, tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    """Before 2026-07-28 the question rides on the waiting spawn_agent call as elicitation/create
    (as Claude Code sees it); from 2026-07-28 wait_for returns it as input_required and the
    client's retry carries the answer."""
    asked: list[str] = []

    async def answer(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"decision": "allow"})

    environment = server_environment(tmp_path / "data", model_server.url, claude_bin)
    async with mcp_server("stdio", environment, mode=era, elicitation_callback=answer) as mcp:
        if era == "legacy":
            outcome = await spawn(mcp, wait=True)
            assert outcome["completed"] and outcome["final_message"] == "done", outcome
            session_id, container = outcome["session"]["session_id"], outcome["session"]["sandbox_id"]
        else:
            spawned = await spawn(mcp, wait=False)
            session_id, container = spawned["session"]["session_id"], spawned["session"]["sandbox_id"]
            waited: dict[str, Any] = {"timed_out": True}
            for _ in range(5):
                waited = await mcp.call("wait_for", {"session_ids": [session_id], "timeout_s": 60})
                if not waited["timed_out"] and not waited["sessions"][0]["pending_permissions"]:
                    break
            session = waited["sessions"][0]
            assert session["status"] == "idle" and session["last_turn"]["final_message"] == "done", waited
        assert len(asked) == 1 and "Bash" in asked[0] and COMMAND in asked[0]
        assert written(container) == "approved"
        events = await confirmations(mcp, session_id)
        assert events[0]["tool_name"] == "Bash" and events[0]["tool_input"]["command"] == COMMAND
        assert events[1]["result"] == "allow" and events[1]["decided_by"] == "operator"
        await mcp.call("stop_session", {"session_id": session_id})


async def test_without_elicitation_the_caller_denies_with_resolve_permission(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    environment = server_environment(tmp_path / "data", model_server.url, claude_bin)
    async with mcp_server("http", environment) as mcp:
        spawned = await spawn(mcp, wait=False)
        session_id = spawned["session"]["session_id"]
        waited = await mcp.call("wait_for", {"session_ids": [session_id], "timeout_s": 60})
        pending = waited["sessions"][0]["pending_permissions"]
        assert not waited["timed_out"] and [p["tool_name"] for p in pending] == ["Bash"]

        # The agent's own token only asks; it cannot use the other tools.
        config = json.loads(docker_exec(spawned["session"]["sandbox_id"], "cat", MCP_CONFIG))
        entry = config["mcpServers"]["sandboxes"]
        async with as_agent(entry["url"], entry["headers"]["Authorization"].removeprefix("Bearer ")) as agent:
            with pytest.raises(ToolCallError, match="only asks about its own permission prompts"):
                await agent.call("list_sessions")
            assert [tool.name for tool in (await agent.client.list_tools()).tools] == ["approve_tool_use"]
        operator_tools = {tool.name for tool in (await mcp.client.list_tools()).tools}
        assert "approve_tool_use" not in operator_tools and {"resolve_permission", "wait_for"} <= operator_tools
        with pytest.raises(ToolCallError, match="only a sandboxed agent asks this"):
            await mcp.call("approve_tool_use", {"tool_name": "Bash", "input": {}})

        await mcp.call(
            "resolve_permission",
            {"session_id": session_id, "request_id": pending[0]["request_id"], "decision": "deny", "message": "no"},
        )
        done = await mcp.call("wait_for", {"session_ids": [session_id], "timeout_s": 60})
        assert not done["timed_out"] and done["sessions"][0]["status"] == "idle"
        assert written(spawned["session"]["sandbox_id"]) == ""
        events = await confirmations(mcp, session_id)
        assert events[1] == {
            "type": "user.tool_confirmation",
            "request_id": pending[0]["request_id"],
            "result": "deny",
            "decided_by": "operator",
            "message": "no",
        }
        with pytest.raises(ToolCallError, match="request_id: "):
            await mcp.call(
                "resolve_permission",
                {"session_id": session_id, "request_id": pending[0]["request_id"], "decision": "allow"},
            )
        await mcp.call("stop_session", {"session_id": session_id})


async def test_a_prompt_nobody_answers_is_denied_after_the_timeout(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    extra = {"MCP_SANDBOXES_PERMISSIONS__TIMEOUT_S": "2"}
    environment = server_environment(tmp_path / "data", model_server.url, claude_bin, extra)
    async with mcp_server("stdio", environment) as mcp:
        with anyio.fail_after(120):
            outcome = await spawn(mcp, wait=True)
        session_id = outcome["session"]["session_id"]
        assert outcome["completed"] and outcome["final_message"] == "done"
        assert written(outcome["session"]["sandbox_id"]) == ""
        events = await confirmations(mcp, session_id)
        assert events[1]["result"] == "deny" and events[1]["decided_by"] == "timeout"
        with pytest.raises(ToolCallError, match="ask_permissions: only the claude backend"):
            await mcp.call(
                "spawn_agent", {"environment": "ask", "prompt": "x", "backend": "codex", "ask_permissions": True}
            )
        await mcp.call("stop_session", {"session_id": session_id})
