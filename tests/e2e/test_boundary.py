"""The sandbox boundary, probed as an attacker would: from inside a real container, as the
agent user, with the agent's own token read from its MCP config file, every escape tried
is refused and nothing happens on the host."""

from __future__ import annotations

import json
import re
import sqlite3
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import (
    McpSession,
    ToolCallError,
    Transport,
    container_exists,
    mcp_server,
    owned_containers,
    server_environment,
)
from tests.support.model_server import Reply, Script, ScriptedModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

MCP_CONFIG = "/home/agent/.mcp-sandboxes/claude-mcp.json"
CURL_TIMEOUT_S = 20

# Speaks streamable HTTP with curl from inside the sandbox: initialize, then one request.
# Prints the HTTP status of each step and the last response body.
MCP_CALL_SCRIPT = r"""
url="$1"; auth="$2"; method="$3"; params="$4"
hdrs=$(mktemp); body=$(mktemp)
init='{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"attacker","version":"0"}}}'
code=$(curl -s -m 20 -o "$body" -D "$hdrs" -w '%{http_code}' -X POST "$url" \
  -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \
  ${auth:+-H "Authorization: $auth"} -d "$init")
echo "init=$code"
if [ "$code" != 200 ]; then cat "$body"; exit 0; fi
sid=$(grep -i '^mcp-session-id:' "$hdrs" | tr -d '\r' | cut -d' ' -f2)
curl -s -m 20 -o /dev/null -X POST "$url" -H 'Content-Type: application/json' \
  -H 'Accept: application/json, text/event-stream' -H "mcp-session-id: $sid" \
  ${auth:+-H "Authorization: $auth"} -d '{"jsonrpc":"2.0","method":"notifications/initialized"}'
code=$(curl -s -m 60 -o "$body" -w '%{http_code}' -X POST "$url" \
  -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \
  -H "mcp-session-id: $sid" ${auth:+-H "Authorization: $auth"} \
  -d "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"$method\",\"params\":$params}")
echo "call=$code"
cat "$body"
"""


@dataclass
class Answer:
    init_status: int
    call_status: int | None
    body: str

    def result(self) -> dict[str, Any]:
        for line in self.body.splitlines():
            payload = line.removeprefix("data: ").strip()
            if payload.startswith("{") and '"id":2' in payload.replace(" ", ""):
                message: dict[str, Any] = json.loads(payload)
                return message
        raise AssertionError(f"no JSON-RPC answer in {self.body[:500]!r}")

    def tool_error(self) -> str:
        result = self.result()["result"]
        assert result["isError"], f"the call was not refused: {result}"
        text = " ".join(block["text"] for block in result["content"])
        # The SDK puts "Error executing tool NAME: " before the server's own message.
        return re.sub(r"^Error executing tool \w+: ", "", text)


async def attack(container: str, url: str, authorization: str, method: str, params: dict[str, Any]) -> Answer:
    """One MCP request sent from inside the sandbox, as its unprivileged agent user."""
    argv = ["docker", "exec", "-u", "agent", container, "sh", "-c", MCP_CALL_SCRIPT, "attack"]
    with anyio.fail_after(CURL_TIMEOUT_S * 4):
        completed = await anyio.run_process([*argv, url, authorization, method, json.dumps(params)])
    lines = completed.stdout.decode().splitlines()
    init = int(lines[0].removeprefix("init="))
    if init != 200:
        return Answer(init, None, "\n".join(lines[1:]))
    return Answer(init, int(lines[1].removeprefix("call=")), "\n".join(lines[2:]))


def call_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


@dataclass
class Agent:
    session_id: str
    container: str
    url: str
    authorization: str

    async def call(self, tool: str, arguments: dict[str, Any]) -> Answer:
        return await attack(self.container, self.url, self.authorization, "tools/call", call_tool(tool, arguments))


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script(fallback=Reply(text="ok"))) as server:
        yield server


@asynccontextmanager
async def agent_in_docker(mcp: McpSession, environment: str) -> AsyncIterator[Agent]:
    spawned = await mcp.call(
        "spawn_agent", {"environment": environment, "prompt": "wait here", "subagents": True, "wait": True}
    )
    container = spawned["session"]["sandbox_id"]
    with anyio.fail_after(30):
        config = await anyio.run_process(["docker", "exec", "-u", "agent", container, "cat", MCP_CONFIG])
    entry = json.loads(config.stdout)["mcpServers"]["sandboxes"]
    yield Agent(spawned["session"]["session_id"], container, entry["url"], entry["headers"]["Authorization"])


def env_count(data: Path) -> int:
    with sqlite3.connect(data / "mcp-sandboxes.sqlite3") as db:
        row = db.execute("SELECT COUNT(*) FROM environments").fetchone()
    return int(row[0])


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_an_agent_cannot_escape_through_this_server(
    transport: Transport, tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    data = tmp_path / "data"
    marker = Path("/tmp") / f"mcp-sandboxes-pwned-{uuid.uuid4().hex}"
    async with mcp_server(transport, server_environment(data, model_server.url, claude_bin)) as mcp:
        await mcp.call(
            "create_environment", {"name": "home", "image": BASE_IMAGE, "network": "host", "memory_mb": 1024}
        )
        async with agent_in_docker(mcp, "home") as agent:
            environments_before = env_count(data)
            containers_before = owned_containers()

            # 1. Host-level providers and other images: refused at the door, nothing runs.
            escapes: list[tuple[str, dict[str, Any]]] = [
                ("provider", {"provider": "process"}),
                ("provider", {"provider": "bubblewrap", "image": "/"}),
                ("provider", {"provider": "bubblewrap", "image": "host"}),
                ("image", {"image": "mcp-sandboxes/agent:latest"}),
                ("memory_mb", {"memory_mb": 4096}),
            ]
            for field, override in escapes:
                answer = await agent.call(
                    "create_environment",
                    {"name": f"evil-{uuid.uuid4().hex[:6]}", "setup_commands": [f"touch {marker}"], **override},
                )
                assert answer.call_status == 200
                assert answer.tool_error().startswith(f"{field}: "), answer.tool_error()
            # The operator's own host-network environment is no way round it either.
            await mcp.call("create_environment", {"name": "operators-process", "provider": "process"})
            answer = await agent.call("spawn_agent", {"environment": "operators-process", "prompt": f"touch {marker}"})
            assert answer.tool_error().startswith("provider: "), answer.tool_error()
            assert not marker.exists()
            assert env_count(data) == environments_before + 1  # only the operator's
            assert owned_containers() == containers_before

            # What it may create inherits its own limits, and a failing setup shows a short, redacted tail.
            made_answer = await agent.call(
                "create_environment",
                {
                    "name": "child-env",
                    "setup_commands": ["echo sk-ant-api03-THISISASECRETVALUE0123456789; seq 1 400; exit 3"],
                },
            )
            made = made_answer.result()["result"]
            assert not made["isError"], made
            assert made["structuredContent"]["limits"]["memory_mb"] == 1024
            failed = (await agent.call("spawn_agent", {"environment": "child-env", "prompt": "hi"})).tool_error()
            # Prepared once, at creation (issue 9, item 5): the spawn names the failed step.
            assert failed.startswith(
                "environment: 'child-env' failed to prepare: setup_commands[0]: exited with code 3"
            )
            assert "THISISASECRETVALUE" not in failed and len(failed) < 400
            assert owned_containers() == containers_before

            # 2. No token, or the agent's token at the operator's door: no operator rights.
            no_token = await attack(agent.container, agent.url, "", "tools/list", {})
            assert no_token.init_status == 401
            if transport == "http":
                operator_url = mcp.operator_url
                assert operator_url is not None and operator_url != agent.url
                assert (await attack(agent.container, operator_url, "", "tools/list", {})).init_status == 401
                assert (
                    await attack(agent.container, operator_url, agent.authorization, "tools/list", {})
                ).init_status == 401
            other = await mcp.call("spawn_agent", {"environment": "home", "prompt": "not yours", "wait": True})
            answer = await agent.call("stop_session", {"session_id": other["session"]["session_id"]})
            assert "among your sub-agents" in answer.tool_error()
            assert (await mcp.call("get_session", {"session_id": other["session"]["session_id"]}))["status"] == "idle"
            listed = (await attack(agent.container, agent.url, agent.authorization, "resources/list", {})).result()
            uris = [resource["uri"] for resource in listed["result"]["resources"]]
            assert not any(other["session"]["session_id"] in uri or agent.session_id in uri for uri in uris), uris

            # 3. The token dies with its session.
            await mcp.call("stop_session", {"session_id": agent.session_id})
            assert not container_exists(agent.container)
            await mcp.call("stop_session", {"session_id": other["session"]["session_id"]})
            survivor = await mcp.call("spawn_agent", {"environment": "home", "prompt": "probe", "wait": True})
            dead = await attack(survivor["session"]["sandbox_id"], agent.url, agent.authorization, "tools/list", {})
            assert dead.init_status == 401
            await mcp.call("stop_session", {"session_id": survivor["session"]["session_id"]})
    assert not marker.exists()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "mcp-sandboxes.sqlite3").stat().st_mode) == 0o600
    if transport == "http":
        assert stat.S_IMODE((data / "operator-token").stat().st_mode) == 0o600


async def test_deleting_environments_keeps_history_and_purge_erases_it(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    """A parent in one environment with a child in another: both environments can be deleted
    (this was a FOREIGN KEY error), history stays readable, purge erases it."""
    data = tmp_path / "data"
    async with mcp_server("stdio", server_environment(data, model_server.url, claude_bin)) as mcp:
        await mcp.call("create_environment", {"name": "a", "image": BASE_IMAGE, "network": "host"})
        await mcp.call("create_environment", {"name": "b", "image": BASE_IMAGE, "network": "host"})
        async with agent_in_docker(mcp, "a") as parent:
            child = (await parent.call("spawn_agent", {"environment": "b", "prompt": "child", "wait": True})).result()
            child_id = child["result"]["structuredContent"]["session"]["session_id"]
        deleted = await mcp.call("delete_environment", {"environment": "a", "force": True})
        assert deleted["state"] == "deleted"
        assert (await mcp.call("get_session", {"session_id": parent.session_id}))["status"] == "stopped"
        assert (await mcp.call("get_session", {"session_id": child_id}))["status"] == "stopped"
        events = (await mcp.call("read_events", {"session_id": parent.session_id}))["events"]
        assert any(e["type"] == "session.thread_created" for e in events)
        transcript = await mcp.read_text(f"sandboxes://sessions/{parent.session_id}/transcript")
        assert "wait here" in transcript
        # The name is free again; the deleted one cannot be spawned into.
        await mcp.call("create_environment", {"name": "a", "image": BASE_IMAGE})
        with pytest.raises(ToolCallError, match="environment: "):
            await mcp.call("spawn_agent", {"environment": deleted["id"], "prompt": "hi"})

        await mcp.call("delete_environment", {"environment": "b", "purge": True})
        with pytest.raises(ToolCallError, match="session_id: no session"):
            await mcp.call("get_session", {"session_id": child_id})
        assert (await mcp.call("get_session", {"session_id": parent.session_id}))["status"] == "stopped"
        names = [e["name"] for e in (await mcp.call("list_environments"))["environments"]]
        assert names == ["a"]


async def test_secrets_are_refused_in_environment_variables(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    data = tmp_path / "data"
    async with mcp_server("stdio", server_environment(data, model_server.url, claude_bin)) as mcp:
        for env in ({"OPENAI_API_KEY": "x"}, {"GITHUB_TOKEN": "abc"}, {"NOTE": "sk-ant-api03-abcdefghijklmnopqrstu"}):
            with pytest.raises(ToolCallError, match=r"env\.\w+: looks like a credential.*pass_env"):
                await mcp.call("create_environment", {"name": "leaky", "image": BASE_IMAGE, "env": env})
        with pytest.raises(ToolCallError, match=r"runtime: .*runsc"):
            await mcp.call("create_environment", {"name": "odd", "image": BASE_IMAGE, "runtime": "no-such-runtime"})
        await mcp.call("create_environment", {"name": "fine", "image": BASE_IMAGE, "env": {"LANG": "C.UTF-8"}})
        hardened = await mcp.call(
            "create_environment", {"name": "hard", "image": BASE_IMAGE, "read_only_root": True, "runtime": "runsc"}
        )
        assert hardened["read_only_root"] and hardened["runtime"] == "runsc"
        assert env_count(data) == 2
