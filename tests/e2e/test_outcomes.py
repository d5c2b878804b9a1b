"""What a turn's outcome tells the agent that spawned it: a short summary first, and tool
calls the sub-agent's permission mode refused, with the real Claude Code in Docker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp_types import TextContent

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import mcp_server, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    script = Script()
    script.on(
        user_contains="CLEAN",
        reply=Reply(tool_calls=[ToolCall(name="Bash", arguments={"command": "rm -rf /workspace/cache"})]),
    )
    script.on(tool_result_contains="", reply=Reply(text="I was not allowed to run that."))
    with ScriptedModelServer(script) as server:
        yield server


async def test_a_refused_tool_call_shows_in_the_outcome_its_summary_and_events(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    async with mcp_server("stdio", server_environment(tmp_path / "data", model_server.url, claude_bin)) as mcp:
        await mcp.call("create_environment", {"name": "ask", "image": BASE_IMAGE, "network": "host"})
        result = await mcp.client.call_tool(
            "spawn_agent", {"environment": "ask", "prompt": "CLEAN the cache", "wait": True, "timeout_s": 90}
        )
        assert not result.is_error and isinstance(result.structured_content, dict)
        outcome = result.structured_content
        assert outcome["completed"] and outcome["stop_reason"] == "end_turn"
        assert outcome["denied_tools"] == ["Bash: rm -rf /workspace/cache"]
        summary = result.content[0]
        assert isinstance(summary, TextContent)
        assert summary.text.splitlines()[0].startswith(outcome["session"]["session_id"])
        assert "refused by the permission mode: Bash: rm -rf /workspace/cache" in summary.text
        assert "final message: I was not allowed to run that." in summary.text
        # Claude Code hands its model only the structured content: the summary leads it too.
        assert outcome["summary"] == summary.text and next(iter(outcome)) == "summary"
        session_id = outcome["session"]["session_id"]
        events = (await mcp.call("read_events", {"session_id": session_id, "types": ["session.error"]}))["events"]
        assert [e["data"]["error"]["type"] for e in events] == ["permission_denied"]
        got = await mcp.call("get_session", {"session_id": session_id})
        assert got["last_turn"]["denied_tools"] == ["Bash: rm -rf /workspace/cache"]
        await mcp.call("stop_session", {"session_id": session_id})
