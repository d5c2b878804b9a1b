"""FactoryTranslator on real recordings of droid 0.225.2 (record.py) and on the collected
third-party transcripts (tests/fixtures/factory/SOURCES.md)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from mcp_sandboxes.backends.base import Translator, TurnResult
from mcp_sandboxes.backends.factory import FactoryTranslator
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
    parse_event,
)
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "factory"
RECORDINGS: dict[str, dict[str, Any]] = json.loads((FIXTURES / "recordings.json").read_text())
VIBE = "vibe-kanban-b189ca8-droid_snapshots-fixtures-"
DOC = "factory-ai-factory-cd013550-docs-cli-droid-exec-overview-mdx"


def lines_of(name: str) -> list[str]:
    return [line for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def records_of(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(name)]


def translate(
    name: str, exit_code: int | None = None, stderr: str = "", lines: list[str] | None = None
) -> tuple[list[Event], TurnResult]:
    translator = FactoryTranslator()
    assert isinstance(translator, Translator)
    events: list[Event] = []
    for line in lines if lines is not None else lines_of(name):
        events.extend(translator.feed(line))
    meta = RECORDINGS.get(name, {"exit_code": 0, "stderr_tail": ""})
    events.extend(
        translator.finish(meta["exit_code"] if exit_code is None else exit_code, stderr or meta["stderr_tail"])
    )
    for event in events:  # every event survives the store's round trip
        assert parse_event(event.model_dump()) == event
    return events, translator.result


T = TypeVar("T")


def of_type(events: list[Event], kind: type[T]) -> list[T]:
    return [event for event in events if isinstance(event, kind)]


def line_of(name: str, kind: str) -> dict[str, Any]:
    return next(r for r in records_of(name) if r["type"] == kind)


# -- recorded here, from the real CLI ---------------------------------------------------


def test_every_recording_comes_from_the_pinned_cli() -> None:
    assert len(RECORDINGS) >= 8, "recordings.json is short: run tests/fixtures/factory/record.py"
    for name, meta in RECORDINGS.items():
        assert meta["droid_version"].startswith("0.225."), name
        assert (FIXTURES / f"{name}.jsonl").is_file(), name


def test_plain_text_reasoning_becomes_thinking_and_completion_the_usage() -> None:
    events, result = translate("plain-text")
    assert [e.type for e in events] == ["agent.thinking", "agent.message", "span.model_request_end"]
    assert of_type(events, AgentThinking)[0].thinking == "The user wants a greeting."
    assert of_type(events, AgentMessage)[0].text == "Hello from the scripted model."
    usage = line_of("plain-text", "completion")["usage"]
    span = of_type(events, SpanModelRequestEnd)[0]
    assert span.model == line_of("plain-text", "system")["model"] == "custom:Scripted-0"
    assert span.model_usage.input_tokens == usage["input_tokens"] > 0
    assert span.model_usage.output_tokens == usage["output_tokens"] > 0
    assert span.model_usage.reasoning_tokens == usage["thinking_tokens"] > 0
    assert span.model_usage.cost_usd is None  # droid reports credits, never dollars
    assert result.stop_reason == "end_turn" and result.final_text == "Hello from the scripted model."
    assert result.usage == span.model_usage
    assert result.native_session_id == line_of("plain-text", "system")["session_id"]


def test_an_execute_call_pairs_with_its_result() -> None:
    events, result = translate("execute-tool")
    assert [e.type for e in events] == [
        "agent.tool_use",
        "agent.tool_result",
        "agent.message",
        "span.model_request_end",
    ]
    use, tool_result = of_type(events, AgentToolUse)[0], of_type(events, AgentToolResult)[0]
    assert use.name == "Execute" and use.input == {"command": "echo recorded-proof > proof.txt && cat proof.txt"}
    assert tool_result.tool_use_id == use.tool_use_id == line_of("execute-tool", "tool_call")["id"]
    assert tool_result.content.startswith("recorded-proof") and tool_result.is_error is False
    assert result.final_text == "DONE-1: wrote proof.txt" and result.stop_reason == "end_turn"


def test_a_forked_turn_reports_the_new_session_to_resume_next() -> None:
    _, first = translate("execute-tool")
    events, second = translate("resume-fork-turn2")
    assert [m.text for m in of_type(events, AgentMessage)] == ["DONE-2: still here"]
    assert second.native_session_id and second.native_session_id != first.native_session_id
    assert RECORDINGS["resume-fork-turn2"]["argv"][-2:] == ["--fork", first.native_session_id]
    assert second.usage.input_tokens > 0


def test_an_api_error_ends_the_turn_with_the_vendor_message() -> None:
    events, result = translate("api-error-401")
    errors = of_type(events, SessionError)
    assert [e.error.type for e in errors] == ["agent_error", "cli_error"]
    assert "authentication_error" in errors[0].error.message and errors[1].error.message == "Exec failed"
    assert result.stop_reason == "error"
    assert result.error is not None and result.error.startswith("401 ") and result.error.endswith("; Exec failed")
    assert of_type(events, SpanModelRequestEnd) == []  # no completion, so no usage


def test_a_refused_command_is_a_failed_tool_result_and_an_error() -> None:
    events, result = translate("read-only-refused")
    tool_result = of_type(events, AgentToolResult)[0]
    assert tool_result.is_error and tool_result.content.startswith("Error: Exec ended early: insufficient permission")
    assert tool_result.tool_use_id == of_type(events, AgentToolUse)[0].tool_use_id
    assert of_type(events, SessionError)[0].error.type == "cli_error"
    assert result.stop_reason == "error" and "insufficient permission" in (result.error or "")
    assert result.final_text is not None and result.final_text.startswith("Exec ended early")


def test_a_signal_stops_droid_without_completion_and_the_turn_reads_interrupted() -> None:
    for name in ("interrupted", "terminated"):
        assert RECORDINGS[name]["exit_code"] == 0
        events, result = translate(name)
        assert [e.type for e in events] == ["agent.tool_use"], name
        assert result.stop_reason == "interrupted" and result.error is None, name
        assert result.native_session_id, name


def test_mcp_tools_are_split_into_server_and_tool() -> None:
    events, result = translate("mcp-tool")
    use = of_type(events, AgentMcpToolUse)[0]
    assert (use.server_name, use.name, use.input) == ("calc", "add", {"a": 2, "b": 40})
    tool_result = of_type(events, AgentMcpToolResult)[0]
    assert (tool_result.tool_use_id, tool_result.content, tool_result.is_error) == (use.tool_use_id, "42", False)
    assert of_type(events, AgentToolUse) == [] and result.final_text == "The sum is 42."


# -- collected transcripts ----------------------------------------------------------------


def test_older_builds_without_ids_pair_results_with_the_open_call() -> None:
    with_ids, _ = translate(f"{VIBE}edits-and-execution")
    without_ids, _ = translate(f"{VIBE}edits-and-execution-no-ids")
    pairs = [(r.tool_use_id, r.content, r.is_error) for r in of_type(with_ids, AgentToolResult)]
    assert len(pairs) == 12
    assert [(r.tool_use_id, r.content, r.is_error) for r in of_type(without_ids, AgentToolResult)] == pairs
    assert [u.tool_use_id for u in of_type(with_ids, AgentToolUse)] == [p[0] for p in pairs]


def test_a_long_real_transcript_keeps_every_call_and_result() -> None:
    events, result = translate(f"{VIBE}rc-claude")
    uses, results = of_type(events, AgentToolUse), of_type(events, AgentToolResult)
    assert len(uses) == len(results) == 20
    assert {u.tool_use_id for u in uses} == {r.tool_use_id for r in results}
    assert len(of_type(events, AgentMessage)) == 9
    assert of_type(events, AgentRaw) == [] and of_type(events, SessionError) == []
    last = [r for r in records_of(f"{VIBE}rc-claude") if r.get("role") == "assistant"][-1]["text"]
    assert result.final_text == last


def test_the_documented_example_survives_its_invalid_first_line() -> None:
    events, result = translate(DOC)
    assert events[0].type == "session.error"
    assert isinstance(events[0], SessionError) and events[0].error.type == "parse_error"
    assert [e.type for e in events[1:]] == [
        "agent.message",
        "agent.tool_use",
        "agent.tool_result",
        "span.model_request_end",
    ]
    assert result.native_session_id == "abc-123" and result.stop_reason == "end_turn"
    assert result.final_text is not None and result.final_text.startswith("The ls command has been executed")


def test_an_older_transcript_with_an_insufficient_permission_error() -> None:
    events, result = translate(f"{VIBE}insufficient-perms", exit_code=1)
    failed = [r for r in of_type(events, AgentToolResult) if r.is_error]
    assert [r.content for r in failed] == ["Error: tool execution cancelled"]
    assert result.stop_reason == "error" and "insufficient permission" in (result.error or "")


def test_an_offline_transcript_that_never_answered() -> None:
    events, result = translate(f"{VIBE}offline", exit_code=1, stderr="getaddrinfo ENOTFOUND api.factory.ai")
    assert [e.type for e in events] == ["session.error"]
    assert isinstance(events[0], SessionError) and events[0].error.type == "cli_crashed"
    assert "ENOTFOUND" in events[0].error.message and result.stop_reason == "error"


# -- edge cases ---------------------------------------------------------------------------


def test_unknown_lines_are_kept_raw_and_bad_lines_become_parse_errors() -> None:
    translator = FactoryTranslator()
    future = {"type": "todo_update", "items": [1]}
    assert translator.feed(json.dumps(future)) == [AgentRaw(source="factory", data=future)]
    assert translator.feed("[1, 2]") == [AgentRaw(source="factory", data=[1, 2])]
    (error,) = translator.feed('{"type": "message", "role": ')
    assert isinstance(error, SessionError) and error.error.type == "parse_error"
    system = {"type": "message", "role": "system", "text": "x"}
    assert translator.feed(json.dumps(system)) == [AgentRaw(source="factory", data=system)]


def test_a_crash_after_output_reports_the_exit_code_and_stderr_tail() -> None:
    translator = FactoryTranslator()
    translator.feed(json.dumps({"type": "message", "role": "assistant", "id": "m", "text": "partial"}))
    (error,) = translator.finish(137, "x" * 5000 + "Killed")
    assert isinstance(error, SessionError) and error.error.type == "cli_crashed"
    assert "code 137" in error.error.message and error.error.message.endswith("Killed")
    assert len(error.error.message) < 2200
    assert translator.result.stop_reason == "error" and translator.result.final_text == "partial"


def test_a_completed_turn_then_sigterm_exit_is_interrupted() -> None:
    translator = FactoryTranslator()
    translator.feed(json.dumps({"type": "completion", "finalText": "done", "session_id": "s1"}))
    assert translator.finish(143, "") == []
    assert translator.result.stop_reason == "interrupted" and translator.result.final_text == "done"


def test_a_result_naming_an_unknown_id_keeps_it_and_leaves_open_calls_alone() -> None:
    translator = FactoryTranslator()
    translator.feed(json.dumps({"type": "tool_call", "id": "a", "toolName": "Read", "parameters": "raw"}))
    (orphan,) = translator.feed(json.dumps({"type": "tool_result", "id": "zzz", "isError": False, "value": {"k": 1}}))
    assert isinstance(orphan, AgentToolResult) and orphan.tool_use_id == "zzz" and orphan.content == '{"k": 1}'
    (late,) = translator.feed(json.dumps({"type": "tool_result", "isError": True, "error": "plain string"}))
    assert isinstance(late, AgentToolResult) and (late.tool_use_id, late.content, late.is_error) == (
        "a",
        "plain string",
        True,
    )
