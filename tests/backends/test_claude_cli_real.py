"""ClaudeBackend with the real Claude Code CLI on this host (no container): the argv from
`command()`, the files from `setup()`, stdout through `ClaudeTranslator`, the model
served by the scripted server on loopback."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from mcp_sandboxes.backends.base import AgentSpec, Backend, Turn
from mcp_sandboxes.backends.claude import CLI_TARGET, ClaudeBackend
from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import BackendError, InvalidInputError
from mcp_sandboxes.events import (
    AgentMcpToolResult,
    AgentMcpToolUse,
    AgentMessage,
    AgentToolResult,
    AgentToolUse,
    Event,
    SessionError,
)
from mcp_sandboxes.orchestrator.setup import apply_setup
from tests.backends import cli_harness
from tests.backends.cli_harness import HostSandbox, Outcome, home_and_work, make_turn, of_type, user_ids
from tests.conftest import ROOT
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

TURN_TIMEOUT_S = 90.0
RECORDER = ROOT / "tests" / "fixtures" / "claude" / "record.py"


# -- running a turn ------------------------------------------------------------------------


async def run_turn(
    backend: Backend,
    turn: Turn,
    claude_bin: Path,
    on_event: Callable[[Event, anyio.abc.Process], None] | None = None,
) -> Outcome:
    return await cli_harness.run_turn(backend, turn, claude_bin, timeout_s=TURN_TIMEOUT_S, on_event=on_event)


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script()) as running:
        yield running


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return home_and_work(tmp_path)


def make_backend(server: ScriptedModelServer) -> Backend:
    settings = BackendSettings(
        pass_env=["ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_MODEL"],
        env={"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"},
    )
    environ = {"ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "sk-test-not-real", "UNRELATED": "x"}
    return build_backend("claude", settings, environ)


BASH_AGENT = AgentSpec(
    backend="claude",
    allowed_tools=["Bash"],
    permission_mode="default",
    max_turns=5,
    system_prompt="APPENDED-SYSTEM-PROMPT: you are under test.",
)


# -- the real CLI ----------------------------------------------------------------------------


async def test_a_bash_turn_writes_a_file_and_a_resumed_turn_carries_the_history(
    server: ScriptedModelServer, dirs: tuple[Path, Path], claude_bin: Path
) -> None:
    command = "echo real-proof > made-by-claude.txt && cat made-by-claude.txt"
    server.script.on(user_contains="FIRST-TASK", reply=Reply(tool_calls=[ToolCall("Bash", {"command": command})]))
    server.script.on(tool_result_contains="real-proof", reply=Reply(text="DONE-1: wrote the file"))
    server.script.on(user_contains="SECOND-TASK", reply=Reply(text="DONE-2: remembered"))
    backend = make_backend(server)
    await apply_setup(HostSandbox(), backend.setup(BASH_AGENT, home=str(dirs[0])), user=None)

    first = await run_turn(backend, make_turn(BASH_AGENT, "FIRST-TASK: write the file", dirs), claude_bin)
    assert (dirs[1] / "made-by-claude.txt").read_text() == "real-proof\n"
    assert [e.type for e in first.events] == [
        "agent.tool_use",
        "agent.tool_result",
        "agent.message",
        "span.model_request_end",
    ]
    use, tool_result = of_type(first.events, AgentToolUse)[0], of_type(first.events, AgentToolResult)[0]
    assert use.name == "Bash" and use.input["command"] == command
    assert tool_result.tool_use_id == use.tool_use_id and tool_result.content == "real-proof"
    assert first.result.stop_reason == "end_turn" and first.result.final_text == "DONE-1: wrote the file"
    assert first.result.usage.input_tokens > 0 and (first.result.usage.cost_usd or 0) > 0
    session_id = first.result.native_session_id
    assert session_id and first.exit_code == 0
    # --append-system-prompt reached the model, after Claude Code's own prompt.
    system = json.dumps(server.requests_containing("FIRST-TASK")[0].body["system"])
    assert "APPENDED-SYSTEM-PROMPT" in system and system.index("APPENDED") > 100

    second = await run_turn(
        backend, make_turn(BASH_AGENT, "SECOND-TASK: still there?", dirs, resume_id=session_id), claude_bin
    )
    assert [m.text for m in of_type(second.events, AgentMessage)] == ["DONE-2: remembered"]
    assert second.result.native_session_id == session_id
    assert second.result.stop_reason == "end_turn"
    # The resumed request carried the whole first turn: prompt, tool call, tool output, reply.
    request = server.requests_containing("SECOND-TASK")[-1]
    history = json.dumps(request.body["messages"])
    for expected in ("FIRST-TASK", use.tool_use_id, "real-proof", "DONE-1: wrote the file"):
        assert expected in history, expected
    assert request.headers["x-api-key"] == "[redacted]"
    assert server.script.pending == 0 and server.script.misses == 0


async def test_bypass_permissions_runs_tools_as_root_because_is_sandbox_is_set(
    server: ScriptedModelServer, dirs: tuple[Path, Path], claude_bin: Path
) -> None:
    server.script.on(user_contains="BYPASS", reply=Reply(tool_calls=[ToolCall("Bash", {"command": "id -u"})]))
    server.script.on(after_tool_result=True, reply=Reply(text="bypassed"))
    agent = AgentSpec(backend="claude", permission_mode="bypassPermissions")
    outcome = await run_turn(make_backend(server), make_turn(agent, "BYPASS", dirs), claude_bin)
    assert outcome.result.stop_reason == "end_turn", outcome.events
    tool_result = of_type(outcome.events, AgentToolResult)[0]
    assert tool_result.is_error is False and tool_result.content.strip() == str(os.getuid())


async def test_a_prompt_on_stdin_may_be_huge_and_start_with_a_dash(
    server: ScriptedModelServer, dirs: tuple[Path, Path], claude_bin: Path
) -> None:
    prompt = "--version -p DASH-PROMPT " + "x" * 300_000
    server.script.on(user_contains="--version -p DASH-PROMPT", reply=Reply(text="DASH-OK"))
    outcome = await run_turn(make_backend(server), make_turn(BASH_AGENT, prompt, dirs), claude_bin)
    assert outcome.result.final_text == "DASH-OK"
    assert server.requests_containing("x" * 300_000)


async def test_a_run_that_lost_the_clis_stdin_race_is_run_again_before_any_model_call(
    server: ScriptedModelServer, dirs: tuple[Path, Path], claude_bin: Path
) -> None:
    # The CLI waits 3 s for piped stdin: withheld, the first run proceeds without a prompt and exits 1.
    server.script.on(user_contains="RACE-PROMPT", reply=Reply(text="RACE-OK"))
    turn = make_turn(BASH_AGENT, "RACE-PROMPT", dirs)
    outcome = await cli_harness.run_turn(
        make_backend(server), turn, claude_bin, timeout_s=TURN_TIMEOUT_S, withhold_stdin=1
    )
    assert outcome.runs == 2 and outcome.result.final_text == "RACE-OK", outcome.stderr
    assert len(server.requests_containing("RACE-PROMPT")) == 1


async def test_mcp_servers_written_by_setup_reach_the_real_cli(
    server: ScriptedModelServer, dirs: tuple[Path, Path], claude_bin: Path
) -> None:
    server.script.on(user_contains="ADD", reply=Reply(tool_calls=[ToolCall("mcp__calc__add", {"a": 2, "b": 40})]))
    server.script.on(tool_result_contains="42", reply=Reply(text="The sum is 42."))
    agent = AgentSpec(
        backend="claude",
        allowed_tools=["mcp__calc__add"],
        permission_mode="default",
        mcp_servers={"calc": {"command": sys.executable, "args": [str(RECORDER), "--mcp-server"]}},
    )
    backend = make_backend(server)
    await apply_setup(HostSandbox(), backend.setup(agent, home=str(dirs[0])), user=None)
    outcome = await run_turn(backend, make_turn(agent, "ADD 2 and 40", dirs), claude_bin)
    use = of_type(outcome.events, AgentMcpToolUse)[0]
    assert (use.server_name, use.name) == ("calc", "add")
    assert json.loads(of_type(outcome.events, AgentMcpToolResult)[0].content) == {"result": 42}
    assert outcome.result.final_text == "The sum is 42."


async def test_sigint_during_a_tool_ends_the_turn_as_interrupted(
    server: ScriptedModelServer, dirs: tuple[Path, Path], claude_bin: Path
) -> None:
    server.script.on(user_contains="LONG", reply=Reply(tool_calls=[ToolCall("Bash", {"command": "sleep 60"})]))

    def interrupt_on_tool_use(event: Event, process: anyio.abc.Process) -> None:
        if isinstance(event, AgentToolUse):
            process.send_signal(signal.SIGINT)

    started = anyio.current_time()
    outcome = await run_turn(
        make_backend(server), make_turn(BASH_AGENT, "LONG", dirs), claude_bin, interrupt_on_tool_use
    )
    assert anyio.current_time() - started < 30
    assert outcome.result.stop_reason == "interrupted"
    assert of_type(outcome.events, SessionError) == []
    assert outcome.result.native_session_id


# -- command(), settings, mounts, setup -------------------------------------------------


def test_the_first_turn_argv_env_and_stdin() -> None:
    backend = ClaudeBackend(env={"ANTHROPIC_API_KEY": "sk-secret"})
    agent = AgentSpec(
        backend="claude",
        model="claude-test",
        system_prompt="be brief",
        allowed_tools=["Bash(git *)", "Edit"],
        permission_mode="acceptEdits",
        max_turns=3,
        mcp_servers={"x": {"command": "x"}},
        extra_args=["--effort", "low"],
    )
    turn = Turn(session_id="s", index=0, prompt="-do it", agent=agent, workdir="/w", home="/h")
    command = backend.command(turn)
    assert command.argv == [
        "claude",
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--model",
        "claude-test",
        "--append-system-prompt",
        "be brief",
        "--permission-mode",
        "acceptEdits",
        "--max-turns",
        "3",
        "--mcp-config",
        "/h/.mcp-sandboxes/claude-mcp.json",
        "--allowedTools",
        "Bash(git *)",
        "Edit",
        "--input-format",
        "text",
        "--effort",
        "low",
    ]
    assert command.stdin == b"-do it" and command.cwd == "/w"
    assert command.env == {"ANTHROPIC_API_KEY": "sk-secret", "HOME": "/h"}
    assert "sk-secret" not in repr(backend)


def test_a_follow_up_resumes_and_bypass_sets_is_sandbox() -> None:
    backend = ClaudeBackend(cli_path="/somewhere/claude")
    agent = AgentSpec(backend="claude", permission_mode="bypassPermissions")
    command = backend.command(Turn(session_id="s", index=1, prompt="p", resume_id="abc-123", agent=agent))
    assert command.argv[0] == CLI_TARGET
    assert command.argv[command.argv.index("--resume") + 1] == "abc-123"
    assert command.env["IS_SANDBOX"] == "1"
    flag_agent = AgentSpec(backend="claude", extra_args=["--dangerously-skip-permissions"])
    assert backend.command(Turn(session_id="s", index=0, prompt="p", agent=flag_agent)).env["IS_SANDBOX"] == "1"
    plain = AgentSpec(backend="claude", permission_mode="default")
    plain_command = backend.command(Turn(session_id="s", index=0, prompt="p", agent=plain))
    assert "IS_SANDBOX" not in plain_command.env and "--resume" not in plain_command.argv


def test_from_settings_passes_only_set_host_variables_and_fixed_env_wins() -> None:
    settings = BackendSettings(pass_env=["A_KEY", "UNSET", "EMPTY"], env={"FIXED": "1", "A_KEY": "from-config"})
    backend = ClaudeBackend.from_settings(settings, {"A_KEY": "from-host", "EMPTY": "", "OTHER": "no"})
    env = backend.command(Turn(session_id="s", index=0, prompt="p", agent=AgentSpec(backend="claude"))).env
    assert env == {"A_KEY": "from-config", "FIXED": "1", "HOME": "/home/agent"}
    only_host = ClaudeBackend.from_settings(BackendSettings(pass_env=["A_KEY"]), {"A_KEY": "from-host"})
    assert (
        only_host.command(Turn(session_id="s", index=0, prompt="p", agent=AgentSpec(backend="claude"))).env["A_KEY"]
        == "from-host"
    )


def test_mounts_name_the_setting_when_the_binary_is_missing(claude_bin: Path, tmp_path: Path) -> None:
    assert ClaudeBackend().mounts() == []
    (mount,) = ClaudeBackend(cli_path=str(claude_bin)).mounts()
    assert (mount.target, mount.read_only) == (CLI_TARGET, True)
    assert Path(mount.source).is_file() and os.access(mount.source, os.X_OK)
    with pytest.raises(InvalidInputError, match=r"backends\.claude\.cli_path: .*nope/claude does not exist"):
        ClaudeBackend(cli_path=str(tmp_path / "nope" / "claude")).mounts()


def test_the_registry_builds_claude_and_rejects_unknown_names() -> None:
    assert "claude" in backend_names()
    assert isinstance(build_backend("claude", BackendSettings(), {}), ClaudeBackend)
    with pytest.raises(InvalidInputError, match="unknown backend 'nope'"):
        build_backend("nope", BackendSettings(), {})


async def test_setup_creates_a_home_owned_by_the_user_and_a_private_mcp_config(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.fail("this test checks chown and must run as root (CI and this machine do)")
    home = tmp_path / "agent-home"
    servers: dict[str, Any] = {"calc": {"command": "calc-server", "env": {"TOKEN": "t"}}}
    agent = AgentSpec(backend="claude", mcp_servers=servers)
    backend = ClaudeBackend()
    for _ in range(2):  # idempotent
        await apply_setup(HostSandbox(), backend.setup(agent, home=str(home)), user="nobody")
    uid, _ = user_ids("nobody")
    config = home / ".mcp-sandboxes" / "claude-mcp.json"
    assert home.stat().st_uid == uid and config.parent.stat().st_uid == uid
    assert config.stat().st_uid == uid and stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"mcpServers": servers}
    # Without MCP servers only HOME is made.
    bare_home = tmp_path / "bare"
    await apply_setup(HostSandbox(), backend.setup(AgentSpec(backend="claude"), home=str(bare_home)), user=None)
    assert bare_home.is_dir() and not (bare_home / ".mcp-sandboxes" / "claude-mcp.json").exists()


async def test_setup_reports_a_home_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BackendError, match=r"could not create HOME .*/file/home"):
        await apply_setup(
            HostSandbox(), ClaudeBackend().setup(AgentSpec(backend="claude"), home=str(blocker / "home")), user=None
        )


def test_the_cli_is_the_pinned_version(claude_bin: Path) -> None:
    version = subprocess.run([str(claude_bin), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert version.startswith("2.1.197")
