"""The real MCP server (build_server) around a real Orchestrator, driven in-process by the `mcp`
SDK's client: create_environment on the `process` provider, spawn_agent(wait), read_events,
send_message, get_session, list_sessions, the transcript resource, interrupt_session and
stop_session, in seconds. Same parts as tests/orchestrator: host processes, a SQLite file,
the `custom` backend running tests/support/scripted_agent.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp_types import CallToolResult, PromptReference, ResourceTemplateReference, TextContent

from mcp_sandboxes.server.app import build_server
from tests.orchestrator.spine import TURN_BUDGET_S, answer_field, orchestrator_of, process_alive, spine_settings, texts


class Tools:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def result(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        with anyio.fail_after(TURN_BUDGET_S):
            return await self.client.call_tool(name, arguments)

    async def call(self, tool: str, /, **arguments: Any) -> dict[str, Any]:
        result = await self.result(tool, arguments)
        assert not result.is_error, f"{tool}: {self.text(result)}"
        assert isinstance(result.structured_content, dict), f"{tool} returned no structured content"
        return result.structured_content

    async def error(self, tool: str, /, **arguments: Any) -> str:
        result = await self.result(tool, arguments)
        assert result.is_error, f"{tool} succeeded: {result.structured_content}"
        return self.text(result)

    @staticmethod
    def text(result: CallToolResult) -> str:
        return " ".join(block.text for block in result.content if isinstance(block, TextContent))

    async def read_text(self, uri: str) -> str:
        with anyio.fail_after(TURN_BUDGET_S):
            result = await self.client.read_resource(uri)
        text = getattr(result.contents[0], "text", None)
        assert isinstance(text, str)
        return text


@asynccontextmanager
async def in_process_server(tmp_path: Path) -> AsyncIterator[Tools]:
    async with orchestrator_of(spine_settings(tmp_path)).running() as orchestrator:
        server, _ = build_server(orchestrator)
        async with Client(server) as client:
            yield Tools(client)


async def test_the_tools_drive_a_session_from_spawn_to_stop_in_process(tmp_path: Path) -> None:
    async with in_process_server(tmp_path) as mcp:
        made = await mcp.call("create_environment", name="spine", provider="process", image="host")
        assert made["provider"] == "process" and made["state"] == "ready"

        first = await mcp.call("spawn_agent", environment="spine", backend="custom", prompt="first task", wait=True)
        assert first["completed"] is True and first["stop_reason"] == "end_turn" and first["turn_index"] == 0
        sid = first["session"]["session_id"]
        assert answer_field(first["final_message"], "echo") == "first task"
        assert answer_field(first["final_message"], "resumed") == "-"

        page = await mcp.call("read_events", session_id=sid)
        kinds = [event["type"] for event in page["events"]]
        assert kinds[0] == "sandbox.provisioned" and kinds[-1] == "session.status_idle"
        assert {"user.message", "agent.tool_use", "agent.tool_result", "agent.message"} <= set(kinds)
        assert page["next_cursor"] == page["events"][-1]["seq"] and page["session_status"] == "idle"
        only = await mcp.call("read_events", session_id=sid, types=["agent.message"])
        assert texts(only["events"]) == [first["final_message"]]

        second = await mcp.call("send_message", session_id=sid, text="second task", wait=True)
        assert second["completed"] is True and second["turn_index"] == 1
        assert answer_field(second["final_message"], "resumed") == f"sa-{sid}-0"
        more = await mcp.call("read_events", session_id=sid, after=page["next_cursor"])
        assert more["events"][0]["type"] == "user.message" and more["events"][0]["seq"] == page["next_cursor"] + 1

        session = await mcp.call("get_session", session_id=sid)
        assert session["status"] == "idle" and session["turns"] == 2
        assert session["agent_session_id"] == f"sa-{sid}-1"
        assert session["usage"]["output_tokens"] == 8
        assert session["last_turn"]["final_message"] == second["final_message"]

        listed = await mcp.call("list_sessions")
        assert [s["session_id"] for s in listed["sessions"]] == [sid]
        assert (await mcp.call("list_sessions", status=["stopped"]))["sessions"] == []

        transcript = await mcp.read_text(session["transcript_uri"])
        assert "first task" in transcript and "second task" in transcript
        assert f"resumed sa-{sid}-0" in transcript

        stopped = await mcp.call("stop_session", session_id=sid)
        assert stopped["status"] == "stopped" and stopped["sandbox_id"] is None
        after = await mcp.call("read_events", session_id=sid, after=more["next_cursor"])
        assert [event["type"] for event in after["events"]] == ["sandbox.destroyed", "session.status_terminated"]
        assert "stopped" in await mcp.error("send_message", session_id=sid, text="too late")
        assert (await mcp.call("list_sessions", status=["stopped"]))["sessions"][0]["session_id"] == sid
        # History stays readable after the stop.
        assert "first task" in await mcp.read_text(session["transcript_uri"])


async def test_interrupt_session_ends_a_long_turn_and_errors_reach_the_caller_by_field(tmp_path: Path) -> None:
    async with in_process_server(tmp_path) as mcp:
        await mcp.call("create_environment", name="spine", provider="process", image="host")
        missing = await mcp.error("spawn_agent", environment="nowhere", backend="custom", prompt="x")
        assert "environment" in missing and "create_environment" in missing

        spawned = await mcp.call("spawn_agent", environment="spine", backend="custom", prompt="SLEEP", wait=False)
        assert spawned["completed"] is False
        sid = spawned["session"]["session_id"]
        cursor = 0
        with anyio.fail_after(TURN_BUDGET_S):
            while True:  # long-polls until the agent's first answer says it is running
                page = await mcp.call("read_events", session_id=sid, after=cursor, wait_s=5, types=["agent.message"])
                cursor = page["next_cursor"]
                if page["events"]:
                    break
        pid = int(answer_field(texts(page["events"])[0], "pid"))
        assert process_alive(pid)

        await mcp.call("interrupt_session", session_id=sid)
        with anyio.fail_after(TURN_BUDGET_S):
            while (session := await mcp.call("get_session", session_id=sid))["status"] != "idle":
                await mcp.call("read_events", session_id=sid, after=session["last_event_seq"], wait_s=5)
        assert session["stop_reason"] == "interrupted"
        assert not process_alive(pid)
        nothing = await mcp.error("interrupt_session", session_id=sid)
        assert "session_id" in nothing and "nothing to interrupt" in nothing
        await mcp.call("stop_session", session_id=sid)


async def test_prompts_and_completions_help_a_client_orchestrate(tmp_path: Path) -> None:
    async with in_process_server(tmp_path) as mcp:
        await mcp.call("create_environment", name="alpha", provider="process", image="host")
        await mcp.call("create_environment", name="beta", provider="process", image="host")
        first = await mcp.call("spawn_agent", environment="alpha", backend="custom", prompt="x", wait=True)
        sid = first["session"]["session_id"]

        prompts = {prompt.name for prompt in (await mcp.client.list_prompts()).prompts}
        assert {"delegate", "fan_out"} <= prompts
        fan = await mcp.client.get_prompt("fan_out", {"task": "port the tests", "count": "4", "environment": "alpha"})
        text = fan.messages[0].content
        assert isinstance(text, TextContent) and "4 coding sub-agents" in text.text and "wait_for" in text.text

        envs = await mcp.client.complete(
            PromptReference(type="ref/prompt", name="delegate"), {"name": "environment", "value": "al"}
        )
        assert envs.completion.values == ["alpha"]
        ids = await mcp.client.complete(
            ResourceTemplateReference(type="ref/resource", uri="sandboxes://sessions/{session_id}/transcript"),
            {"name": "session_id", "value": "ses_"},
        )
        assert ids.completion.values == [sid]
        await mcp.call("stop_session", session_id=sid)
