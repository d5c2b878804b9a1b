"""The Anthropic Messages API (`POST /v1/messages`), as Claude Code calls it.

Streaming replies follow the published SSE sequence: message_start, then per content block
content_block_start / content_block_delta (text_delta, thinking_delta + signature_delta,
input_json_delta) / content_block_stop, then message_delta (stop_reason, output usage) and
message_stop. Errors are the API's `{"type": "error", "error": {...}}` JSON with its status
codes (529 for overloaded).

Claude Code also sends requests that are not the agent's turn: `HEAD /` as a reachability
probe, `POST /v1/messages/count_tokens`, and tool-less helper queries such as session titles
(see `side_query_reply`). These are answered here without consuming a script reply.
"""

from __future__ import annotations

import json
import secrets
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

# kind -> (HTTP status, Anthropic error type), from the API's error reference.
ERRORS: dict[ErrorKind, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "authentication": (401, "authentication_error"),
    "permission": (403, "permission_error"),
    "not_found": (404, "not_found_error"),
    "request_too_large": (413, "request_too_large"),
    "rate_limit": (429, "rate_limit_error"),
    "server_error": (500, "api_error"),
    "overloaded": (529, "overloaded_error"),
}

TEXT_CHUNK = 24  # characters per text/json delta, so clients must join several deltas


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _text_of(content: Any) -> str:
    """The text of a message or tool_result `content`: a string or a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                if block.get("type") == "text":
                    parts.append(str(block.get("text", "")))
                elif block.get("type") == "tool_result":
                    parts.append(_text_of(block.get("content", "")))
                elif block.get("type") == "tool_reference":
                    # ToolSearch's result in newer Claude Code: the tools it loaded, by name.
                    parts.append(str(block.get("tool_name", "")))
        return "\n".join(parts)
    return ""


def parse_request(body: dict[str, Any]) -> ModelRequest:
    messages = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    tool_results: list[str] = []
    if messages and isinstance(messages[-1].get("content"), list):
        tool_results = [
            _text_of(block.get("content", ""))
            for block in messages[-1]["content"]
            if isinstance(block, dict) and block.get("type") == "tool_result"
        ]
    prompt = ""
    for message in reversed(messages):
        content = message.get("content")
        carries_results = isinstance(content, list) and any(
            isinstance(block, dict) and block.get("type") == "tool_result" for block in content
        )
        if not carries_results:
            prompt = _text_of(content)
            break
    return ModelRequest(model=str(body.get("model", "")), user_text=prompt, tool_results=tool_results)


def side_query_reply(body: dict[str, Any]) -> Reply | None:
    """A canned reply for Claude Code's own helper queries, or None for an agent turn.

    Agent turns always carry the tool list. Claude Code 2.1.197 sends, besides them, a
    session title query (`tools: []`, `output_config.format` a JSON schema with `title`)
    unless CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC is set; other helper queries (quota
    probes, bash command prefixes) are likewise tool-less."""
    if body.get("tools"):
        return None
    output_format = (body.get("output_config") or {}).get("format") or {}
    if output_format.get("type") == "json_schema":
        return Reply(text=json.dumps(_sample_for_schema(output_format.get("schema") or {})))
    system = _text_of(body.get("system", "")).lower()
    if "command prefix" in system:
        return Reply(text="none")
    return Reply(text="ok")


def _sample_for_schema(schema: dict[str, Any]) -> Any:
    """A small value that satisfies a structured-output schema (objects, strings, numbers)."""
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: _sample_for_schema(sub) for name, sub in properties.items()}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return False
    if schema.get("enum"):
        return schema["enum"][0]
    return "Scripted session"


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunks(text: str, size: int = TEXT_CHUNK) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _blocks(reply: Reply) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if reply.thinking is not None:
        blocks.append({"type": "thinking", "thinking": reply.thinking, "signature": _new_id("sig_")})
    if reply.text is not None:
        blocks.append({"type": "text", "text": reply.text})
    for call in reply.tool_calls:
        blocks.append(
            {"type": "tool_use", "id": call.id or _new_id("toolu_"), "name": call.name, "input": call.arguments}
        )
    if not blocks:
        blocks.append({"type": "text", "text": ""})
    return blocks


def _usage(body: dict[str, Any], blocks: list[dict[str, Any]]) -> dict[str, int]:
    # Rough token counts (4 characters a token): real clients only add and display them.
    input_tokens = max(1, len(json.dumps(body.get("messages", []))) // 4)
    output_tokens = max(1, len(json.dumps(blocks)) // 4)
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _stop_reason(reply: Reply) -> str:
    return "tool_use" if reply.tool_calls else "end_turn"


def error_response(error: ApiError) -> JSONResponse:
    status, error_type = ERRORS[error.kind]
    request_id = _new_id("req_")
    return JSONResponse(
        {"type": "error", "error": {"type": error_type, "message": error.message}, "request_id": request_id},
        status_code=error.status or status,
        headers={"request-id": request_id},
    )


def message_json(reply: Reply, model: str, body: dict[str, Any]) -> dict[str, Any]:
    blocks = _blocks(reply)
    return {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": _stop_reason(reply),
        "stop_sequence": None,
        "usage": _usage(body, blocks),
    }


def _block_events(index: int, block: dict[str, Any]) -> Iterator[bytes]:
    kind = block["type"]
    if kind == "text":
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
        )
        for piece in _chunks(block["text"]):
            delta = {"type": "text_delta", "text": piece}
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    elif kind == "thinking":
        start_thinking = {"type": "thinking", "thinking": "", "signature": ""}
        yield _sse(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": start_thinking}
        )
        for piece in _chunks(block["thinking"]):
            delta = {"type": "thinking_delta", "thinking": piece}
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        delta = {"type": "signature_delta", "signature": block["signature"]}
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    else:
        start: dict[str, Any] = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        yield _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        for piece in _chunks(json.dumps(block["input"])):
            delta = {"type": "input_json_delta", "partial_json": piece}
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})


async def stream_events(reply: Reply, model: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
    message = message_json(reply, model, body)
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse("ping", {"type": "ping"})
    if reply.delay_s:
        # After message_start, so a client sees a live stream it can interrupt.
        await anyio.sleep(reply.delay_s)
    for index, block in enumerate(message["content"]):
        for chunk in _block_events(index, block):
            yield chunk
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


def routes(script: Script, recorder: Recorder) -> list[Route]:
    async def messages(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        headers = redact_headers(request.headers)
        if not isinstance(body, dict):
            recorder.add(RecordedRequest(request.method, request.url.path, headers, body, "side"))
            return error_response(ApiError("invalid_request", "request body is not a JSON object"))
        model = str(body.get("model", "claude-scripted"))
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
                stream_events(reply, model, body),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "request-id": _new_id("req_")},
            )
        if reply.delay_s:
            await anyio.sleep(reply.delay_s)
        return JSONResponse(message_json(reply, model, body), headers={"request-id": _new_id("req_")})

    async def count_tokens(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        recorder.add(RecordedRequest(request.method, request.url.path, redact_headers(request.headers), body, "side"))
        return JSONResponse({"input_tokens": max(1, len(json.dumps(body)) // 4)})

    return [
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
