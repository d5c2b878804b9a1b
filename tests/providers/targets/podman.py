"""Podman through its Docker-compatible API service (scripts/start-podman.sh): the busybox and
base images, imported into Podman's store by scripts/import-images.sh. Podman applies the
same cgroup limits as Docker here (cgroup v1, cgroupfs manager), so all three are proven."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.local.podman import DEFAULT_SOCKET, PodmanProvider
from tests.providers.targets import ConformanceTarget
from tests.providers.targets.docker import BASE_IMAGE, BUSYBOX_IMAGE, _UnixHTTPConnection

ALL_LIMITS = frozenset({"memory", "cpus", "pids"})


def probe_podman(image: str) -> str | None:
    """Why the Podman service cannot run `image` here, or None. Synchronous: runs at collection."""
    connection = _UnixHTTPConnection(DEFAULT_SOCKET)
    try:
        connection.request("GET", "/_ping")
        if connection.getresponse().read() != b"OK":
            return f"the Podman service at {DEFAULT_SOCKET} does not answer /_ping: run scripts/start-podman.sh"
        connection.request("GET", f"/images/{urllib.parse.quote(image, safe='')}/json")
        response = connection.getresponse()
        response.read()
        if response.status == 404:
            return f"image {image} is not in Podman's store: run scripts/import-images.sh"
        if response.status != 200:
            return f"the Podman service failed to inspect {image} (HTTP {response.status})"
    except OSError as exc:
        return f"no Podman service at {DEFAULT_SOCKET} ({exc}): run scripts/start-podman.sh"
    finally:
        connection.close()
    return None


def _available(image: str) -> Callable[[], str | None]:
    return lambda: probe_podman(image)


@asynccontextmanager
async def open_podman() -> AsyncIterator[Provider]:
    provider = PodmanProvider.from_settings({})
    try:
        yield provider
    finally:
        await provider.aclose()


TARGETS = [
    ConformanceTarget(
        name="podman-busybox",
        open_provider=open_podman,
        spec=SandboxSpec(image=BUSYBOX_IMAGE, workdir="/workspace"),
        enforces=ALL_LIMITS,
        available=_available(BUSYBOX_IMAGE),
    ),
    ConformanceTarget(
        name="podman-base",
        open_provider=open_podman,
        spec=SandboxSpec(image=BASE_IMAGE, workdir="/workspace", user="agent"),
        enforces=ALL_LIMITS,
        available=_available(BASE_IMAGE),
    ),
]
