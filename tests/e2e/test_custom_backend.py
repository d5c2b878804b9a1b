"""The custom backend end to end: a real MCP client -> our server (stdio) -> Docker -> a user-defined
command (a small sh script in the base image, configured in a TOML file) printing JSONL events.
Turn 1 writes a file and reports a native id; turn 2 runs `resume_argv` with that id; a failing
turn reports its stderr; then stop removes the container."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import container_exists, docker_exec, mcp_server, server_environment

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

# $1 the prompt (one argument, whatever it holds), $2 the id to continue from. The prompt never goes
# into the JSON: only lengths and ids do, so the script needs no JSON escaping.
SCRIPT = r"""
set -eu
prompt="$1"; from="$2"
case "$prompt" in FAIL*) echo "custom-agent: refusing the task" >&2; exit 3;; esac
printf '%s\n' "$prompt" >> custom-proof.txt
lines=$(wc -l < custom-proof.txt)
turn="${MCP_SANDBOXES_TURN_INDEX}"
echo "{\"type\":\"session.native_id\",\"id\":\"nid-$turn-$MCP_SANDBOXES_SESSION_ID\"}"
echo '{"type":"agent.tool_use","tool_use_id":"t1","name":"append","input":{"file":"custom-proof.txt"}}'
who="$(id -un) token=${CUSTOM_E2E_TOKEN:-unset}"
echo "{\"type\":\"agent.tool_result\",\"tool_use_id\":\"t1\",\"content\":\"$lines lines as $who\"}"
echo "this line is not an event"
echo '{"type":"span.model_request_end","model":"sh","model_usage":{"input_tokens":3,"output_tokens":4}}'
echo "{\"type\":\"agent.message\",\"content\":[{\"type\":\"text\",\"text\":\"DONE turn $turn from $from\"}]}"
"""


def _config(path: Path) -> Path:
    argv = ["sh", "-c", SCRIPT, "sh", "{prompt}", "start"]
    resume = ["sh", "-c", SCRIPT, "sh", "{prompt}", "{resume_id}"]
    path.write_text(
        "[backends.custom]\n"
        f"argv = {json.dumps(argv)}\n"
        f"resume_argv = {json.dumps(resume)}\n"
        'output = "jsonl"\n'
        'pass_env = ["CUSTOM_E2E_TOKEN"]\n'
    )
    return path


def _texts(events: list[dict[str, Any]]) -> str:
    return " ".join(
        "".join(block.get("text", "") for block in e["data"]["content"]) for e in events if e["type"] == "agent.message"
    )


async def test_a_custom_command_runs_resumes_with_its_own_id_and_reports_failure(tmp_path: Path) -> None:
    env = server_environment(tmp_path / "data", "http://127.0.0.1:9", Path("/nonexistent"))
    env["MCP_SANDBOXES_CONFIG"] = str(_config(tmp_path / "config.toml"))
    env["CUSTOM_E2E_TOKEN"] = "handed-over"
    async with mcp_server("stdio", env) as mcp:
        await mcp.call("create_environment", {"name": "custom-e2e", "image": BASE_IMAGE, "network": "none"})
        prompt = 'FIRST "quoted" $(touch /workspace/pwned) ; rm -rf / #'
        spawned = await mcp.call("spawn_agent", {"environment": "custom-e2e", "backend": "custom", "prompt": prompt})
        session_id = spawned["session"]["session_id"]
        sandbox_id = spawned["session"]["sandbox_id"]
        events = await mcp.events_until_idle(session_id, budget_s=120)
        kinds = [e["type"] for e in events]
        assert kinds.count("agent.tool_use") == 1 and kinds.count("agent.tool_result") == 1, kinds
        result = next(e for e in events if e["type"] == "agent.tool_result")
        # The credential-like variable reached the agent (which printed it); the journal shows a
        # marker in its place, as it does for every credential the server hands over.
        assert result["data"]["content"] == "1 lines as agent token=[redacted]"
        errors = [e["data"]["error"] for e in events if e["type"] == "session.error"]
        assert [e["type"] for e in errors] == ["parse_error"] and "not an event" in errors[0]["message"]
        assert "DONE turn 0 from start" in _texts(events)
        assert events[-1]["data"]["stop_reason"]["type"] == "end_turn"
        usage = [e for e in events if e["type"] == "span.model_request_end"]
        assert usage[-1]["data"]["model_usage"]["output_tokens"] == 4
        # The prompt was one argument: written verbatim, nothing it names was run.
        assert docker_exec(sandbox_id, "cat", "/workspace/custom-proof.txt") == prompt + "\n"
        assert docker_exec(sandbox_id, "sh", "-c", "ls /workspace").split() == ["custom-proof.txt"]

        first_id = f"nid-0-{session_id}"
        session = await mcp.call("get_session", {"session_id": session_id})
        assert session["agent_session_id"] == first_id

        second = await mcp.call(
            "send_message", {"session_id": session_id, "text": "SECOND", "wait": True, "timeout_s": 120}
        )
        assert second["completed"] and second["stop_reason"] == "end_turn", second
        assert second["final_message"] == f"DONE turn 1 from {first_id}"
        assert second["session"]["agent_session_id"] == f"nid-1-{session_id}"
        assert docker_exec(sandbox_id, "cat", "/workspace/custom-proof.txt").splitlines() == [prompt, "SECOND"]

        failed = await mcp.call(
            "send_message", {"session_id": session_id, "text": "FAIL now", "wait": True, "timeout_s": 120}
        )
        assert failed["completed"] and failed["stop_reason"] == "error", failed
        tail = await mcp.call("read_events", {"session_id": session_id, "types": ["session.error"], "limit": 50})
        messages = [e["data"]["error"]["message"] for e in tail["events"]]
        assert any("exited with code 3" in m and "custom-agent: refusing the task" in m for m in messages), messages
        # A failed turn keeps the id to resume from.
        assert failed["session"]["agent_session_id"] == f"nid-1-{session_id}"

        stopped = await mcp.call("stop_session", {"session_id": session_id})
        assert stopped["status"] == "stopped"
        assert not container_exists(sandbox_id)
