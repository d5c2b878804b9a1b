"""The OpenAI Responses API (`POST /v1/responses`), as the Codex CLI calls it.

Codex 0.169.0 with a custom provider (`wire_api = "responses"`) posts `stream: true`
requests whose `input` is the whole conversation as a flat list of items: `message`
(role developer/user/assistant, `input_text`/`output_text` parts), `reasoning`,
`function_call` {call_id, name, arguments} and `function_call_output` {call_id, output}.

Streaming replies follow the published event sequence, each SSE event `event: <type>` with
a JSON `data` carrying the same `type` and a rising `sequence_number`: response.created,
response.in_progress, then per output item response.output_item.added, its content events
(reasoning: response.reasoning_summary_part.added / response.reasoning_summary_text.delta /
.done / response.reasoning_summary_part.done; message: response.content_part.added /
response.output_text.delta / .done / response.content_part.done; function_call:
response.function_call_arguments.delta / .done), response.output_item.done with the whole
item, and last response.completed whose response carries `usage` {input_tokens,
input_tokens_details.cached_tokens, output_tokens, output_tokens_details.reasoning_tokens,
total_tokens}. There is no `[DONE]` sentinel in this API.

Errors are the API's `{"error": {"message", "type", "param", "code"}}` JSON with its status
codes. An `ApiError` with `status=200` is instead reported the way the API reports a failure
after the stream began: response.created, then response.failed whose response has
`status: "failed"` and `error {code, message}`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
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
    ToolCall,
    redact_headers,
)

# kind -> (HTTP status, error type, error code), after the API's error-code guide.
ERRORS: dict[ErrorKind, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", None),
    "authentication": (401, "invalid_request_error", "invalid_api_key"),
    "permission": (403, "invalid_request_error", "unsupported_country_region_territory"),
    "not_found": (404, "invalid_request_error", "model_not_found"),
    "request_too_large": (413, "invalid_request_error", "request_too_large"),
    "rate_limit": (429, "requests", "rate_limit_exceeded"),
    "server_error": (500, "server_error", "server_error"),
    "overloaded": (503, "server_error", "server_is_overloaded"),
}

TEXT_CHUNK = 24  # characters per text/arguments delta, so clients must join several
# Items that carry a tool's output back to the model.
OUTPUT_ITEMS = frozenset({"function_call_output", "custom_tool_call_output", "tool_search_output"})
# User messages Codex writes itself (workspace facts, AGENTS.md), not the user's prompt.
CONTEXT_PREFIXES = ("<environment_context>", "<user_instructions>", "# AGENTS.md instructions")


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _text_of(content: Any) -> str:
    """A message's or an output's content: a string, or a list of parts (text kept)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text")
        )
    return ""


def _is_prompt(item: dict[str, Any]) -> bool:
    if item.get("type", "message") != "message" or item.get("role") != "user":
        return False
    return not _text_of(item.get("content")).lstrip().startswith(CONTEXT_PREFIXES)


def parse_request(body: dict[str, Any]) -> ModelRequest:
    """The newest user prompt, and the tool outputs when the model is called back after tools.

    The history is flat: a model response's call items are followed by one output item per
    call, so a request after tools ends with that run of outputs (earlier round trips sit
    before the calls that separate them), possibly followed by developer messages the client
    adds in between."""
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        return ModelRequest(model=str(body.get("model", "")), user_text=raw_input)
    items = [item for item in raw_input or [] if isinstance(item, dict)]
    tool_results: list[str] = []
    for item in reversed(items):
        kind = item.get("type")
        if kind == "message" and item.get("role") == "developer":
            continue  # a client notice after the outputs (Codex: "Added deferred tool namespaces")
        if kind == "tool_search_output":
            tool_results.insert(0, json.dumps(item.get("tools")))
        elif kind in OUTPUT_ITEMS:
            tool_results.insert(0, _text_of(item.get("output")))
        else:
            break
    prompt = next((_text_of(item.get("content")) for item in reversed(items) if _is_prompt(item)), "")
    return ModelRequest(model=str(body.get("model", "")), user_text=prompt, tool_results=tool_results)


def error_response(error: ApiError) -> JSONResponse:
    status, error_type, code = ERRORS[error.kind]
    return JSONResponse(
        {"error": {"message": error.message, "type": error_type, "param": None, "code": code}},
        status_code=error.status or status,
        headers={"x-request-id": _new_id("req_")},
    )


def _chunks(text: str, size: int = TEXT_CHUNK) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _declared_tools(tools: Any) -> Iterator[dict[str, Any]]:
    """Tool declarations, namespaces opened (Codex groups tools in `namespace` entries)."""
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            yield tool
            yield from _declared_tools(tool.get("tools"))


@dataclass(frozen=True)
class OfferedTools:
    """What the request lets the model call, as far as rendering a call depends on it."""

    custom: frozenset[str] = frozenset()
    # "<namespace>__<name>" -> (namespace, name) for tools inside a namespace.
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)


def offered_tools(body: dict[str, Any]) -> OfferedTools:
    """Freeform (`type: "custom"`) tools such as Codex's apply_patch, and namespaced tools.

    Codex declares tools in `tools`, for some models also in `additional_tools` input items,
    and MCP tools only once its client-side `tool_search` found them (`tool_search_output`
    items, a `namespace` such as "mcp__calc" holding function "add")."""
    declared = list(_declared_tools(body.get("tools")))
    for item in body.get("input") or []:
        if isinstance(item, dict) and item.get("type") in ("additional_tools", "tool_search_output"):
            declared.extend(_declared_tools(item.get("tools")))
    custom = frozenset(str(tool.get("name")) for tool in declared if tool.get("type") == "custom")
    namespaced: dict[str, tuple[str, str]] = {}
    for tool in declared:
        if tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            for inner in tool["tools"]:
                if isinstance(inner, dict) and inner.get("name"):
                    namespaced[f"{tool.get('name')}__{inner['name']}"] = (str(tool.get("name")), str(inner["name"]))
    return OfferedTools(custom=custom, namespaced=namespaced)


def _call_item(call: ToolCall, offered: OfferedTools) -> dict[str, Any]:
    """The output item for a call: `tool_search` becomes a client-executed tool_search_call;
    a freeform tool a custom_tool_call whose raw `input` is the call's `input` argument; a
    "<namespace>__<name>" of a namespaced tool a function_call with `namespace`; any other a
    function_call."""
    call_id = call.id or _new_id("call_")
    if call.name == "tool_search":
        return {
            "id": _new_id("tsc_"),
            "type": "tool_search_call",
            "status": "completed",
            "call_id": call_id,
            "execution": "client",
            "arguments": call.arguments,
        }
    if call.name in offered.namespaced:
        namespace, name = offered.namespaced[call.name]
        return {
            "id": _new_id("fc_"),
            "type": "function_call",
            "status": "completed",
            "call_id": call_id,
            "namespace": namespace,
            "name": name,
            "arguments": json.dumps(call.arguments),
        }
    if call.name in offered.custom:
        raw = call.arguments.get("input")
        text = raw if isinstance(raw, str) else json.dumps(call.arguments)
        return {
            "id": _new_id("ctc_"),
            "type": "custom_tool_call",
            "status": "completed",
            "call_id": call_id,
            "name": call.name,
            "input": text,
        }
    return {
        "id": _new_id("fc_"),
        "type": "function_call",
        "status": "completed",
        "call_id": call_id,
        "name": call.name,
        "arguments": json.dumps(call.arguments),
    }


def output_items(reply: Reply, offered: OfferedTools | None = None) -> list[dict[str, Any]]:
    """The reply as completed Responses output items: reasoning, message, tool calls."""
    items: list[dict[str, Any]] = []
    if reply.thinking is not None:
        items.append(
            {
                "id": _new_id("rs_"),
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": reply.thinking}],
                # Opaque to clients: Codex asks for it (include=reasoning.encrypted_content)
                # and sends it back in the next request's history.
                "encrypted_content": _new_id("enc_"),
            }
        )
    if reply.text is not None or not reply.tool_calls:
        items.append(
            {
                "id": _new_id("msg_"),
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": reply.text or "", "annotations": [], "logprobs": []}],
            }
        )
    items.extend(_call_item(call, offered or OfferedTools()) for call in reply.tool_calls)
    return items


def _usage(body: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    # Rough token counts (4 characters a token): clients only add and display them.
    input_tokens = max(1, len(json.dumps(body.get("input", []))) // 4)
    output_tokens = max(1, len(json.dumps(items)) // 4)
    reasoning = sum(len(json.dumps(item["summary"])) // 4 for item in items if item["type"] == "reasoning")
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": min(reasoning, output_tokens)},
        "total_tokens": input_tokens + output_tokens,
    }


def response_json(
    response_id: str,
    body: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": error,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": str(body.get("model", "scripted-model")),
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


class _EventWriter:
    """Numbers events and renders them as SSE (`event:` name plus JSON `data:`)."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _in_progress(item: dict[str, Any]) -> dict[str, Any]:
    """The item as output_item.added shows it: no content yet."""
    if item["type"] == "reasoning":
        return {**item, "summary": []}
    if item["type"] == "message":
        return {**item, "status": "in_progress", "content": []}
    if item["type"] == "custom_tool_call":
        return {**item, "status": "in_progress", "input": ""}
    if item["type"] == "tool_search_call":
        return {**item, "status": "in_progress"}
    return {**item, "status": "in_progress", "arguments": ""}


def _item_events(event: _EventWriter, index: int, item: dict[str, Any]) -> Iterator[bytes]:
    yield event("response.output_item.added", output_index=index, item=_in_progress(item))
    where = {"item_id": item["id"], "output_index": index}
    if item["type"] == "reasoning":
        for summary_index, part in enumerate(item["summary"]):
            empty: dict[str, Any] = {"type": "summary_text", "text": ""}
            yield event("response.reasoning_summary_part.added", **where, summary_index=summary_index, part=empty)
            for piece in _chunks(part["text"]):
                yield event("response.reasoning_summary_text.delta", **where, summary_index=summary_index, delta=piece)
            yield event("response.reasoning_summary_text.done", **where, summary_index=summary_index, text=part["text"])
            yield event("response.reasoning_summary_part.done", **where, summary_index=summary_index, part=part)
    elif item["type"] == "message":
        for content_index, part in enumerate(item["content"]):
            at = {**where, "content_index": content_index}
            empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield event("response.content_part.added", **at, part=empty)
            for piece in _chunks(part["text"]):
                yield event("response.output_text.delta", **at, delta=piece, logprobs=[])
            yield event("response.output_text.done", **at, text=part["text"], logprobs=[])
            yield event("response.content_part.done", **at, part=part)
    elif item["type"] == "tool_search_call":
        pass  # arguments arrive whole, in the item itself
    elif item["type"] == "custom_tool_call":
        for piece in _chunks(item["input"]):
            yield event("response.custom_tool_call_input.delta", **where, delta=piece)
        yield event("response.custom_tool_call_input.done", **where, input=item["input"])
    else:
        for piece in _chunks(item["arguments"]):
            yield event("response.function_call_arguments.delta", **where, delta=piece)
        yield event("response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"])
    yield event("response.output_item.done", output_index=index, item=item)


async def stream_events(reply: Reply, body: dict[str, Any]) -> AsyncIterator[bytes]:
    event = _EventWriter()
    response_id = _new_id("resp_")
    yield event("response.created", response=response_json(response_id, body, status="in_progress", output=[]))
    yield event("response.in_progress", response=response_json(response_id, body, status="in_progress", output=[]))
    if reply.delay_s:
        # After the stream opened, so a client sees a live request it can interrupt.
        await anyio.sleep(reply.delay_s)
    if reply.error is not None:
        _, _, code = ERRORS[reply.error.kind]
        failure = {"code": code or reply.error.kind, "message": reply.error.message}
        failed = response_json(response_id, body, status="failed", output=[], error=failure)
        yield event("response.failed", response=failed)
        return
    items = output_items(reply, offered_tools(body))
    for index, item in enumerate(items):
        for chunk in _item_events(event, index, item):
            yield chunk
    done = response_json(response_id, body, status="completed", output=items, usage=_usage(body, items))
    yield event("response.completed", response=done)


def routes(script: Script, recorder: Recorder) -> list[Route]:
    async def responses(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        headers = redact_headers(request.headers)
        if not isinstance(body, dict):
            recorder.add(RecordedRequest(request.method, request.url.path, headers, body, "side"))
            return error_response(ApiError("invalid_request", "request body is not a JSON object"))
        reply = script.pick(parse_request(body))
        recorder.add(RecordedRequest(request.method, request.url.path, headers, body, "model", reply))
        in_stream_failure = reply.error is not None and reply.error.status == 200
        if reply.error is not None and not in_stream_failure:
            if reply.delay_s:
                await anyio.sleep(reply.delay_s)
            return error_response(reply.error)
        if body.get("stream"):
            return StreamingResponse(
                stream_events(reply, body),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-request-id": _new_id("req_")},
            )
        if reply.delay_s:
            await anyio.sleep(reply.delay_s)
        response_id = _new_id("resp_")
        if reply.error is not None:
            _, _, code = ERRORS[reply.error.kind]
            failure = {"code": code or reply.error.kind, "message": reply.error.message}
            return JSONResponse(response_json(response_id, body, status="failed", output=[], error=failure))
        items = output_items(reply, offered_tools(body))
        done = response_json(response_id, body, status="completed", output=items, usage=_usage(body, items))
        return JSONResponse(done, headers={"x-request-id": _new_id("req_")})

    return [
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/responses", responses, methods=["POST"]),
    ]
