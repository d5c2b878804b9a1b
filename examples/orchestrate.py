"""A Python MCP client orchestrating a sub-agent: create an environment, spawn Claude Code in
Docker, follow its events, continue the conversation, print the transcript, stop it. Exits 1
(saying why on stderr) when a call is refused or a turn fails.

Run against a server started with `scripts/serve --transport http --port 8765`:
    .venv/bin/python examples/orchestrate.py http://127.0.0.1:8765/mcp
The server requires its operator token: MCP_SANDBOXES_AUTH_TOKEN when set, else the one it keeps in
its data directory (`mcp-sandboxes token` prints it), which this example reads the same way.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_sandboxes.config import load_settings


def operator_token() -> str:
    server = load_settings().server
    return server.auth_token or server.operator_token_path.read_text("utf-8").strip()


class Failed(Exception):
    """A tool call or a turn that did not work: the example exits 1 with this message."""


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A tool's structured answer; a tool error (bad input, a refused spawn) raises Failed."""
    result = await client.call_tool(tool, arguments)
    if result.is_error or not isinstance(result.structured_content, dict):
        text = " ".join(getattr(block, "text", "") for block in result.content)
        raise Failed(f"{tool}: {text or 'failed'}")
    return result.structured_content


async def main(url: str) -> int:
    headers = {"Authorization": f"Bearer {operator_token()}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        await call(
            client, "create_environment", {"name": "example", "image": "mcp-sandboxes/base:latest", "network": "host"}
        )
        try:
            return await run(client)
        finally:
            await call(client, "delete_environment", {"environment": "example", "force": True})


async def follow(client: Client, session_id: str, cursor: int, turn: int, failures: list[str]) -> int:
    """Prints the session's events until its turn ends; what went wrong goes into `failures`.
    Returns the cursor after the last event read."""
    while True:
        page = await call(client, "read_events", {"session_id": session_id, "after": cursor, "wait_s": 30})
        for event in page["events"]:
            sys.stdout.write(f"{event['seq']:>4} {event['type']}\n")
            if event["type"] == "session.error":
                failures.append(f"turn {turn}: {event['data']['error']['message']}")
        cursor = page["next_cursor"]
        idle = [e for e in page["events"] if e["type"] == "session.status_idle"]
        if idle:
            reason = idle[-1]["data"]["stop_reason"]["type"]
            if reason != "end_turn":
                failures.append(f"turn {turn} ended with {reason}")
            return cursor
        if page["session_status"] in ("stopped", "failed"):
            failures.append(f"turn {turn}: the session is {page['session_status']}")
            return cursor


async def run(client: Client) -> int:
    spawned = await call(
        client,
        "spawn_agent",
        {
            "environment": "example",
            "prompt": "Create hello.py that prints hello",
            "permission_mode": "bypassPermissions",
        },
    )
    session_id = spawned["session"]["session_id"]
    failures: list[str] = []
    try:
        cursor = await follow(client, session_id, 0, 1, failures)
        if not failures:
            await call(client, "send_message", {"session_id": session_id, "text": "Now run it"})
            await follow(client, session_id, cursor, 2, failures)
        transcript = await client.read_resource(f"sandboxes://sessions/{session_id}/transcript")
        sys.stdout.write(getattr(transcript.contents[0], "text", "") + "\n")
    finally:
        await call(client, "stop_session", {"session_id": session_id})
    for failure in failures:
        sys.stderr.write(f"failed: {failure}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        code = anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8765/mcp")
    except Failed as exc:
        sys.stderr.write(f"failed: {exc}\n")
        code = 1
    sys.exit(code)
