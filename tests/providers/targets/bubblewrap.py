"""Bubblewrap: the host's own /usr as root (as root), and the debootstrap tree that
scripts/build-images.sh makes (as the unprivileged `agent`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.local._bwrap_limits import probe_limiter
from mcp_sandboxes.providers.local.bubblewrap import BubblewrapProvider
from tests.conftest import ROOT
from tests.providers.targets import ConformanceTarget

ROOTFS = ROOT / ".cache" / "rootfs-bookworm"
ROOTFS_IMAGE = "mcp-sandboxes/base:latest"


def _bwrap_missing() -> str | None:
    if shutil.which("bwrap") is None:
        return "bwrap is not installed: run scripts/setup-system.sh"
    return None


def _rootfs_missing() -> str | None:
    if not (ROOTFS / "bin").exists():
        return f"{ROOTFS} is missing: run scripts/build-images.sh"
    return _bwrap_missing()


def open_bubblewrap(settings: dict[str, object]) -> Callable[[], AbstractAsyncContextManager[Provider]]:
    @asynccontextmanager
    async def opened() -> AsyncIterator[Provider]:
        state = Path(tempfile.mkdtemp(prefix="mcp-sbx-bwrap-"))
        provider = BubblewrapProvider.from_settings({**settings, "state_dir": str(state)})
        try:
            yield provider
        finally:
            await provider.aclose()
            shutil.rmtree(state, ignore_errors=True)

    return opened


# What this host lets us enforce (cgroup v1 on this project's machines: all three).
ENFORCED = probe_limiter().enforces

TARGETS = [
    ConformanceTarget(
        name="bubblewrap-host",
        open_provider=open_bubblewrap({}),
        spec=SandboxSpec(image="host", workdir="/workspace"),
        enforces=ENFORCED,
        available=_bwrap_missing,
    ),
    ConformanceTarget(
        name="bubblewrap-rootfs",
        open_provider=open_bubblewrap({"images": {ROOTFS_IMAGE: str(ROOTFS)}}),
        spec=SandboxSpec(image=ROOTFS_IMAGE, workdir="/workspace", user="agent"),
        enforces=ENFORCED,
        available=_rootfs_missing,
    ),
]
