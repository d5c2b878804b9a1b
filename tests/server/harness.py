"""The real MCP server, in-process: a real Orchestrator on a SQLite file under the test's tmp
dir, its tools registered by build_server, called through the `mcp` SDK's own Client (an
in-memory client/server pair, so each call is the SDK's whole request path without a
subprocess). Agents are the `custom` backend running `sh` on the `process` provider (host
processes, no Docker), unless a test picks another provider."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp_types import CallToolResult, TextContent

from mcp_sandboxes.config import Settings, load_settings
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.server.app import build_server

CALL_TIMEOUT_S = 60.0
# Every wait a call may do is capped low, so that no value a fuzzer picks stalls the run.
MAX_WAIT_S = 1.0
SDK_PREFIX = "Error executing tool "


def server_settings(tmp_path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    values = {
        "MCP_SANDBOXES_DATA_DIR": str(tmp_path / "data"),
        "MCP_SANDBOXES_DEFAULT_PROVIDER": "process",
        "MCP_SANDBOXES_DEFAULT_IMAGE": "host",
        "MCP_SANDBOXES_SANDBOX_HOME": str(tmp_path / "home"),
        "MCP_SANDBOXES_PROVIDERS__PROCESS__STATE_DIR": str(tmp_path / "sandboxes"),
        # The agent: reads its prompt on stdin, prints one line, ends the turn.
        "MCP_SANDBOXES_BACKENDS__CUSTOM__ARGV": json.dumps(["sh", "-c", "cat >/dev/null; echo done"]),
        "MCP_SANDBOXES_BACKENDS__CUSTOM__PROMPT_VIA": "stdin",
        "MCP_SANDBOXES_BACKENDS__CUSTOM__OUTPUT": "text",
        "MCP_SANDBOXES_SUBAGENTS__MAX_DEPTH": "0",
        "MCP_SANDBOXES_SERVER__MAX_WAIT_S": str(MAX_WAIT_S),
        "MCP_SANDBOXES_SERVER__MAX_CALL_S": str(MAX_WAIT_S),
        **(environ or {}),
    }
    settings = load_settings(environ=values)
    # The process provider runs as the server's own user: no sandbox user to switch to.
    return settings.model_copy(update={"server": settings.server.model_copy(update={"sandbox_user": None})})


class ToolCallError(Exception):
    """The server answered with is_error; the message is the text the client got."""


@dataclass
class ServerUnderTest:
    client: Client
    settings: Settings

    @property
    def database(self) -> Path:
        return self.settings.database_path

    async def raw_call(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        with anyio.fail_after(CALL_TIMEOUT_S):
            return await self.client.call_tool(name, arguments)

    async def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = await self.raw_call(name, arguments)
        if result.is_error:
            raise ToolCallError(error_text(result))
        assert isinstance(result.structured_content, dict), f"{name} returned no structured content"
        return result.structured_content

    async def refused(self, name: str, arguments: dict[str, Any]) -> str:
        """Calls a tool that must refuse; returns the refusal without the SDK's prefix."""
        result = await self.raw_call(name, arguments)
        assert result.is_error, f"{name} accepted {short(arguments)}: {result.structured_content}"
        return without_prefix(name, error_text(result))

    def rows(self, table: str) -> int:
        with sqlite3.connect(self.database) as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def sandbox_dirs(self) -> set[str]:
        state = Path(self.settings.provider("process")["state_dir"])
        return {entry.name for entry in state.iterdir()} if state.exists() else set()


def error_text(result: CallToolResult) -> str:
    return " ".join(block.text for block in result.content if isinstance(block, TextContent))


def without_prefix(name: str, text: str) -> str:
    prefix = f"{SDK_PREFIX}{name}: "
    assert text.startswith(prefix), f"not a tool error of ours: {text[:300]!r}"
    return text[len(prefix) :]


def short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# What no refusal may contain: pydantic's raw text, its docs URL, the input echoed, a traceback.
OPAQUE = re.compile(
    r"errors\.pydantic\.dev|input_value=|input_type=|validation errors? for |Traceback|failed unexpectedly"
)


def assert_clear(name: str, body: str, fields: list[str]) -> None:
    """A refusal a caller can act on: it starts with the field at fault (or with 'invalid
    arguments: field'), says what is wrong and is short (no echo of a huge value)."""
    assert not OPAQUE.search(body), f"{name}: opaque error {body[:500]!r}"
    assert len(body) < 4000, f"{name}: a {len(body)}-character error (an echo?): {body[:300]!r}"
    first = body.removeprefix("invalid arguments: ")
    if re.match(r'(""|[^:]{1,70}): is not an argument of this tool', first):
        return  # an unknown argument is itself what is named
    field = re.match(r"[A-Za-z_][A-Za-z0-9_]*", first)
    assert field is not None and first[field.end() :][:1] in (":", ".", "["), f"{name}: no field named: {body[:300]!r}"
    known = {*fields, "environment", "session_id", "provider", "image", "name", "cpus"}
    assert field.group(0) in known, f"{name}: {body[:300]!r}"


@asynccontextmanager
async def running_server(tmp_path: Path, environ: Mapping[str, str] | None = None) -> AsyncIterator[ServerUnderTest]:
    settings = server_settings(tmp_path, environ)
    # An empty environment: nothing of the test runner's own is handed to agents.
    async with Orchestrator(settings, environ={}).running() as orchestrator:
        server, _ = build_server(orchestrator)
        async with Client(server) as client:
            yield ServerUnderTest(client, settings)


def owned_containers() -> set[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--no-trunc", "--filter", "label=io.mcp-sandboxes.managed"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return set(out.split())


def docker_cpu_count() -> int:
    out = subprocess.run(
        ["docker", "info", "--format", "{{.NCPU}}"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return int(out.strip())
