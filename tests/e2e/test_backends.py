"""Every backend through the same end-to-end path: a real MCP client -> our server -> Docker ->
the real agent CLI (from the standard agent image) -> the scripted model server speaking that
vendor's wire format. Turn 1 runs a real shell command in the container through the CLI's own
tool; turn 2 resumes the same conversation; then stop removes the container."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.backend_cases import BackendCase, discover_cases
from tests.e2e.harness import container_exists, docker_exec, mcp_server, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

CASES = discover_cases()


def _script(case: BackendCase) -> Script:
    script = Script()
    script.on(
        user_contains="FIRST-TASK",
        reply=Reply(tool_calls=[case.shell_call(f"echo {case.backend}-proof > proof.txt && cat proof.txt")]),
    )
    script.on(tool_result_contains=f"{case.backend}-proof", reply=Reply(text="DONE-1 wrote the proof"))
    script.on(user_contains="SECOND-TASK", reply=Reply(text="DONE-2 resumed"))
    return script


def _texts(events: list[dict[str, Any]]) -> str:
    return " ".join(
        "".join(block.get("text", "") for block in e["data"]["content"]) for e in events if e["type"] == "agent.message"
    )


@pytest.mark.parametrize("case", CASES, ids=[c.backend for c in CASES])
async def test_backend_runs_a_tool_resumes_and_stops(case: BackendCase, tmp_path: Path) -> None:
    script = _script(case)
    with ScriptedModelServer(script, vendors=list(case.vendors)) as model:
        env = server_environment(tmp_path / "data", model.url, Path("/nonexistent"))
        env.pop("MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH")  # the CLI comes from the image
        env.pop("ANTHROPIC_BASE_URL")
        env.update(case.server_env(model.url))
        async with mcp_server("stdio", env) as mcp:
            await mcp.call("create_environment", {"name": f"be-{case.backend}", "image": case.image, "network": "host"})
            spawned = await mcp.call(
                "spawn_agent",
                {
                    "environment": f"be-{case.backend}",
                    "backend": case.backend,
                    "prompt": "FIRST-TASK: write proof.txt with the shell",
                    **case.spawn_args,
                },
            )
            session_id = spawned["session"]["session_id"]
            sandbox_id = spawned["session"]["sandbox_id"]
            events = await mcp.events_until_idle(session_id, budget_s=180)
            kinds = [e["type"] for e in events]
            assert "agent.tool_use" in kinds, kinds
            results = [e for e in events if e["type"] == "agent.tool_result"]
            assert any(f"{case.backend}-proof" in r["data"]["content"] for r in results), results
            assert "DONE-1" in _texts(events)
            idle = [e for e in events if e["type"] == "session.status_idle"][-1]
            assert idle["data"]["stop_reason"]["type"] == "end_turn", events[-6:]
            usage = [e for e in events if e["type"] == "span.model_request_end"]
            assert usage and usage[-1]["data"]["model_usage"]["output_tokens"] > 0
            assert docker_exec(sandbox_id, "cat", "/workspace/proof.txt").strip() == f"{case.backend}-proof"
            assert not script.misses, script.misses

            second = await mcp.call(
                "send_message", {"session_id": session_id, "text": "SECOND-TASK: still there?", "wait": True,
                                 "timeout_s": 180},
            )  # fmt: skip
            assert second["completed"] and "DONE-2" in (second["final_message"] or ""), second
            assert second["session"]["agent_session_id"]
            resumed = model.requests_containing("SECOND-TASK")
            assert resumed, "the scripted server never saw the second turn"
            history = case.history_probe(resumed[-1].body)
            assert "FIRST-TASK" in history and f"{case.backend}-proof" in history

            stopped = await mcp.call("stop_session", {"session_id": session_id})
            assert stopped["status"] == "stopped"
            assert not container_exists(sandbox_id)
