"""ClaudeTranslator on real recordings of Claude Code 2.1.197 (record.py) and on the
collected third-party transcripts (tests/fixtures/claude/SOURCES.md)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import pytest

from mcp_sandboxes.backends.base import Translator, TurnResult
from mcp_sandboxes.backends.claude import ClaudeTranslator
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

FIXTURES = ROOT / "tests" / "fixtures" / "claude"
RECORDINGS: dict[str, dict[str, Any]] = json.loads((FIXTURES / "recordings.json").read_text())


def lines_of(name: str) -> list[str]:
    return [line for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def records_of(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(name)]


def translate(
    name: str, exit_code: int | None = None, stderr: str | None = None, lines: list[str] | None = None
) -> tuple[list[Event], TurnResult]:
    translator = ClaudeTranslator()
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


def init_of(name: str) -> dict[str, Any]:
    return next(r for r in records_of(name) if r["type"] == "system" and r["subtype"] == "init")


def result_line(name: str) -> dict[str, Any]:
    return next(r for r in records_of(name) if r["type"] == "result")


# -- recorded here, from the real CLI ---------------------------------------------------


def test_every_recording_comes_from_the_pinned_cli() -> None:
    assert RECORDINGS, "recordings.json is empty: run tests/fixtures/claude/record.py"
    for name, meta in RECORDINGS.items():
        assert meta["claude_version"].startswith("2.1.197"), name
        assert (FIXTURES / f"{name}.jsonl").exists(), name


def test_a_plain_reply_gives_thinking_message_and_usage_from_the_result_line() -> None:
    events, result = translate("plain-text")
    kinds = [event.type for event in events if not isinstance(event, AgentRaw)]
    assert kinds == ["agent.thinking", "agent.message", "span.model_request_end"]
    assert of_type(events, AgentThinking)[0].thinking == "The user wants a greeting."
    assert of_type(events, AgentMessage)[0].text == "Hello from the scripted model."
    # system/thinking_tokens progress lines are kept, not dropped.
    raws = of_type(events, AgentRaw)
    assert raws and all(raw.data["subtype"] == "thinking_tokens" for raw in raws)

    final = result_line("plain-text")
    span = of_type(events, SpanModelRequestEnd)[0]
    assert span.model == "claude-opus-4-8"
    assert span.model_usage.input_tokens == final["usage"]["input_tokens"] > 1000
    assert span.model_usage.output_tokens == final["usage"]["output_tokens"]
    assert span.model_usage.cost_usd == pytest.approx(final["total_cost_usd"]) and final["total_cost_usd"] > 0
    assert result.usage == span.model_usage
    assert result.stop_reason == "end_turn" and result.error is None
    assert result.final_text == "Hello from the scripted model."
    assert result.native_session_id == init_of("plain-text")["session_id"]


def test_assistant_usage_repeated_per_content_block_is_not_summed() -> None:
    # Both assistant lines of plain-text carry the same message id and the same usage.
    assistant = [r for r in records_of("plain-text") if r["type"] == "assistant"]
    assert len(assistant) == 2 and assistant[0]["message"]["id"] == assistant[1]["message"]["id"]
    without_result = [line for line in lines_of("plain-text") if '"type":"result"' not in line]
    _, result = translate("plain-text", exit_code=1, stderr="", lines=without_result)
    assert result.usage.input_tokens == assistant[0]["message"]["usage"]["input_tokens"]


def test_a_bash_tool_call_gives_tool_use_result_and_final_message() -> None:
    events, result = translate("bash-tool")
    kinds = [event.type for event in events]
    assert kinds == ["agent.tool_use", "agent.tool_result", "agent.message", "span.model_request_end"]
    use = of_type(events, AgentToolUse)[0]
    assert use.name == "Bash"
    assert use.input == {"command": "echo recorded-proof > proof.txt && cat proof.txt"}
    tool_result = of_type(events, AgentToolResult)[0]
    assert tool_result.tool_use_id == use.tool_use_id
    assert tool_result.content == "recorded-proof" and tool_result.is_error is False
    assert result.final_text == "DONE-1: wrote proof.txt"
    assert result.stop_reason == "end_turn"
    assert result.native_session_id == init_of("bash-tool")["session_id"]


def test_a_resumed_turn_keeps_the_session_id() -> None:
    events, result = translate("resume-turn2")
    assert [m.text for m in of_type(events, AgentMessage)] == ["DONE-2: still here"]
    assert result.native_session_id == init_of("bash-tool")["session_id"]
    assert result.stop_reason == "end_turn"


@pytest.mark.parametrize(("name", "status"), [("api-error-overloaded", "529"), ("api-error-500", "500")])
def test_an_api_error_is_an_error_turn_with_the_api_message(name: str, status: str) -> None:
    assert RECORDINGS[name]["exit_code"] == 1
    events, result = translate(name)
    errors = of_type(events, SessionError)
    assert len(errors) == 1 and errors[0].error.type == "api_error"
    assert errors[0].error.message.startswith(f"API Error: {status}")
    # The CLI's synthetic assistant text is shown too; the span names the real model, not "<synthetic>".
    assert of_type(events, AgentMessage)[0].text.startswith(f"API Error: {status}")
    assert of_type(events, SpanModelRequestEnd)[0].model == init_of(name)["model"]
    assert result.stop_reason == "error"
    assert result.error is not None and result.error.startswith(f"API Error: {status}")
    assert result.usage.input_tokens == 0 and result.usage.cost_usd == 0


def test_max_turns_is_its_own_stop_reason_without_a_session_error() -> None:
    events, result = translate("max-turns")
    assert len(of_type(events, AgentToolUse)) == 2 and len(of_type(events, AgentToolResult)) == 2
    assert of_type(events, SessionError) == []
    assert result.stop_reason == "max_turns"
    assert result.error == "Reached maximum number of turns (2)"
    assert result.usage.input_tokens == result_line("max-turns")["usage"]["input_tokens"]


@pytest.mark.parametrize("name", ["interrupted", "terminated", "interrupted-streaming"])
def test_an_interrupted_run_without_a_result_is_interrupted_not_crashed(name: str) -> None:
    events, result = translate(name)
    assert of_type(events, SessionError) == []
    assert result.stop_reason == "interrupted"
    assert result.native_session_id == init_of(name)["session_id"]
    if name != "interrupted-streaming":
        assert of_type(events, AgentToolUse)[0].input == {"command": "sleep 30"}
        assert result.usage.input_tokens > 0  # from the one assistant message seen


def test_mcp_tools_become_mcp_events_with_the_server_name() -> None:
    events, result = translate("mcp-tool")
    use = of_type(events, AgentMcpToolUse)[0]
    assert (use.server_name, use.name, use.input) == ("calc", "add", {"a": 2, "b": 40})
    mcp_result = of_type(events, AgentMcpToolResult)[0]
    assert mcp_result.tool_use_id == use.tool_use_id and json.loads(mcp_result.content) == {"result": 42}
    assert of_type(events, AgentToolUse) == [] and of_type(events, AgentToolResult) == []
    assert result.final_text == "The sum is 42."


# -- failure handling ------------------------------------------------------------------


def test_a_cli_that_dies_without_a_result_is_reported_with_exit_code_and_stderr() -> None:
    partial = lines_of("bash-tool")[:3]
    events, result = translate("bash-tool", exit_code=1, stderr="warming up\nSegmentation fault\n", lines=partial)
    crash = of_type(events, SessionError)[-1]
    assert crash.error.type == "cli_crashed"
    assert "exited with code 1" in crash.error.message and "Segmentation fault" in crash.error.message
    assert result.stop_reason == "error" and result.error == crash.error.message
    assert result.native_session_id == init_of("bash-tool")["session_id"]
    assert of_type(events, SpanModelRequestEnd) == []


def test_a_crash_with_a_huge_stderr_keeps_only_its_tail() -> None:
    stderr = "x" * 10_000 + "THE-END"
    events, _ = translate("bash-tool", exit_code=137, stderr=stderr, lines=[])
    message = of_type(events, SessionError)[0].error.message
    assert message.endswith("THE-END") and len(message) < 2200


def test_a_malformed_line_is_a_parse_error_and_translation_goes_on() -> None:
    lines = lines_of("bash-tool")
    broken = [lines[0], '{"type":"assistant","message":{', *lines[1:]]
    events, result = translate("bash-tool", lines=broken)
    parse_errors = [e for e in of_type(events, SessionError) if e.error.type == "parse_error"]
    assert len(parse_errors) == 1 and '{"type":"assistant"' in parse_errors[0].error.message
    assert result.final_text == "DONE-1: wrote proof.txt" and result.stop_reason == "end_turn"


def test_unknown_lines_and_blocks_are_kept_raw() -> None:
    translator = ClaudeTranslator()
    odd = {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed"}}
    assert translator.feed(json.dumps(odd)) == [AgentRaw(source="claude", data=odd)]
    assert translator.feed("[1, 2]") == [AgentRaw(source="claude", data=[1, 2])]
    block = {"type": "redacted_thinking", "data": "abc"}
    line = {"type": "assistant", "message": {"id": "m", "content": [block]}}
    assert translator.feed(json.dumps(line)) == [AgentRaw(source="claude", data=block)]


def test_a_failed_mcp_server_at_init_is_reported() -> None:
    events, _ = translate("takopi-tests-fixtures-claude_stream_json_session")
    failed = [e for e in of_type(events, SessionError) if e.error.type == "mcp_server_failed"]
    assert len(failed) == 1 and "'sentry'" in failed[0].error.message


# -- collected third-party transcripts --------------------------------------------------

# name -> (stop_reason, tool uses, tool results, final text start, session error types)
COLLECTED: dict[str, tuple[str, int, int, str | None, list[str]]] = {
    "recorded-here-claude-2.1.197-bash-tool": ("end_turn", 1, 1, "WORKER DONE rec01", []),
    "sluna-wq-agentic-org-v2-lead-tasks-task-018-transcript.EXCERPT": ("end_turn", 4, 5, "Done. Here's a summary", []),
    "takopi-tests-fixtures-claude_stream_json_session": (
        "error",
        2,
        2,
        "I see README.md",
        ["mcp_server_failed", "permission_denied", "error_during_execution"],
    ),
    "takopi-03646bd-docs-runner-claude-claude_stream_success": ("end_turn", 2, 2, "Done. Added notes.md.", []),
    "takopi-03646bd-docs-runner-claude-claude_stream_error": (
        "error",
        1,
        1,
        "I need permission",
        ["permission_denied", "error"],
    ),
    "takopi-05e504c-tests-fixtures-claude_code_all_events": ("end_turn", 9, 9, None, []),
    "takopi-05e504c-tests-fixtures-claude_code_api_error": ("error", 1, 0, "I'll analyze your codebase", ["error"]),
    "takopi-05e504c-tests-fixtures-claude_code_error": ("end_turn", 2, 2, "The directory is empty", []),
    "takopi-05e504c-tests-fixtures-claude_code_multi_tool": ("end_turn", 5, 5, "All tests pass.", []),
    "takopi-05e504c-tests-fixtures-claude_code_permission_denied": (
        "end_turn",
        1,
        1,
        "I understand you've denied",
        ["permission_denied"],
    ),
    "takopi-05e504c-tests-fixtures-claude_code_simple": ("end_turn", 1, 1, "Here are the files", []),
    "takopi-05e504c-tests-fixtures-claude_code_web_search": ("end_turn", 2, 2, "Here are the key Python", []),
    "agentstep-gateway-fixture-custom-tool-turn1": ("end_turn", 1, 0, None, []),
    "agentstep-gateway-fixture-custom-tool-turn2": ("end_turn", 0, 0, "Sydney is 18°C and sunny.", []),
}


def test_every_collected_fixture_has_expectations() -> None:
    on_disk = {path.stem for path in FIXTURES.glob("*.jsonl")} - set(RECORDINGS)
    assert on_disk == set(COLLECTED)


@pytest.mark.parametrize("name", sorted(COLLECTED))
def test_collected_transcripts_translate_to_the_expected_turn(name: str) -> None:
    stop_reason, tool_uses, tool_results, final_start, error_types = COLLECTED[name]
    events, result = translate(name)
    assert result.stop_reason == stop_reason
    assert len(of_type(events, AgentToolUse)) == tool_uses
    assert len(of_type(events, AgentToolResult)) == tool_results
    assert [e.error.type for e in of_type(events, SessionError)] == error_types
    if final_start is None:
        assert result.final_text is None or result.final_text
    else:
        assert result.final_text is not None and result.final_text.startswith(final_start)
    final = [r for r in records_of(name) if r["type"] == "result"][-1]
    assert result.native_session_id == final["session_id"]
    assert result.usage.input_tokens == final.get("usage", {}).get("input_tokens", 0)
    assert result.usage.cost_usd == pytest.approx(final["total_cost_usd"])
    # Tool results point at tool uses of the same transcript (the EXCERPT dropped some lines).
    use_ids = {e.tool_use_id for e in of_type(events, AgentToolUse)}
    result_ids = {e.tool_use_id for e in of_type(events, AgentToolResult)}
    if "EXCERPT" not in name and "session" not in name:
        assert result_ids <= use_ids


def test_tool_result_content_as_a_list_of_blocks_is_joined_text() -> None:
    events, _ = translate("takopi-03646bd-docs-runner-claude-claude_stream_success")
    assert of_type(events, AgentToolResult)[0].content == "total 2\nREADME.md\nsrc\n"


def test_error_results_carry_the_cli_error_text() -> None:
    events, result = translate("takopi-05e504c-tests-fixtures-claude_code_api_error")
    assert result.error == "Rate limit exceeded. Please try again in 60 seconds."
    assert of_type(events, SessionError)[0].error.message == result.error
    _, session = translate("takopi-tests-fixtures-claude_stream_json_session")
    assert session.error == "Permission denied: cannot write to /root/secret.txt"


def test_failed_tool_results_keep_is_error() -> None:
    events, _ = translate("sluna-wq-agentic-org-v2-lead-tasks-task-018-transcript.EXCERPT")
    flags = [e.is_error for e in of_type(events, AgentToolResult)]
    assert flags[:2] == [True, True] and flags.count(True) == 2


def test_a_result_line_then_a_sigterm_exit_is_still_interrupted() -> None:
    _, result = translate("bash-tool", exit_code=143, stderr="")
    assert result.stop_reason == "interrupted"


def test_every_fixture_has_a_provenance_line() -> None:
    sources = (FIXTURES / "SOURCES.md").read_text()
    for path in FIXTURES.glob("*.jsonl"):
        assert path.name in sources, path.name


def test_tool_calls_refused_by_the_permission_mode_become_events_and_part_of_the_result() -> None:
    translator = ClaudeTranslator()
    result_line = {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "session_id": "s-1",
        "result": "I could not delete the cache: permission was denied.",
        "usage": {"input_tokens": 10, "output_tokens": 5},
        "permission_denials": [
            {"tool_name": "Bash", "tool_use_id": "t1", "tool_input": {"command": "rm -rf /tmp/cache/*"}},
            {"tool_name": "Write", "tool_use_id": "t2", "tool_input": {"file_path": "/root/x", "content": "y"}},
        ],
    }
    events = translator.feed(json.dumps(result_line))
    refusals = [e for e in events if isinstance(e, SessionError) and e.error.type == "permission_denied"]
    assert [e.error.message.split(" was refused")[0] for e in refusals] == [
        "Bash: rm -rf /tmp/cache/*",
        "Write: /root/x",
    ]
    assert translator.result.denials == ["Bash: rm -rf /tmp/cache/*", "Write: /root/x"]
    assert translator.result.stop_reason == "end_turn"
