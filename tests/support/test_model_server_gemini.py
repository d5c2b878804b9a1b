"""The scripted model server's Gemini API module over HTTP: the SSE stream the
`@google/genai` SDK parses, the one-shot and JSON-array forms, the API's error JSON, token
counting, and Gemini CLI's tool-less helper queries answered without consuming replies.
(tests/backends/test_gemini_cli_real.py drives it with the real CLI.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.model_server import ApiError, Reply, Script, ScriptedModelServer, ToolCall, gemini

TIMEOUT = httpx.Timeout(10.0)
MODEL = "gemini-test-pro"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
TOOLS = [{"functionDeclarations": [{"name": "run_shell_command", "parametersJsonSchema": {"type": "object"}}]}]


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(Script(), vendors=[gemini]) as running:
        yield running


def user(*texts: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text} for text in texts]}


def function_response(name: str, output: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"functionResponse": {"name": name, "response": {"output": output}}}]}


def body(contents: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"contents": contents, "tools": TOOLS, "systemInstruction": {"parts": [{"text": "sys"}]}, **extra}


def post(server: ScriptedModelServer, payload: dict[str, Any], path: str = STREAM) -> httpx.Response:
    return httpx.post(server.url + path, json=payload, headers={"x-goog-api-key": "key-value"}, timeout=TIMEOUT)


def frames(response: httpx.Response) -> list[dict[str, Any]]:
    """Split the body the way the SDK does: `data: <json>` frames ended by a blank line."""
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = [c for c in response.text.split("\r\n\r\n") if c]
    assert all(c.startswith("data: ") for c in chunks), chunks
    return [json.loads(c[len("data: ") :]) for c in chunks]


def parts_of(responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [part for r in responses for part in r["candidates"][0]["content"]["parts"]]


def test_a_streamed_reply_has_thought_text_and_call_parts_usage_and_a_final_stop(server: ScriptedModelServer) -> None:
    text = "A reply long enough to arrive in more than one frame."
    server.script.then(
        Reply(thinking="thinking it over", text=text, tool_calls=[ToolCall("run_shell_command", {"command": "ls"})])
    )
    response = post(server, body([user("<session_context>...</session_context>", "go")]))
    assert response.status_code == 200
    responses = frames(response)
    parts = parts_of(responses)
    assert "".join(p["text"] for p in parts if p.get("thought")) == "thinking it over"
    assert "".join(p["text"] for p in parts if "text" in p and not p.get("thought")) == text
    assert len([p for p in parts if "text" in p and not p.get("thought")]) > 1
    calls = [p for p in parts if "functionCall" in p]
    assert len(calls) == 1 and calls[0]["functionCall"] == {"name": "run_shell_command", "args": {"command": "ls"}}
    assert calls[0]["thoughtSignature"]  # thinking models sign their first function call
    assert [r["candidates"][0].get("finishReason") for r in responses][-1] == "STOP"
    assert all("finishReason" not in r["candidates"][0] for r in responses[:-1])
    assert all(r["candidates"][0]["content"]["role"] == "model" and r["modelVersion"] == MODEL for r in responses)
    assert len({r["responseId"] for r in responses}) == 1
    usage = responses[-1]["usageMetadata"]
    assert (
        usage["totalTokenCount"]
        == usage["promptTokenCount"] + usage["candidatesTokenCount"] + usage["thoughtsTokenCount"]
    )
    assert "cachedContentTokenCount" not in usage  # a first request has no repeated prefix
    [recorded] = server.model_requests
    assert recorded.headers["x-goog-api-key"] == "[redacted]"


def test_generate_content_and_the_array_stream_carry_the_same_response(server: ScriptedModelServer) -> None:
    server.script.then(Reply(text="one"), Reply(text="two"))
    whole = post(server, body([user("hi")]), f"/v1beta/models/{MODEL}:generateContent").json()
    assert whole["candidates"][0]["content"] == {"role": "model", "parts": [{"text": "one"}]}
    assert whole["candidates"][0]["finishReason"] == "STOP" and whole["usageMetadata"]["candidatesTokenCount"] > 0
    array = post(server, body([user("hi")]), f"/v1beta/models/{MODEL}:streamGenerateContent").json()
    assert isinstance(array, list) and parts_of(array) == [{"text": "two"}]


def test_rules_see_the_prompt_and_function_responses(server: ScriptedModelServer) -> None:
    server.script.on(
        user_contains="FIRST", reply=Reply(tool_calls=[ToolCall("run_shell_command", {"command": "echo p"})])
    )
    server.script.on(tool_result_contains="Output: p", reply=Reply(text="DONE"))
    history = [user("<session_context>x</session_context>", "FIRST task")]
    call = parts_of(frames(post(server, body(history))))
    history += [{"role": "model", "parts": call}, function_response("run_shell_command", "Output: p\nExit Code: 0")]
    responses = frames(post(server, body(history)))
    assert parts_of(responses) == [{"text": "DONE"}]
    # The repeated history counts as cached, as the API's implicit caching reports it.
    assert responses[-1]["usageMetadata"]["cachedContentTokenCount"] > 0
    assert server.script.misses == 0 and server.script.pending == 0
    request = gemini.parse_request({"contents": history})
    assert request.user_text.endswith("FIRST task") and request.tool_results == ["Output: p\nExit Code: 0"]


@pytest.mark.parametrize(
    ("error", "status", "rpc_status"),
    [
        (ApiError("invalid_request", "Request contains an invalid argument."), 400, "INVALID_ARGUMENT"),
        (ApiError("rate_limit", "Resource has been exhausted"), 429, "RESOURCE_EXHAUSTED"),
        (ApiError("server_error", "Internal error"), 500, "INTERNAL"),
        (ApiError("overloaded", "The model is overloaded."), 503, "UNAVAILABLE"),
        (ApiError("permission", "denied", status=401), 401, "PERMISSION_DENIED"),
    ],
)
def test_errors_are_the_apis_error_json(
    server: ScriptedModelServer, error: ApiError, status: int, rpc_status: str
) -> None:
    server.script.then(Reply(error=error))
    response = post(server, body([user("hi")]))
    assert response.status_code == status
    assert response.json() == {"error": {"code": status, "message": error.message, "status": rpc_status}}


def test_a_bad_api_key_names_its_reason(server: ScriptedModelServer) -> None:
    server.script.then(Reply(error=ApiError("authentication", "API key not valid. Please pass a valid API key.")))
    error = post(server, body([user("hi")])).json()["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["details"][0]["reason"] == "API_KEY_INVALID"


def test_tool_less_helper_queries_do_not_consume_script_replies(server: ScriptedModelServer) -> None:
    server.script.then(Reply(text="for the agent"))
    schema = {
        "type": "OBJECT",
        "properties": {
            "complexity_reasoning": {"type": "STRING"},
            "complexity_score": {"type": "INTEGER"},
            "model_choice": {"type": "STRING", "enum": ["flash", "pro"]},
        },
    }
    config = {"responseMimeType": "application/json", "responseJsonSchema": schema}
    classifier = {"contents": [user("route me")], "generationConfig": config}
    answer = post(server, classifier, "/v1beta/models/gemini-lite:generateContent").json()
    routed = json.loads(answer["candidates"][0]["content"]["parts"][0]["text"])
    assert routed == {"complexity_reasoning": "scripted", "complexity_score": 1, "model_choice": "flash"}
    summary = post(server, {"contents": [user("summarize")]}, "/v1beta/models/gemini-lite:generateContent").json()
    assert summary["candidates"][0]["content"]["parts"] == [{"text": "ok"}]
    assert [r.kind for r in server.requests] == ["side", "side"] and server.script.pending == 1
    assert parts_of(frames(post(server, body([user("hi")])))) == [{"text": "for the agent"}]


def test_count_tokens_and_unknown_methods(server: ScriptedModelServer) -> None:
    counted = post(server, {"contents": [user("x" * 400)]}, f"/v1beta/models/{MODEL}:countTokens").json()
    assert counted["totalTokens"] >= 100
    missing = post(server, body([user("hi")]), f"/v1beta/models/{MODEL}:embedContent")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"
    bad = httpx.post(server.url + STREAM, content=b"not json", timeout=TIMEOUT)
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert not server.model_requests
