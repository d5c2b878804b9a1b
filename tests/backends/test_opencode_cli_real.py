"""OpencodeBackend with the real OpenCode CLI on this host (no container): the argv from
`command()`, the files from `setup()`, stdout through the backend's translator, the model
served by the scripted server (OpenAI Chat Completions) on loopback. Every run gets its own
HOME, so OpenCode's config, session database and caches start empty."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from mcp_sandboxes.backends.base import AgentSpec, Turn
from mcp_sandboxes.backends.opencode import CLI_TARGET, OpencodeBackend, config_path, instructions_path
from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import BackendSettings, load_settings
from mcp_sandboxes.errors import BackendError, InvalidInputError
from mcp_sandboxes.events import (
    AgentMcpToolResult,
    AgentMcpToolUse,
    AgentMessage,
    AgentToolResult,
    AgentToolUse,
    SessionError,
)
from mcp_sandboxes.orchestrator.setup import apply_setup
from tests.backends import cli_harness
from tests.backends.cli_harness import HostSandbox, Outcome, home_and_work, make_turn, of_type
from tests.conftest import AGENT_CLIS, ROOT
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall, openai_chat

OPENCODE_BIN = AGENT_CLIS / "opencode-ai" / "bin" / "opencode.exe"
RECORDER = ROOT / "tests" / "fixtures" / "opencode" / "record.py"
TURN_TIMEOUT_S = 120.0
MODEL = "scripted/scripted-model"


@pytest.fixture(scope="session")
def opencode_bin() -> Path:
    if not OPENCODE_BIN.exists():
        pytest.fail(f"{OPENCODE_BIN} is missing: run scripts/install-agent-clis.sh (scripts/test does it)")
    return OPENCODE_BIN


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script(), vendors=[openai_chat]) as running:
        yield running


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return home_and_work(tmp_path)


def make_backend(server: ScriptedModelServer) -> OpencodeBackend:
    """Built the way the server builds it: default.toml's section, the host environment."""
    settings = load_settings(environ={}).backend("opencode")
    settings.model_extra["config"]["provider"]["scripted"] = {  # type: ignore[index]
        "npm": "@ai-sdk/openai-compatible",
        "options": {"baseURL": "{env:OPENAI_COMPATIBLE_BASE_URL}", "apiKey": "{env:OPENAI_COMPATIBLE_API_KEY}"},
    }
    environ = {
        "OPENAI_COMPATIBLE_BASE_URL": f"{server.url}/v1",
        "OPENAI_COMPATIBLE_API_KEY": "sk-test-not-real",
        "UNRELATED": "x",
    }
    backend = build_backend("opencode", settings, environ)
    assert isinstance(backend, OpencodeBackend)
    return backend


async def run_turn(
    backend: OpencodeBackend,
    turn: Turn,
    opencode_bin: Path,
    *,
    prefix: list[str] | None = None,
    interrupt_after_step_start_s: float | None = None,
) -> Outcome:
    """setup() applied, then one turn; `prefix` wraps the CLI (e.g. strace)."""
    await apply_setup(HostSandbox(), backend.setup(turn.agent, home=turn.home), user=None)
    pending = interrupt_after_step_start_s

    async def interrupt_once_a_step_started(line: str, process: anyio.abc.Process) -> None:
        nonlocal pending
        if pending is not None and '"type":"step_start"' in line:
            # OpenCode prints a tool only when it ends: wait until it is running.
            await anyio.sleep(pending)
            process.send_signal(signal.SIGINT)
            pending = None

    return await cli_harness.run_turn(
        backend,
        turn,
        opencode_bin,
        timeout_s=TURN_TIMEOUT_S,
        on_line=interrupt_once_a_step_started,
        prefix=prefix or [],
    )


def tool_names(request_body: Any) -> list[str]:
    return sorted(tool["function"]["name"] for tool in request_body.get("tools", []))


AGENT = AgentSpec(backend="opencode", model=MODEL, system_prompt="APPENDED-SYSTEM-PROMPT: you are under test.")


# -- the real CLI ----------------------------------------------------------------------------


async def test_a_bash_turn_writes_a_file_and_a_resumed_turn_carries_the_history(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path
) -> None:
    command = "echo real-proof > made-by-opencode.txt && cat made-by-opencode.txt"
    server.script.on(user_contains="FIRST-TASK", reply=Reply(tool_calls=[ToolCall("bash", {"command": command})]))
    server.script.on(tool_result_contains="real-proof", reply=Reply(text="DONE-1: wrote the file"))
    server.script.on(user_contains="SECOND-TASK", reply=Reply(text="DONE-2: remembered"))
    backend = make_backend(server)

    first = await run_turn(backend, make_turn(AGENT, "FIRST-TASK: write the file", dirs), opencode_bin)
    assert (dirs[1] / "made-by-opencode.txt").read_text() == "real-proof\n"
    assert [e.type for e in first.events] == [
        "agent.tool_use",
        "agent.tool_result",
        "span.model_request_end",
        "agent.message",
        "span.model_request_end",
    ]
    use, tool_result = of_type(first.events, AgentToolUse)[0], of_type(first.events, AgentToolResult)[0]
    assert use.name == "bash" and use.input["command"] == command
    assert tool_result.tool_use_id == use.tool_use_id and tool_result.content == "real-proof\n"
    assert first.result.stop_reason == "end_turn" and first.result.final_text == "DONE-1: wrote the file"
    assert first.result.usage.input_tokens > 1000 and first.result.usage.output_tokens > 0
    session_id = first.result.native_session_id
    assert session_id and session_id.startswith("ses_") and first.exit_code == 0
    # The system prompt reached the model after OpenCode's own, as an instruction file.
    system = server.requests_containing("FIRST-TASK")[0].body["messages"][0]
    assert system["role"] == "system" and "APPENDED-SYSTEM-PROMPT" in system["content"]
    assert system["content"].index("APPENDED") > 1000
    # The title request is answered on the side, so it consumed no scripted reply.
    sides = [r for r in server.requests if r.kind == "side" and r.path == "/v1/chat/completions"]
    assert len(sides) == 1 and "title generator" in sides[0].body["messages"][0]["content"]
    # OpenCode keeps the session in the pinned home's XDG data dir.
    assert (dirs[0] / ".local" / "share" / "opencode" / "opencode.db").is_file()

    second = await run_turn(
        backend, make_turn(AGENT, "SECOND-TASK: still there?", dirs, resume_id=session_id), opencode_bin
    )
    assert [m.text for m in of_type(second.events, AgentMessage)] == ["DONE-2: remembered"]
    assert second.result.native_session_id == session_id
    assert second.result.stop_reason == "end_turn"
    request = server.requests_containing("SECOND-TASK")[-1]
    history = json.dumps(request.body["messages"])
    for expected in ("FIRST-TASK", use.tool_use_id, "real-proof", "DONE-1: wrote the file"):
        assert expected in history, expected
    assert request.headers["authorization"] == "[redacted]"
    assert server.script.pending == 0 and server.script.misses == 0


async def test_the_cli_connects_to_nothing_but_the_model_server(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path, tmp_path: Path
) -> None:
    """Without setup()'s lock file OpenCode 1.18.33 npm-installs a plugin package from the
    registry on every start; with it, and default.toml's variables, it stays on loopback."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: run scripts/setup-system.sh")
    server.script.on(user_contains="QUIET", reply=Reply(text="quiet"))
    log = tmp_path / "connect.log"
    outcome = await run_turn(
        make_backend(server),
        make_turn(AGENT, "QUIET", dirs),
        opencode_bin,
        prefix=[strace, "-f", "-qq", "-e", "trace=connect", "-o", str(log)],
    )
    assert outcome.result.final_text == "quiet"
    # Every IPv4/IPv6 connect() of the CLI and its children, each with a parsed address.
    connects = [line for line in log.read_text().splitlines() if "sa_family=AF_INET" in line]
    found = [re.search(r'inet_(?:addr|pton)\((?:AF_INET6, )?"([^"]+)"', line) for line in connects]
    assert connects and all(found), connects
    assert {match.group(1) for match in found if match} <= {"127.0.0.1", "::1"}, connects
    assert any(f"htons({server.port})" in line for line in connects)
    config_dir = Path(config_path(str(dirs[0]))).parent
    assert list((config_dir / "node_modules").iterdir()) == []
    assert not (dirs[0] / ".npm").exists()


async def test_a_prompt_on_stdin_may_be_huge_and_start_with_a_dash(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path
) -> None:
    prompt = "--version -m DASH-PROMPT " + "x" * 300_000
    server.script.on(user_contains="--version -m DASH-PROMPT", reply=Reply(text="DASH-OK"))
    outcome = await run_turn(make_backend(server), make_turn(AGENT, prompt, dirs), opencode_bin)
    assert outcome.result.final_text == "DASH-OK"
    assert server.requests_containing("x" * 300_000)


async def test_mcp_servers_written_by_setup_reach_the_real_cli(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path
) -> None:
    server.script.on(user_contains="ADD", reply=Reply(tool_calls=[ToolCall("calc_add", {"a": 2, "b": 40})]))
    server.script.on(tool_result_contains="42", reply=Reply(text="The sum is 42."))
    agent = AgentSpec(
        backend="opencode",
        model=MODEL,
        mcp_servers={"calc": {"command": sys.executable, "args": [str(RECORDER), "--mcp-server"]}},
    )
    outcome = await run_turn(make_backend(server), make_turn(agent, "ADD 2 and 40", dirs), opencode_bin)
    use = of_type(outcome.events, AgentMcpToolUse)[0]
    assert (use.server_name, use.name) == ("calc", "add")
    assert of_type(outcome.events, AgentMcpToolResult)[0].content == "42"
    assert outcome.result.final_text == "The sum is 42."
    assert "calc_add" in tool_names(server.requests_containing("ADD 2 and 40")[0].body)


async def test_allowed_tools_are_the_only_tools_the_model_sees(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path
) -> None:
    server.script.on(
        user_contains="WRITE", reply=Reply(tool_calls=[ToolCall("write", {"filePath": "x.txt", "content": "no"})])
    )
    server.script.on(after_tool_result=True, reply=Reply(text="could not write"))
    agent = AgentSpec(backend="opencode", model=MODEL, allowed_tools=["bash"])
    outcome = await run_turn(make_backend(server), make_turn(agent, "WRITE x.txt", dirs), opencode_bin)
    assert tool_names(server.model_requests[0].body) == ["bash"]
    tool_result = of_type(outcome.events, AgentToolResult)[0]
    assert tool_result.is_error and "Available tools: bash" in tool_result.content
    assert not (dirs[1] / "x.txt").exists()


@pytest.mark.parametrize(("mode", "approved"), [(None, False), ("default", False), ("auto", True)])
async def test_permission_mode_decides_what_was_left_to_ask(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path, mode: str | None, approved: bool
) -> None:
    # Reading outside the working directory is "ask" in OpenCode's defaults.
    outside = dirs[0].parent / "outside.txt"
    outside.write_text("OUTSIDE-CONTENT")
    server.script.on(user_contains="READ", reply=Reply(tool_calls=[ToolCall("read", {"filePath": str(outside)})]))
    server.script.on(after_tool_result=True, reply=Reply(text="read it"))
    agent = AgentSpec(backend="opencode", model=MODEL, permission_mode=mode)
    outcome = await run_turn(make_backend(server), make_turn(agent, "READ the file", dirs), opencode_bin)
    tool_result = of_type(outcome.events, AgentToolResult)[0]
    if approved:
        assert not tool_result.is_error and "OUTSIDE-CONTENT" in tool_result.content
    else:
        assert tool_result.is_error and "rejected permission" in tool_result.content
    assert outcome.result.stop_reason == "end_turn"


async def test_max_turns_caps_the_agent_steps(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path
) -> None:
    loop = Reply(tool_calls=[ToolCall("bash", {"command": "echo again"})])
    server.script.on(user_contains="LOOP", reply=loop)
    server.script.on(after_tool_result=True, reply=loop, times=None)
    server.script.fallback = Reply(text="stopped looping")
    agent = AgentSpec(backend="opencode", model=MODEL, max_turns=2)
    outcome = await run_turn(make_backend(server), make_turn(agent, "LOOP forever", dirs), opencode_bin)
    # The last allowed step is told to answer in text: one bash call, then the text.
    assert len(of_type(outcome.events, AgentToolUse)) == 1
    assert len(server.model_requests) == 2
    assert "MAXIMUM STEPS REACHED" in json.dumps(server.model_requests[-1].body["messages"])
    assert outcome.result.final_text == "stopped looping"


async def test_sigint_during_a_tool_ends_the_turn_as_interrupted(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path
) -> None:
    server.script.on(user_contains="LONG", reply=Reply(tool_calls=[ToolCall("bash", {"command": "sleep 60"})]))
    started = anyio.current_time()
    outcome = await run_turn(
        make_backend(server), make_turn(AGENT, "LONG", dirs), opencode_bin, interrupt_after_step_start_s=1.0
    )
    assert anyio.current_time() - started < 30
    assert outcome.exit_code == -signal.SIGINT
    assert outcome.result.stop_reason == "interrupted"
    assert of_type(outcome.events, SessionError) == []
    assert outcome.result.native_session_id


async def test_an_api_error_ends_the_turn_with_the_api_message(
    server: ScriptedModelServer, dirs: tuple[Path, Path], opencode_bin: Path
) -> None:
    from tests.support.model_server import ApiError

    server.script.on(user_contains="DENIED", reply=Reply(error=ApiError("permission", "not in your region")))
    outcome = await run_turn(make_backend(server), make_turn(AGENT, "DENIED", dirs), opencode_bin)
    assert outcome.exit_code == 1
    (error,) = of_type(outcome.events, SessionError)
    assert (error.error.type, error.error.message) == ("api_error", "not in your region")
    assert outcome.result.stop_reason == "error"


# -- command(), settings, config, mounts, setup --------------------------------------------


def test_the_first_turn_argv_env_and_stdin() -> None:
    backend = OpencodeBackend(env={"OPENAI_API_KEY": "sk-secret"})
    agent = AgentSpec(backend="opencode", model="openai/gpt-test", extra_args=["--variant", "high"])
    command = backend.command(Turn(session_id="s", index=0, prompt="-do it", agent=agent, workdir="/w", home="/h"))
    assert command.argv == [
        "opencode",
        "run",
        "--format",
        "json",
        "--thinking",
        "--model",
        "openai/gpt-test",
        "--variant",
        "high",
    ]
    assert command.stdin == b"-do it" and command.cwd == "/w"
    assert command.env == {
        "OPENAI_API_KEY": "sk-secret",
        "HOME": "/h",
        "XDG_CONFIG_HOME": "/h/.config",
        "XDG_DATA_HOME": "/h/.local/share",
        "XDG_STATE_HOME": "/h/.local/state",
        "XDG_CACHE_HOME": "/h/.cache",
    }
    assert "sk-secret" not in repr(backend)


def test_a_follow_up_resumes_the_session_and_auto_approves() -> None:
    backend = OpencodeBackend(cli_path="/somewhere/opencode")
    for mode in ("auto", "bypassPermissions"):
        agent = AgentSpec(backend="opencode", permission_mode=mode)
        command = backend.command(Turn(session_id="s", index=1, prompt="p", resume_id="ses_abc", agent=agent))
        assert command.argv[0] == CLI_TARGET
        assert command.argv[command.argv.index("--session") + 1] == "ses_abc"
        assert "--auto" in command.argv and "--model" not in command.argv
    with pytest.raises(InvalidInputError, match=r"permission_mode: opencode does not know 'plan'"):
        backend.command(Turn(session_id="s", index=0, prompt="p", agent=AgentSpec(backend="x", permission_mode="plan")))


def test_from_settings_passes_only_set_host_variables_and_reads_the_config_table() -> None:
    settings = BackendSettings.model_validate(
        {"pass_env": ["A_KEY", "UNSET", "EMPTY"], "env": {"FIXED": "1"}, "config": {"model": "a/b"}}
    )
    backend = OpencodeBackend.from_settings(settings, {"A_KEY": "host", "EMPTY": "", "OTHER": "no"})
    env = backend.command(Turn(session_id="s", index=0, prompt="p", agent=AgentSpec(backend="opencode"))).env
    assert env["A_KEY"] == "host" and env["FIXED"] == "1" and "EMPTY" not in env and "OTHER" not in env
    assert backend.config_for(AgentSpec(backend="opencode"), home="/h")["model"] == "a/b"
    with pytest.raises(InvalidInputError, match=r"backends\.opencode\.config: must be a table"):
        OpencodeBackend.from_settings(BackendSettings.model_validate({"config": "nope"}), {})


def test_default_settings_keep_opencode_off_the_network_and_define_an_openai_compatible_provider() -> None:
    settings = load_settings(environ={}).backend("opencode")
    for variable in ("AUTOUPDATE", "MODELS_FETCH", "SHARE", "LSP_DOWNLOAD"):
        assert settings.env[f"OPENCODE_DISABLE_{variable}"] == "1"
    assert "OPENAI_COMPATIBLE_BASE_URL" in settings.pass_env
    config = OpencodeBackend.from_settings(settings, {}).config_for(
        AgentSpec(backend="opencode", model="openai-compatible/qwen-coder"), home="/h"
    )
    provider = config["provider"]["openai-compatible"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"]["baseURL"] == "{env:OPENAI_COMPATIBLE_BASE_URL}"
    assert provider["models"] == {"qwen-coder": {"name": "qwen-coder"}}
    assert (config["autoupdate"], config["share"]) == (False, "disabled")


def test_config_for_maps_the_agent_spec_onto_opencode_config() -> None:
    backend = OpencodeBackend(config={"provider": {"p": {"models": {"known": {"name": "Known"}}}}, "mcp": {"x": {}}})
    agent = AgentSpec(
        backend="opencode",
        model="p/known",
        allowed_tools=["bash", "write", "calc_add"],
        max_turns=7,
        system_prompt="be brief",
        mcp_servers={
            "calc": {"command": "calc", "args": ["--stdio", 3], "env": {"TOKEN": "t"}},
            "web": {"type": "http", "url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer t"}},
        },
    )
    config = backend.config_for(agent, home="/h")
    assert config["provider"]["p"]["models"] == {"known": {"name": "Known"}}  # not relisted
    assert config["mcp"] == {
        "x": {},
        "calc": {"type": "local", "command": ["calc", "--stdio", "3"], "enabled": True, "environment": {"TOKEN": "t"}},
        "web": {
            "type": "remote",
            "url": "http://127.0.0.1:9/mcp",
            "enabled": True,
            "headers": {"Authorization": "Bearer t"},
        },
    }
    assert config["permission"] == {"*": "deny", "bash": "allow", "edit": "allow", "calc_add": "allow"}
    assert config["agent"] == {"build": {"steps": 7}}
    assert config["instructions"] == [instructions_path("/h")]
    # A built-in provider is left to OpenCode's catalog.
    builtin = backend.config_for(AgentSpec(backend="opencode", model="anthropic/x"), home="/h")
    assert set(builtin["provider"]) == {"p"}
    with pytest.raises(InvalidInputError, match=r"model: 'gpt' is not provider/model"):
        backend.config_for(AgentSpec(backend="opencode", model="gpt"), home="/h")
    with pytest.raises(InvalidInputError, match=r"mcp_servers\.bad: has neither `command`"):
        backend.config_for(AgentSpec(backend="opencode", mcp_servers={"bad": {"type": "stdio"}}), home="/h")


def test_mounts_name_the_setting_when_the_binary_is_missing(opencode_bin: Path, tmp_path: Path) -> None:
    assert OpencodeBackend().mounts() == []
    (mount,) = OpencodeBackend(cli_path=str(opencode_bin)).mounts()
    assert (mount.target, mount.read_only) == (CLI_TARGET, True)
    assert Path(mount.source).is_file() and os.access(mount.source, os.X_OK)
    with pytest.raises(InvalidInputError, match=r"backends\.opencode\.cli_path: .*nope/opencode does not exist"):
        OpencodeBackend(cli_path=str(tmp_path / "nope" / "opencode")).mounts()


def test_the_registry_builds_opencode() -> None:
    assert "opencode" in backend_names()
    assert isinstance(build_backend("opencode", BackendSettings(), {}), OpencodeBackend)


async def test_setup_makes_a_home_owned_by_the_user_a_private_config_and_a_plugin_lock(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.fail("this test checks chown and must run as root (CI and this machine do)")
    import pwd

    home = tmp_path / "agent-home"
    agent = AgentSpec(
        backend="opencode", system_prompt="SYS", mcp_servers={"calc": {"command": "c", "env": {"T": "t"}}}
    )
    backend = OpencodeBackend()
    for _ in range(2):  # idempotent
        await apply_setup(HostSandbox(), backend.setup(agent, home=str(home)), user="nobody")
    assert_prepared(home, pwd.getpwnam("nobody").pw_uid)
    # An existing lock (the image's own plugins) is left alone.
    lock = anyio.Path(config_path(str(home))).parent / "package-lock.json"
    await lock.write_text("{}")
    await apply_setup(HostSandbox(), backend.setup(agent, home=str(home)), user=None)
    assert await lock.read_text() == "{}"


def assert_prepared(home: Path, uid: int) -> None:
    config = Path(config_path(str(home)))
    for path in (home, home / ".config", config.parent, config.parent / "node_modules", config):
        assert path.stat().st_uid == uid, path
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text())["mcp"]["calc"]["environment"] == {"T": "t"}
    assert Path(instructions_path(str(home))).read_text() == "SYS"
    lock = json.loads((config.parent / "package-lock.json").read_text())
    assert "@opencode-ai/plugin" in lock["packages"][""]["dependencies"]


async def test_setup_reports_a_home_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BackendError, match=r"opencode: could not create HOME .*/file/home"):
        await apply_setup(
            HostSandbox(), OpencodeBackend().setup(AgentSpec(backend="opencode"), home=str(blocker / "home")), user=None
        )


def test_the_cli_is_the_pinned_version(opencode_bin: Path) -> None:
    version = subprocess.run([str(opencode_bin), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert version.strip() == "1.18.33"
