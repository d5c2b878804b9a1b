"""Apple `container` against the recorded-behaviour CLI stand-in
(tests/contract_servers/apple_container_cli.py), passed as the provider's cli_path."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.remote.apple import AppleContainerProvider
from tests.contract_servers.sandbox_host import bwrap_available
from tests.providers.targets import ConformanceTarget

CLI = Path(__file__).resolve().parents[2] / "contract_servers" / "apple_container_cli.py"
STATE_ENV = "APPLE_CONTAINER_STANDIN_STATE"


@asynccontextmanager
async def open_apple() -> AsyncIterator[Provider]:
    state = tempfile.mkdtemp(prefix="apple-standin-")
    previous = os.environ.get(STATE_ENV)
    os.environ[STATE_ENV] = state
    # A `container` executable that runs the stand-in with this interpreter (it imports anyio).
    launcher = Path(state) / "bin" / "container"
    launcher.parent.mkdir()
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} {CLI} "$@"\n')
    launcher.chmod(0o755)
    provider = AppleContainerProvider({"cli_path": str(launcher)})
    try:
        yield provider
    finally:
        for sandbox_id in await provider.list_owned():
            await provider.destroy(sandbox_id)
        await provider.aclose()
        if previous is None:
            os.environ.pop(STATE_ENV, None)
        else:
            os.environ[STATE_ENV] = previous
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(state, ignore_errors=True))


TARGETS = [
    ConformanceTarget(
        name="apple",
        open_provider=open_apple,
        spec=SandboxSpec(image="mcp-sandboxes/debian:bookworm"),
        available=bwrap_available,
    )
]
