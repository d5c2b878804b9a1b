"""The scripted model server speaks the Anthropic Messages wire format, picks replies by
rule, and answers the side requests Claude Code makes without consuming replies."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.support.model_server import ApiError, ModelRequest, Reply, Script, ScriptedModelServer, ToolCall

TIMEOUT = httpx.Timeout(10.0)
TOOLS = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]
REMINDER = {"type": "text", "text": "<system-reminder>\ncontext\n</system-reminder>"}


def user(text: str) -> dict[str, Any]:
    # Claude Code puts a system reminder block before the prompt; rules must see through it.
    return {"role": "user", "content": [REMINDER, {"type": "text", "text": text}]}


def tool_result(tool_use_id: str, content: Any) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": content}]}


def body(messages: list[dict[str, Any]], *, stream: bool = True) -> dict[str, Any]:
    return {"model": "claude-test-1", "max_tokens": 1000, "messages": messages, "tools": TOOLS, "stream": stream}


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body into (event name, data) pairs, checking name and data.type agree."""
    events = []
    for frame in response.text.split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append((lines["event"], data))
    return events


def assemble(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rebuild the message from stream events the way an SDK does."""
    message: dict[str, Any] = {}
    partial_json: dict[int, str] = {}
    for name, data in events:
        if name == "message_start":
            message = data["message"]
        elif name == "content_block_start":
            assert data["index"] == len(message["content"])
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block = message["content"][data["index"]]
            delta = data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial_json[data["index"]] = partial_json.get(data["index"], "") + delta["partial_json"]
        elif name == "content_block_stop":
            if data["index"] in partial_json:
                message["content"][data["index"]]["input"] = json.loads(partial_json[data["index"]])
        elif name == "message_delta":
            message["stop_reason"] = data["delta"]["stop_reason"]
            message["usage"]["output_tokens"] = data["usage"]["output_tokens"]
    return message


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script()) as running:
        yield running


def post(server: ScriptedModelServer, payload: dict[str, Any], path: str = "/v1/messages") -> httpx.Response:
    headers = {"x-api-key": "sk-secret-value", "anthropic-version": "2023-06-01"}
    return httpx.post(server.url + path, json=payload, headers=headers, timeout=TIMEOUT)


def test_a_text_reply_streams_in_the_messages_event_order(server: ScriptedModelServer) -> None:
    long_text = "The quick brown fox jumps over the lazy dog, twice over."
    server.script.then(Reply(text=long_text))
    response = post(server, body([user("hello")]))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 1
    assert names.count("content_block_delta") > 1, "long text must arrive in several deltas"
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["role"] == "assistant" and start["model"] == "claude-test-1"
    assert start["content"] == [] and start["stop_reason"] is None
    message = assemble(events)
    assert message["content"] == [{"type": "text", "text": long_text}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"]["input_tokens"] > 0 and message["usage"]["output_tokens"] > 0


def test_thinking_text_and_tool_use_blocks_stream_with_their_deltas(server: ScriptedModelServer) -> None:
    arguments = {"command": "echo " + "x" * 80, "timeout": 1000}
    server.script.then(
        Reply(thinking="Let me think this through.", text="Running it.", tool_calls=[ToolCall("Bash", arguments)])
    )
    events = sse_events(post(server, body([user("go")])))
    delta_types = {data["delta"]["type"] for name, data in events if name == "content_block_delta"}
    assert delta_types == {"thinking_delta", "signature_delta", "text_delta", "input_json_delta"}
    tool_start = [d for n, d in events if n == "content_block_start" and d["content_block"]["type"] == "tool_use"]
    assert tool_start[0]["content_block"]["input"] == {}
    message = assemble(events)
    thinking, text, tool = message["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "Let me think this through."
    assert thinking["signature"]
    assert text == {"type": "text", "text": "Running it."}
    assert tool["type"] == "tool_use" and tool["name"] == "Bash" and tool["input"] == arguments
    assert tool["id"].startswith("toolu_")
    assert message["stop_reason"] == "tool_use"


def test_non_streaming_requests_get_one_message_json(server: ScriptedModelServer) -> None:
    server.script.then(Reply(text="plain", tool_calls=[ToolCall("Read", {"file_path": "/x"}, id="toolu_fixed")]))
    response = post(server, body([user("hi")], stream=False))
    assert response.status_code == 200
    message = response.json()
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [
        {"type": "text", "text": "plain"},
        {"type": "tool_use", "id": "toolu_fixed", "name": "Read", "input": {"file_path": "/x"}},
    ]
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    assert set(message["usage"]) >= {"input_tokens", "output_tokens"}


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (ApiError("overloaded", "Overloaded"), 529, "overloaded_error"),
        (ApiError("server_error", "Internal server error"), 500, "api_error"),
        (ApiError("rate_limit", "Slow down"), 429, "rate_limit_error"),
        (ApiError("invalid_request", "bad", status=422), 422, "invalid_request_error"),
    ],
)
def test_errors_use_the_api_error_json_and_status(
    server: ScriptedModelServer, error: ApiError, status: int, error_type: str
) -> None:
    server.script.then(Reply(error=error))
    response = post(server, body([user("hi")]))
    assert response.status_code == status
    assert response.json() == {
        "type": "error",
        "error": {"type": error_type, "message": error.message},
        "request_id": response.headers["request-id"],
    }


def test_rules_script_a_tool_round_trip_and_a_second_turn(server: ScriptedModelServer) -> None:
    script = server.script
    script.on(user_contains="first", reply=Reply(tool_calls=[ToolCall("Bash", {"command": "echo X"}, id="toolu_1")]))
    script.on(after_tool_result=True, reply=Reply(text="DONE-1"))
    script.on(user_contains="second", reply=Reply(text="DONE-2"))

    turn1 = assemble(sse_events(post(server, body([user("the first task")]))))
    assert turn1["content"][0]["input"] == {"command": "echo X"}
    history = [user("the first task"), {"role": "assistant", "content": turn1["content"]}]
    history.append(tool_result("toolu_1", [{"type": "text", "text": "X"}]))
    # The prompt rule is spent and would not answer a tool round trip anyway.
    assert assemble(sse_events(post(server, body(history))))["content"][0]["text"] == "DONE-1"
    history += [{"role": "assistant", "content": [{"type": "text", "text": "DONE-1"}]}, user("now the second")]
    assert assemble(sse_events(post(server, body(history))))["content"][0]["text"] == "DONE-2"

    assert script.pending == 0 and script.misses == 0
    second = server.requests_containing("now the second")
    assert len(second) == 1
    assert "the first task" in json.dumps(second[0].body["messages"])
    assert second[0].headers["x-api-key"] == "[redacted]"
    assert second[0].headers["anthropic-version"] == "2023-06-01"


def test_tool_result_contains_picks_by_tool_output_string_or_blocks(server: ScriptedModelServer) -> None:
    server.script.on(tool_result_contains="boom", reply=Reply(text="saw boom"))
    server.script.on(tool_result_contains="fine", reply=Reply(text="saw fine"))
    first = post(server, body([user("x"), tool_result("t1", "all fine here")]))
    second = post(server, body([user("x"), tool_result("t2", [{"type": "text", "text": "boom!"}])]))
    assert assemble(sse_events(first))["content"][0]["text"] == "saw fine"
    assert assemble(sse_events(second))["content"][0]["text"] == "saw boom"


def test_a_responder_rule_computes_its_reply_from_the_request(server: ScriptedModelServer) -> None:
    """The next step of a conversation can depend on what a tool returned (ids, say)."""
    seen: list[list[str]] = []

    def echo(request: ModelRequest) -> Reply:
        seen.append(request.tool_results)
        return Reply(tool_calls=[ToolCall("Next", {"from": request.tool_results[0]})])

    server.script.on(after_tool_result=True, reply=echo, times=None)
    reply = assemble(sse_events(post(server, body([user("x"), tool_result("t1", "ses_1")]))))
    assert reply["content"][0]["input"] == {"from": "ses_1"} and seen == [["ses_1"]]
    assert server.model_requests[0].reply == Reply(tool_calls=[ToolCall("Next", {"from": "ses_1"})])


def test_tool_search_results_read_as_the_names_they_loaded(server: ScriptedModelServer) -> None:
    """Newer Claude Code answers ToolSearch with tool_reference blocks, not text."""
    server.script.on(tool_result_contains="mcp__s__spawn", reply=Reply(text="loaded"))
    loaded = [{"type": "tool_reference", "tool_name": "mcp__s__spawn"}]
    reply = assemble(sse_events(post(server, body([user("x"), tool_result("t1", loaded)]))))
    assert reply["content"][0]["text"] == "loaded"


def test_queue_is_in_order_after_rules_then_the_fallback_names_the_miss(server: ScriptedModelServer) -> None:
    server.script.then(Reply(text="one"), Reply(text="two"))
    server.script.on(user_contains="special", reply=Reply(text="rule"), times=None)
    texts = [assemble(sse_events(post(server, body([user(p)]))))["content"][0]["text"] for p in ("a", "special", "b")]
    assert texts == ["one", "rule", "two"]
    fallback = assemble(sse_events(post(server, body([user("c")]))))["content"][0]["text"]
    assert fallback.startswith("SCRIPT-EXHAUSTED")
    assert server.script.misses == 1
    assert assemble(sse_events(post(server, body([user("special again")]))))["content"][0]["text"] == "rule"


def test_side_requests_are_answered_without_consuming_replies(server: ScriptedModelServer) -> None:
    server.script.then(Reply(text="THE-REPLY"))
    assert httpx.head(server.url + "/", timeout=TIMEOUT).status_code == 200
    counted = post(server, {"model": "m", "messages": [user("count me")]}, "/v1/messages/count_tokens")
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    title_request = {
        "model": "claude-test-1",
        "messages": [user("<session>\nfirst\n</session>")],
        "tools": [],
        "stream": True,
        "output_config": {
            "format": {"type": "json_schema", "schema": {"type": "object", "properties": {"title": {"type": "string"}}}}
        },
    }
    title = assemble(sse_events(post(server, title_request)))
    assert set(json.loads(title["content"][0]["text"])) == {"title"}
    telemetry = httpx.post(server.url + "/api/event_logging/batch", json={"events": []}, timeout=TIMEOUT)
    assert telemetry.status_code == 200
    assert server.script.pending == 1

    assert assemble(sse_events(post(server, body([user("real")]))))["content"][0]["text"] == "THE-REPLY"
    kinds = [(r.method, r.path, r.kind) for r in server.requests]
    assert kinds == [
        ("HEAD", "/", "side"),
        ("POST", "/v1/messages/count_tokens", "side"),
        ("POST", "/v1/messages", "side"),
        ("POST", "/api/event_logging/batch", "side"),
        ("POST", "/v1/messages", "model"),
    ]
    assert len(server.model_requests) == 1


def test_a_delayed_reply_starts_streaming_before_the_delay(server: ScriptedModelServer) -> None:
    server.script.then(Reply(text="late", delay_s=0.5))
    with httpx.stream("POST", server.url + "/v1/messages", json=body([user("x")]), timeout=TIMEOUT) as response:
        started = time.monotonic()
        chunks = response.iter_text()
        first = next(chunks)
        first_at = time.monotonic() - started
        rest = "".join(chunks)
        total = time.monotonic() - started
    assert "message_start" in first and first_at < 0.4
    assert "late" in rest and total >= 0.45


async def test_the_server_works_from_async_tests() -> None:
    script = Script().then(Reply(text="async hello"))
    async with ScriptedModelServer(script) as server, httpx.AsyncClient(timeout=TIMEOUT) as client:
        response = await client.post(server.url + "/v1/messages", json=body([user("hi")], stream=False))
    assert response.json()["content"][0]["text"] == "async hello"


def test_the_standalone_process_serves_a_json_script_file(tmp_path: Path) -> None:
    script_file = tmp_path / "script.json"
    script_file.write_text(
        json.dumps(
            {
                "rules": [
                    {
                        "user_contains": "weather",
                        "reply": {"tool_calls": [{"name": "Bash", "arguments": {"command": "date"}}]},
                    },
                    {"after_tool_result": True, "reply": {"text": "sunny"}},
                    {"user_contains": "fail", "reply": {"error": {"kind": "overloaded", "message": "busy"}}},
                ],
                "queue": [{"text": "from the queue"}],
            }
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.model_server", "--port", "0", "--script", str(script_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")

        def send(messages: list[dict[str, Any]]) -> httpx.Response:
            return httpx.post(url + "/v1/messages", json=body(messages, stream=False), timeout=TIMEOUT)

        call = send([user("what is the weather")]).json()["content"][0]
        assert call["name"] == "Bash" and call["input"] == {"command": "date"}
        assert send([user("w"), tool_result(call["id"], "Mon")]).json()["content"][0]["text"] == "sunny"
        assert send([user("please fail")]).status_code == 529
        assert send([user("anything")]).json()["content"][0]["text"] == "from the queue"
        listing = httpx.get(url + "/_scripted/requests", timeout=TIMEOUT).json()
        assert [r["kind"] for r in listing["requests"]] == ["model"] * 4
        assert listing["pending"] == 0
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0
        if process.stdout is not None:
            process.stdout.close()


def test_a_bad_script_file_names_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        Script.from_dict({"rulez": []})
    with pytest.raises(ValueError, match=r"rules\[0\] has no reply"):
        Script.from_dict({"rules": [{"user_contains": "x"}]})
