"""CodexBackend with the real Codex CLI on this host (no container): the argv from
`command()`, the profile from `setup()`, stdout through the backend's translator, the model
served by the scripted Responses API server on loopback."""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from mcp_sandboxes.backends.base import AgentSpec, Turn
from mcp_sandboxes.backends.codex import (
    CLI_MOUNT,
    CLI_TARGET,
    CodexBackend,
    profile_path,
    profile_toml,
    toml_string,
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
from tests.backends.cli_harness import HostSandbox, Outcome, home_and_work, make_turn, of_type
from tests.conftest import AGENT_CLIS, ROOT
from tests.support.model_server import ApiError, Reply, Script, ScriptedModelServer, ToolCall, openai_responses

CODEX_WRAPPER = AGENT_CLIS / ".bin" / "codex"
CODEX_NATIVE = AGENT_CLIS / "@openai" / "codex-linux-x64" / "vendor" / "x86_64-unknown-linux-musl" / "bin" / "codex"
MCP_SERVER = ROOT / "tests" / "fixtures" / "codex" / "record.py"
TURN_TIMEOUT_S = 90.0
MODEL = "gpt-5.5"  # in Codex's catalog, offered exec_command/apply_patch/tool_search
NO_RETRIES = [
    "-c",
    "model_providers.mcp_sandboxes.request_max_retries=0",
    "-c",
    "model_providers.mcp_sandboxes.stream_max_retries=0",
]


@pytest.fixture(scope="session")
def codex_bin() -> Path:
    if not CODEX_WRAPPER.exists():
        pytest.fail(f"{CODEX_WRAPPER} is missing: run scripts/install-agent-clis.sh (scripts/test does it)")
    return CODEX_WRAPPER


# -- running a turn ------------------------------------------------------------------------


async def run_turn(
    backend: CodexBackend,
    turn: Turn,
    executable: Path,
    on_event: Callable[[Event, anyio.abc.Process], None] | None = None,
) -> Outcome:
    return await cli_harness.run_turn(backend, turn, executable, timeout_s=TURN_TIMEOUT_S, on_event=on_event)


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script(), vendors=[openai_responses]) as running:
        yield running


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return home_and_work(tmp_path)


def make_backend(server: ScriptedModelServer) -> CodexBackend:
    settings = BackendSettings(pass_env=["OPENAI_API_KEY", "CODEX_API_KEY", "OPENAI_BASE_URL"])
    environ = {"OPENAI_BASE_URL": f"{server.url}/v1", "OPENAI_API_KEY": "sk-test-not-real", "UNRELATED": "x"}
    backend = build_backend("codex", settings, environ)
    assert isinstance(backend, CodexBackend)
    return backend


AGENT = AgentSpec(backend="codex", model=MODEL, system_prompt="DEVELOPER-INSTRUCTIONS-MARKER: you are under test.")


async def prepared(server: ScriptedModelServer, agent: AgentSpec, dirs: tuple[Path, Path]) -> CodexBackend:
    backend = make_backend(server)
    await apply_setup(HostSandbox(), backend.setup(agent, home=str(dirs[0])), user=None)
    return backend


# -- the real CLI ----------------------------------------------------------------------------


async def test_a_shell_turn_writes_a_file_and_a_resumed_turn_carries_the_history(
    server: ScriptedModelServer, dirs: tuple[Path, Path], codex_bin: Path
) -> None:
    command = "echo real-proof > made-by-codex.txt && cat made-by-codex.txt"
    server.script.on(user_contains="FIRST-TASK", reply=Reply(tool_calls=[ToolCall("exec_command", {"cmd": command})]))
    server.script.on(tool_result_contains="real-proof", reply=Reply(text="DONE-1: wrote the file"))
    server.script.on(user_contains="SECOND-TASK", reply=Reply(text="DONE-2: remembered"))
    backend = await prepared(server, AGENT, dirs)

    first = await run_turn(backend, make_turn(AGENT, "FIRST-TASK: write the file", dirs), codex_bin)
    assert (dirs[1] / "made-by-codex.txt").read_text() == "real-proof\n"
    assert [e.type for e in first.events] == [
        "agent.tool_use",
        "agent.tool_result",
        "agent.message",
        "span.model_request_end",
    ]
    use, tool_result = of_type(first.events, AgentToolUse)[0], of_type(first.events, AgentToolResult)[0]
    assert use.name == "command_execution" and command in use.input["command"]
    assert tool_result.tool_use_id == use.tool_use_id and tool_result.content == "real-proof\n"
    assert first.result.stop_reason == "end_turn" and first.result.final_text == "DONE-1: wrote the file"
    assert first.result.usage.input_tokens > 0 and first.result.usage.cost_usd is None
    thread_id = first.result.native_session_id
    assert thread_id and first.exit_code == 0
    # The system prompt reached the model as developer instructions, besides Codex's own.
    request = server.requests_containing("FIRST-TASK")[0]
    developer = [i for i in request.body["input"] if i.get("role") == "developer"]
    assert any("DEVELOPER-INSTRUCTIONS-MARKER" in json.dumps(i) for i in developer) and len(developer) > 1
    assert request.body["model"] == MODEL and request.headers["authorization"] == "[redacted]"

    second = await run_turn(
        backend, make_turn(AGENT, "SECOND-TASK: still there?", dirs, resume_id=thread_id), codex_bin
    )
    assert [m.text for m in of_type(second.events, AgentMessage)] == ["DONE-2: remembered"]
    assert second.result.native_session_id == thread_id and second.result.stop_reason == "end_turn"
    # The resumed request carried the whole first turn: prompt, tool call, its output, reply.
    history = json.dumps(server.requests_containing("SECOND-TASK")[-1].body["input"])
    for expected in ("FIRST-TASK", "exec_command", "real-proof", "DONE-1: wrote the file"):
        assert expected in history, expected
    # Codex reports the thread's running total; the backend turns it into this turn's usage:
    # one model request, so less than the first turn's two.
    assert 0 < second.result.usage.input_tokens < first.result.usage.input_tokens
    assert server.script.pending == 0 and server.script.misses == 0


async def test_a_prompt_on_stdin_may_be_huge_and_start_with_a_dash(
    server: ScriptedModelServer, dirs: tuple[Path, Path], codex_bin: Path
) -> None:
    prompt = "--version -m DASH-PROMPT " + "x" * 300_000
    server.script.on(user_contains="--version -m DASH-PROMPT", reply=Reply(text="DASH-OK"))
    backend = await prepared(server, AGENT, dirs)
    outcome = await run_turn(backend, make_turn(AGENT, prompt, dirs), codex_bin)
    assert outcome.result.final_text == "DASH-OK"
    assert server.requests_containing("x" * 300_000)


async def test_mcp_servers_written_by_setup_reach_the_real_cli(
    server: ScriptedModelServer, dirs: tuple[Path, Path], codex_bin: Path
) -> None:
    # Codex offers MCP tools through its tool_search; a server still starting finds nothing yet.
    search = Reply(tool_calls=[ToolCall("tool_search", {"query": "add"})])
    server.script.on(user_contains="ADD", reply=search)
    server.script.on(tool_result_contains="[]", reply=search, times=20)
    server.script.on(
        tool_result_contains='"add"', reply=Reply(tool_calls=[ToolCall("mcp__calc__add", {"a": 2, "b": 40})])
    )
    server.script.on(tool_result_contains="42", reply=Reply(text="The sum is 42."))
    agent = AGENT.model_copy(
        update={
            "mcp_servers": {
                "calc": {"type": "stdio", "command": sys.executable, "args": [str(MCP_SERVER), "--mcp-server"]}
            }
        }
    )
    backend = await prepared(server, agent, dirs)
    outcome = await run_turn(backend, make_turn(agent, "ADD 2 and 40", dirs), codex_bin)
    use = of_type(outcome.events, AgentMcpToolUse)[0]
    assert (use.server_name, use.name, use.input) == ("calc", "add", {"a": 2, "b": 40})
    assert of_type(outcome.events, AgentMcpToolResult)[0].content == "42"
    assert outcome.result.final_text == "The sum is 42."


async def test_sigint_during_a_tool_ends_the_turn_as_interrupted_and_the_thread_resumes(
    server: ScriptedModelServer, dirs: tuple[Path, Path], codex_bin: Path
) -> None:
    server.script.on(user_contains="LONG", reply=Reply(tool_calls=[ToolCall("exec_command", {"cmd": "sleep 60"})]))
    server.script.on(user_contains="AFTER", reply=Reply(text="back again"))

    def interrupt_on_tool_use(event: Event, process: anyio.abc.Process) -> None:
        if isinstance(event, AgentToolUse):
            process.send_signal(signal.SIGINT)

    backend = await prepared(server, AGENT, dirs)
    started = anyio.current_time()
    outcome = await run_turn(backend, make_turn(AGENT, "LONG", dirs), codex_bin, interrupt_on_tool_use)
    assert anyio.current_time() - started < 30
    assert outcome.exit_code == 1  # what 0.169.0 exits with on SIGINT
    assert outcome.result.stop_reason == "interrupted" and of_type(outcome.events, SessionError) == []
    thread_id = outcome.result.native_session_id
    assert thread_id

    after = await run_turn(backend, make_turn(AGENT, "AFTER the interrupt", dirs, resume_id=thread_id), codex_bin)
    assert after.result.final_text == "back again" and after.result.native_session_id == thread_id
    assert "LONG" in json.dumps(server.requests_containing("AFTER")[-1].body["input"])


async def test_an_api_error_ends_the_turn_with_the_apis_message(
    server: ScriptedModelServer, dirs: tuple[Path, Path], codex_bin: Path
) -> None:
    error = ApiError("authentication", "Incorrect API key provided: sk-test")
    server.script.on(user_contains="NOPE", reply=Reply(error=error), times=None)
    agent = AGENT.model_copy(update={"extra_args": NO_RETRIES})
    backend = await prepared(server, agent, dirs)
    outcome = await run_turn(backend, make_turn(agent, "NOPE", dirs), codex_bin)
    assert outcome.exit_code == 1 and outcome.result.stop_reason == "error"
    (reported,) = of_type(outcome.events, SessionError)
    assert reported.error.type == "api_error" and "401" in reported.error.message
    assert "Incorrect API key provided" in (outcome.result.error or "")


async def test_the_native_binary_the_mount_points_at_runs_a_turn_on_its_own(
    server: ScriptedModelServer, dirs: tuple[Path, Path]
) -> None:
    server.script.on(user_contains="NATIVE", reply=Reply(text="native ok"))
    backend = await prepared(server, AGENT, dirs)
    outcome = await run_turn(backend, make_turn(AGENT, "NATIVE", dirs), CODEX_NATIVE)
    assert outcome.result.final_text == "native ok" and outcome.exit_code == 0


# -- command(), settings, mounts, setup -------------------------------------------------


def test_the_first_turn_argv_env_and_stdin() -> None:
    backend = CodexBackend(env={"OPENAI_API_KEY": "sk-secret", "OPENAI_BASE_URL": "http://x/v1"})
    agent = AgentSpec(backend="codex", model="gpt-test", extra_args=["-c", "model_reasoning_effort=low"])
    command = backend.command(Turn(session_id="s", index=0, prompt="-do it", agent=agent, workdir="/w", home="/h"))
    assert command.argv == [
        "codex",
        "exec",
        "--json",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        "-p",
        "mcp-sandboxes",
        "-m",
        "gpt-test",
        "-c",
        "model_reasoning_effort=low",
        "-",
    ]
    assert command.stdin == b"-do it" and command.cwd == "/w"
    # exec reads CODEX_API_KEY, the configured provider OPENAI_API_KEY: both are set.
    assert command.env == {
        "OPENAI_API_KEY": "sk-secret",
        "CODEX_API_KEY": "sk-secret",
        "OPENAI_BASE_URL": "http://x/v1",
        "HOME": "/h",
    }
    assert "sk-secret" not in repr(backend)


def test_a_follow_up_resumes_the_thread_after_the_exec_flags() -> None:
    backend = CodexBackend(cli_path="/somewhere/bin/codex", env={"CODEX_API_KEY": "k"})
    command = backend.command(
        Turn(session_id="s", index=1, prompt="p", resume_id="thread-1", agent=AgentSpec(backend="codex"))
    )
    assert command.argv[0] == CLI_TARGET
    assert command.argv[-3:] == ["resume", "thread-1", "-"]
    assert command.argv.index("--json") < command.argv.index("resume")
    assert command.env["OPENAI_API_KEY"] == "k"
    first = backend.command(Turn(session_id="s", index=0, prompt="p", agent=AgentSpec(backend="codex")))
    assert "resume" not in first.argv and "-m" not in first.argv


def test_from_settings_passes_only_set_host_variables_and_fixed_env_wins() -> None:
    settings = BackendSettings(pass_env=["OPENAI_API_KEY", "UNSET", "EMPTY"], env={"FIXED": "1"})
    backend = CodexBackend.from_settings(settings, {"OPENAI_API_KEY": "host", "EMPTY": "", "OTHER": "no"})
    env = backend.command(Turn(session_id="s", index=0, prompt="p", agent=AgentSpec(backend="codex"))).env
    assert env == {"OPENAI_API_KEY": "host", "CODEX_API_KEY": "host", "FIXED": "1", "HOME": "/home/agent"}


def test_mounts_take_the_native_binarys_platform_directory(codex_bin: Path, tmp_path: Path) -> None:
    assert CodexBackend().mounts() == []
    (mount,) = CodexBackend(cli_path=str(CODEX_NATIVE)).mounts()
    assert (mount.target, mount.read_only) == (CLI_MOUNT, True)
    assert Path(mount.source, "bin", "codex").is_file() and Path(mount.source, "codex-path", "rg").exists()
    with pytest.raises(InvalidInputError, match=r"backends\.codex\.cli_path: .*nope/codex does not exist"):
        CodexBackend(cli_path=str(tmp_path / "nope" / "codex")).mounts()
    with pytest.raises(InvalidInputError, match="not a native executable"):
        CodexBackend(cli_path=str(codex_bin)).mounts()  # the npm wrapper script
    loose = tmp_path / "codex"
    loose.write_bytes(CODEX_NATIVE.read_bytes()[:64])
    with pytest.raises(InvalidInputError, match="not inside a bin/ directory"):
        CodexBackend(cli_path=str(loose)).mounts()


def test_the_registry_builds_codex() -> None:
    assert "codex" in backend_names()
    assert isinstance(build_backend("codex", BackendSettings(), {}), CodexBackend)


def owned_private_toml(home: Path, path: str, uid: int) -> dict[str, Any]:
    profile = Path(path)
    assert profile == home / ".codex" / "mcp-sandboxes.config.toml"
    assert home.stat().st_uid == uid and profile.parent.stat().st_uid == uid
    assert profile.stat().st_uid == uid and stat.S_IMODE(profile.stat().st_mode) == 0o600
    return tomllib.loads(profile.read_text())


async def test_setup_writes_a_private_profile_owned_by_the_user(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.fail("this test checks chown and must run as root (CI and this machine do)")
    home = tmp_path / "agent-home"
    servers: dict[str, Any] = {
        "calc": {"type": "stdio", "command": "calc-server", "args": ["--x"], "env": {"TOKEN": "t"}},
        "remote": {"type": "http", "url": "https://mcp.example/mcp", "headers": {"X-Key": "k"}},
    }
    agent = AgentSpec(backend="codex", system_prompt='be "careful"\nand brief', mcp_servers=servers)
    backend = CodexBackend(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    for _ in range(2):  # idempotent
        await apply_setup(HostSandbox(), backend.setup(agent, home=str(home)), user="nobody")
    config = owned_private_toml(home, profile_path(str(home)), pwd.getpwnam("nobody").pw_uid)
    assert config["developer_instructions"] == 'be "careful"\nand brief'
    assert config["model_provider"] == "mcp_sandboxes"
    assert config["model_providers"]["mcp_sandboxes"] == {
        "name": "mcp-sandboxes",
        "base_url": "http://127.0.0.1:9/v1",
        "env_key": "OPENAI_API_KEY",
        "wire_api": "responses",
    }
    assert config["mcp_servers"] == {
        "calc": {"command": "calc-server", "args": ["--x"], "env": {"TOKEN": "t"}},
        "remote": {"url": "https://mcp.example/mcp", "http_headers": {"X-Key": "k"}},
    }
    # Without a base URL Codex's own OpenAI provider is used; the profile sets nothing.
    bare = tomllib.loads(profile_toml(AgentSpec(backend="codex"), base_url=None))
    assert bare == {}


def test_toml_strings_survive_any_text() -> None:
    nasty = 'quote " backslash \\ tab \t newline \n bell \x07 del \x7f unicode é 🚀 \U0001f600'
    assert tomllib.loads(f"x = {toml_string(nasty)}")["x"] == nasty


def test_bad_mcp_server_entries_name_the_field() -> None:
    with pytest.raises(InvalidInputError, match=r"mcp_servers: server name 'a\.b'"):
        profile_toml(AgentSpec(backend="codex", mcp_servers={"a.b": {"command": "x"}}), base_url=None)
    with pytest.raises(InvalidInputError, match=r"mcp_servers\.x: needs `command`"):
        profile_toml(AgentSpec(backend="codex", mcp_servers={"x": {"args": []}}), base_url=None)


async def test_setup_reports_a_home_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BackendError, match=r"codex: could not create HOME .*/file/home"):
        await apply_setup(
            HostSandbox(), CodexBackend().setup(AgentSpec(backend="codex"), home=str(blocker / "home")), user=None
        )


def test_the_cli_is_the_pinned_version(codex_bin: Path) -> None:
    for binary in (codex_bin, CODEX_NATIVE):
        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60).stdout
        assert version.strip() == "codex-cli 0.169.0"


# -- the scripted Responses API server itself --------------------------------------------


def _sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_the_scripted_server_streams_the_published_event_sequence(server: ScriptedModelServer) -> None:
    call = ToolCall("exec_command", {"cmd": "echo " + "y" * 40}, id="call_1")
    server.script.on(user_contains="SEQ", reply=Reply(thinking="hmm", text="a" * 30, tool_calls=[call]))
    request = {
        "model": "m",
        "stream": True,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context/>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "SEQ go"}]},
        ],
    }
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{server.url}/v1/responses", json=request)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    names = [name for name, _ in events]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    assert names.count("response.output_item.added") == names.count("response.output_item.done") == 3
    assert names.count("response.output_text.delta") == 2  # 30 characters in 24-character pieces
    done = [data["item"] for name, data in events if name == "response.output_item.done"]
    assert [item["type"] for item in done] == ["reasoning", "message", "function_call"]
    assert done[2]["call_id"] == "call_1" and json.loads(done[2]["arguments"]) == call.arguments
    usage = events[-1][1]["response"]["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens_details"]["reasoning_tokens"] >= 0
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert server.model_requests[-1].reply is not None


async def test_the_scripted_server_reads_tool_outputs_and_answers_errors_and_plain_json(
    server: ScriptedModelServer,
) -> None:
    server.script.on(tool_result_contains="out-2", reply=Reply(text="saw the newest output"))
    server.script.on(user_contains="BROKEN", reply=Reply(error=ApiError("rate_limit", "slow down")))

    def item(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, **fields}

    history = [
        item("message", role="user", content=[{"type": "input_text", "text": "task"}]),
        item("function_call", call_id="c1", name="exec_command", arguments="{}"),
        item("function_call_output", call_id="c1", output="out-1"),
        item("function_call", call_id="c2", name="exec_command", arguments="{}"),
        item("function_call_output", call_id="c2", output="out-2"),
    ]
    parsed = openai_responses.parse_request({"model": "m", "input": history})
    assert parsed.user_text == "task" and parsed.tool_results == ["out-2"]  # only the newest round trip
    # A notice Codex adds after the outputs (an MCP server finished starting) does not hide them.
    notice = item("message", role="developer", content=[{"type": "input_text", "text": "<tools>...</tools>"}])
    assert openai_responses.parse_request({"model": "m", "input": [*history, notice]}).tool_results == ["out-2"]
    async with httpx.AsyncClient(timeout=10) as client:
        plain = await client.post(f"{server.url}/v1/responses", json={"model": "m", "input": history})
        error = await client.post(f"{server.url}/v1/responses", json={"model": "m", "input": "BROKEN"})
    assert plain.json()["status"] == "completed"
    assert plain.json()["output"][0]["content"][0]["text"] == "saw the newest output"
    assert error.status_code == 429
    assert error.json() == {
        "error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    }
