"""GeminiTranslator on real recordings of Gemini CLI 0.61.0 (tests/fixtures/gemini/record.py)
and on the documented example from the CLI's headless docs (SOURCES.md there)."""

from __future__ import annotations

import json
import time
from typing import Any, TypeVar

import pytest

from mcp_sandboxes.backends.base import Translator, TurnResult
from mcp_sandboxes.backends.gemini import GeminiTranslator, stats_usage
from mcp_sandboxes.events import (
    AgentMcpToolResult,
    AgentMcpToolUse,
    AgentMessage,
    AgentRaw,
    AgentToolResult,
    AgentToolUse,
    Event,
    SessionError,
    SpanModelRequestEnd,
    Usage,
    parse_event,
)
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "gemini"
RECORDINGS: dict[str, dict[str, Any]] = json.loads((FIXTURES / "recordings.json").read_text())
DOC_EXAMPLE = "gemini-cli-docs-headless-md-pr10883-example"


def lines_of(name: str) -> list[str]:
    return [line for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def records_of(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(name)]


def translate(
    name: str, exit_code: int | None = None, stderr: str | None = None, lines: list[str] | None = None
) -> tuple[list[Event], TurnResult]:
    translator = GeminiTranslator()
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


def kinds(events: list[Event]) -> list[str]:
    return [event.type for event in events]


def result_line(name: str) -> dict[str, Any]:
    return next(r for r in records_of(name) if r["type"] == "result")


def test_every_recording_comes_from_the_pinned_cli_with_the_backends_argv() -> None:
    assert RECORDINGS, "record.py has not been run"
    for name, meta in RECORDINGS.items():
        assert meta["gemini_version"] == "0.61.0", name
        assert meta["argv"][:5] == ["gemini", "-p", "", "--output-format", "stream-json"], name
        assert (FIXTURES / f"{name}.jsonl").exists(), name


def test_delta_chunks_are_joined_into_one_message_with_usage_from_the_result() -> None:
    deltas = [r for r in records_of("plain-text") if r["type"] == "message" and r.get("delta")]
    assert len(deltas) >= 2, "the recording should show a reply streamed in several pieces"
    events, result = translate("plain-text")
    assert kinds(events) == ["agent.message", "span.model_request_end"]
    assert of_type(events, AgentMessage)[0].text == "Hello from the scripted Gemini model, in pieces."
    stats = result_line("plain-text")["stats"]
    span = of_type(events, SpanModelRequestEnd)[0]
    assert span.model == "gemini-2.5-flash"
    assert span.model_usage == result.usage
    assert result.usage.input_tokens == stats["input"] and result.usage.output_tokens == stats["output_tokens"]
    # The scripted reply carried a thought; the CLI counts it only in the total.
    assert result.usage.reasoning_tokens == stats["total_tokens"] - stats["input_tokens"] - stats["output_tokens"] > 0
    assert result.stop_reason == "end_turn" and result.error is None
    assert result.final_text == "Hello from the scripted Gemini model, in pieces."
    assert result.native_session_id == records_of("plain-text")[0]["session_id"]


def test_a_shell_tool_call_gives_message_tool_use_result_and_final_message() -> None:
    events, result = translate("shell-tool")
    assert kinds(events) == [
        "agent.message",
        "agent.tool_use",
        "agent.tool_result",
        "agent.message",
        "span.model_request_end",
    ]
    use, tool_result = of_type(events, AgentToolUse)[0], of_type(events, AgentToolResult)[0]
    assert use.name == "run_shell_command"
    assert use.input["command"] == "echo recorded-proof > proof.txt && cat proof.txt"
    assert tool_result.tool_use_id == use.tool_use_id and use.tool_use_id.startswith("run_shell_command")
    assert tool_result.content == "recorded-proof" and tool_result.is_error is False
    assert [m.text for m in of_type(events, AgentMessage)] == ["Writing the file.", "DONE-1: wrote proof.txt"]
    assert result.final_text == "DONE-1: wrote proof.txt"
    stats = result_line("shell-tool")["stats"]
    assert result.usage.cache_read_input_tokens == stats["cached"] > 0
    assert result.usage.input_tokens == stats["input_tokens"] - stats["cached"]


def test_a_resumed_turn_reports_the_same_session_id() -> None:
    _, first = translate("shell-tool")
    events, second = translate("resume-turn2")
    assert second.native_session_id == first.native_session_id is not None
    assert [m.text for m in of_type(events, AgentMessage)] == ["DONE-2: still here"]
    assert "--resume" in RECORDINGS["resume-turn2"]["argv"]


@pytest.mark.parametrize(
    ("name", "needle", "exit_code"),
    [("api-error-400", "INVALID_ARGUMENT", 144), ("api-error-503", "overloaded", 247)],
)
def test_an_api_error_is_an_error_turn_with_the_api_message(name: str, needle: str, exit_code: int) -> None:
    # 0.61.0 exits with the HTTP status (truncated to a byte) after its result line.
    assert RECORDINGS[name]["exit_code"] == exit_code
    events, result = translate(name)
    assert kinds(events) == ["span.model_request_end", "session.error"]
    error = of_type(events, SessionError)[0].error
    assert error.type == "api_error" and needle in error.message
    assert result.stop_reason == "error" and result.error == error.message
    assert result.native_session_id is not None


def test_a_failed_tool_is_an_error_result_and_the_turn_goes_on() -> None:
    events, result = translate("tool-error")
    failed = of_type(events, AgentToolResult)[0]
    raw = next(r for r in records_of("tool-error") if r["type"] == "tool_result")
    assert raw["status"] == "error" and "is_error" not in raw  # the peer's field does not exist
    assert failed.is_error is True and failed.content == raw["error"]["message"]
    assert "Path not in workspace" in failed.content
    assert result.stop_reason == "end_turn" and result.final_text == "The file is outside the workspace."


def test_a_non_fatal_error_line_is_a_session_error_and_the_turn_ends_normally() -> None:
    events, result = translate("loop-detected")
    errors = of_type(events, SessionError)
    assert [(e.error.type, e.error.message) for e in errors] == [("cli_warning", "Loop detected, stopping execution")]
    assert kinds(events)[-2:] == ["session.error", "span.model_request_end"]
    assert len(of_type(events, AgentToolUse)) == len(of_type(events, AgentToolResult)) == 4
    assert result.stop_reason == "end_turn"


def test_the_turn_limit_is_max_turns_without_a_session_error() -> None:
    assert RECORDINGS["max-turns"]["exit_code"] == 53
    events, result = translate("max-turns")
    assert not of_type(events, SessionError)
    assert result.stop_reason == "max_turns" and "max session turns" in (result.error or "")
    assert len(of_type(events, AgentToolUse)) == 2 and of_type(events, SpanModelRequestEnd)


@pytest.mark.parametrize("name", ["interrupted", "terminated", "interrupted-streaming"])
def test_a_stopped_run_without_a_result_is_interrupted_not_crashed(name: str) -> None:
    assert RECORDINGS[name]["exit_code"] == 0
    events, result = translate(name)
    assert not of_type(events, SessionError) and not of_type(events, SpanModelRequestEnd)
    assert result.stop_reason == "interrupted" and result.error is None
    assert result.native_session_id == records_of(name)[0]["session_id"]


def test_text_still_streaming_when_stopped_is_kept() -> None:
    lines = lines_of("plain-text")[:-1]  # no result line
    events, result = translate("plain-text", exit_code=130, stderr="", lines=lines)
    assert kinds(events) == ["agent.message"]
    assert (
        result.stop_reason == "interrupted" and result.final_text == "Hello from the scripted Gemini model, in pieces."
    )


def test_mcp_tools_become_mcp_events_with_the_server_name() -> None:
    events, result = translate("mcp-tool")
    use, tool_result = of_type(events, AgentMcpToolUse)[0], of_type(events, AgentMcpToolResult)[0]
    assert (use.server_name, use.name, use.input) == ("calc", "add", {"a": 2, "b": 40})
    assert tool_result.tool_use_id == use.tool_use_id and tool_result.content == "42"
    assert not of_type(events, AgentToolUse) and result.final_text == "The sum is 42."


def test_auto_routing_names_the_model_that_answered_and_counts_the_classifier() -> None:
    records = records_of("auto-model")
    assert records[0]["model"] == "auto"
    models = result_line("auto-model")["stats"]["models"]
    assert len(models) == 2, models
    events, result = translate("auto-model")
    span = of_type(events, SpanModelRequestEnd)[0]
    main = max(models, key=lambda name: models[name]["input_tokens"])
    assert span.model == main and "lite" not in main
    assert result.usage.output_tokens == sum(m["output_tokens"] for m in models.values())


@pytest.mark.parametrize(
    ("name", "error_type", "needle"),
    [
        ("auth-missing", "auth_error", "GEMINI_API_KEY"),
        ("resume-unknown", "input_error", "No previous sessions found"),
    ],
)
def test_a_fatal_exit_before_any_output_names_the_cause_and_stderr(name: str, error_type: str, needle: str) -> None:
    assert lines_of(name) == []
    events, result = translate(name)
    error = of_type(events, SessionError)[0].error
    assert error.type == error_type and needle in error.message
    assert f"exit code {RECORDINGS[name]['exit_code']}" in error.message
    assert result.stop_reason == "error" and result.error == error.message


@pytest.mark.parametrize(
    ("exit_code", "stop_reason", "error_type"),
    [
        (41, "error", "auth_error"),
        (42, "error", "input_error"),
        (44, "error", "sandbox_error"),
        (52, "error", "config_error"),
        (53, "max_turns", None),
        (54, "error", "tool_error"),
        (130, "interrupted", None),
        (143, "interrupted", None),
        (1, "error", "cli_crashed"),
        (137, "error", "cli_crashed"),
    ],
)
def test_exit_codes_without_a_result(exit_code: int, stop_reason: str, error_type: str | None) -> None:
    translator = GeminiTranslator()
    translator.feed(lines_of("shell-tool")[0])
    events = translator.finish(exit_code, "boom on stderr")
    assert translator.result.stop_reason == stop_reason
    assert [e.error.type for e in of_type(events, SessionError)] == ([error_type] if error_type else [])
    if error_type:
        assert "boom on stderr" in (translator.result.error or "")


def test_a_result_line_then_a_cancellation_exit_is_interrupted() -> None:
    _, result = translate("plain-text", exit_code=130)
    assert result.stop_reason == "interrupted"


def test_a_huge_stderr_keeps_only_its_tail() -> None:
    _, result = translate("auth-missing", stderr="x" * 100_000 + "THE-END")
    assert result.error is not None and result.error.endswith("THE-END") and len(result.error) < 3000


def test_an_error_result_without_details_takes_the_last_error_line() -> None:
    lines = [
        '{"type":"init","session_id":"s1","model":"m"}',
        '{"type":"error","severity":"error","message":"Invalid stream: empty response"}',
        '{"type":"result","status":"error","stats":{}}',
    ]
    events, result = translate("x", exit_code=0, stderr="", lines=lines)
    assert [e.error.message for e in of_type(events, SessionError)] == ["Invalid stream: empty response"] * 2
    assert result.stop_reason == "error" and result.error == "Invalid stream: empty response"


def test_a_malformed_line_is_a_parse_error_and_translation_goes_on() -> None:
    lines = lines_of("shell-tool")
    broken = [lines[0], '{"type":"message", "role":', *lines[1:]]
    events, result = translate("shell-tool", lines=broken)
    assert of_type(events, SessionError)[0].error.type == "parse_error"
    assert result.final_text == "DONE-1: wrote proof.txt" and result.stop_reason == "end_turn"


def test_unknown_lines_are_kept_raw() -> None:
    lines = [
        "[1, 2]",
        '{"type":"telemetry","x":1}',
        '{"type":"message","role":"system","content":"hi"}',
        '{"type":"message","role":"user","content":"the prompt"}',
    ]
    events, _ = translate("x", exit_code=0, stderr="", lines=lines)
    assert kinds(events) == ["agent.raw", "agent.raw", "agent.raw"]
    assert of_type(events, AgentRaw)[1].data == {"type": "telemetry", "x": 1}


def test_a_whole_assistant_message_is_emitted_at_once() -> None:
    lines = ['{"type":"message","role":"assistant","content":"whole"}', '{"type":"result","status":"success"}']
    events, result = translate("x", exit_code=0, stderr="", lines=lines)
    assert [m.text for m in of_type(events, AgentMessage)] == ["whole"] and result.final_text == "whole"


def test_the_documented_example_translates() -> None:
    events, result = translate(DOC_EXAMPLE)
    assert kinds(events) == ["agent.tool_use", "agent.tool_result", "agent.message", "span.model_request_end"]
    assert of_type(events, AgentToolResult)[0].content == "file1.txt\nfile2.txt"
    # The example's stats have neither `input` nor `cached`: input is the whole prompt.
    assert result.usage == Usage(input_tokens=50, output_tokens=200)
    assert result.native_session_id == "abc123" and result.final_text == "Here are the files..."


def test_stats_usage_tolerates_missing_and_odd_fields() -> None:
    assert stats_usage(None) == Usage()
    assert stats_usage({"input_tokens": "7", "output_tokens": True, "cached": 3}) == Usage(cache_read_input_tokens=3)


def test_truncated_lines_never_raise() -> None:
    translator = GeminiTranslator()
    for name in RECORDINGS:
        for line in lines_of(name):
            for cut in range(0, len(line), max(1, len(line) // 7)):
                for event in translator.feed(line[:cut]):
                    assert parse_event(event.model_dump()) == event
    translator.finish(0, "")


def test_translation_keeps_up_with_a_fast_cli() -> None:
    """100k lines of recorded turns (each through a fresh translator, as the runner does):
    the translator must not be the bottleneck of a turn."""
    turns = [lines_of(name) for name in RECORDINGS if lines_of(name)]
    total = 0
    started = time.perf_counter()
    while total < 100_000:
        for lines in turns:
            translator = GeminiTranslator()
            for line in lines:
                translator.feed(line)
            translator.finish(0, "")
            total += len(lines)
    rate = total / (time.perf_counter() - started)
    assert rate > 20_000, f"{rate:.0f} lines/s"


def test_every_fixture_has_a_provenance_line() -> None:
    sources = (FIXTURES / "SOURCES.md").read_text()
    for path in FIXTURES.glob("*.jsonl"):
        assert path.name in sources, path.name
