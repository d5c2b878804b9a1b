"""Renders a session's event log as readable markdown."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from mcp_sandboxes.store import EventRecord
from mcp_sandboxes.store.records import SessionRecord

MAX_TOOL_OUTPUT_CHARS = 4000


def _fence(text: str, lang: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text}\n{fence}"


def _clip(text: str) -> str:
    if len(text) <= MAX_TOOL_OUTPUT_CHARS:
        return text
    return text[:MAX_TOOL_OUTPUT_CHARS] + f"\n… ({len(text) - MAX_TOOL_OUTPUT_CHARS} more characters)"


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return str(content)


def _usage_line(usage: dict[str, Any]) -> str:
    parts = [f"input {usage.get('input_tokens', 0)}", f"output {usage.get('output_tokens', 0)}"]
    if usage.get("cache_read_input_tokens"):
        parts.append(f"cache read {usage['cache_read_input_tokens']}")
    if usage.get("cache_creation_input_tokens"):
        parts.append(f"cache write {usage['cache_creation_input_tokens']}")
    if usage.get("cost_usd") is not None:
        parts.append(f"cost ${usage['cost_usd']:.6f}")
    return ", ".join(parts)


def render_transcript(session: SessionRecord, events: Iterable[EventRecord]) -> str:
    lines = [
        f"# Session {session.id}",
        "",
        f"- backend: {session.backend}" + (f" (model {session.agent.model})" if session.agent.model else ""),
        f"- status: {session.status}" + (f", stop reason {session.stop_reason}" if session.stop_reason else ""),
        f"- usage: {_usage_line(session.usage.model_dump())}",
        "",
    ]
    for record in events:
        data = record.data
        kind = record.type
        if kind == "user.message":
            lines += ["## User", "", _text(data.get("content")), ""]
        elif kind == "agent.message":
            lines += ["### Agent", "", _text(data.get("content")), ""]
        elif kind == "agent.thinking":
            lines += ["<details><summary>Thinking</summary>", "", str(data.get("thinking", "")), "", "</details>", ""]
        elif kind in ("agent.tool_use", "agent.mcp_tool_use"):
            server = f"{data['server_name']}/" if data.get("server_name") else ""
            arguments = json.dumps(data.get("input", {}), indent=2, ensure_ascii=False)
            lines += [
                f"**Tool call** `{server}{data.get('name')}` ({data.get('tool_use_id')})",
                "",
                _fence(arguments, "json"),
                "",
            ]
        elif kind in ("agent.tool_result", "agent.mcp_tool_result"):
            label = "Tool error" if data.get("is_error") else "Tool result"
            lines += [f"**{label}** ({data.get('tool_use_id')})", "", _fence(_clip(str(data.get("content", "")))), ""]
        elif kind == "session.error":
            error = data.get("error", {})
            lines += [f"> **Error** ({error.get('type')}): {error.get('message')}", ""]
        elif kind == "span.model_request_end":
            usage = data.get("model_usage", {})
            lines += [f"_Usage: {_usage_line(usage)}_", ""]
        elif kind == "session.status_idle":
            lines += [f"_Turn ended: {data.get('stop_reason', {}).get('type')}_", ""]
        elif kind == "user.interrupt":
            lines += ["> **Interrupted by the user**", ""]
        elif kind == "session.status_terminated":
            lines += [f"_Session terminated: {data.get('reason')}_", ""]
        elif kind == "agent.raw":
            lines += [f"<details><summary>Unrecognized output from {data.get('source')}</summary>", ""]
            lines += [_fence(_clip(json.dumps(data.get("data"), ensure_ascii=False))), "", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"
