"""The scripted model server speaks OpenAI Chat Completions: streamed chunks an SDK can
reassemble, the usage chunk only when asked for, error JSON with the API's status codes, the
model list, and OpenCode's title request answered without consuming a reply."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.model_server import ApiError, Reply, Script, ScriptedModelServer, ToolCall, openai_chat
from tests.support.model_server.openai_chat import parse_request

TIMEOUT = httpx.Timeout(10.0)
TOOLS = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script(), vendors=[openai_chat]) as running:
        yield running


def body(messages: list[dict[str, Any]], *, stream: bool = True, usage: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {"model": "scripted-model", "messages": messages, "tools": TOOLS, "stream": stream}
    if usage:
        data["stream_options"] = {"include_usage": True}
    return data


def chunks(response: httpx.Response) -> list[Any]:
    frames = [frame for frame in response.text.split("\n\n") if frame.strip()]
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames), frames
    assert frames[-1] == "data: [DONE]"
    return [json.loads(frame[len("data: ") :]) for frame in frames[:-1]]


def assemble(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the assistant message from chunks the way an SDK does."""
    message: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": []}
    finish = None
    for part in parts:
        for choice in part["choices"]:
            delta = choice["delta"]
            message["content"] += delta.get("content") or ""
            message["reasoning_content"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                if call.get("id"):
                    assert call["index"] == len(message["tool_calls"]) and call["type"] == "function"
                    message["tool_calls"].append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
                message["tool_calls"][call["index"]]["arguments"] += call["function"].get("arguments", "")
            finish = choice["finish_reason"] or finish
    message["finish_reason"] = finish
    return message


def test_a_streamed_reply_reassembles_into_reasoning_text_and_tool_calls(server: ScriptedModelServer) -> None:
    calls = [ToolCall("bash", {"command": "echo " + "long " * 20}, id="call_1"), ToolCall("read", {"filePath": "a"})]
    server.script.on(user_contains="GO", reply=Reply(thinking="hmm " * 10, text="Sure, " * 10, tool_calls=calls))
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=body([{"role": "user", "content": "GO"}]), timeout=TIMEOUT
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    parts = chunks(response)
    assert parts[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {p["id"] for p in parts} == {parts[0]["id"]} and parts[0]["object"] == "chat.completion.chunk"
    usage = parts[-1]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] > 0
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    assert all(p["usage"] is None for p in parts[:-1])
    message = assemble(parts)
    assert message["reasoning_content"] == "hmm " * 10 and message["content"] == "Sure, " * 10
    assert message["finish_reason"] == "tool_calls"
    first, second = message["tool_calls"]
    assert first["id"] == "call_1" and json.loads(first["arguments"]) == {"command": "echo " + "long " * 20}
    assert second["name"] == "read" and second["id"].startswith("call_")
    assert sum(1 for p in parts if p["choices"] and "content" in p["choices"][0]["delta"]) > 2  # really chunked


def test_without_include_usage_there_is_no_usage_chunk(server: ScriptedModelServer) -> None:
    server.script.then(Reply(text="plain"))
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body([{"role": "user", "content": "hi"}], usage=False),
        timeout=TIMEOUT,
    )
    parts = chunks(response)
    assert all(p["choices"] and "usage" not in p for p in parts)
    assert assemble(parts)["finish_reason"] == "stop"


def test_a_non_streamed_reply_is_one_completion_object(server: ScriptedModelServer) -> None:
    server.script.then(Reply(text="whole", tool_calls=[ToolCall("bash", {"command": "ls"})]))
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body([{"role": "user", "content": "hi"}], stream=False),
        timeout=TIMEOUT,
    )
    data = response.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["finish_reason"] == "tool_calls"
    message = data["choices"][0]["message"]
    assert message["content"] == "whole" and json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "command": "ls"
    }


@pytest.mark.parametrize(
    ("kind", "status", "error_type"),
    [
        ("invalid_request", 400, "invalid_request_error"),
        ("authentication", 401, "invalid_request_error"),
        ("rate_limit", 429, "requests"),
        ("server_error", 500, "server_error"),
        ("overloaded", 503, "server_error"),
    ],
)
def test_errors_are_the_api_error_json(server: ScriptedModelServer, kind: Any, status: int, error_type: str) -> None:
    server.script.then(Reply(error=ApiError(kind, "scripted failure")))
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=body([{"role": "user", "content": "x"}]), timeout=TIMEOUT
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["message"], error["type"]) == ("scripted failure", error_type)
    assert set(error) == {"message", "type", "param", "code"}


def test_title_and_summary_requests_are_side_requests(server: ScriptedModelServer) -> None:
    server.script.on(user_contains="FIRST", reply=Reply(text="the real answer"))
    title = {
        "model": "scripted-model",
        "stream": True,
        "messages": [
            {"role": "system", "content": "You are a title generator. You output ONLY a thread title."},
            {"role": "user", "content": "Generate a title for this conversation:\n"},
            {"role": "user", "content": "FIRST: do it"},
        ],
    }
    response = httpx.post(f"{server.url}/v1/chat/completions", json=title, timeout=TIMEOUT)
    assert assemble(chunks(response))["content"] == "Scripted session"
    assert server.script.pending == 1 and [r.kind for r in server.requests] == ["side"]
    summary = {**title, "messages": [{"role": "system", "content": "You are a context summarization agent. ..."}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=summary, timeout=TIMEOUT)
    assert assemble(chunks(response))["content"] == "Scripted summary of the context."
    assert server.script.pending == 1
    # A tool-less request that is not a hidden agent's is still a model turn.
    plain = {**title, "messages": [{"role": "user", "content": "FIRST: do it"}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=plain, timeout=TIMEOUT)
    assert assemble(chunks(response))["content"] == "the real answer"


def test_the_model_list(server: ScriptedModelServer) -> None:
    data = httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()
    assert data["object"] == "list" and "scripted-model" in {model["id"] for model in data["data"]}


def test_rules_see_the_prompt_and_the_trailing_tool_messages() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "PROMPT one"}]},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "a"}, {"id": "b"}]},
        {"role": "tool", "tool_call_id": "a", "content": "out-a"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "out-b"}]},
    ]
    request = parse_request({"model": "m", "messages": messages})
    assert (request.user_text, request.tool_results, request.model) == ("PROMPT one", ["out-a", "out-b"], "m")
    later = parse_request(
        {"messages": [*messages, {"role": "assistant", "content": "done"}, {"role": "user", "content": "next"}]}
    )
    assert (later.user_text, later.tool_results) == ("next", [])
