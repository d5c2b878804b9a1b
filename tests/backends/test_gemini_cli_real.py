"""GeminiBackend with the real Gemini CLI on this host (no container): the argv and env from
`command()`, the files from `setup()`, stdout through `GeminiTranslator`, the model served
by the scripted Gemini API server on loopback."""

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
from mcp_sandboxes.backends.gemini import (
    CLI_MOUNT_DIR,
    GeminiBackend,
    approval_mode,
    gemini_mcp_server,
)
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
from tests.conftest import AGENT_CLIS, ROOT
from tests.support.model_server import ApiError, Reply, Script, ScriptedModelServer, ToolCall, gemini

TURN_TIMEOUT_S = 120.0
GEMINI_BIN = AGENT_CLIS / ".bin" / "gemini"
MCP_SERVER_SCRIPT = ROOT / "tests" / "fixtures" / "gemini" / "record.py"
MODEL = "gemini-2.5-flash"


@pytest.fixture(scope="session")
def gemini_bin() -> Path:
    if not GEMINI_BIN.exists():
        pytest.fail(f"{GEMINI_BIN} is missing: run scripts/install-agent-clis.sh (scripts/test does it)")
    return GEMINI_BIN


# -- running a turn ------------------------------------------------------------------------


async def run_turn(
    backend: Backend,
    turn: Turn,
    gemini_bin: Path,
    on_event: Callable[[Event, anyio.abc.Process], None] | None = None,
) -> Outcome:
    return await cli_harness.run_turn(backend, turn, gemini_bin, timeout_s=TURN_TIMEOUT_S, on_event=on_event)


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script(), vendors=[gemini]) as running:
        yield running


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return home_and_work(tmp_path)


def make_backend(server: ScriptedModelServer, extra: dict[str, Any] | None = None) -> Backend:
    # `settings` is an extra key of the backend's table, as a config file would give it.
    raw: dict[str, Any] = {"pass_env": ["GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL"]}
    if extra:
        raw["settings"] = extra
    settings = BackendSettings.model_validate(raw)
    environ = {"GOOGLE_GEMINI_BASE_URL": server.url, "GEMINI_API_KEY": "test-not-real", "UNRELATED": "x"}
    return build_backend("gemini", settings, environ)


async def prepared(server: ScriptedModelServer, agent: AgentSpec, dirs: tuple[Path, Path], **kw: Any) -> Backend:
    backend = make_backend(server, **kw)
    await apply_setup(HostSandbox(), backend.setup(agent, home=str(dirs[0])), user=None)
    return backend


def shell(command: str) -> ToolCall:
    return ToolCall("run_shell_command", {"command": command})


AGENT = AgentSpec(backend="gemini", model=MODEL, system_prompt="APPENDED-SYSTEM-PROMPT: you are under test.")


# -- the real CLI ----------------------------------------------------------------------------


async def test_a_shell_turn_writes_a_file_and_a_resumed_turn_carries_the_history(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    command = "echo real-proof > made-by-gemini.txt && cat made-by-gemini.txt"
    server.script.on(user_contains="FIRST-TASK", reply=Reply(tool_calls=[shell(command)]))
    server.script.on(tool_result_contains="real-proof", reply=Reply(text="DONE-1: wrote the file"))
    server.script.on(user_contains="SECOND-TASK", reply=Reply(text="DONE-2: remembered"))
    backend = await prepared(server, AGENT, dirs)

    first = await run_turn(backend, make_turn(AGENT, "FIRST-TASK: write the file", dirs), gemini_bin)
    assert (dirs[1] / "made-by-gemini.txt").read_text() == "real-proof\n"
    assert [e.type for e in first.events] == [
        "agent.tool_use",
        "agent.tool_result",
        "agent.message",
        "span.model_request_end",
    ], first.stderr
    use, tool_result = of_type(first.events, AgentToolUse)[0], of_type(first.events, AgentToolResult)[0]
    assert use.name == "run_shell_command" and use.input["command"] == command
    assert tool_result.tool_use_id == use.tool_use_id and tool_result.content == "real-proof"
    assert first.result.stop_reason == "end_turn" and first.result.final_text == "DONE-1: wrote the file"
    assert first.result.usage.input_tokens > 0 and first.result.usage.output_tokens > 0
    session_id = first.result.native_session_id
    assert session_id and first.exit_code == 0
    # The system prompt is appended: the CLI's own instructions first, ours at the end.
    system = json.dumps(server.requests_containing("FIRST-TASK")[0].body["systemInstruction"])
    assert "APPENDED-SYSTEM-PROMPT" in system and system.index("APPENDED") > len(system) // 2

    second = await run_turn(
        backend, make_turn(AGENT, "SECOND-TASK: still there?", dirs, resume_id=session_id), gemini_bin
    )
    assert [m.text for m in of_type(second.events, AgentMessage)] == ["DONE-2: remembered"]
    assert second.result.native_session_id == session_id and second.result.stop_reason == "end_turn"
    assert second.result.usage.cache_read_input_tokens > 0  # the scripted API reports the repeated prefix
    request = server.requests_containing("SECOND-TASK")[-1]
    history = json.dumps(request.body["contents"])
    for expected in ("FIRST-TASK", "functionCall", "real-proof", "DONE-1: wrote the file"):
        assert expected in history, expected
    assert request.headers["x-goog-api-key"] == "[redacted]"
    assert request.path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert server.script.pending == 0 and server.script.misses == 0


async def test_without_a_model_the_routers_classifier_query_is_a_side_request(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    server.script.on(user_contains="ROUTE-ME", reply=Reply(text="routed"))
    agent = AgentSpec(backend="gemini")
    outcome = await run_turn(await prepared(server, agent, dirs), make_turn(agent, "ROUTE-ME", dirs), gemini_bin)
    assert outcome.result.final_text == "routed" and outcome.result.stop_reason == "end_turn"
    side = [r for r in server.requests if r.kind == "side"]
    assert side and all(r.path.endswith(":generateContent") for r in side)
    assert len(server.model_requests) == 1 and server.script.misses == 0


async def test_default_mode_offers_the_shell_only_when_allowed_and_still_refuses_redirections(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    server.script.on(user_contains="PLAIN-ECHO", reply=Reply(tool_calls=[shell("echo allowed-ran")]), times=2)
    server.script.on(user_contains="REDIRECT", reply=Reply(tool_calls=[shell("echo x > file.txt")]))
    server.script.on(after_tool_result=True, reply=Reply(text="after the tool"), times=None)
    strict = AgentSpec(backend="gemini", model=MODEL, permission_mode="default")
    allowed = strict.model_copy(update={"allowed_tools": ["run_shell_command"]})
    backend = await prepared(server, strict, dirs)

    refused = await run_turn(backend, make_turn(strict, "PLAIN-ECHO", dirs), gemini_bin)
    result = of_type(refused.events, AgentToolResult)[0]
    assert result.is_error and "not found" in result.content  # not offered at all
    ran = await run_turn(backend, make_turn(allowed, "PLAIN-ECHO", dirs), gemini_bin)
    assert of_type(ran.events, AgentToolResult)[0].content == "allowed-ran"
    redirect = await run_turn(backend, make_turn(allowed, "REDIRECT", dirs), gemini_bin)
    result = of_type(redirect.events, AgentToolResult)[0]
    assert result.is_error and "requires user confirmation" in result.content
    assert not (dirs[1] / "file.txt").exists()


async def test_a_prompt_on_stdin_may_be_huge_and_start_with_a_dash(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    prompt = "--version -p DASH-PROMPT " + "x" * 300_000
    server.script.on(user_contains="--version -p DASH-PROMPT", reply=Reply(text="DASH-OK"))
    outcome = await run_turn(await prepared(server, AGENT, dirs), make_turn(AGENT, prompt, dirs), gemini_bin)
    assert outcome.result.final_text == "DASH-OK", outcome.stderr
    assert server.requests_containing("x" * 300_000)


async def test_a_run_that_lost_the_clis_stdin_race_is_run_again_before_any_model_call(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    # The CLI gives piped stdin 500 ms: withheld, the first run sees no prompt and exits 42.
    server.script.on(user_contains="RACE-PROMPT", reply=Reply(text="RACE-OK"))
    backend = await prepared(server, AGENT, dirs)
    turn = make_turn(AGENT, "RACE-PROMPT", dirs)
    outcome = await cli_harness.run_turn(backend, turn, gemini_bin, timeout_s=TURN_TIMEOUT_S, withhold_stdin=1)
    assert outcome.runs == 2
    assert outcome.result.final_text == "RACE-OK", outcome.stderr
    assert len(server.requests_containing("RACE-PROMPT")) == 1


async def test_a_cli_that_never_gets_its_prompt_fails_with_the_input_error_after_three_runs(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    backend = await prepared(server, AGENT, dirs)
    turn = make_turn(AGENT, "NEVER-SEEN", dirs)
    outcome = await cli_harness.run_turn(backend, turn, gemini_bin, timeout_s=TURN_TIMEOUT_S, withhold_stdin=3)
    assert outcome.runs == 3 and outcome.exit_code == 42
    assert outcome.result.stop_reason == "error" and "input" in (outcome.result.error or "")
    assert not server.requests_containing("NEVER-SEEN")


async def test_mcp_servers_written_by_setup_reach_the_real_cli(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    server.script.on(user_contains="ADD", reply=Reply(tool_calls=[ToolCall("mcp_calc_add", {"a": 2, "b": 40})]))
    server.script.on(tool_result_contains="42", reply=Reply(text="The sum is 42."))
    servers = {"calc": {"type": "stdio", "command": sys.executable, "args": [str(MCP_SERVER_SCRIPT), "--mcp-server"]}}
    agent = AGENT.model_copy(update={"mcp_servers": servers})
    outcome = await run_turn(await prepared(server, agent, dirs), make_turn(agent, "ADD 2 and 40", dirs), gemini_bin)
    use, result = of_type(outcome.events, AgentMcpToolUse)[0], of_type(outcome.events, AgentMcpToolResult)[0]
    assert (use.server_name, use.name) == ("calc", "add") and result.content == "42" and not result.is_error
    declared = json.dumps(server.requests_containing("ADD")[0].body["tools"])
    assert "mcp_calc_add" in declared


async def test_max_turns_from_setup_stops_a_looping_agent(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    server.script.on(user_contains="LOOP", reply=Reply(tool_calls=[shell("echo again-1")]))
    server.script.on(tool_result_contains="again-1", reply=Reply(tool_calls=[shell("echo again-2")]))
    server.script.on(after_tool_result=True, reply=Reply(text="should not be reached"), times=None)
    agent = AGENT.model_copy(update={"max_turns": 2})
    outcome = await run_turn(await prepared(server, agent, dirs), make_turn(agent, "LOOP", dirs), gemini_bin)
    assert outcome.exit_code == 53 and outcome.result.stop_reason == "max_turns"
    assert len(server.model_requests) == 2 and not of_type(outcome.events, SessionError)


async def test_sigint_to_the_pid_stops_a_running_tool_and_the_session_resumes(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    server.script.on(user_contains="LONG", reply=Reply(tool_calls=[shell("sleep 60")]))
    server.script.on(user_contains="AFTER", reply=Reply(text="resumed after the interrupt"))
    backend = await prepared(server, AGENT, dirs)

    def stop_at_tool(event: Event, process: anyio.abc.Process) -> None:
        if isinstance(event, AgentToolUse):
            # The pid alone (no process group): GEMINI_CLI_NO_RELAUNCH keeps the CLI in it.
            process.send_signal(signal.SIGINT)

    with anyio.fail_after(30):
        stopped = await run_turn(backend, make_turn(AGENT, "LONG", dirs), gemini_bin, on_event=stop_at_tool)
    assert stopped.result.stop_reason == "interrupted" and not of_type(stopped.events, SessionError)
    session_id = stopped.result.native_session_id
    assert session_id
    resumed = await run_turn(backend, make_turn(AGENT, "AFTER", dirs, resume_id=session_id), gemini_bin)
    assert resumed.result.final_text == "resumed after the interrupt"
    assert "LONG" in json.dumps(server.requests_containing("AFTER")[-1].body["contents"])


async def test_an_api_error_without_retries_is_an_error_turn(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    overloaded = ApiError("overloaded", "The model is overloaded. Please try again later.")
    server.script.on(user_contains="BUSY", reply=Reply(error=overloaded), times=None)
    # Extra CLI settings from the backend's config: one attempt instead of ten with backoff.
    backend = await prepared(server, AGENT, dirs, extra={"general": {"maxAttempts": 1}})
    outcome = await run_turn(backend, make_turn(AGENT, "BUSY", dirs), gemini_bin)
    error = of_type(outcome.events, SessionError)[0].error
    assert error.type == "api_error" and "overloaded" in error.message
    assert outcome.result.stop_reason == "error" and len(server.model_requests) == 1


async def test_without_an_api_key_the_turn_fails_with_the_auth_exit_code(
    server: ScriptedModelServer, dirs: tuple[Path, Path], gemini_bin: Path
) -> None:
    backend = build_backend(
        "gemini", BackendSettings(pass_env=["GOOGLE_GEMINI_BASE_URL"]), {"GOOGLE_GEMINI_BASE_URL": server.url}
    )
    await apply_setup(HostSandbox(), backend.setup(AGENT, home=str(dirs[0])), user=None)
    outcome = await run_turn(backend, make_turn(AGENT, "NO KEY", dirs), gemini_bin)
    assert outcome.exit_code == 41 and not server.requests
    error = of_type(outcome.events, SessionError)[0].error
    assert error.type == "auth_error" and "GEMINI_API_KEY" in error.message


def test_the_cli_is_the_pinned_version(gemini_bin: Path) -> None:
    version = subprocess.run([str(gemini_bin), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert version.strip() == "0.61.0"


# -- command, settings, setup and mounts ---------------------------------------------------


def test_the_registry_builds_gemini_and_passes_only_named_variables() -> None:
    assert "gemini" in backend_names()
    settings = BackendSettings(pass_env=["GEMINI_API_KEY", "MISSING"], env={"FIXED": "1"})
    backend = build_backend("gemini", settings, {"GEMINI_API_KEY": "secret-value", "OTHER": "x"})
    assert isinstance(backend, GeminiBackend)
    env = backend.command(make_turn(AgentSpec(backend="gemini"), "p", (Path("/h"), Path("/w")))).env
    assert env["GEMINI_API_KEY"] == "secret-value" and env["FIXED"] == "1"
    assert "OTHER" not in env and "MISSING" not in env
    assert env["HOME"] == "/h" and env["GEMINI_CLI_NO_RELAUNCH"] == "true"
    assert "secret-value" not in repr(backend)


def test_the_command_for_a_first_and_a_resumed_turn() -> None:
    agent = AgentSpec(backend="gemini", model="m-1", allowed_tools=["read_file", "run_shell_command(git)"])
    first = GeminiBackend().command(make_turn(agent, "hello", (Path("/h"), Path("/w"))))
    assert first.argv == [
        "gemini",
        "-p",
        "",
        "--output-format",
        "stream-json",
        "--approval-mode",
        "yolo",
        "--model",
        "m-1",
        "--allowed-tools=read_file",
        "--allowed-tools=run_shell_command(git)",
    ]
    assert first.stdin == b"hello" and first.cwd == "/w"
    resumed = GeminiBackend().command(make_turn(agent, "again", (Path("/h"), Path("/w")), resume_id="uuid-1"))
    assert resumed.argv[resumed.argv.index("--resume") + 1] == "uuid-1"
    yolo_flag = AgentSpec(backend="gemini", extra_args=["--yolo"], permission_mode="plan")
    argv = GeminiBackend().command(make_turn(yolo_flag, "x", (Path("/h"), Path("/w")))).argv
    assert "--approval-mode" not in argv and argv[-1] == "--yolo"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (None, "yolo"),
        ("bypassPermissions", "yolo"),
        ("acceptEdits", "auto_edit"),
        ("auto", "auto_edit"),
        ("plan", "plan"),
        ("default", "default"),
        ("dontAsk", "default"),
    ],
)
def test_permission_modes_map_to_approval_modes(mode: str | None, expected: str) -> None:
    assert approval_mode(mode) == expected


def test_an_unknown_permission_mode_names_the_field() -> None:
    with pytest.raises(InvalidInputError, match="permission_mode"):
        approval_mode("everything")


def test_mcp_servers_in_claudes_shape_become_gemini_entries() -> None:
    assert gemini_mcp_server("a", {"command": "x", "args": ["1"], "env": {"T": "t"}}) == {
        "command": "x",
        "args": ["1"],
        "env": {"T": "t"},
    }
    assert gemini_mcp_server("b", {"type": "http", "url": "http://h/mcp", "headers": {"A": "1"}}) == {
        "httpUrl": "http://h/mcp",
        "headers": {"A": "1"},
    }
    assert gemini_mcp_server("c", {"type": "sse", "url": "http://h/sse", "trust": True}) == {
        "url": "http://h/sse",
        "trust": True,
    }
    assert gemini_mcp_server("d", {"url": "http://h/mcp"}) == {"httpUrl": "http://h/mcp"}
    for bad in ({"type": "http"}, {"type": "websocket", "url": "ws://h"}, "not an object"):
        with pytest.raises(InvalidInputError, match="mcp_servers"):
            gemini_mcp_server("bad", bad)


def test_the_settings_document_keeps_existing_keys_and_overrides_what_a_headless_run_needs() -> None:
    existing = {
        "ui": {"theme": "Dracula"},
        "security": {"auth": {"selectedType": "oauth-personal"}},
        "mcpServers": {"mine": {"command": "mine"}},
    }
    agent = AgentSpec(backend="gemini", max_turns=7, system_prompt="p", mcp_servers={"calc": {"command": "calc"}})
    backend = GeminiBackend(settings={"general": {"maxAttempts": 2}})
    document = backend.settings_document(agent, existing)
    assert document["ui"] == {"theme": "Dracula"}
    assert document["security"] == {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}}
    assert document["general"] == {"enableAutoUpdate": False, "enableAutoUpdateNotification": False, "maxAttempts": 2}
    assert document["privacy"] == {"usageStatisticsEnabled": False} and document["telemetry"] == {"enabled": False}
    assert document["mcpServers"] == {"mine": {"command": "mine"}, "calc": {"command": "calc"}}
    assert document["model"] == {"maxSessionTurns": 7}
    assert document["context"]["fileName"] == ["GEMINI.md", "MCP-SANDBOXES.md"]
    vertex = GeminiBackend(env={"GOOGLE_GENAI_USE_VERTEXAI": "true"}).settings_document(AgentSpec(backend="gemini"))
    assert vertex["security"]["auth"]["selectedType"] == "vertex-ai" and "context" not in vertex


def test_settings_that_are_not_a_table_are_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"backends\.gemini\.settings"):
        GeminiBackend.from_settings(BackendSettings.model_validate({"settings": "general.maxAttempts=1"}), {})


async def test_setup_merges_into_existing_settings_owned_by_the_user_and_private(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.fail("this test checks chown and must run as root (CI and this machine do)")
    home = tmp_path / "agent-home"
    (home / ".gemini").mkdir(parents=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps({"ui": {"theme": "Dracula"}}))
    servers: dict[str, Any] = {"calc": {"command": "calc-server", "env": {"TOKEN": "t"}}}
    agent = AgentSpec(backend="gemini", mcp_servers=servers, system_prompt="EXTRA")
    backend = GeminiBackend()
    for _ in range(2):  # idempotent
        await apply_setup(HostSandbox(), backend.setup(agent, home=str(home)), user="nobody")
    uid, _ = user_ids("nobody")
    settings = home / ".gemini" / "settings.json"
    assert home.stat().st_uid == uid and settings.parent.stat().st_uid == uid
    assert settings.stat().st_uid == uid and stat.S_IMODE(settings.stat().st_mode) == 0o600
    document = json.loads(settings.read_text())
    assert document["ui"] == {"theme": "Dracula"} and document["mcpServers"] == servers
    assert (home / ".gemini" / "MCP-SANDBOXES.md").read_text() == "EXTRA"
    # A broken settings file is replaced, not left to fail the CLI.
    settings.write_text("{ not json")
    await apply_setup(HostSandbox(), backend.setup(AgentSpec(backend="gemini"), home=str(home)), user=None)
    assert json.loads(settings.read_text())["security"]["auth"]["selectedType"] == "gemini-api-key"


async def test_setup_reports_a_home_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BackendError, match=r"could not create HOME .*/file/home"):
        await apply_setup(
            HostSandbox(), GeminiBackend().setup(AgentSpec(backend="gemini"), home=str(blocker / "home")), user=None
        )


def test_cli_path_mounts_the_npm_package_and_runs_its_entry_script(gemini_bin: Path) -> None:
    backend = GeminiBackend(cli_path=str(gemini_bin))
    [mount] = backend.mounts()
    assert (Path(mount.source) / "package.json").is_file() and mount.target == CLI_MOUNT_DIR and mount.read_only
    entry = backend.command(make_turn(AgentSpec(backend="gemini"), "p", (Path("/h"), Path("/w")))).argv[0]
    assert entry == f"{CLI_MOUNT_DIR}/bundle/gemini.js"
    assert (Path(mount.source) / "bundle" / "gemini.js").is_file()
    assert GeminiBackend().mounts() == []
    with pytest.raises(InvalidInputError, match=r"backends\.gemini\.cli_path"):
        GeminiBackend(cli_path="/nonexistent/gemini").mounts()
