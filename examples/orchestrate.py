"""A Python MCP client orchestrating a sub-agent: create an environment, spawn Claude Code in
Docker, follow its events, continue the conversation, print the transcript, stop it.

Run against a server started with `scripts/serve --transport http --port 8765`:
    .venv/bin/python examples/orchestrate.py http://127.0.0.1:8765/mcp
The server requires its operator token: MCP_SANDBOXES_AUTH_TOKEN when set, else the one it keeps in
its data directory (`mcp-sandboxes token` prints it), which this example reads the same way.
"""

from __future__ import annotations

import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_sandboxes.config import load_settings


def operator_token() -> str:
    server = load_settings().server
    return server.auth_token or server.operator_token_path.read_text("utf-8").strip()


async def main(url: str) -> None:
    headers = {"Authorization": f"Bearer {operator_token()}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        await client.call_tool(
            "create_environment", {"name": "example", "image": "mcp-sandboxes/base:latest", "network": "host"}
        )
        spawned = await client.call_tool(
            "spawn_agent",
            {
                "environment": "example",
                "prompt": "Create hello.py that prints hello",
                "permission_mode": "bypassPermissions",
            },
        )
        assert isinstance(spawned.structured_content, dict)
        session_id = spawned.structured_content["session"]["session_id"]
        cursor = 0
        while True:
            page = await client.call_tool("read_events", {"session_id": session_id, "after": cursor, "wait_s": 30})
            assert isinstance(page.structured_content, dict)
            for event in page.structured_content["events"]:
                sys.stdout.write(f"{event['seq']:>4} {event['type']}\n")
            cursor = page.structured_content["next_cursor"]
            if any(e["type"] == "session.status_idle" for e in page.structured_content["events"]):
                break
        await client.call_tool("send_message", {"session_id": session_id, "text": "Now run it", "wait": True})
        transcript = await client.read_resource(f"sandboxes://sessions/{session_id}/transcript")
        sys.stdout.write(getattr(transcript.contents[0], "text", "") + "\n")
        await client.call_tool("stop_session", {"session_id": session_id})
        await client.call_tool("delete_environment", {"environment": "example"})


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8765/mcp")
