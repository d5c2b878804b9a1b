"""Sub-agents all the way down, with real parts: a real Claude Code in Docker, spawned with
`subagents=true`, calls this server back through its MCP config (streamable HTTP, its own
bearer token) and spawns a second real Claude Code; the scripted model drives both."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import (
    McpSession,
    ToolCallError,
    Transport,
    container_exists,
    docker_exec,
    mcp_server,
    owned_containers,
    server_environment,
)
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

MCP_CONFIG = "/home/agent/.mcp-sandboxes/claude-mcp.json"


def add_family_rules(script: Script, environment: str) -> None:
    child = {
        "environment": environment,
        "prompt": "CHILD-TASK: say hello",
        "permission_mode": "bypassPermissions",
        "wait": True,
        "timeout_s": 120,
    }
    script.on(user_contains="PARENT-TASK", reply=Reply(tool_calls=[ToolCall("mcp__sandboxes__spawn_agent", child)]))
    script.on(user_contains="CHILD-TASK", reply=Reply(text="CHILD-DONE: hello from below"))
    script.on(tool_result_contains="CHILD-DONE", reply=Reply(text="PARENT-DONE: my sub-agent said hello"))
    script.on(user_contains="UNRELATED", reply=Reply(text="unrelated"))


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script()) as server:
        yield server


@asynccontextmanager
async def as_agent(url: str, token: str) -> AsyncIterator[McpSession]:
    """An MCP client holding a sub-agent's token, as the agent in the sandbox would."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield McpSession(client, "http")


def callback_entry(container: str) -> dict[str, Any]:
    config = json.loads(docker_exec(container, "cat", MCP_CONFIG))
    entry: dict[str, Any] = config["mcpServers"]["sandboxes"]
    return entry


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_an_agent_spawns_a_sub_agent_that_reaches_only_its_own_subtree(
    transport: Transport, tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    data = tmp_path / "data"
    async with mcp_server(transport, server_environment(data, model_server.url, claude_bin)) as mcp:
        env = await mcp.call(
            "create_environment", {"name": f"family-{transport}", "image": BASE_IMAGE, "network": "host"}
        )
        add_family_rules(model_server.script, env["name"])
        other = await mcp.call(
            "spawn_agent", {"environment": env["name"], "prompt": "UNRELATED: not yours", "wait": True}
        )
        parent = await mcp.call(
            "spawn_agent",
            {
                "environment": env["name"],
                "prompt": "PARENT-TASK: delegate a greeting",
                "permission_mode": "bypassPermissions",
                "subagents": True,
                "wait": True,
                "timeout_s": 240,
            },
        )
        parent_id = parent["session"]["session_id"]
        assert parent["completed"] and parent["final_message"] == "PARENT-DONE: my sub-agent said hello"

        sessions = (await mcp.call("list_sessions"))["sessions"]
        children = [s for s in sessions if s["parent_session_id"] == parent_id]
        assert len(children) == 1 and children[0]["last_turn"]["final_message"] == "CHILD-DONE: hello from below"
        child_id = children[0]["session_id"]
        events = (await mcp.call("read_events", {"session_id": parent_id, "limit": 500}))["events"]
        created = [e["data"]["child_session_id"] for e in events if e["type"] == "session.thread_created"]
        assert created == [child_id]

        # The token lives in the agent's sandbox only; the database keeps its hash.
        entry = callback_entry(parent["session"]["sandbox_id"])
        token = entry["headers"]["Authorization"].removeprefix("Bearer ")
        stored = (data / "mcp-sandboxes.sqlite3").read_bytes() + b"".join(
            path.read_bytes() for path in data.glob("*.sqlite3-wal")
        )
        assert len(token) > 30 and token.encode() not in stored

        async with as_agent(entry["url"], token) as agent:
            visible = [s["session_id"] for s in (await agent.call("list_sessions"))["sessions"]]
            assert visible == [child_id]
            assert (await agent.call("get_session", {"session_id": child_id}))["status"] == "idle"
            for session_id in (parent_id, other["session"]["session_id"]):
                with pytest.raises(ToolCallError, match="among your sub-agents"):
                    await agent.call("read_events", {"session_id": session_id})
            with pytest.raises(ToolCallError, match="may not delete environments"):
                await agent.call("delete_environment", {"environment": env["name"], "force": True})
        async with httpx.AsyncClient() as http:
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
            wrong = await http.post(entry["url"], json=body, headers={"Authorization": "Bearer not-a-token"})
        assert wrong.status_code == 401

        # Stopping the parent stops its subtree; the unrelated session lives on.
        child_sandbox = children[0]["sandbox_id"]
        stopped = await mcp.call("stop_session", {"session_id": parent_id})
        assert stopped["status"] == "stopped"
        assert (await mcp.call("get_session", {"session_id": child_id}))["status"] == "stopped"
        assert not container_exists(child_sandbox) and not container_exists(parent["session"]["sandbox_id"])
        assert (await mcp.call("get_session", {"session_id": other["session"]["session_id"]}))["status"] == "idle"
        await mcp.call("stop_session", {"session_id": other["session"]["session_id"]})


async def test_sub_agents_need_a_way_out_and_respect_the_depth_limit(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    data = tmp_path / "data"
    extra = {"MCP_SANDBOXES_SUBAGENTS__MAX_DEPTH": "1"}
    async with mcp_server("stdio", server_environment(data, model_server.url, claude_bin, extra)) as mcp:
        closed = await mcp.call("create_environment", {"name": "closed", "image": BASE_IMAGE, "network": "none"})
        before = owned_containers()
        # A CLI with no way out is refused up front (network 'model', the default, is the way).
        with pytest.raises(ToolCallError, match=r"environment: .*network 'none'.*network 'model'"):
            await mcp.call("spawn_agent", {"environment": closed["name"], "prompt": "hi", "subagents": True})
        assert owned_containers() == before
        rows = sqlite3.connect(data / "mcp-sandboxes.sqlite3").execute("SELECT COUNT(*) FROM sessions").fetchone()
        assert rows == (0,)

        open_env = await mcp.call("create_environment", {"name": "open", "image": BASE_IMAGE, "network": "host"})
        model_server.script.on(user_contains="IDLE-PARENT", reply=Reply(text="ok"))
        parent = await mcp.call(
            "spawn_agent",
            {"environment": open_env["name"], "prompt": "IDLE-PARENT", "subagents": True, "wait": True},
        )
        entry = callback_entry(parent["session"]["sandbox_id"])
        token = entry["headers"]["Authorization"].removeprefix("Bearer ")
        async with as_agent(entry["url"], token) as agent:
            with pytest.raises(ToolCallError, match=r"subagents: .*limit is 1"):
                await agent.call("spawn_agent", {"environment": open_env["name"], "prompt": "x", "subagents": True})
        assert owned_containers() == before | {parent["session"]["sandbox_id"]}
        await mcp.call("stop_session", {"session_id": parent["session"]["session_id"]})
