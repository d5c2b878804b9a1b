"""FactoryBackend with the real droid CLI on this host (no container): the argv from
`command()`, the files from `setup()`, stdout through `FactoryTranslator`, the model a BYOK
custom model served by the scripted server on loopback. No Factory account is involved."""

from __future__ import annotations

import json
import os
import pwd
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

from mcp_sandboxes.backends.base import AgentSpec, Backend, Command, Turn
from mcp_sandboxes.backends.factory import CLI_TARGET, FactoryBackend, FactoryTranslator
from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import BackendError, InvalidInputError
from mcp_sandboxes.events import (
    AgentMcpToolResult,
    AgentMcpToolUse,
    AgentMessage,
    AgentThinking,
    AgentToolResult,
    AgentToolUse,
    Event,
    SessionError,
)
from mcp_sandboxes.orchestrator.setup import apply_setup
from tests.backends import cli_harness
from tests.backends.cli_harness import HostSandbox as HostSandbox  # test_custom_backend imports it from here
from tests.backends.cli_harness import Outcome, home_and_work, make_turn, of_type
from tests.conftest import AGENT_CLIS, ROOT
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall, anthropic

DROID = AGENT_CLIS / ".bin" / "droid"
DROID_NATIVE = AGENT_CLIS / "@factory" / "cli-linux-x64" / "bin" / "droid"
RECORDER = ROOT / "tests" / "fixtures" / "factory" / "record.py"
TURN_TIMEOUT_S = 90.0
MODEL = "custom:claude-scripted"


async def run_turn(
    backend: Backend, turn: Turn, on_event: Callable[[Event, anyio.abc.Process], None] | None = None
) -> Outcome:
    return await cli_harness.run_turn(
        backend, turn, DROID, timeout_s=TURN_TIMEOUT_S, on_event=on_event, extra_env=_tmpdir_in_home
    )


def _tmpdir_in_home(command: Command) -> dict[str, str]:
    # droid leaves a droid-terminal-* directory in TMPDIR per run: keep it in the turn's HOME.
    return {"TMPDIR": command.env["HOME"]}


def byok(url: str) -> dict[str, Any]:
    return {
        "customModels": [
            {
                "model": "claude-scripted",
                "displayName": "Scripted",
                "baseUrl": url,
                "apiKey": "sk-test-not-a-real-key",
                "provider": "anthropic",
                "maxOutputTokens": 4096,
            }
        ]
    }


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script(), vendors=[anthropic]) as running:
        yield running


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return home_and_work(tmp_path)


def make_backend(server: ScriptedModelServer) -> Backend:
    # droid_settings arrives as JSON text when it comes from an environment variable.
    settings = BackendSettings.model_validate(
        {"pass_env": ["FACTORY_API_KEY"], "droid_settings": json.dumps(byok(server.url))}
    )
    return build_backend("factory", settings, {"UNRELATED": "x"})


BYPASS = AgentSpec(
    backend="factory",
    model=MODEL,
    permission_mode="bypassPermissions",
    system_prompt="APPENDED-SYSTEM-PROMPT: you are under test.",
)


# -- the real CLI ----------------------------------------------------------------------------


async def test_an_execute_turn_writes_a_file_and_a_forked_turn_carries_the_history(
    server: ScriptedModelServer, dirs: tuple[Path, Path]
) -> None:
    command = "echo real-proof > made-by-droid.txt && cat made-by-droid.txt"
    server.script.on(user_contains="FIRST-TASK", reply=Reply(tool_calls=[ToolCall("Execute", {"command": command})]))
    server.script.on(tool_result_contains="real-proof", reply=Reply(thinking="it worked", text="DONE-1: wrote it"))
    server.script.on(user_contains="SECOND-TASK", reply=Reply(text="DONE-2: remembered"))
    backend = make_backend(server)
    await apply_setup(HostSandbox(), backend.setup(BYPASS, home=str(dirs[0])), user=None)

    first = await run_turn(backend, make_turn(BYPASS, "FIRST-TASK: write the file", dirs))
    assert (dirs[1] / "made-by-droid.txt").read_text() == "real-proof\n"
    assert [e.type for e in first.events] == [
        "agent.tool_use",
        "agent.tool_result",
        "agent.thinking",
        "agent.message",
        "span.model_request_end",
    ]
    use, tool_result = of_type(first.events, AgentToolUse)[0], of_type(first.events, AgentToolResult)[0]
    assert use.name == "Execute" and use.input["command"] == command
    assert tool_result.tool_use_id == use.tool_use_id and tool_result.content.startswith("real-proof")
    assert of_type(first.events, AgentThinking)[0].thinking == "it worked"
    assert first.result.stop_reason == "end_turn" and first.result.final_text == "DONE-1: wrote it"
    assert first.result.usage.input_tokens > 0 and first.result.usage.output_tokens > 0
    session_id = first.result.native_session_id
    assert session_id and first.exit_code == 0
    # --append-system-prompt reached the model, after droid's own prompt.
    system = json.dumps(server.requests_containing("FIRST-TASK")[0].body["system"])
    assert "APPENDED-SYSTEM-PROMPT" in system and system.index("APPENDED") > 100

    second = await run_turn(backend, make_turn(BYPASS, "SECOND-TASK: still there?", dirs, resume_id=session_id))
    assert [m.text for m in of_type(second.events, AgentMessage)] == ["DONE-2: remembered"]
    assert second.result.stop_reason == "end_turn"
    # Without a Factory API key the turn is a fork: a new session, which the next turn resumes.
    assert second.result.native_session_id and second.result.native_session_id != session_id
    request = server.requests_containing("SECOND-TASK")[-1]
    history = json.dumps(request.body["messages"])
    for expected in ("FIRST-TASK", use.tool_use_id, "real-proof", "DONE-1: wrote it"):
        assert expected in history, expected
    assert request.headers["x-api-key"] == "[redacted]"
    assert server.script.pending == 0 and server.script.misses == 0


async def test_a_prompt_on_stdin_may_be_huge_and_start_with_a_dash(
    server: ScriptedModelServer, dirs: tuple[Path, Path]
) -> None:
    prompt = "--version -s DASH-PROMPT " + "x" * 200_000
    server.script.on(user_contains="--version -s DASH-PROMPT", reply=Reply(text="DASH-OK"))
    backend = make_backend(server)
    await apply_setup(HostSandbox(), backend.setup(BYPASS, home=str(dirs[0])), user=None)
    outcome = await run_turn(backend, make_turn(BYPASS, prompt, dirs))
    assert outcome.result.final_text == "DASH-OK", outcome.events
    assert server.requests_containing("x" * 200_000)


async def test_mcp_servers_written_by_setup_reach_the_real_cli(
    server: ScriptedModelServer, dirs: tuple[Path, Path]
) -> None:
    # droid connects MCP servers in the background; the delayed reply lets `calc` register.
    call = ToolCall("calc___add", {"a": 2, "b": 40})
    server.script.on(user_contains="ADD", reply=Reply(tool_calls=[call], delay_s=8))
    server.script.on(tool_result_contains="42", reply=Reply(text="The sum is 42."))
    agent = BYPASS.model_copy(
        update={"mcp_servers": {"calc": {"command": sys.executable, "args": [str(RECORDER), "--mcp-server"]}}}
    )
    backend = make_backend(server)
    await apply_setup(HostSandbox(), backend.setup(agent, home=str(dirs[0])), user=None)
    outcome = await run_turn(backend, make_turn(agent, "ADD 2 and 40", dirs))
    use = of_type(outcome.events, AgentMcpToolUse)[0]
    assert (use.server_name, use.name) == ("calc", "add")
    assert of_type(outcome.events, AgentMcpToolResult)[0].content == "42"
    assert outcome.result.final_text == "The sum is 42."


async def test_sigint_during_a_tool_ends_the_turn_as_interrupted(
    server: ScriptedModelServer, dirs: tuple[Path, Path]
) -> None:
    server.script.on(user_contains="LONG", reply=Reply(tool_calls=[ToolCall("Execute", {"command": "sleep 60"})]))

    def interrupt_on_tool_use(event: Event, process: anyio.abc.Process) -> None:
        if isinstance(event, AgentToolUse):
            process.send_signal(signal.SIGINT)

    backend = make_backend(server)
    await apply_setup(HostSandbox(), backend.setup(BYPASS, home=str(dirs[0])), user=None)
    started = anyio.current_time()
    outcome = await run_turn(backend, make_turn(BYPASS, "LONG", dirs), interrupt_on_tool_use)
    assert anyio.current_time() - started < 30
    assert outcome.result.stop_reason == "interrupted"
    assert of_type(outcome.events, SessionError) == []
    assert outcome.result.native_session_id


async def test_the_default_read_only_autonomy_refuses_a_write(
    server: ScriptedModelServer, dirs: tuple[Path, Path]
) -> None:
    arguments = {"command": "echo no > refused.txt", "riskLevelReason": "writes a file", "riskLevel": "medium"}
    server.script.on(user_contains="WRITE", reply=Reply(tool_calls=[ToolCall("Execute", arguments)]))
    server.script.on(after_tool_result=True, reply=Reply(text="unreachable"), times=None)
    agent = AgentSpec(backend="factory", model=MODEL)
    backend = make_backend(server)
    await apply_setup(HostSandbox(), backend.setup(agent, home=str(dirs[0])), user=None)
    outcome = await run_turn(backend, make_turn(agent, "WRITE a file", dirs))
    assert not (dirs[1] / "refused.txt").exists()
    assert outcome.exit_code == 1 and outcome.result.stop_reason == "error"
    assert "insufficient permission" in (outcome.result.error or "")


# -- command(), settings, mounts, setup -------------------------------------------------


def test_the_first_turn_argv_env_and_stdin() -> None:
    backend = FactoryBackend(env={"FACTORY_API_KEY": "fk-secret"}, droid_settings={"customModels": []})
    agent = AgentSpec(
        backend="factory",
        model="claude-opus-4-8",
        system_prompt="be brief",
        permission_mode="acceptEdits",
        max_turns=3,
        allowed_tools=["Read"],
        extra_args=["--only-tools", "Read,Execute"],
    )
    command = backend.command(Turn(session_id="s", index=0, prompt="-do it", agent=agent, workdir="/w", home="/h"))
    assert command.argv == [
        "droid",
        "exec",
        "--output-format",
        "stream-json",
        "--model",
        "claude-opus-4-8",
        "--append-system-prompt",
        "be brief",
        "--auto",
        "low",
        "--settings",
        "/h/.mcp-sandboxes/factory-settings.json",
        "--only-tools",
        "Read,Execute",
    ]
    assert command.stdin == b"-do it" and command.cwd == "/w"
    assert command.env == {"FACTORY_API_KEY": "fk-secret", "HOME": "/h"}
    assert "fk-secret" not in repr(backend)


def test_resume_uses_the_session_with_a_factory_key_and_a_fork_without() -> None:
    agent = AgentSpec(backend="factory")
    turn = Turn(session_id="s", index=1, prompt="p", resume_id="abc-123", agent=agent)
    assert FactoryBackend(env={"FACTORY_API_KEY": "fk"}).command(turn).argv[-2:] == ["--session-id", "abc-123"]
    assert FactoryBackend().command(turn).argv[-2:] == ["--fork", "abc-123"]
    assert FactoryBackend(resume="session").command(turn).argv[-2:] == ["--session-id", "abc-123"]
    assert FactoryBackend(env={"FACTORY_API_KEY": "fk"}, resume="fork").command(turn).argv[-2:] == ["--fork", "abc-123"]
    first = FactoryBackend(cli_path="/x/droid").command(turn.model_copy(update={"resume_id": None, "index": 0}))
    assert first.argv[0] == CLI_TARGET and "--fork" not in first.argv and "--settings" not in first.argv


def test_permission_modes_map_to_droid_autonomy_and_unknown_ones_are_refused() -> None:
    backend = FactoryBackend()

    def flags(mode: str) -> list[str]:
        argv = backend.command(
            Turn(session_id="s", index=0, prompt="p", agent=AgentSpec(backend="factory", permission_mode=mode))
        ).argv
        return argv[4:]

    assert flags("bypassPermissions") == ["--skip-permissions-unsafe"]
    assert flags("auto") == ["--auto", "medium"]
    assert flags("plan") == ["--use-spec"]
    assert flags("default") == [] and flags("dontAsk") == []
    with pytest.raises(InvalidInputError, match=r"permission_mode: 'yolo' has no droid equivalent"):
        flags("yolo")


def test_settings_from_toml_or_json_and_bad_values_name_the_field() -> None:
    table = BackendSettings.model_validate({"droid_settings": {"customModels": [{"model": "m"}]}, "resume": "fork"})
    backend = FactoryBackend.from_settings(table, {})
    assert backend.droid_settings == {"customModels": [{"model": "m"}]} and backend.resume == "fork"
    with pytest.raises(InvalidInputError, match=r"backends\.factory\.resume: is 'later'"):
        FactoryBackend.from_settings(BackendSettings.model_validate({"resume": "later"}), {})
    with pytest.raises(InvalidInputError, match=r"backends\.factory\.droid_settings: is not a JSON object"):
        FactoryBackend.from_settings(BackendSettings.model_validate({"droid_settings": "{nope"}), {})
    with pytest.raises(InvalidInputError, match=r"droid_settings: must be a table"):
        FactoryBackend.from_settings(BackendSettings.model_validate({"droid_settings": "[1]"}), {})
    passed = FactoryBackend.from_settings(
        BackendSettings(pass_env=["FACTORY_API_KEY", "UNSET"], env={"FIXED": "1"}), {"FACTORY_API_KEY": "fk", "X": "y"}
    )
    env = passed.command(Turn(session_id="s", index=0, prompt="p", agent=AgentSpec(backend="factory"))).env
    assert env == {"FACTORY_API_KEY": "fk", "FIXED": "1", "HOME": "/home/agent"}


def test_mounts_name_the_setting_when_the_binary_is_missing(tmp_path: Path) -> None:
    assert FactoryBackend().mounts() == []
    (mount,) = FactoryBackend(cli_path=str(DROID_NATIVE)).mounts()
    assert (mount.target, mount.read_only) == (CLI_TARGET, True) and os.access(mount.source, os.X_OK)
    with pytest.raises(InvalidInputError, match=r"backends\.factory\.cli_path: .*nope/droid does not exist"):
        FactoryBackend(cli_path=str(tmp_path / "nope" / "droid")).mounts()


def test_the_registry_builds_factory() -> None:
    assert "factory" in backend_names()
    assert isinstance(build_backend("factory", BackendSettings(), {}), FactoryBackend)
    assert isinstance(FactoryBackend().translator(), FactoryTranslator)


async def test_setup_writes_private_mcp_and_settings_files_owned_by_the_user(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.fail("this test checks chown and must run as root (CI and this machine do)")
    home = tmp_path / "agent-home"
    servers: dict[str, Any] = {
        "calc": {"command": "calc-server", "env": {"TOKEN": "t"}},
        "web": {"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer z"}},
        "sse": {"type": "sse", "url": "http://127.0.0.1:9/sse"},
    }
    agent = AgentSpec(backend="factory", mcp_servers=servers)
    backend = FactoryBackend(droid_settings={"customModels": [{"model": "m", "apiKey": "secret"}]})
    for _ in range(2):  # idempotent
        await apply_setup(HostSandbox(), backend.setup(agent, home=str(home)), user="nobody")
    uid = pwd.getpwnam("nobody").pw_uid
    mcp = home / ".factory" / "mcp.json"
    settings = home / ".mcp-sandboxes" / "factory-settings.json"
    for path in (home, mcp.parent, settings.parent, mcp, settings):
        assert path.stat().st_uid == uid, path
    for path in (mcp, settings):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert json.loads(mcp.read_text()) == {
        "mcpServers": {
            "calc": {"type": "stdio", "command": "calc-server", "env": {"TOKEN": "t"}},
            "web": {"type": "http", "url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer z"}},
            "sse": {"type": "sse", "url": "http://127.0.0.1:9/sse"},
        }
    }
    assert json.loads(settings.read_text()) == backend.droid_settings
    bare = tmp_path / "bare"
    await apply_setup(HostSandbox(), FactoryBackend().setup(AgentSpec(backend="factory"), home=str(bare)), user=None)
    assert bare.is_dir() and not (bare / ".factory" / "mcp.json").exists()
    assert not (bare / ".mcp-sandboxes" / "factory-settings.json").exists()


async def test_setup_reports_a_home_it_cannot_create_and_bad_mcp_entries(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BackendError, match=r"factory: could not create HOME .*/file/home"):
        await apply_setup(
            HostSandbox(), FactoryBackend().setup(AgentSpec(backend="factory"), home=str(blocker / "home")), user=None
        )
    bad = AgentSpec(backend="factory", mcp_servers={"x": "not-an-object"})
    with pytest.raises(InvalidInputError, match=r"mcp_servers\.x: must be an object"):
        await apply_setup(HostSandbox(), FactoryBackend().setup(bad, home=str(tmp_path / "h")), user=None)


def test_the_cli_is_the_pinned_native_binary() -> None:
    version = subprocess.run([str(DROID), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert version.strip() == "0.225.2"
    # The node shim does not forward signals; the install step links the native binary instead.
    with DROID.resolve().open("rb") as binary:
        assert binary.read(4) == b"\x7fELF"
