"""Resource notifications in both protocol eras, environment deletion rules and session
listing, through the real client, server, Docker and Claude Code."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPDeprecationWarning

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import McpSession, ToolCallError, container_exists, mcp_server, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    script = Script()
    script.on(user_contains="HELLO", reply=Reply(text="HELLO-BACK"), times=None)
    script.on(user_contains="AGAIN", reply=Reply(text="AGAIN-BACK"), times=None)
    with ScriptedModelServer(script) as server:
        yield server


async def _spawn_idle(mcp: McpSession, name: str) -> str:
    await mcp.call("create_environment", {"name": name, "image": BASE_IMAGE, "network": "host"})
    spawned = await mcp.call("spawn_agent", {"environment": name, "prompt": "HELLO", "wait": True})
    assert spawned["completed"] and "HELLO-BACK" in spawned["final_message"]
    session_id: str = spawned["session"]["session_id"]
    return session_id


async def test_listen_subscribers_hear_a_transcript_grow(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    env = server_environment(tmp_path / "data", model_server.url, claude_bin)
    async with mcp_server("http", env) as mcp:
        assert mcp.client.protocol_version >= "2026-07-28"
        session_id = await _spawn_idle(mcp, "listen")
        uri = f"sandboxes://sessions/{session_id}/transcript"
        async with mcp.client.listen(resource_subscriptions=[uri], resources_list_changed=True) as subscription:
            await mcp.call("send_message", {"session_id": session_id, "text": "AGAIN"})
            heard: list[Any] = []
            with anyio.fail_after(60):
                async for event in subscription:
                    heard.append(event)
                    if getattr(event, "uri", None) == uri:
                        break
        assert any(getattr(e, "uri", None) == uri for e in heard)
        await mcp.call("stop_session", {"session_id": session_id})


async def test_legacy_resource_subscribers_get_resources_updated(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    received: list[str] = []
    got_one = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            received.append(str(message.params.uri))
            got_one.set()

    env = server_environment(tmp_path / "data", model_server.url, claude_bin)
    async with mcp_server("stdio", env, mode="legacy", message_handler=on_message) as mcp:
        session_id = await _spawn_idle(mcp, "legacy")
        uri = f"sandboxes://sessions/{session_id}/transcript"
        # Deprecated in the SDK because 2026-07-28 removed it, but still what earlier clients use.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            await mcp.client.session.subscribe_resource(uri)
        reply = await mcp.call("send_message", {"session_id": session_id, "text": "AGAIN", "wait": True})
        assert "AGAIN-BACK" in reply["final_message"]
        with anyio.fail_after(30):
            await got_one.wait()
        assert uri in received
        await mcp.call("stop_session", {"session_id": session_id})


async def test_an_environment_in_use_is_kept_unless_forced_and_sessions_filter_by_status(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    env = server_environment(tmp_path / "data", model_server.url, claude_bin)
    async with mcp_server("stdio", env) as mcp:
        session_id = await _spawn_idle(mcp, "inuse")
        session = await mcp.call("get_session", {"session_id": session_id})
        with pytest.raises(ToolCallError, match="force=true"):
            await mcp.call("delete_environment", {"environment": "inuse"})
        listed = await mcp.call("list_environments")
        assert [e["live_sessions"] for e in listed["environments"]] == [1]

        idle = await mcp.call("list_sessions", {"status": ["idle"]})
        assert [s["session_id"] for s in idle["sessions"]] == [session_id]
        assert (await mcp.call("list_sessions", {"status": ["stopped"]}))["sessions"] == []

        deleted = await mcp.call("delete_environment", {"environment": "inuse", "force": True})
        assert deleted["name"] == "inuse"
        assert not container_exists(session["sandbox_id"])
        assert (await mcp.call("list_environments"))["environments"] == []


async def test_a_model_that_cannot_be_reached_ends_the_turn_with_an_error_not_a_hang(
    tmp_path: Path, claude_bin: Path
) -> None:
    env = server_environment(
        tmp_path / "data",
        "http://127.0.0.1:9",
        claude_bin,
        {"MCP_SANDBOXES_BACKENDS__CLAUDE__ENV__CLAUDE_CODE_MAX_RETRIES": "0"},
    )
    async with mcp_server("stdio", env) as mcp:
        await mcp.call("create_environment", {"name": "nomodel", "image": BASE_IMAGE, "network": "host"})
        spawned = await mcp.call(
            "spawn_agent", {"environment": "nomodel", "prompt": "HELLO", "wait": True, "timeout_s": 120}
        )
        assert spawned["completed"] is True
        assert spawned["stop_reason"] == "error"
        events = await mcp.call("read_events", {"session_id": spawned["session"]["session_id"], "limit": 500})
        assert "session.error" in [e["type"] for e in events["events"]]
        await mcp.call("stop_session", {"session_id": spawned["session"]["session_id"]})
