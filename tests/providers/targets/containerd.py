"""containerd through ctr, on the containerd dockerd starts, in our own namespace: the busybox
and base images, imported by scripts/import-images.sh. Memory and cpus are ctr flags, pids is
written into the container's cgroup; all three are proven."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.local.containerd import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    ContainerdProvider,
    image_reference,
)
from tests.providers.targets import ConformanceTarget
from tests.providers.targets.docker import BASE_IMAGE, BUSYBOX_IMAGE

ALL_LIMITS = frozenset({"memory", "cpus", "pids"})
PROBE_TIMEOUT_S = 15.0


def probe_containerd(image: str) -> str | None:
    """Why containerd cannot run `image` here, or None. Synchronous: runs at collection."""
    if shutil.which("ctr") is None:
        return "ctr is not installed: run scripts/setup-system.sh"
    if not Path(DEFAULT_ADDRESS).is_socket():
        return f"no containerd socket at {DEFAULT_ADDRESS}: run scripts/start-dockerd.sh"
    reference = image_reference(image)
    listed = subprocess.run(
        ["ctr", "-a", DEFAULT_ADDRESS, "-n", DEFAULT_NAMESPACE, "images", "list", "-q", f"name=={reference}"],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    if listed.returncode != 0:
        return f"ctr cannot list images: {listed.stderr.strip()}"
    if reference not in listed.stdout.split():
        return f"image {reference} is not in containerd namespace {DEFAULT_NAMESPACE}: run scripts/import-images.sh"
    return None


def _available(image: str) -> Callable[[], str | None]:
    return lambda: probe_containerd(image)


@asynccontextmanager
async def open_containerd() -> AsyncIterator[Provider]:
    provider = ContainerdProvider.from_settings({})
    try:
        yield provider
    finally:
        await provider.aclose()


TARGETS = [
    ConformanceTarget(
        name="containerd-busybox",
        open_provider=open_containerd,
        spec=SandboxSpec(image=BUSYBOX_IMAGE, workdir="/workspace"),
        enforces=ALL_LIMITS,
        available=_available(BUSYBOX_IMAGE),
    ),
    ConformanceTarget(
        name="containerd-base",
        open_provider=open_containerd,
        spec=SandboxSpec(image=BASE_IMAGE, workdir="/workspace", user="agent"),
        enforces=ALL_LIMITS,
        available=_available(BASE_IMAGE),
    ),
]
