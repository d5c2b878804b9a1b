"""OpenAI-compatible Chat Completions (`POST /v1/chat/completions`), as OpenCode's
`@ai-sdk/openai-compatible` provider calls it (and any other client of that wire format).

Streaming replies (`stream: true`) are SSE `data:` lines of `chat.completion.chunk` objects:
a first chunk with `delta.role`, then `delta.reasoning_content` / `delta.content` pieces, then
per tool call a chunk opening it (`index`, `id`, `type: "function"`, `function.name`) and
chunks carrying pieces of `function.arguments`, then a chunk with an empty delta and the
`finish_reason` ("stop" | "tool_calls"); when `stream_options.include_usage` is set, a last
chunk with `choices: []` and `usage`; then `data: [DONE]`. Errors are the API's
`{"error": {"message", "type", "param", "code"}}` JSON with its status codes.
`GET /v1/models` lists the model names a script can be asked with.

OpenCode also sends requests that are not the agent's turn, from its hidden tool-less agents:
the session title, and summaries (of the session, and of the context when it compacts it).
They are answered here without consuming a script reply (see `side_query_reply`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.model_server.core import (
    ApiError,
    ErrorKind,
    ModelRequest,
    RecordedRequest,
    Recorder,
    Reply,
    Script,
    redact_headers,
)

# kind -> (HTTP status, OpenAI error type, error code), after the API's error-code guide.
ERRORS: dict[ErrorKind, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", None),
    "authentication": (401, "invalid_request_error", "invalid_api_key"),
    "permission": (403, "invalid_request_error", "unsupported_country_region_territory"),
    "not_found": (404, "invalid_request_error", "model_not_found"),
    "request_too_large": (413, "invalid_request_error", "request_too_large"),
    "rate_limit": (429, "requests", "rate_limit_exceeded"),
    "server_error": (500, "server_error", None),
    "overloaded": (503, "server_error", "overloaded"),
}

TEXT_CHUNK = 24  # characters per content/arguments piece, so clients must join several
MODELS = ("scripted-model", "scripted-small")


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _text_of(content: Any) -> str:
    """A message's `content`: a string, or a list of parts (text parts kept)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def parse_request(body: dict[str, Any]) -> ModelRequest:
    """The newest user prompt, and the tool outputs when the request ends with tool messages.

    In this format each tool output is its own `role: "tool"` message after the assistant
    message that called the tools; a request that calls the model back after tools ends
    with that run of tool messages."""
    messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
    tool_results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        tool_results.insert(0, _text_of(message.get("content")))
    prompt = ""
    for message in reversed(messages):
        if message.get("role") == "user":
            prompt = _text_of(message.get("content"))
            break
    return ModelRequest(model=str(body.get("model", "")), user_text=prompt, tool_results=tool_results)


# The system prompts of OpenCode 1.18.33's hidden agents (title, summary, compaction), which
# run without tools; the canned reply for each.
SIDE_AGENTS: tuple[tuple[str, str], ...] = (
    ("you are a title generator", "Scripted session"),
    ("summarize what was done in this conversation", "Scripted summary of the session."),
    ("you are a context summarization agent", "Scripted summary of the context."),
)


def side_query_reply(body: dict[str, Any]) -> Reply | None:
    """A canned reply for a client's own helper queries, or None for an agent turn.

    Agent turns carry the tool list; a tool-less request is a side query when its system
    message is one of OpenCode's hidden agents (`SIDE_AGENTS`)."""
    if body.get("tools"):
        return None
    system = " ".join(
        _text_of(m.get("content"))
        for m in body.get("messages", [])
        if isinstance(m, dict) and m.get("role") in ("system", "developer")
    ).lower()
    for marker, text in SIDE_AGENTS:
        if marker in system:
            return Reply(text=text)
    return None


def error_response(error: ApiError) -> JSONResponse:
    status, error_type, code = ERRORS[error.kind]
    request_id = _new_id("req_")
    return JSONResponse(
        {"error": {"message": error.message, "type": error_type, "param": None, "code": code}},
        status_code=error.status or status,
        headers={"x-request-id": request_id},
    )


def _chunks(text: str, size: int = TEXT_CHUNK) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _tool_calls(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "id": call.id or _new_id("call_"),
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for call in reply.tool_calls
    ]


def _usage(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    # Rough token counts (4 characters a token): real clients only add and display them.
    prompt_tokens = max(1, len(json.dumps(body.get("messages", []))) // 4)
    produced = (reply.text or "") + (reply.thinking or "") + json.dumps(_tool_calls(reply))
    completion_tokens = max(1, len(produced) // 4)
    reasoning_tokens = len(reply.thinking) // 4 if reply.thinking else 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def _finish_reason(reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls else "stop"


def completion_json(reply: Reply, model: str, body: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if reply.thinking is not None:
        message["reasoning_content"] = reply.thinking
    calls = _tool_calls(reply)
    if calls:
        message["tool_calls"] = calls
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(reply)}],
        "usage": _usage(body, reply),
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def stream_chunks(reply: Reply, model: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
    completion_id = _new_id("chatcmpl-")
    created = int(time.time())
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return _sse(data)

    yield chunk({"role": "assistant", "content": ""})
    if reply.delay_s:
        # After the first chunk, so a client sees a live stream it can interrupt.
        await anyio.sleep(reply.delay_s)
    if reply.thinking is not None:
        for piece in _chunks(reply.thinking):
            yield chunk({"reasoning_content": piece})
    if reply.text is not None:
        for piece in _chunks(reply.text):
            yield chunk({"content": piece})
    for index, call in enumerate(_tool_calls(reply)):
        opening = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        yield chunk({"tool_calls": [opening]})
        for piece in _chunks(call["function"]["arguments"]):
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield chunk({}, _finish_reason(reply))
    if include_usage:
        usage = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(body, reply),
        }
        yield _sse(usage)
    yield _sse("[DONE]")


def routes(script: Script, recorder: Recorder) -> list[Route]:
    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        headers = redact_headers(request.headers)
        if not isinstance(body, dict):
            recorder.add(RecordedRequest(request.method, request.url.path, headers, body, "side"))
            return error_response(ApiError("invalid_request", "request body is not a JSON object"))
        model = str(body.get("model", "scripted-model"))
        reply = side_query_reply(body)
        kind: Any = "side"
        if reply is None:
            reply = script.pick(parse_request(body))
            kind = "model"
        recorder.add(RecordedRequest(request.method, request.url.path, headers, body, kind, reply))
        if reply.error is not None:
            if reply.delay_s:
                await anyio.sleep(reply.delay_s)
            return error_response(reply.error)
        if body.get("stream"):
            return StreamingResponse(
                stream_chunks(reply, model, body),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-request-id": _new_id("req_")},
            )
        if reply.delay_s:
            await anyio.sleep(reply.delay_s)
        return JSONResponse(completion_json(reply, model, body), headers={"x-request-id": _new_id("req_")})

    async def models(request: Request) -> Response:
        recorder.add(RecordedRequest(request.method, request.url.path, redact_headers(request.headers), None, "side"))
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "scripted"} for name in MODELS]
        return JSONResponse({"object": "list", "data": data})

    return [
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
