"""Shared fixtures: paths to the project's installed parts, and the Docker engine check."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

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


ALLOW_UNAVAILABLE = "MCP_SANDBOXES_ALLOW_UNAVAILABLE"


def unavailable(reason: str) -> NoReturn:
    """A part a test needs cannot run here: that fails the test, unless the developer set
    MCP_SANDBOXES_ALLOW_UNAVAILABLE=1 to skip such tests on a partial machine (CI never does)."""
    if os.environ.get(ALLOW_UNAVAILABLE) == "1":
        pytest.skip(reason)
    pytest.fail(f"{reason} (set {ALLOW_UNAVAILABLE}=1 to skip instead)")


@pytest.fixture(scope="session")
def docker_available() -> None:
    if shutil.which("docker") is None or not Path("/var/run/docker.sock").exists():
        unavailable("no Docker engine: run scripts/setup.sh (scripts/test does it)")
