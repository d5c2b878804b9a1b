"""The process provider (no isolation), with a host directory as the shared workdir: `pwd`
must print spec.workdir, which only a real host path can do without a sandbox."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.local.process import ProcessProvider
from tests.providers.targets import ConformanceTarget

# Per test process: made by each provider's context and removed with it.
WORKDIR = Path(tempfile.gettempdir()) / f"mcp-sandboxes-process-conformance-{os.getpid()}"


@asynccontextmanager
async def open_process() -> AsyncIterator[Provider]:
    state = Path(tempfile.mkdtemp(prefix="mcp-sbx-process-"))
    WORKDIR.mkdir(exist_ok=True)
    provider = ProcessProvider.from_settings({"state_dir": str(state)})
    try:
        yield provider
    finally:
        await provider.aclose()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(WORKDIR, ignore_errors=True)


TARGETS = [
    ConformanceTarget(
        name="process",
        open_provider=open_process,
        spec=SandboxSpec(image="host", workdir=str(WORKDIR)),
        enforces=frozenset(),
    ),
]
