"""Drives the real server through the `mcp` SDK's client, over stdio (a subprocess) or
streamable HTTP (a subprocess serving on a free loopback port)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
import httpx2
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

from tests.conftest import ROOT

Transport = Literal["stdio", "http"]
SERVER_START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 120.0


class ToolCallError(Exception):
    """The server answered a tool call with is_error; the message is the server's text."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class McpSession:
    def __init__(self, client: Client, transport: Transport, operator_url: str | None = None) -> None:
        self.client = client
        self.transport = transport
        # The HTTP endpoint the operator calls (None over stdio).
        self.operator_url = operator_url

    async def call(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        with anyio.fail_after(CALL_TIMEOUT_S):
            result: CallToolResult = await self.client.call_tool(name, arguments or {})
        if result.is_error:
            text = " ".join(block.text for block in result.content if isinstance(block, TextContent))
            raise ToolCallError(text)
        assert isinstance(result.structured_content, dict), f"{name} returned no structured content"
        return result.structured_content

    async def read_text(self, uri: str) -> str:
        result = await self.client.read_resource(uri)
        content = result.contents[0]
        text = getattr(content, "text", None)
        assert isinstance(text, str)
        return text

    async def events_until_idle(self, session_id: str, after: int = 0, budget_s: float = 120.0) -> list[dict[str, Any]]:
        """Long-poll read_events until a session.status_idle arrives (bounded in time and count)."""
        collected: list[dict[str, Any]] = []
        cursor = after
        with anyio.fail_after(budget_s):
            for _ in range(500):
                page = await self.call("read_events", {"session_id": session_id, "after": cursor, "wait_s": 20})
                collected.extend(page["events"])
                cursor = page["next_cursor"]
                if any(event["type"] == "session.status_idle" for event in page["events"]):
                    return collected
        raise AssertionError(f"no session.status_idle within 500 polls: {[e['type'] for e in collected]}")


def server_environment(
    data_dir: Path, model_url: str, claude_bin: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = {
        "MCP_SANDBOXES_DATA_DIR": str(data_dir),
        "MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH": str(claude_bin),
        "ANTHROPIC_BASE_URL": model_url,
        "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
        "PYTHONPATH": str(ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
    }
    env.update(extra or {})
    return env


@asynccontextmanager
async def mcp_server(
    transport: Transport,
    environment: dict[str, str],
    *,
    mode: str = "auto",
    message_handler: Any = None,
    elicitation_callback: Any = None,
) -> AsyncIterator[McpSession]:
    command = [sys.executable, "-m", "mcp_sandboxes", "serve", "--transport", transport]
    if transport == "stdio":
        params = StdioServerParameters(command=command[0], args=command[1:], env=environment, cwd=str(ROOT))
        async with Client(
            params, mode=mode, message_handler=message_handler, elicitation_callback=elicitation_callback
        ) as client:
            yield McpSession(client, transport)
        return
    port = free_port()
    process = await anyio.open_process(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=None,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        with anyio.fail_after(SERVER_START_TIMEOUT_S):
            while True:
                if process.returncode is not None:
                    raise AssertionError(f"HTTP server exited early with {process.returncode}")
                try:
                    async with httpx.AsyncClient() as probe:
                        await probe.get(f"http://127.0.0.1:{port}/", timeout=1.0)
                    break
                except httpx.TransportError:
                    await anyio.sleep(0.1)
        token = operator_token(environment)
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=CALL_TIMEOUT_S) as http,
            Client(
                streamable_http_client(url, http_client=http),
                mode=mode,
                message_handler=message_handler,
                elicitation_callback=elicitation_callback,
            ) as client,
        ):
            yield McpSession(client, transport, url)
    finally:
        with anyio.CancelScope(shield=True):
            process.terminate()
            with anyio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


def operator_token(environment: Mapping[str, str]) -> str:
    """The token the HTTP server requires of its operator: the configured one, or the one it made
    in its data directory at start-up."""
    configured = environment.get("MCP_SANDBOXES_AUTH_TOKEN")
    if configured:
        return configured
    return (Path(environment["MCP_SANDBOXES_DATA_DIR"]) / "operator-token").read_text("utf-8").strip()


def docker_json(*args: str) -> Any:
    out = subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=30).stdout
    return json.loads(out)


def container_exists(container_id: str) -> bool:
    result = subprocess.run(["docker", "inspect", container_id], capture_output=True, timeout=30)
    return result.returncode == 0


def owned_containers() -> set[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--no-trunc", "--filter", "label=io.mcp-sandboxes.managed"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return set(out.split())


def docker_exec(container_id: str, *argv: str) -> str:
    return subprocess.run(
        ["docker", "exec", container_id, *argv], check=True, capture_output=True, text=True, timeout=30
    ).stdout
