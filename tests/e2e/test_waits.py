"""Waits that fit the client: no tool call blocks past the server's cap (Claude Code moves
calls past 120 s to the background), the caller hears progress meanwhile, and `wait_for`
gathers a fan-out of real Claude Code sub-agents in Docker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import CALL_TIMEOUT_S, mcp_server, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

CAP_S = 4.0


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    script = Script(fallback=Reply(text="done"))
    script.on(user_contains="SLOW", reply=Reply(text="slow done", delay_s=12))
    for index in range(3):
        script.on(user_contains=f"CHILD-{index}", reply=Reply(text=f"child {index} done", delay_s=index))
    with ScriptedModelServer(script) as server:
        yield server


async def test_a_long_wait_returns_at_the_cap_with_progress_and_wait_for_continues(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    extra = {"MCP_SANDBOXES_MAX_CALL_S": str(CAP_S)}
    environment = server_environment(tmp_path / "data", model_server.url, claude_bin, extra)
    async with mcp_server("stdio", environment) as mcp:
        await mcp.call("create_environment", {"name": "w", "image": BASE_IMAGE, "network": "host"})
        heard: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            heard.append((progress, total, message))

        started = anyio.current_time()
        with anyio.fail_after(CALL_TIMEOUT_S):
            result = await mcp.client.call_tool(
                "spawn_agent",
                {"environment": "w", "prompt": "SLOW task", "wait": True, "timeout_s": 600},
                progress_callback=on_progress,
            )
        elapsed = anyio.current_time() - started
        outcome = result.structured_content
        assert outcome is not None and not result.is_error
        session_id = outcome["session"]["session_id"]
        # Returned at the cap (plus provisioning), not after the 12 s the model takes.
        assert not outcome["completed"] and outcome["session"]["status"] == "running"
        assert "wait_for" in outcome["note"] and session_id in outcome["note"]
        assert elapsed < 12
        assert any(message and "provisioning" in message for _, _, message in heard)

        # The next call goes on where the first left off and sees the turn end.
        finished = None
        for _ in range(10):
            finished = await mcp.call("wait_for", {"session_ids": [session_id], "timeout_s": 600})
            if not finished["timed_out"]:
                break
        assert finished is not None and not finished["timed_out"]
        assert finished["settled"] == [session_id]
        assert finished["sessions"][0]["last_turn"]["final_message"] == "slow done"
        await mcp.call("stop_session", {"session_id": session_id})


async def test_wait_for_gathers_a_fan_out_any_then_all(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    environment = server_environment(tmp_path / "data", model_server.url, claude_bin)
    async with mcp_server("http", environment) as mcp:
        await mcp.call("create_environment", {"name": "fan", "image": BASE_IMAGE, "network": "host"})
        ids = []
        for index in range(3):
            spawned = await mcp.call("spawn_agent", {"environment": "fan", "prompt": f"CHILD-{index}: work"})
            ids.append(spawned["session"]["session_id"])
        first = await mcp.call("wait_for", {"session_ids": ids, "mode": "any", "timeout_s": 60})
        assert not first["timed_out"] and len(first["settled"]) >= 1
        every = await mcp.call("wait_for", {"session_ids": ids, "mode": "all", "timeout_s": 90})
        assert not every["timed_out"] and sorted(every["settled"]) == sorted(ids)
        finals = sorted(s["last_turn"]["final_message"] for s in every["sessions"])
        assert finals == ["child 0 done", "child 1 done", "child 2 done"]
        with pytest.raises(Exception, match="session_ids"):
            await mcp.call("wait_for", {"session_ids": []})
        for session_id in ids:
            await mcp.call("stop_session", {"session_id": session_id})
