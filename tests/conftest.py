"""Shared fixtures: paths to the project's installed parts, and the Docker engine check."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT_CLIS = ROOT / "tools" / "agent-clis" / "node_modules"
CLAUDE_BIN = AGENT_CLIS / "@anthropic-ai" / "claude-code" / "bin" / "claude.exe"
BASE_IMAGE = "mcp-sandboxes/base:latest"
BUSYBOX_IMAGE = "mcp-sandboxes/busybox:latest"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def claude_bin() -> Path:
    if not CLAUDE_BIN.exists():
        pytest.fail(f"{CLAUDE_BIN} is missing: run scripts/install-agent-clis.sh (scripts/test does it)")
    return CLAUDE_BIN


@pytest.fixture(scope="session")
def docker_available() -> None:
    if shutil.which("docker") is None or not Path("/var/run/docker.sock").exists():
        if os.environ.get("MCP_SANDBOXES_ALLOW_UNAVAILABLE") == "1":
            pytest.skip("no Docker engine")
        pytest.fail("no Docker engine: run scripts/setup.sh (scripts/test does it)")
