"""The Gemini API (`generativelanguage.googleapis.com`), as Gemini CLI calls it.

Gemini CLI (0.61.0) reaches the model through the `@google/genai` SDK with an API key
(`x-goog-api-key` header) at `GOOGLE_GEMINI_BASE_URL`:

- `POST /v1beta/models/{model}:streamGenerateContent?alt=sse`: the agent's turns. Each SSE
  frame is `data: <GenerateContentResponse JSON>` followed by a blank line; candidates carry
  `content{role:"model", parts[...]}` with `{text}`, `{text, thought:true}` and
  `{functionCall{name, args}}` parts, the last frame adds `finishReason: "STOP"`, and every
  frame carries `usageMetadata` (promptTokenCount, candidatesTokenCount, thoughtsTokenCount,
  cachedContentTokenCount, totalTokenCount).
  (Without `alt=sse` the API answers one JSON array of those responses instead.)
- `POST /v1beta/models/{model}:generateContent`: the same response as one JSON object.
- `POST /v1beta/models/{model}:countTokens`: `{"totalTokens": n}`.
- Errors: the API's `{"error": {"code", "message", "status", "details"}}` with its HTTP codes.

Side requests: besides the agent's turns the CLI sends tool-less helper queries through
`generateContent` (model routing classifier when the model is "auto", next-speaker check,
loop detection, chat compression, edit correction, tool-output summaries). Agent turns always
declare the CLI's tools; a request without `tools` is answered here (JSON for a response
schema, else a short text) and never consumes a script reply.
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

# kind -> (HTTP status, google.rpc status, ErrorInfo reason or None), from the Gemini API's
# error reference. A wrong API key is 400 INVALID_ARGUMENT with reason API_KEY_INVALID there.
ERRORS: dict[ErrorKind, tuple[int, str, str | None]] = {
    "invalid_request": (400, "INVALID_ARGUMENT", None),
    "authentication": (400, "INVALID_ARGUMENT", "API_KEY_INVALID"),
    "permission": (403, "PERMISSION_DENIED", None),
    "not_found": (404, "NOT_FOUND", None),
    "request_too_large": (400, "INVALID_ARGUMENT", None),
    "rate_limit": (429, "RESOURCE_EXHAUSTED", None),
    "server_error": (500, "INTERNAL", None),
    "overloaded": (503, "UNAVAILABLE", None),
}

TEXT_CHUNK = 24  # characters per streamed text part, so clients must join several frames
API_VERSIONS = ("v1beta", "v1", "v1alpha")


def _new_id(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(12)


def _tokens(value: Any) -> int:
    # Rough token counts (4 characters a token): real clients only add and display them.
    return max(1, len(json.dumps(value, ensure_ascii=False)) // 4) if value else 0


def _contents(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in body.get("contents") or [] if isinstance(c, dict)]


def _parts(content: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in content.get("parts") or [] if isinstance(p, dict)]


def _function_response_text(part: dict[str, Any]) -> str:
    """A functionResponse's result as text: Gemini CLI sends `response: {output: ...}` for a
    result and `response: {error: ...}` for a failure; anything else as JSON."""
    response = (part.get("functionResponse") or {}).get("response")
    if isinstance(response, dict):
        for key in ("output", "error", "content", "result"):
            value = response.get(key)
            if isinstance(value, str):
                return value
        return json.dumps(response, ensure_ascii=False)
    return "" if response is None else json.dumps(response, ensure_ascii=False)


def parse_request(body: dict[str, Any]) -> ModelRequest:
    """The newest user prompt, and the tool outputs when the request ends with them.

    In this format a tool output is a `functionResponse` part of a `role: "user"` content
    after the model content that called the tool; a prompt is a user content of text parts
    (Gemini CLI puts its `<session_context>` part before the prompt in the same content)."""
    contents = _contents(body)
    tool_results: list[str] = []
    if contents and contents[-1].get("role", "user") == "user":
        tool_results = [_function_response_text(p) for p in _parts(contents[-1]) if "functionResponse" in p]
    prompt = ""
    for content in reversed(contents):
        if content.get("role", "user") != "user":
            continue
        parts = _parts(content)
        if any("functionResponse" in p for p in parts):
            continue
        prompt = "\n".join(str(p["text"]) for p in parts if isinstance(p.get("text"), str) and not p.get("thought"))
        break
    model = str(body.get("model") or "")
    return ModelRequest(model=model, user_text=prompt, tool_results=tool_results)


def _declares_tools(body: dict[str, Any]) -> bool:
    return any(isinstance(tool, dict) and tool.get("functionDeclarations") for tool in body.get("tools") or [])


def side_query_reply(body: dict[str, Any]) -> Reply | None:
    """A canned reply for Gemini CLI's own helper queries, or None for an agent turn.

    Agent turns (the main chat and subagents) declare the CLI's function tools; helper
    queries (routing classifier, next-speaker check, loop detection, compression, edit
    correction, summaries) declare none. Those that want JSON name a response schema."""
    if _declares_tools(body):
        return None
    config = body.get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    if isinstance(schema, dict):
        return Reply(text=json.dumps(_sample_for_schema(schema)))
    if config.get("responseMimeType") == "application/json":
        return Reply(text="{}")
    return Reply(text="ok")


def _sample_for_schema(schema: dict[str, Any]) -> Any:
    """A small value that satisfies a response schema (JSON Schema or the API's OpenAPI
    subset, whose type names are upper case)."""
    kind = str(schema.get("type", "")).lower()
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: _sample_for_schema(sub) for name, sub in properties.items() if isinstance(sub, dict)}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        minimum = schema.get("minimum")
        return minimum if isinstance(minimum, int | float) else 1
    if kind == "boolean":
        return False
    return "scripted"


def error_body(error: ApiError) -> tuple[int, dict[str, Any]]:
    status, rpc_status, reason = ERRORS[error.kind]
    payload: dict[str, Any] = {"code": error.status or status, "message": error.message, "status": rpc_status}
    if reason is not None:
        payload["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return error.status or status, {"error": payload}


def error_response(error: ApiError) -> JSONResponse:
    status, payload = error_body(error)
    return JSONResponse(payload, status_code=status)


def _model_parts(reply: Reply) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if reply.thinking is not None:
        parts.append({"text": reply.thinking, "thought": True})
    if reply.text is not None:
        parts.append({"text": reply.text})
    for index, call in enumerate(reply.tool_calls):
        part: dict[str, Any] = {"functionCall": {"name": call.name, "args": call.arguments}}
        if call.id:
            part["functionCall"]["id"] = call.id
        if index == 0:
            # Thinking models sign their first function call; clients send it back with the history.
            part["thoughtSignature"] = secrets.token_urlsafe(24)
        parts.append(part)
    if not parts:
        parts.append({"text": ""})
    return parts


def usage_metadata(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """Token counts for a reply. The history before the newest content was sent before, so
    it counts as cached (what the API's implicit caching reports for a repeated prefix)."""
    contents = _contents(body)
    prompt = _tokens(body.get("systemInstruction")) + _tokens(body.get("tools")) + _tokens(contents)
    cached = min(prompt, _tokens(contents[:-1]))
    parts = _model_parts(reply)
    thoughts = _tokens(reply.thinking) if reply.thinking else 0
    candidates = max(1, _tokens([p for p in parts if not p.get("thought")]))
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    if cached:
        usage["cachedContentTokenCount"] = cached
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
    return usage


def _finish_reason(reply: Reply) -> str:
    # The API says STOP for function calls too; clients look at the parts.
    return "STOP"


def response_json(reply: Reply, model: str, body: dict[str, Any], response_id: str | None = None) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": _model_parts(reply)},
                "finishReason": _finish_reason(reply),
                "index": 0,
            }
        ],
        "usageMetadata": usage_metadata(body, reply),
        "modelVersion": model,
        "responseId": response_id or _new_id(),
    }


def _chunks(text: str, size: int = TEXT_CHUNK) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _sse(data: dict[str, Any]) -> bytes:
    # The API separates frames with CRLF CRLF; the SDK accepts that and LF LF.
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\r\n\r\n".encode()


def stream_frames(reply: Reply, model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The frames of a streamed reply: text and thoughts in pieces, each function call whole
    (the API never splits one), usage on every frame, finishReason on the last."""
    whole = response_json(reply, model, body)
    usage = whole["usageMetadata"]
    response_id = whole["responseId"]
    partial_usage = {"promptTokenCount": usage["promptTokenCount"], "totalTokenCount": usage["promptTokenCount"]}
    pieces: list[dict[str, Any]] = []
    for part in whole["candidates"][0]["content"]["parts"]:
        if part.get("text"):
            for piece in _chunks(part["text"]):
                pieces.append({**part, "text": piece})
        else:
            pieces.append(part)
    frames = []
    for index, part in enumerate(pieces):
        last = index == len(pieces) - 1
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [part]}, "index": 0}
        if last:
            candidate["finishReason"] = _finish_reason(reply)
        frames.append(
            {
                "candidates": [candidate],
                "usageMetadata": usage if last else partial_usage,
                "modelVersion": model,
                "responseId": response_id,
            }
        )
    return frames


async def stream_events(reply: Reply, model: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
    if reply.delay_s:
        # The response headers are out already, so a client sees a live stream it can interrupt.
        await anyio.sleep(reply.delay_s)
    for frame in stream_frames(reply, model, body):
        yield _sse(frame)


def routes(script: Script, recorder: Recorder) -> list[Route]:
    async def models(request: Request) -> Response:
        version = request.path_params["version"]
        target = request.path_params["target"]
        model, _, method = target.rpartition(":")
        headers = redact_headers(request.headers)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if version not in API_VERSIONS or method not in ("streamGenerateContent", "generateContent", "countTokens"):
            recorder.add(RecordedRequest(request.method, request.url.path, headers, body, "side"))
            error = ApiError("not_found", f"Method {method or target!r} is not found for API version {version}.")
            return error_response(error)
        if not isinstance(body, dict):
            recorder.add(RecordedRequest(request.method, request.url.path, headers, body, "side"))
            return error_response(ApiError("invalid_request", "Invalid JSON payload received."))
        if method == "countTokens":
            recorder.add(RecordedRequest(request.method, request.url.path, headers, body, "side"))
            # countTokens takes `contents`, or a whole `generateContentRequest`.
            inner = body.get("generateContentRequest")
            counted = inner if isinstance(inner, dict) else body
            return JSONResponse({"totalTokens": _tokens(counted.get("contents"))})
        reply = side_query_reply(body)
        kind: Any = "side"
        if reply is None:
            reply = script.pick(parse_request({**body, "model": model}))
            kind = "model"
        recorder.add(RecordedRequest(request.method, request.url.path, headers, body, kind, reply))
        if reply.error is not None:
            if reply.delay_s:
                await anyio.sleep(reply.delay_s)
            return error_response(reply.error)
        if method == "streamGenerateContent" and request.query_params.get("alt") != "sse":
            # Without alt=sse the API streams one JSON array of the same responses.
            if reply.delay_s:
                await anyio.sleep(reply.delay_s)
            return JSONResponse(stream_frames(reply, model, body))
        if method == "streamGenerateContent":
            return StreamingResponse(
                stream_events(reply, model, body), media_type="text/event-stream", headers={"cache-control": "no-cache"}
            )
        if reply.delay_s:
            await anyio.sleep(reply.delay_s)
        return JSONResponse(response_json(reply, model, body))

    return [Route("/{version}/models/{target}", models, methods=["POST"])]
