"""CustomBackend: argv templates (checked at start-up, expanded without a shell), profiles, the
JSONL and text translators, and real processes run from the argv it builds."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mcp_sandboxes.backends.base import AgentSpec, Translator, Turn
from mcp_sandboxes.backends.custom import (
    MAX_FINAL_TEXT,
    TEXT_CHUNK_LINES,
    CommandProfile,
    CustomBackend,
    CustomTranslator,
    expand,
)
from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import BackendSettings, load_settings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.events import (
    AgentMessage,
    AgentRaw,
    AgentToolUse,
    Event,
    SessionError,
    SpanModelRequestEnd,
    Usage,
    parse_event,
)
from mcp_sandboxes.orchestrator.setup import apply_setup
from tests.backends.test_factory_cli_real import HostSandbox

ECHO_ARGV = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
NASTY_PROMPTS = [
    '"; touch {pwned}; echo "',
    "$(touch {pwned})",
    "`touch {pwned}`",
    "a\nb && touch {pwned}",
    "--help",
    "-rf /",
    "{session} {{prompt}} %s \\x00-free ' \" *",
    "",
]


def backend_of(**table: Any) -> CustomBackend:
    return CustomBackend.from_settings(BackendSettings.model_validate(table), {"HOST_KEY": "from-host"})


def turn_of(prompt: str = "hi", *, resume_id: str | None = None, **agent: Any) -> Turn:
    return Turn(
        session_id="ses_abc",
        index=1 if resume_id else 0,
        prompt=prompt,
        resume_id=resume_id,
        agent=AgentSpec(backend="custom", **agent),
        workdir="/w",
        home="/h",
    )


def run_argv(argv: list[str], cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, timeout=30, check=True)


def translate(translator: Translator, lines: list[str], exit_code: int = 0, stderr: str = "") -> list[Event]:
    events: list[Event] = []
    for line in lines:
        events.extend(translator.feed(line))
    events.extend(translator.finish(exit_code, stderr))
    for event in events:
        assert parse_event(event.model_dump()) == event
    return events


# -- templates ------------------------------------------------------------------------------


def test_expand_is_one_pass_and_leaves_shell_and_json_braces_alone() -> None:
    values = {"prompt": "say {session} {{x}}", "session": "ses_1"}
    assert expand("{prompt}", values) == "say {session} {{x}}"
    assert expand("--id={session}:{{literal}}", values) == "--id=ses_1:{literal}"
    script = 'echo "${HOME} ${session:-x} ${a:-${b}}" \'{"a":{"b":[{}]}}\' {Upper} { session }'
    assert expand(script, values) == script


def test_an_sh_script_with_shell_and_json_braces_runs_as_written(tmp_path: Path) -> None:
    script = 'printf \'%s|%s|{"k":{"v":1}}\\n\' "${1}" "${MCP_SANDBOXES_SESSION_ID}"'
    backend = backend_of(argv=["sh", "-c", script, "sh", "{prompt}"])
    command = backend.command(turn_of("p r"))
    done = subprocess.run(command.argv, env=command.env, capture_output=True, timeout=30, check=True)
    assert done.stdout == b'p r|ses_abc|{"k":{"v":1}}\n'


@pytest.mark.parametrize("template", ["{prompt}", "--message={prompt}"])
def test_a_hostile_prompt_is_exactly_one_argument_and_no_shell_runs(tmp_path: Path, template: str) -> None:
    backend = backend_of(argv=[*ECHO_ARGV, "--session", "{session}", template])
    for raw in NASTY_PROMPTS:
        prompt = raw.replace("{pwned}", str(tmp_path / "pwned"))
        command = backend.command(turn_of(prompt))
        printed = json.loads(run_argv(command.argv, tmp_path).stdout)
        assert printed == ["--session", "ses_abc", template.replace("{prompt}", prompt)]
        assert command.stdin is None
    assert not (tmp_path / "pwned").exists()


def test_a_prompt_on_stdin_is_passed_byte_for_byte(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"]
    backend = backend_of(argv=argv, prompt_via="stdin")
    prompt = "-x $(touch pwned) ünïcode\n" + "y" * 300_000
    command = backend.command(turn_of(prompt))
    assert command.argv == argv
    assert run_argv(command.argv, tmp_path, command.stdin).stdout == prompt.encode()
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("table", "field", "message"),
    [
        ({"argv": []}, "backends.custom.argv", "is empty; set the command to run"),
        ({"argv": ["agent"]}, "backends.custom.argv", "has no {prompt}; add it, or set prompt_via"),
        ({"argv": ["agent", "{prompt}"], "prompt_via": "stdin"}, "backends.custom.argv", 'but prompt_via = "stdin"'),
        ({"argv": ["agent", "{promt}"]}, "backends.custom.argv", r"\{promt\} is not allowed here"),
        ({"argv": ["agent", "{resume_id}", "{prompt}"]}, "backends.custom.argv", r"\{resume_id\} is not allowed"),
        ({"argv": ["a", "{model}", "{prompt}"]}, "backends.custom.argv", r"\{model\} is not allowed"),
        ({"argv": ["a", "{prompt}"], "resume_argv": ["a", "-r", "{resume_id}"]}, "backends.custom.resume_argv",
         "has no {prompt}"),
        ({"argv": ["a", "{prompt}"], "model_argv": ["-m", "{system_prompt}"]}, "backends.custom.model_argv",
         r"\{system_prompt\} is not allowed"),
        ({"argv": ["a", "{prompt}"], "output": "xml"}, "backends.custom.output", "'jsonl' or 'text'"),
        ({"argv": ["a", "{prompt}"], "ouput": "text"}, "backends.custom.ouput", "Extra inputs are not permitted"),
        ({"argv": "[not json"}, "backends.custom.argv", "is not a JSON array"),
        ({"argv": ["a", "{prompt}"], "profiles": {"x": {"output": "text"}}}, "backends.custom.profiles.x.output",
         "every profile"),
        ({"argv": ["a", "{prompt}"], "profiles": {"x": "aider"}}, "backends.custom.profiles.x", "must be a table"),
        ({"profiles": {"x": {"argv": ["x"]}}}, "backends.custom.profiles.x.argv", "has no {prompt}"),
    ],
)  # fmt: skip
def test_bad_templates_fail_at_start_up_naming_the_field(table: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match="^" + re.escape(field) + ": .*" + message):
        backend_of(**table)


def test_an_unconfigured_custom_backend_is_refused_by_the_registry() -> None:
    assert "custom" in backend_names()
    with pytest.raises(InvalidInputError, match=r"backends\.custom\.argv: is empty"):
        build_backend("custom", BackendSettings(), {})


def test_settings_from_an_environment_variable_reach_the_backend() -> None:
    environ = {
        "MCP_SANDBOXES_BACKENDS__CUSTOM__ARGV": json.dumps(["my-agent", "--json", "{prompt}"]),
        "MCP_SANDBOXES_BACKENDS__CUSTOM__OUTPUT": "text",
    }
    settings = load_settings(environ=environ).backend("custom")
    backend = build_backend("custom", settings, {})
    assert isinstance(backend, CustomBackend) and backend.output == "text"
    assert backend.command(turn_of("go")).argv == ["my-agent", "--json", "go"]


# -- command() ------------------------------------------------------------------------------


def test_first_resumed_model_and_system_prompt_argv() -> None:
    backend = backend_of(
        argv=["agent", "--json", "{prompt}"],
        resume_argv=["agent", "--json", "--resume", "{resume_id}", "{prompt}"],
        model_argv=["--model", "{model}"],
        system_prompt_argv=["--system={system_prompt}"],
        pass_env=["HOST_KEY", "UNSET"],
        env={"FIXED": "1"},
    )
    first = backend.command(turn_of("p1", model="m-1", system_prompt="be brief", extra_args=["--x"]))
    assert first.argv == ["agent", "--model", "m-1", "--system=be brief", "--json", "p1", "--x"]
    assert first.cwd == "/w" and first.stdin is None
    assert first.env == {
        "HOST_KEY": "from-host",
        "FIXED": "1",
        "HOME": "/h",
        "MCP_SANDBOXES_SESSION_ID": "ses_abc",
        "MCP_SANDBOXES_TURN_INDEX": "0",
        "MCP_SANDBOXES_MODEL": "m-1",
        "MCP_SANDBOXES_SYSTEM_PROMPT": "be brief",
    }
    resumed = backend.command(turn_of("p2", resume_id="nat-9", permission_mode="plan", max_turns=4))
    assert resumed.argv == ["agent", "--json", "--resume", "nat-9", "p2"]
    assert resumed.env["MCP_SANDBOXES_RESUME_ID"] == "nat-9" and resumed.env["MCP_SANDBOXES_TURN_INDEX"] == "1"
    assert resumed.env["MCP_SANDBOXES_PERMISSION_MODE"] == "plan" and resumed.env["MCP_SANDBOXES_MAX_TURNS"] == "4"
    mcp = backend.command(turn_of("p3", mcp_servers={"x": {"command": "x"}}))
    assert mcp.env["MCP_SANDBOXES_MCP_CONFIG"] == "/h/.mcp-sandboxes/custom-mcp.json"
    # Without resume_argv, a follow-up runs argv again (the command keys its state on {session}).
    plain = backend_of(argv=["agent", "--state", "/tmp/{session}", "{prompt}"])
    assert plain.command(turn_of("again", resume_id="ignored")).argv == ["agent", "--state", "/tmp/ses_abc", "again"]


def test_profiles_inherit_the_base_and_a_model_picks_them() -> None:
    backend = backend_of(
        argv=["base-agent", "{prompt}"],
        resume_argv=["base-agent", "-r", "{resume_id}", "{prompt}"],
        model_argv=["-m", "{model}"],
        env={"SHARED": "base", "KEEP": "1"},
        profiles={
            "aider": {"argv": ["aider", "--message", "{prompt}"], "env": {"SHARED": "aider"}},
            "quiet": {"prompt_via": "stdin", "argv": ["quiet-agent"]},
            "fast": {"env": {"FAST": "1"}},
        },
    )
    assert backend.command(turn_of("p", model="aider")).argv == ["aider", "--message", "p"]
    # Its own argv: the base's model_argv and resume_argv belong to another program.
    with_model = backend.command(turn_of("p", model="aider:gpt-4o", resume_id="r1"))
    assert with_model.argv == ["aider", "--message", "p"]
    assert with_model.env["SHARED"] == "aider" and with_model.env["KEEP"] == "1"
    assert with_model.env["MCP_SANDBOXES_MODEL"] == "gpt-4o"
    quiet = backend.command(turn_of("secret", model="quiet"))
    assert quiet.argv == ["quiet-agent"] and quiet.stdin == b"secret"
    # A profile without argv is a variant of the base command and keeps all of its templates.
    fast = backend.command(turn_of("p", model="fast:m2", resume_id="r1"))
    assert fast.argv == ["base-agent", "-m", "m2", "-r", "r1", "p"] and fast.env["FAST"] == "1"
    # A model that names no profile goes to the base command whole, colon and all.
    assert backend.command(turn_of("p", model="llama3:8b")).argv == ["base-agent", "-m", "llama3:8b", "p"]
    assert "aider" in repr(backend) and "base" not in repr(backend).split("profiles")[1]


def test_profiles_only_require_a_profile_name() -> None:
    backend = backend_of(profiles={"a": {"argv": ["a", "{prompt}"]}})
    assert backend.command(turn_of("p", model="a")).argv == ["a", "p"]
    with pytest.raises(InvalidInputError, match=r"model: 'gpt' names no custom profile .*use one of: a"):
        backend.command(turn_of("p", model="gpt"))


async def test_setup_checks_the_model_and_writes_a_private_mcp_config(tmp_path: Path) -> None:
    backend = backend_of(profiles={"a": {"argv": ["a", "{prompt}"]}})
    servers = {"calc": {"command": "calc", "env": {"TOKEN": "t"}}}
    agent = AgentSpec(backend="custom", model="a", mcp_servers=servers)
    await apply_setup(HostSandbox(), backend.setup(agent, home=str(tmp_path / "home")), user=None)
    config = tmp_path / "home" / ".mcp-sandboxes" / "custom-mcp.json"
    assert json.loads(config.read_text()) == {"mcpServers": servers}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    with pytest.raises(InvalidInputError, match="names no custom profile"):
        await apply_setup(
            HostSandbox(), backend.setup(AgentSpec(backend="custom", model="b"), home=str(tmp_path)), user=None
        )
    assert backend.mounts() == []


# -- the JSONL translator -------------------------------------------------------------------


def test_jsonl_events_pass_validated_bad_lines_do_not_stop_the_turn_and_unknown_ones_are_kept() -> None:
    translator = CustomTranslator("jsonl")
    use = {"type": "agent.tool_use", "tool_use_id": "t1", "name": "sh", "input": {"cmd": "ls"}}
    lines = [
        json.dumps({"type": "session.native_id", "id": "native-1"}),
        json.dumps({"type": "agent.message", "content": [{"type": "text", "text": "first"}]}),
        "not json at all",
        json.dumps({"type": "agent.message", "content": "a string, not blocks"}),
        json.dumps({"type": "no.such_event"}),
        json.dumps(["a", "list"]),
        json.dumps({"type": "session.native_id", "id": ""}),
        json.dumps(use),
        json.dumps({"type": "agent.raw", "source": "mine", "data": {"k": [1]}}),
        json.dumps({"type": "span.model_request_end", "model": "m", "model_usage": {"input_tokens": 5}}),
        json.dumps({"type": "span.model_request_end", "model_usage": {"input_tokens": 2, "output_tokens": 7}}),
        json.dumps({"type": "agent.message", "content": [{"type": "text", "text": "last"}]}),
    ]
    events = translate(translator, lines)
    assert [e.type for e in events] == [
        "agent.message",
        "session.error",
        "session.error",
        "agent.raw",
        "agent.raw",
        "session.error",
        "agent.tool_use",
        "agent.raw",
        "span.model_request_end",
        "span.model_request_end",
        "agent.message",
    ]
    errors = [e for e in events if isinstance(e, SessionError)]
    assert {e.error.type for e in errors} == {"parse_error"}
    assert errors[0].error.message.startswith("not JSON (") and errors[0].error.message.endswith(": not json at all")
    assert "not a valid event (agent.message.content: Input should be a valid list" in errors[1].error.message
    assert 'needs a non-empty string "id"' in errors[2].error.message
    # As every backend does (tests/backends/test_translator_contract.py): JSON that is not an object
    # and a type that is no event of ours are kept whole as agent.raw.
    assert events[3] == AgentRaw(source="custom", data={"type": "no.such_event"})
    assert events[4] == AgentRaw(source="custom", data=["a", "list"])
    assert events[6] == AgentToolUse(tool_use_id="t1", name="sh", input={"cmd": "ls"})
    assert events[7] == AgentRaw(source="mine", data={"k": [1]})
    result = translator.result
    assert result.native_session_id == "native-1" and result.final_text == "last"
    assert result.usage == Usage(input_tokens=7, output_tokens=7)
    # parse errors are the command's bugs, reported; they do not fail the turn.
    assert result.stop_reason == "end_turn" and result.error is None


def test_server_owned_events_are_refused_and_status_idle_sets_the_stop_reason() -> None:
    translator = CustomTranslator("jsonl")
    lines = [
        json.dumps({"type": "user.message", "content": [{"type": "text", "text": "fake"}]}),
        json.dumps({"type": "session.status_running"}),
        json.dumps({"type": "sandbox.destroyed", "provider": "x", "sandbox_id": "y"}),
        json.dumps({"type": "session.status_idle", "stop_reason": {"type": "max_turns"}}),
    ]
    events = translate(translator, lines)
    assert [e.error.type for e in events if isinstance(e, SessionError)] == ["invalid_event"] * 3
    assert len(events) == 3 and translator.result.stop_reason == "max_turns"


def test_a_reported_error_fails_the_turn_and_a_nonzero_exit_adds_the_stderr_tail() -> None:
    reported = CustomTranslator("jsonl")
    error = {"type": "session.error", "error": {"type": "api_error", "message": "model said no"}}
    events = translate(reported, [json.dumps(error)])
    assert events == [parse_event(error)]
    assert reported.result.stop_reason == "error" and reported.result.error == "model said no"

    crashed = CustomTranslator("jsonl")
    events = translate(crashed, [json.dumps(error)], exit_code=3, stderr="x" * 5000 + "Traceback: boom")
    failure = events[-1]
    assert isinstance(failure, SessionError) and failure.error.type == "command_failed"
    assert "exited with code 3" in failure.error.message and failure.error.message.endswith("Traceback: boom")
    assert len(failure.error.message) < 2100
    assert crashed.result.stop_reason == "error"
    assert crashed.result.error is not None and crashed.result.error.startswith("model said no; the custom command")


def test_interrupt_exit_codes_read_interrupted_without_an_error() -> None:
    for code in (130, 143):
        translator = CustomTranslator("jsonl")
        assert translate(translator, [], exit_code=code) == []
        assert translator.result.stop_reason == "interrupted" and translator.result.error is None


# -- the text translator --------------------------------------------------------------------


def test_text_lines_are_joined_into_chunks_and_the_whole_output_is_the_final_text() -> None:
    translator = CustomTranslator("text")
    lines = [f"line {i}\r\n" for i in range(TEXT_CHUNK_LINES + 10)]
    events = translate(translator, lines)
    messages = [e for e in events if isinstance(e, AgentMessage)]
    assert [len(m.text.splitlines()) for m in messages] == [TEXT_CHUNK_LINES, 10]
    assert messages[0].text.startswith("line 0\nline 1\n") and "\r" not in messages[0].text
    whole = "\n".join(f"line {i}" for i in range(TEXT_CHUNK_LINES + 10))
    assert translator.result.final_text == whole and translator.result.stop_reason == "end_turn"
    assert translator.result.native_session_id is None


def test_long_text_lines_flush_early_and_the_final_text_is_capped() -> None:
    translator = CustomTranslator("text")
    events = translate(translator, ["z" * 9000, '{"type": "agent.message"} is just text here'], exit_code=1)
    assert isinstance(events[0], AgentMessage) and events[0].text == "z" * 9000
    assert isinstance(events[1], AgentMessage) and events[1].text.startswith('{"type"')
    assert isinstance(events[2], SessionError) and translator.result.stop_reason == "error"
    big = CustomTranslator("text")
    translate(big, ["w" * 1000] * 200)
    assert big.result.final_text is not None and len(big.result.final_text) <= MAX_FINAL_TEXT


# -- real processes, argv from command(), output through the translator ----------------------


SCRIPT = r"""
set -eu
printf '%s\n' "{\"type\":\"session.native_id\",\"id\":\"nat-$1\"}"
text="got $(printf %s "$2" | wc -c) bytes, resume=${MCP_SANDBOXES_RESUME_ID:-none}"
printf '%s\n' "{\"type\":\"agent.message\",\"content\":[{\"type\":\"text\",\"text\":\"$text\"}]}"
echo "this line is not json"
echo "diagnostics go to stderr" >&2
"""


def test_a_real_jsonl_command_run_from_the_built_argv(tmp_path: Path) -> None:
    backend = backend_of(
        argv=["sh", "-c", SCRIPT, "sh", "{session}", "{prompt}"],
        resume_argv=["sh", "-c", SCRIPT, "sh", "{resume_id}", "{prompt}"],
    )
    prompt = 'it\'s a "prompt" with $(danger)'
    outputs = []
    resume_id = None
    for _ in range(2):
        command = backend.command(turn_of(prompt, resume_id=resume_id))
        done = subprocess.run(
            command.argv, env={"PATH": os.environ["PATH"], **command.env}, capture_output=True, timeout=30
        )
        translator = backend.translator()
        events = translate(translator, done.stdout.decode().splitlines(), done.returncode, done.stderr.decode())
        outputs.append((events, translator.result))
        resume_id = translator.result.native_session_id
    (first_events, first), (second_events, second) = outputs
    assert first.native_session_id == "nat-ses_abc" and second.native_session_id == "nat-nat-ses_abc"
    assert first.final_text == f"got {len(prompt.encode())} bytes, resume=none"
    assert second.final_text == f"got {len(prompt.encode())} bytes, resume=nat-ses_abc"
    assert [e.type for e in first_events] == ["agent.message", "session.error"]
    assert first.stop_reason == "end_turn" and not any(isinstance(e, SpanModelRequestEnd) for e in second_events)


def test_a_failing_text_command_reports_its_stderr(tmp_path: Path) -> None:
    script = 'echo "working on: $1"; echo "fatal: no model" >&2; exit 7'
    backend = backend_of(argv=["sh", "-c", script, "sh", "{prompt}"], output="text")
    command = backend.command(turn_of("task"))
    done = subprocess.run(command.argv, env={"PATH": os.environ["PATH"]}, capture_output=True, timeout=30)
    translator = backend.translator()
    events = translate(translator, done.stdout.decode().splitlines(), done.returncode, done.stderr.decode())
    assert isinstance(events[0], AgentMessage) and events[0].text == "working on: task"
    assert isinstance(events[1], SessionError) and events[1].error.message.endswith("stderr: fatal: no model")
    assert translator.result.stop_reason == "error" and translator.result.final_text == "working on: task"


def test_command_profile_defaults() -> None:
    profile = CommandProfile()
    assert (profile.prompt_via, profile.output, profile.argv) == ("arg", "jsonl", [])
