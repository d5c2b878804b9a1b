"""CodexTranslator on real recordings of codex-cli 0.169.0 (record.py) and on the collected
third-party transcripts (tests/fixtures/codex/SOURCES.md)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from mcp_sandboxes.backends.base import Translator, TurnResult
from mcp_sandboxes.backends.codex import CodexTranslator, UsageLedger
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

FIXTURES = ROOT / "tests" / "fixtures" / "codex"
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
    ledger: UsageLedger | None = None,
) -> tuple[list[Event], TurnResult]:
    translator = CodexTranslator(ledger=ledger)
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


def errors(events: list[Event]) -> list[tuple[str, str]]:
    return [(event.error.type, event.error.message) for event in of_type(events, SessionError)]


def thread_of(name: str) -> str:
    return str(next(r for r in records_of(name) if r["type"] == "thread.started")["thread_id"])


def usage_line(name: str, index: int = -1) -> dict[str, Any]:
    usage: dict[str, Any] = [r for r in records_of(name) if r["type"] == "turn.completed"][index]["usage"]
    return usage


# -- recorded here, from the real CLI ---------------------------------------------------


def test_every_recording_comes_from_the_pinned_cli() -> None:
    assert len(RECORDINGS) >= 14, "recordings.json is incomplete: run tests/fixtures/codex/record.py"
    for name, meta in RECORDINGS.items():
        assert meta["codex_version"] == "codex-cli 0.169.0", name
        assert (FIXTURES / f"{name}.jsonl").exists(), name
        assert meta["argv"][:4] == ["codex", "exec", "--json", "--skip-git-repo-check"], name
        assert "--dangerously-bypass-approvals-and-sandbox" in meta["argv"] and meta["argv"][-1] == "-", name


def test_a_plain_reply_gives_thinking_message_and_usage() -> None:
    events, result = translate("plain-text")
    assert kinds(events) == ["agent.thinking", "agent.message", "span.model_request_end"]
    assert of_type(events, AgentThinking)[0].thinking == "The user wants a greeting."
    assert of_type(events, AgentMessage)[0].text == "Hello from the scripted model."
    raw = usage_line("plain-text")
    span = of_type(events, SpanModelRequestEnd)[0]
    assert span.model_usage.input_tokens == raw["input_tokens"] > 1000
    assert span.model_usage.output_tokens == raw["output_tokens"]
    assert span.model_usage.reasoning_tokens == raw["reasoning_output_tokens"] > 0
    assert span.model_usage.cost_usd is None  # Codex reports no cost
    assert result.usage == span.model_usage
    assert result.stop_reason == "end_turn" and result.error is None
    assert result.final_text == "Hello from the scripted model."
    assert result.native_session_id == thread_of("plain-text")


def test_a_shell_command_gives_tool_use_then_its_output() -> None:
    events, result = translate("shell-tool")
    assert kinds(events) == ["agent.tool_use", "agent.tool_result", "agent.message", "span.model_request_end"]
    use, tool_result = of_type(events, AgentToolUse)[0], of_type(events, AgentToolResult)[0]
    assert use.name == "command_execution" and use.tool_use_id == "item_0"
    assert use.input == {"command": "/bin/bash -lc 'echo recorded-proof > proof.txt && cat proof.txt'"}
    assert tool_result.tool_use_id == "item_0"
    assert tool_result.content == "recorded-proof\n" and tool_result.is_error is False
    assert result.final_text == "DONE-1: wrote proof.txt"


def test_a_failing_command_is_an_error_result_with_its_output() -> None:
    events, result = translate("failing-command")
    tool_result = of_type(events, AgentToolResult)[0]
    assert tool_result.is_error is True and tool_result.content == "to-stderr\n"
    assert result.stop_reason == "end_turn"  # the agent went on and answered


def test_a_resumed_turn_keeps_the_thread_and_reports_only_its_own_usage() -> None:
    assert thread_of("resume-turn2") == thread_of("shell-tool")
    first_total, second_total = usage_line("shell-tool"), usage_line("resume-turn2")
    # What Codex prints: the thread's running total, which includes the first turn.
    assert second_total["input_tokens"] > first_total["input_tokens"]

    ledger = UsageLedger()
    _, first = translate("shell-tool", ledger=ledger)
    events, second = translate("resume-turn2", ledger=ledger)
    assert [m.text for m in of_type(events, AgentMessage)] == ["DONE-2: still here"]
    assert second.native_session_id == first.native_session_id
    assert second.usage.input_tokens == second_total["input_tokens"] - first_total["input_tokens"]
    assert second.usage.output_tokens == second_total["output_tokens"] - first_total["output_tokens"]
    assert of_type(events, SpanModelRequestEnd)[0].model_usage == second.usage
    # The two turns add up to what Codex says the thread used.
    assert (first.usage + second.usage).input_tokens == second_total["input_tokens"]

    # Without a remembered baseline (a server restart) the thread's total is all there is.
    _, unknown = translate("resume-turn2")
    assert unknown.usage.input_tokens == second_total["input_tokens"]


def test_an_apply_patch_file_change_is_a_tool_use_with_its_changes() -> None:
    events, result = translate("file-change")
    assert result.final_text == "Added hello.txt."
    assert kinds(events) == ["agent.tool_use", "agent.tool_result", "agent.message", "span.model_request_end"]
    use = of_type(events, AgentToolUse)[0]
    assert use.name == "file_change"
    (change,) = use.input["changes"]
    assert change["kind"] == "add" and change["path"].endswith("/hello.txt")
    tool_result = of_type(events, AgentToolResult)[0]
    assert tool_result.content == f"add {change['path']}" and tool_result.is_error is False


def test_an_mcp_tool_call_gives_server_tool_arguments_and_result() -> None:
    events, result = translate("mcp-tool")
    assert kinds(events) == [
        "agent.mcp_tool_use",
        "agent.mcp_tool_result",
        "agent.message",
        "span.model_request_end",
    ]
    use = of_type(events, AgentMcpToolUse)[0]
    assert (use.server_name, use.name, use.input) == ("calc", "add", {"a": 2, "b": 40})
    mcp_result = of_type(events, AgentMcpToolResult)[0]
    assert mcp_result.tool_use_id == use.tool_use_id and mcp_result.content == "42" and not mcp_result.is_error
    assert result.final_text == "The sum is 42."


def test_api_errors_end_the_turn_with_one_error_each() -> None:
    expected = {
        "api-error-500": "high demand",
        "api-error-401": "401 Unauthorized: Incorrect API key",
        "api-error-midstream": "the model failed mid-stream",
    }
    for name, fragment in expected.items():
        events, result = translate(name)
        assert RECORDINGS[name]["exit_code"] == 1
        (error,) = errors(events)  # the error line and turn.failed say the same: reported once
        assert error[0] == "api_error" and fragment in error[1], name
        assert result.stop_reason == "error" and result.error is not None and fragment in result.error, name
        assert result.native_session_id == thread_of(name)
        assert of_type(events, SpanModelRequestEnd) == []


def test_reconnecting_notices_are_kept_but_not_fatal() -> None:
    events, result = translate("api-error-recovered")
    assert errors(events)[0][0] == "retrying" and "Reconnecting... 1/2" in errors(events)[0][1]
    assert kinds(events)[1:] == ["agent.message", "span.model_request_end"]
    assert result.stop_reason == "end_turn" and result.error is None
    assert result.final_text == "Recovered after a retry."

    events, result = translate("api-error-reconnecting")
    assert [kind for kind, _ in errors(events)] == ["retrying", "retrying", "api_error"]
    assert result.stop_reason == "error" and "high demand" in (result.error or "")


def test_an_error_item_is_a_warning_and_the_turn_goes_on() -> None:
    events, result = translate("unknown-model")
    assert kinds(events) == ["session.error", "agent.message", "span.model_request_end"]
    (warning,) = errors(events)
    assert warning[0] == "codex_warning" and "scripted-unknown-model" in warning[1]
    assert result.stop_reason == "end_turn" and result.error is None


def test_sigint_during_a_tool_is_an_interruption_not_a_crash() -> None:
    assert RECORDINGS["interrupted"]["exit_code"] == 1
    events, result = translate("interrupted")
    assert kinds(events) == ["agent.tool_use"]
    assert result.stop_reason == "interrupted" and result.error is None
    assert result.native_session_id == thread_of("interrupted")


def test_sigterm_and_an_interrupted_model_stream_are_interruptions() -> None:
    for name in ("terminated", "interrupted-streaming"):
        events, result = translate(name)
        assert errors(events) == [], name
        assert result.stop_reason == "interrupted", name
    # The same exit through a shell or a container runtime.
    _, result = translate("terminated", exit_code=143)
    assert result.stop_reason == "interrupted"


def test_a_cli_that_dies_before_the_turn_ends_is_a_crash_with_stderr() -> None:
    # Exits before turn.started: nothing to interrupt, the CLI failed.
    events, result = translate(
        "plain-text", exit_code=1, stderr="Error: bad config\n", lines=lines_of("plain-text")[:1]
    )
    assert errors(events) == [
        ("cli_crashed", "codex exited with code 1 before the turn ended; stderr: Error: bad config")
    ]
    assert result.stop_reason == "error" and result.native_session_id == thread_of("plain-text")
    # Mid-turn, a panic is a crash even with exit code 1.
    mid_turn = lines_of("shell-tool")[:4]
    events, result = translate("shell-tool", exit_code=1, stderr="thread 'main' panicked at x.rs", lines=mid_turn)
    assert errors(events)[0][0] == "cli_crashed" and result.stop_reason == "error"
    # Killed for memory: a crash, and the partial work is kept.
    events, result = translate("shell-tool", exit_code=137, stderr="", lines=mid_turn)
    assert errors(events)[0][0] == "cli_crashed" and kinds(events)[:2] == ["agent.tool_use", "agent.tool_result"]


def test_malformed_and_unknown_lines_become_events() -> None:
    translator = CodexTranslator()
    (error,) = translator.feed('{"type": "turn.started"')
    assert isinstance(error, SessionError) and error.error.type == "parse_error"
    (raw,) = translator.feed("[1, 2]")
    assert isinstance(raw, AgentRaw) and raw.data == [1, 2]
    (raw,) = translator.feed('{"type": "turn.paused", "why": "new"}')
    assert isinstance(raw, AgentRaw) and raw.source == "codex" and raw.data["why"] == "new"
    (raw,) = translator.feed('{"type": "item.completed", "item": {"id": "i", "type": "hologram"}}')
    assert isinstance(raw, AgentRaw) and raw.data["item"]["type"] == "hologram"
    assert translator.feed('{"type": "item.completed", "item": {"id": "i", "type": "agent_message", "text": ""}}') == []


def test_the_usage_ledger_forgets_the_oldest_threads() -> None:
    ledger = UsageLedger(max_threads=2)
    for thread in ("a", "b", "c"):
        ledger.record(thread, Usage(input_tokens=1))
    assert ledger.last_total("a") is None and ledger.last_total("c") == Usage(input_tokens=1)


# -- collected elsewhere ------------------------------------------------------------------


def test_the_documented_sample_with_cached_input() -> None:
    events, result = translate("openai-codex-docs-exec-md")
    assert kinds(events) == [
        "agent.thinking",
        "agent.tool_use",
        "agent.tool_result",
        "agent.thinking",
        "agent.message",
        "span.model_request_end",
    ]
    assert "README.md" in of_type(events, AgentToolResult)[0].content
    usage = result.usage
    # OpenAI counts cached input inside input_tokens; ours does not (as Anthropic's).
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (24763 - 24448, 24448, 122)
    assert result.final_text == records_of("openai-codex-docs-exec-md")[-2]["item"]["text"]
    assert result.final_text is not None and result.final_text.endswith("in the repository root.")


def test_a_real_0_145_capture_and_the_gateway_turn_one() -> None:
    events, result = translate("third-party-env-findings-codex-0.145.0-id69309460369")
    assert kinds(events) == ["agent.message", "span.model_request_end"] and result.final_text == "OK"
    assert result.native_session_id == "01a07802-..." and result.usage.input_tokens == 14487
    events, result = translate("agentstep-gateway-fixture-turn1")
    assert result.final_text == "4" and result.usage.input_tokens == 12247


def test_the_gateways_wrong_output_field_is_not_read_as_output() -> None:
    # Its command_execution carries `output`; the real CLI prints `aggregated_output`.
    events, _ = translate("agentstep-gateway-fixture-turn2")
    tool_result = of_type(events, AgentToolResult)[0]
    assert of_type(events, AgentToolUse)[0].input == {"command": "echo hello"}
    assert tool_result.content == "" and tool_result.is_error is False


def test_every_item_kind_of_the_synthetic_all_formats_transcript() -> None:
    events, result = translate("takopi-tests-fixtures-codex_exec_json_all_formats", exit_code=1, stderr="")
    uses = {use.tool_use_id: use for use in of_type(events, AgentToolUse)}
    results: dict[str, list[AgentToolResult]] = {}
    for tool_result in of_type(events, AgentToolResult):
        results.setdefault(tool_result.tool_use_id, []).append(tool_result)
    # todo_list: the plan once, then its state after each update.
    assert uses["item_0"].name == "todo_list" and len(uses["item_0"].input["items"]) == 3
    assert [r.content.count("[x]") for r in results["item_0"]] == [1, 3]
    assert results["item_1"][0].is_error is False and results["item_2"][0].is_error is True
    assert results["item_2"][0].content == "....F\n"
    assert results["item_3"][0].content == "update src/compute_answer.py\nadd README.md"
    assert results["item_4"][0].is_error is True
    assert uses["item_7"].name == "web_search" and uses["item_7"].input == {"query": "codex exec --json schema"}
    mcp_uses = of_type(events, AgentMcpToolUse)
    assert [(u.server_name, u.name, u.input) for u in mcp_uses] == [
        ("github", "search_issues", {"q": "exec --json"}),
        ("github", "search_issues", {}),
    ]
    mcp_results = of_type(events, AgentMcpToolResult)
    assert [(r.content, r.is_error) for r in mcp_results] == [("Found 3 matches.", False), ("tool timeout", True)]
    assert ("codex_warning", "command output truncated") in errors(events)
    assert ("turn_failed", "Aborted: required dependency `npm` is missing; cannot continue.") in errors(events)
    assert result.stop_reason == "error" and result.error is not None and "npm" in result.error


def test_message_phases_and_unknown_items_of_the_synthetic_transcript() -> None:
    events, result = translate("takopi-tests-fixtures-codex_exec_json_phase_and_unknown")
    assert [m.text for m in of_type(events, AgentMessage)] == [
        "Inspecting repository state.",
        "Implemented the requested changes.",
    ]
    raws = of_type(events, AgentRaw)
    assert [raw.data["item"]["type"] for raw in raws] == ["collab_tool_call", "collab_tool_call", "future_item"]
    assert result.final_text == "Implemented the requested changes." and result.stop_reason == "end_turn"


def test_the_legacy_format_is_kept_raw_and_the_turn_has_no_end() -> None:
    events, result = translate("legacy-0.39.0-captured-in-third-party-test-id56799926155", exit_code=0, stderr="")
    assert all(isinstance(event, AgentRaw) for event in events[:-1]) and len(events) == 6
    assert errors(events)[0][0] == "cli_crashed" and result.stop_reason == "error"
