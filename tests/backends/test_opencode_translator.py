"""OpencodeTranslator on real recordings of OpenCode 1.18.33 (record.py) and on the collected
third-party transcripts (tests/fixtures/opencode/SOURCES.md)."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any, TypeVar

import pytest

from mcp_sandboxes.backends.base import Translator, TurnResult
from mcp_sandboxes.backends.opencode import OpencodeTranslator
from mcp_sandboxes.events import (
    AgentMcpToolResult,
    AgentMcpToolUse,
    AgentMessage,
    AgentRaw,
    AgentThinking,
    AgentToolResult,
    AgentToolUse,
    Event,
    SessionError,
    SpanModelRequestEnd,
    Usage,
    parse_event,
)
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "opencode"
RECORDINGS: dict[str, dict[str, Any]] = json.loads((FIXTURES / "recordings.json").read_text())


def lines_of(name: str) -> list[str]:
    return [line for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def records_of(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(name)]


def translate(
    name: str,
    exit_code: int | None = None,
    stderr: str | None = None,
    lines: list[str] | None = None,
    mcp_servers: Collection[str] = (),
) -> tuple[list[Event], TurnResult]:
    translator = OpencodeTranslator(mcp_servers=mcp_servers)
    assert isinstance(translator, Translator)
    events: list[Event] = []
    for line in lines if lines is not None else lines_of(name):
        events.extend(translator.feed(line))
    meta = RECORDINGS.get(name, {"exit_code": 0, "stderr_tail": ""})
    events.extend(
        translator.finish(
            meta["exit_code"] if exit_code is None else exit_code, meta["stderr_tail"] if stderr is None else stderr
        )
    )
    for event in events:  # every event survives the store's round trip
        assert parse_event(event.model_dump()) == event
    return events, translator.result


T = TypeVar("T")


def of_type(events: list[Event], kind: type[T]) -> list[T]:
    return [event for event in events if isinstance(event, kind)]


def steps_of(name: str) -> list[dict[str, Any]]:
    return [r["part"] for r in records_of(name) if r["type"] == "step_finish"]


def session_of(name: str) -> str:
    session: str = records_of(name)[0]["sessionID"]
    return session


# -- recorded here, from the real CLI ---------------------------------------------------


def test_every_recording_comes_from_the_pinned_cli() -> None:
    assert len(RECORDINGS) >= 10, "recordings.json is incomplete: run tests/fixtures/opencode/record.py"
    for name, meta in RECORDINGS.items():
        assert meta["opencode_version"] == "1.18.33", name
        assert (FIXTURES / f"{name}.jsonl").exists(), name
        assert meta["argv"][:4] == ["opencode", "run", "--format", "json"], name


def test_a_plain_reply_gives_thinking_message_and_the_step_usage() -> None:
    events, result = translate("plain-text")
    assert [event.type for event in events] == ["agent.thinking", "agent.message", "span.model_request_end"]
    assert of_type(events, AgentThinking)[0].thinking == "The user wants a greeting."
    assert of_type(events, AgentMessage)[0].text == "Hello from the scripted model."
    (step,) = steps_of("plain-text")
    span = of_type(events, SpanModelRequestEnd)[0]
    assert span.model_usage.input_tokens == step["tokens"]["input"] > 1000
    assert span.model_usage.output_tokens == step["tokens"]["output"] > 0
    assert span.model_usage.reasoning_tokens == step["tokens"]["reasoning"] > 0
    assert span.model_usage.cost_usd == step["cost"] == 0
    assert result.usage == span.model_usage
    assert result.stop_reason == "end_turn" and result.error is None
    assert result.final_text == "Hello from the scripted model."
    assert result.native_session_id == session_of("plain-text")


def test_a_bash_tool_call_carries_its_result_and_usage_is_summed_over_steps() -> None:
    events, result = translate("bash-tool")
    assert [event.type for event in events] == [
        "agent.tool_use",
        "agent.tool_result",
        "span.model_request_end",
        "agent.message",
        "span.model_request_end",
    ]
    use = of_type(events, AgentToolUse)[0]
    assert use.name == "bash"
    assert use.input == {"command": "echo recorded-proof > proof.txt && cat proof.txt"}
    tool_result = of_type(events, AgentToolResult)[0]
    assert tool_result.tool_use_id == use.tool_use_id and use.tool_use_id.startswith("call_")
    assert tool_result.content == "recorded-proof\n" and tool_result.is_error is False
    first, second = steps_of("bash-tool")
    assert (first["reason"], second["reason"]) == ("tool-calls", "stop")
    assert result.usage.input_tokens == first["tokens"]["input"] + second["tokens"]["input"]
    assert result.usage.output_tokens == first["tokens"]["output"] + second["tokens"]["output"]
    assert [span.model_usage.input_tokens for span in of_type(events, SpanModelRequestEnd)] == [
        first["tokens"]["input"],
        second["tokens"]["input"],
    ]
    assert result.final_text == "DONE-1: wrote proof.txt"
    assert result.stop_reason == "end_turn"


def test_a_resumed_turn_keeps_the_session_id() -> None:
    events, result = translate("resume-turn2")
    assert [m.text for m in of_type(events, AgentMessage)] == ["DONE-2: still here"]
    assert result.native_session_id == session_of("bash-tool")
    assert result.stop_reason == "end_turn"


def test_a_failed_tool_is_an_error_result_and_the_turn_goes_on() -> None:
    events, result = translate("tool-error")
    tool_result = of_type(events, AgentToolResult)[0]
    assert tool_result.is_error is True and tool_result.content.startswith("File not found: ")
    assert of_type(events, AgentToolUse)[0].name == "read"
    assert of_type(events, SessionError) == []
    assert result.stop_reason == "end_turn" and result.final_text == "The file does not exist."


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("api-error-400", 400, "scripted bad request"),
        ("api-error-401", 401, "Incorrect API key"),
        ("api-error-500", 500, "boom"),
    ],
)
def test_an_api_error_is_an_error_turn_with_the_api_message(name: str, status: int, message: str) -> None:
    assert RECORDINGS[name]["exit_code"] == 1
    (record,) = records_of(name)
    assert record["error"]["data"]["statusCode"] == status
    events, result = translate(name)
    assert [event.type for event in events] == ["session.error"]
    error = of_type(events, SessionError)[0].error
    assert (error.type, error.message) == ("api_error", message)
    assert result.stop_reason == "error" and result.error == message
    assert result.native_session_id == record["sessionID"]
    assert result.usage == Usage()


@pytest.mark.parametrize(
    ("name", "exit_codes"),
    [
        ("interrupted", (-2, 130)),
        ("terminated", (-15, 143)),
        ("interrupted-streaming", (-2, 130)),
    ],
)
def test_a_signal_ends_the_turn_as_interrupted_not_crashed(name: str, exit_codes: tuple[int, int]) -> None:
    # On the host the process dies of the signal (-2/-15); a container engine reports 130/143.
    assert RECORDINGS[name]["exit_code"] == exit_codes[0]
    assert [r["type"] for r in records_of(name)] == ["step_start"]
    for exit_code in exit_codes:
        events, result = translate(name, exit_code=exit_code)
        assert events == []
        assert result.stop_reason == "interrupted" and result.error is None
        assert result.native_session_id == session_of(name)


def test_mcp_tools_are_split_by_the_configured_server_names() -> None:
    events, result = translate("mcp-tool", mcp_servers={"calc"})
    use = of_type(events, AgentMcpToolUse)[0]
    assert (use.server_name, use.name, use.input) == ("calc", "add", {"a": 2, "b": 40})
    mcp_result = of_type(events, AgentMcpToolResult)[0]
    assert (mcp_result.tool_use_id, mcp_result.content, mcp_result.is_error) == (use.tool_use_id, "42", False)
    assert of_type(events, AgentToolUse) == []
    assert result.final_text == "The sum is 42."
    # Without the server names the same line is an ordinary tool, never a guess.
    plain, _ = translate("mcp-tool")
    assert [u.name for u in of_type(plain, AgentToolUse)] == ["calc_add"]


def test_the_longest_sanitized_server_name_wins() -> None:
    line = json.dumps(
        {
            "type": "tool_use",
            "sessionID": "ses_x",
            "part": {
                "callID": "c1",
                "tool": "my_calc_v2_add_all",
                "state": {"status": "completed", "input": {}, "output": "ok"},
            },
        }
    )
    translator = OpencodeTranslator(mcp_servers=["my", "my.calc", "my.calc/v2"])
    use = of_type(translator.feed(line), AgentMcpToolUse)[0]
    assert (use.server_name, use.name) == ("my.calc/v2", "add_all")


# -- crashes and bad input ---------------------------------------------------------------


def test_a_crash_before_any_output_names_the_exit_code_and_stderr() -> None:
    events, result = translate("none", exit_code=1, stderr="Error: boom\n" + "x" * 5000, lines=[])
    (error,) = of_type(events, SessionError)
    assert error.error.type == "cli_crashed"
    assert error.error.message.startswith("opencode exited with code 1 before finishing a step; stderr: ")
    assert len(error.error.message) < 2200 and error.error.message.endswith("x")
    assert result.stop_reason == "error" and result.error == error.error.message


def test_a_crash_after_steps_keeps_what_was_said_and_the_usage() -> None:
    lines = lines_of("bash-tool")[:4]  # tool step finished, second step started
    events, result = translate("bash-tool", exit_code=137, stderr="", lines=lines)
    assert of_type(events, SessionError)[-1].error.message == "opencode exited with code 137"
    assert result.usage.input_tokens == steps_of("bash-tool")[0]["tokens"]["input"]
    assert result.stop_reason == "error"


def test_malformed_and_unknown_lines_become_events_and_the_turn_goes_on() -> None:
    translator = OpencodeTranslator()
    (parse_error,) = translator.feed('{"type":"text", "part": {')
    assert isinstance(parse_error, SessionError) and parse_error.error.type == "parse_error"
    assert "{" in parse_error.error.message
    (raw_list,) = translator.feed("[1, 2]")
    assert isinstance(raw_list, AgentRaw) and raw_list.data == [1, 2]
    unknown = {"type": "done", "sessionID": "ses_new", "part": {"x": 1}}
    (raw,) = translator.feed(json.dumps(unknown))
    assert isinstance(raw, AgentRaw) and raw.data == unknown and raw.source == "opencode"
    (no_part,) = translator.feed(json.dumps({"type": "text", "sessionID": "ses_new"}))
    assert isinstance(no_part, AgentRaw)
    assert translator.feed(json.dumps({"type": "text", "part": {"text": "  "}})) == []
    (message,) = translator.feed(json.dumps({"type": "text", "part": {"text": "still here"}}))
    assert isinstance(message, AgentMessage)
    assert translator.finish(0, "") == []
    assert translator.result.native_session_id == "ses_new"
    assert translator.result.final_text == "still here" and translator.result.stop_reason == "end_turn"


def test_a_tool_still_running_has_no_result_yet() -> None:
    line = {"type": "tool_use", "part": {"callID": "c9", "tool": "bash", "state": {"status": "running", "input": "ls"}}}
    (use,) = OpencodeTranslator().feed(json.dumps(line))
    assert isinstance(use, AgentToolUse) and use.input == {"input": "ls"}


def test_an_aborted_message_is_an_interrupt_not_an_error() -> None:
    translator = OpencodeTranslator()
    aborted = {"type": "error", "sessionID": "ses_a", "error": {"name": "MessageAbortedError", "data": {}}}
    assert translator.feed(json.dumps(aborted)) == []
    assert translator.finish(1, "") == []
    assert translator.result.stop_reason == "interrupted"


def test_error_names_become_snake_case_types_and_a_bare_name_is_the_message() -> None:
    translator = OpencodeTranslator()
    (auth,) = translator.feed(json.dumps({"type": "error", "error": {"name": "ProviderAuthError", "data": {}}}))
    assert isinstance(auth, SessionError) and (auth.error.type, auth.error.message) == (
        "provider_auth_error",
        "ProviderAuthError",
    )
    (unknown,) = translator.feed(
        json.dumps({"type": "error", "error": {"name": "UnknownError", "data": {"message": "Model not found"}}})
    )
    assert isinstance(unknown, SessionError) and unknown.error.type == "unknown_error"
    translator.finish(1, "")
    assert translator.result.error == "ProviderAuthError; Model not found"


# -- collected from elsewhere (SOURCES.md) ------------------------------------------------


def test_takopi_real_success_sums_cache_reads_and_cost() -> None:
    events, result = translate("takopi-tests-fixtures-opencode_stream_success")
    assert [e.type for e in events] == [
        "agent.tool_use",
        "agent.tool_result",
        "span.model_request_end",
        "agent.message",
        "span.model_request_end",
    ]
    assert of_type(events, AgentToolResult)[0].content == "hello\n"
    assert result.usage.input_tokens == 21772 + 671
    assert result.usage.cache_read_input_tokens == 21415
    assert result.usage.cost_usd == pytest.approx(0.001)
    assert result.final_text == "```\nhello\n```"
    assert result.native_session_id == "ses_494719016ffe85dkDMj0FPRbHK"


def test_takopi_run_json_keeps_reasoning_tokens_and_reports_the_trailing_error() -> None:
    events, result = translate("takopi-tests-fixtures-opencode_run_json", exit_code=1, stderr="")
    span = of_type(events, SpanModelRequestEnd)[0]
    assert (span.model_usage.input_tokens, span.model_usage.reasoning_tokens) == (534, 64)
    assert span.model_usage.cost_usd == pytest.approx(0.0123)
    (error,) = of_type(events, SessionError)
    assert (error.error.type, error.error.message) == ("api_error", "Upstream timeout while calling provider")
    assert result.stop_reason == "error" and result.final_text == "Found ripgrep 13.0.0."


@pytest.mark.parametrize(
    ("name", "final_text", "input_tokens"),
    [
        ("takopi-tests-fixtures-opencode_stream_success_no_reason", "All done.", 12),
        ("agentstep-gateway-fixture-turn1", "Hello from opencode.", 42),
        ("agentstep-gateway-fixture-turn2", "You said hello.", 56),
    ],
)
def test_minimal_synthetic_transcripts(name: str, final_text: str, input_tokens: int) -> None:
    events, result = translate(name)
    assert result.final_text == final_text and result.stop_reason == "end_turn"
    assert result.usage.input_tokens == input_tokens and result.usage.cost_usd
    assert of_type(events, AgentRaw) == []


def test_takopi_stream_error_and_a_lone_step_start() -> None:
    events, result = translate("takopi-tests-fixtures-opencode_stream_error", exit_code=1, stderr="")
    assert [e.error.message for e in of_type(events, SessionError)] == ["Rate limit exceeded"]
    assert result.native_session_id == "ses_error123"
    events, result = translate("charmbracelet-crush-issue-3035-step_start")
    assert events == [] and result.native_session_id == "ses_18ef22a63ffeYvPBilm6eD8TSy"
