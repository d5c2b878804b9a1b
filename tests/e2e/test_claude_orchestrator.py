"""The real Claude Code as the ORCHESTRATOR: the CLI on the host, registered with this server
over stdio (`--mcp-config`, `--strict-mcp-config`), driven by the scripted model to fan out to
three Claude Code sub-agents in Docker, wait for all of them, read their answers and stop them.

What is asserted comes from the orchestrator CLI's own stream-json, timed as its lines arrive:
the MCP calls happen in order, every call gets its result (none moved to the background), no
call outlasts the server's cap (set low here, with one child slower than the cap, so that the
first wait returns at the cap and the model calls wait_for again), and the final message names
the three children's answers. Once with the pinned CLI, once with the newest from npm, which
defers MCP tools behind ToolSearch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from tests.conftest import BASE_IMAGE, CLAUDE_BIN, ROOT
from tests.e2e.harness import container_exists, server_environment
from tests.support.model_server import ModelRequest, Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

LATEST_DIR = ROOT / "tools" / "agent-clis-latest" / "node_modules" / "@anthropic-ai" / "claude-code"
LATEST_BIN = LATEST_DIR / "bin" / "claude.exe"

# The server's cap on any one call, low so the test sees it work: the slowest child takes longer.
CAP_S = 10.0
# What a call may take beyond the cap: the CLI's own bookkeeping and the stdio hop, seen from outside.
CAP_SLACK_S = 1.5
RUN_BUDGET_S = 240.0
ENVIRONMENT = "orch"
PROMPT = "ORCHESTRATE: fan out to three sub-agents, wait for all, report their answers"
MCP = "mcp__sandboxes__"
# Child name -> (its answer, how long the model takes to give it). C outlasts the cap.
CHILDREN = {"A": ("ANSWER-A: alpha is 1", 1.0), "B": ("ANSWER-B: beta is 2", 2.0), "C": ("ANSWER-C: gamma is 3", 14.0)}
SESSION_ID = re.compile(r"ses_[0-9a-f]{20}")
SANDBOX_ID = re.compile(r'"sandbox_id":\s*"([^"]+)"')


def latest_version() -> str:
    """The newest CLI's version as installed (shown in the test id, so every run records it)."""
    try:
        version: str = json.loads((LATEST_DIR / "package.json").read_text("utf-8"))["version"]
        return version
    except (OSError, ValueError, KeyError):
        return "not-installed"


class Orchestration:
    """The model's side of the orchestrator's conversation. Each step is decided from the tool
    results it is sent (session ids come back from spawn_agent), so it is a responder, not a list
    of fixed replies; `steps` records what it answered, for the failure message."""

    def __init__(self, tool_search: bool) -> None:
        self.tool_search = tool_search
        self.finals: list[str] = []
        self.steps: list[str] = []

    def __call__(self, request: ModelRequest) -> Reply:
        reply = self.next_reply(request.tool_results, request.after_tool_result)
        self.steps.append(", ".join(call.name for call in reply.tool_calls) or f"text: {reply.text}")
        return reply

    def next_reply(self, results: list[str], after_tool: bool) -> Reply:
        if not after_tool:
            if self.tool_search:
                # The exact form the newest CLI's ToolSearch description gives: select by name.
                names = ",".join(
                    MCP + name for name in ("create_environment", "spawn_agent", "wait_for", "stop_session")
                )
                return Reply(tool_calls=[ToolCall("ToolSearch", {"query": f"select:{names}"})])
            return self.create_environment()
        if any(f"{MCP}create_environment" in result for result in results):  # ToolSearch loaded the tools
            return self.create_environment()
        # Decided on the structured output, which every CLI passes on (2.1.197 passes nothing else).
        outputs = [structured(result) for result in results]
        if all("live_sessions" in output for output in outputs):  # the environment
            return Reply(
                tool_calls=[
                    ToolCall(
                        f"{MCP}spawn_agent",
                        {"environment": ENVIRONMENT, "prompt": f"CHILD-{name}: answer your question", "wait": False},
                    )
                    for name in CHILDREN
                ]
            )
        if all("turn_index" in output for output in outputs):  # the spawns
            return self.wait_for([output["session"]["session_id"] for output in outputs])
        if len(outputs) == 1 and "settled" in outputs[0]:
            view = outputs[0]
            if view["timed_out"]:
                return self.wait_for([session["session_id"] for session in view["sessions"]])
            self.finals = [session["last_turn"]["final_message"] for session in view["sessions"]]
            return Reply(
                tool_calls=[
                    ToolCall(f"{MCP}stop_session", {"session_id": session["session_id"]})
                    for session in view["sessions"]
                ]
            )
        if all(output.get("status") == "stopped" for output in outputs) and self.finals:
            return Reply(text="All three sub-agents answered: " + " | ".join(self.finals))
        return Reply(text=f"SCRIPT-LOST: no step for tool results {results!r:.800}")

    def create_environment(self) -> Reply:
        arguments = {"name": ENVIRONMENT, "provider": "docker", "image": BASE_IMAGE}  # network "model", the default
        return Reply(tool_calls=[ToolCall(f"{MCP}create_environment", arguments)])

    def wait_for(self, session_ids: list[str]) -> Reply:
        arguments = {"session_ids": session_ids, "mode": "all", "timeout_s": 90}
        return Reply(tool_calls=[ToolCall(f"{MCP}wait_for", arguments)])


def structured(result: str) -> dict[str, Any]:
    """A tool's structured output from its result text: the whole text (as Claude Code 2.1.197
    passes it) or the JSON block after the summary line (content blocks joined)."""
    for text in (result, *result.splitlines()):
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return {}


@dataclass
class Call:
    name: str
    arguments: dict[str, Any]
    started: float
    ended: float | None = None
    result: str = ""
    is_error: bool = False

    @property
    def duration(self) -> float:
        assert self.ended is not None
        return self.ended - self.started


@dataclass
class Run:
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None

    @property
    def init(self) -> dict[str, Any]:
        return next(line for _, line in self.lines if line.get("type") == "system" and line.get("subtype") == "init")

    @property
    def result(self) -> dict[str, Any]:
        results = [line for _, line in self.lines if line.get("type") == "result"]
        assert results, f"no result line; stderr: {self.stderr[-2000:]}"
        return results[-1]

    def calls(self) -> list[Call]:
        """Tool calls in the order the model made them, each timed from the line that carried its
        tool_use to the line that carried its tool_result (as this test read them)."""
        calls: dict[str, Call] = {}
        for at, line in self.lines:
            content = (line.get("message") or {}).get("content")
            if not isinstance(content, list):
                continue
            for block in content:
                if line["type"] == "assistant" and block.get("type") == "tool_use":
                    calls[block["id"]] = Call(block["name"], block.get("input") or {}, at)
                elif line["type"] == "user" and block.get("type") == "tool_result":
                    call = calls[block["tool_use_id"]]
                    call.ended, call.result = at, text_of(block.get("content"))
                    call.is_error = bool(block.get("is_error"))
        return list(calls.values())


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(block.get("text") or block.get("tool_name") or "") for block in content)
    return ""


async def run_orchestrator(cli: Path, model_url: str, workdir: Path) -> Run:
    """Runs the CLI with this server as its only MCP server, reading stream-json as it comes."""
    # The children run the pinned CLI (the server's own setting); only the orchestrator varies.
    server_env = server_environment(workdir / "data", model_url, CLAUDE_BIN, {"MCP_SANDBOXES_MAX_CALL_S": str(CAP_S)})
    command = [sys.executable, "-m", "mcp_sandboxes", "serve", "--transport", "stdio"]
    config = {
        "mcpServers": {"sandboxes": {"type": "stdio", "command": command[0], "args": command[1:], "env": server_env}}
    }
    config_path = workdir / "mcp.json"
    config_path.write_text(json.dumps(config), "utf-8")
    home = workdir / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": model_url,
        "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    argv = [
        str(cli),
        "-p",
        PROMPT,
        "--output-format",
        "stream-json",
        "--verbose",
        "--mcp-config",
        str(config_path),
        "--strict-mcp-config",
        # The orchestrator runs as root here, where bypassPermissions is refused: allow this server's tools.
        "--allowedTools",
        "mcp__sandboxes",
    ]
    run = Run()
    process = await anyio.open_process(
        argv, env=env, cwd=str(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        stdout, stderr = process.stdout, process.stderr

        async def read_stderr() -> None:
            async for chunk in TextReceiveStream(stderr):
                run.stderr += chunk

        with anyio.fail_after(RUN_BUDGET_S):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(read_stderr)
                buffer = ""
                async for chunk in TextReceiveStream(stdout):
                    buffer += chunk
                    *complete, buffer = buffer.split("\n")
                    now = anyio.current_time()
                    run.lines.extend((now, json.loads(text)) for text in complete if text.strip())
                run.returncode = await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()
    return run


def report(request: pytest.FixtureRequest, run: Run) -> None:
    """The CLI's version and each call's seconds, in the JUnit properties and in `pytest -rP`."""
    version = run.init["claude_code_version"]
    seconds = ", ".join(f"{call.name.removeprefix(MCP)} {call.duration:.2f}s" for call in run.calls())
    request.node.user_properties.extend([("claude_code_version", version), ("call_seconds", seconds)])
    request.node.add_report_section("call", "orchestrator", f"Claude Code {version}: {seconds}")


def remove_containers(run: Run) -> None:
    """Whatever the outcome, no child container outlives the test."""
    for call in run.calls():
        for sandbox in SANDBOX_ID.findall(call.result):
            subprocess.run(["docker", "rm", "-f", sandbox], capture_output=True, timeout=60)


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    script = Script()
    for name, (answer, delay) in CHILDREN.items():
        script.on(user_contains=f"CHILD-{name}", reply=Reply(text=answer, delay_s=delay))
    with ScriptedModelServer(script) as server:
        yield server


async def orchestrate(cli: Path, tool_search: bool, model_server: ScriptedModelServer, tmp_path: Path) -> Run:
    orchestration = Orchestration(tool_search)
    for after_tool in (None, True):
        model_server.script.on(
            user_contains="ORCHESTRATE", after_tool_result=after_tool, reply=orchestration, times=None
        )
    run = Run()
    try:
        run = await run_orchestrator(cli, model_server.url, tmp_path)
        check(run, tool_search, orchestration)
    finally:
        remove_containers(run)
    return run


def check(run: Run, tool_search: bool, orchestration: Orchestration) -> None:
    calls = run.calls()
    names = [call.name.removeprefix(MCP) for call in calls]
    story = f"calls {names}; model steps {orchestration.steps}; stderr {run.stderr[-1500:]!r}"
    assert run.returncode == 0 and run.result.get("subtype") == "success", story

    # In order: (ToolSearch,) create, three spawns, wait_for until settled (the first at the cap), three stops.
    waits = names.count("wait_for")
    expected = [*(["ToolSearch"] if tool_search else []), "create_environment", *["spawn_agent"] * 3]
    expected += ["wait_for"] * waits + ["stop_session"] * 3
    assert names == expected and waits >= 2, story

    # Every call came back, in the foreground, without error, and within the cap.
    for call in calls:
        assert call.ended is not None, f"{call.name} never got its result; {story}"
        assert not call.is_error, f"{call.name} failed: {call.result[:500]}"
        assert "background" not in call.result.lower(), f"{call.name} was backgrounded: {call.result[:500]}"
        assert call.duration < CAP_S + CAP_SLACK_S, f"{call.name} took {call.duration:.1f}s; {story}"
    waits_seen = [structured(call.result) for call in calls if call.name.endswith("wait_for")]
    # The slowest child outlasts the cap, so the first wait returned at the cap, timed out, with
    # the quick children settled; the model called again until all three were.
    first_wait = next(call for call in calls if call.name.endswith("wait_for"))
    assert waits_seen[0]["timed_out"] and len(waits_seen[0]["settled"]) == 2, first_wait.result
    assert first_wait.duration >= CAP_S - 0.5, first_wait.duration
    assert not waits_seen[-1]["timed_out"] and len(waits_seen[-1]["settled"]) == 3, waits_seen[-1]

    # The final message names each child's answer (read from wait_for, not known to the script in advance).
    final = run.result["result"]
    for answer, _ in CHILDREN.values():
        assert answer in final, final
    assert sorted(orchestration.finals) == sorted(answer for answer, _ in CHILDREN.values())

    # Each spawn made its own container; each was stopped and removed by stop_session.
    spawned = [SANDBOX_ID.findall(call.result)[0] for call in calls if call.name.endswith("spawn_agent")]
    assert len(set(spawned)) == 3
    stops = [call for call in calls if call.name.endswith("stop_session")]
    assert [structured(call.result)["status"] for call in stops] == ["stopped"] * 3, [c.result for c in stops]
    assert [sandbox for sandbox in spawned if container_exists(sandbox)] == []


async def test_the_pinned_claude_code_orchestrates_three_docker_sub_agents_within_the_cap(
    tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path, request: pytest.FixtureRequest
) -> None:
    run = await orchestrate(claude_bin, False, model_server, tmp_path)
    assert run.init["claude_code_version"] == "2.1.197"
    report(request, run)


@pytest.mark.parametrize("version", [latest_version()], ids=lambda version: f"claude-{version}")
async def test_the_newest_claude_code_finds_the_tools_with_tool_search_and_orchestrates(
    version: str, tmp_path: Path, model_server: ScriptedModelServer, request: pytest.FixtureRequest
) -> None:
    if not LATEST_BIN.exists():
        pytest.fail(f"{LATEST_BIN} is missing: run scripts/install-latest-claude.sh (scripts/setup.sh does it)")
    run = await orchestrate(LATEST_BIN, True, model_server, tmp_path)
    assert run.init["claude_code_version"] == version
    report(request, run)
    # The MCP tools were deferred: absent from the first request's tool list, loaded by ToolSearch.
    first, *rest = model_server.requests_containing("ORCHESTRATE")
    assert [tool["name"] for tool in first.body["tools"] if tool["name"].startswith(MCP)] == []
    loaded = {tool["name"] for tool in rest[0].body["tools"] if tool["name"].startswith(MCP)}
    assert loaded >= {MCP + name for name in ("create_environment", "spawn_agent", "wait_for", "stop_session")}
