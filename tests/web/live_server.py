"""A real server as a user runs it (`python -m mcp_sandboxes serve --transport http`, a subprocess
on a free loopback port) on the `process` provider with the `custom` backend running
tests/support/scripted_agent.py: real sessions in seconds, no Docker. Shared by tests/web and
tests/cli."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from tests.e2e.harness import McpSession, mcp_server, operator_token
from tests.orchestrator.spine import SCRIPTED_AGENT

# A turn of the scripted agent takes well under a second; this bounds each wait on one.
TURN_BUDGET_S = 30.0


@dataclass
class LiveServer:
    mcp: McpSession
    base_url: str  # http://127.0.0.1:PORT
    token: str
    environment: dict[str, str]

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    async def spawn(self, prompt: str, environment: str = "web") -> str:
        made = await self.mcp.call(
            "spawn_agent", {"environment": environment, "backend": "custom", "prompt": prompt, "wait": False}
        )
        session_id: str = made["session"]["session_id"]
        return session_id

    async def wait_for_event(self, session_id: str, text: str, type_: str = "agent.message") -> dict[str, Any]:
        cursor = 0
        with anyio.fail_after(TURN_BUDGET_S):
            while True:
                page = await self.mcp.call("read_events", {"session_id": session_id, "after": cursor, "wait_s": 10})
                for event in page["events"]:
                    if event["type"] == type_ and text in json.dumps(event["data"]):
                        return dict(event)
                cursor = page["next_cursor"]


def server_env(tmp_path: Path) -> dict[str, str]:
    agent = [sys.executable, str(SCRIPTED_AGENT), "--session", "{session}"]
    (tmp_path / "home").mkdir(exist_ok=True)
    return {
        "MCP_SANDBOXES_DATA_DIR": str(tmp_path / "data"),
        "MCP_SANDBOXES_DEFAULT_PROVIDER": "process",
        "MCP_SANDBOXES_DEFAULT_IMAGE": "host",
        "MCP_SANDBOXES_SANDBOX_HOME": str(tmp_path / "home"),
        # The process provider runs everything as the server's own user (root here).
        "MCP_SANDBOXES_SANDBOX_USER": "root",
        "MCP_SANDBOXES_PROVIDERS__PROCESS__STATE_DIR": str(tmp_path / "sandboxes"),
        "MCP_SANDBOXES_BACKENDS__CUSTOM__ARGV": json.dumps([*agent, "{prompt}"]),
        "MCP_SANDBOXES_BACKENDS__CUSTOM__RESUME_ARGV": json.dumps([*agent, "--resume", "{resume_id}", "{prompt}"]),
        "MCP_SANDBOXES_SUBAGENTS__MAX_DEPTH": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
    }


@asynccontextmanager
async def live_server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    environment = server_env(tmp_path)
    async with mcp_server("http", environment) as mcp:
        assert mcp.operator_url is not None
        await mcp.call("create_environment", {"name": "web", "provider": "process", "image": "host"})
        yield LiveServer(mcp, mcp.operator_url.removesuffix("/mcp"), operator_token(environment), environment)
