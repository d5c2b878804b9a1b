"""Docker on the local engine: the tiny busybox image and the Debian base image."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.local.docker import DockerProvider, resolve_docker_url
from tests.providers.targets import ConformanceTarget

BUSYBOX_IMAGE = "mcp-sandboxes/busybox:latest"
BASE_IMAGE = "mcp-sandboxes/base:latest"
PROBE_TIMEOUT_S = 5.0


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str) -> None:
        super().__init__("localhost", timeout=PROBE_TIMEOUT_S)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(PROBE_TIMEOUT_S)
        sock.connect(self._socket_path)
        self.sock = sock


def _probe(image: str) -> str | None:
    """Why the engine cannot run `image` here, or None. Synchronous: runs at collection."""
    url = resolve_docker_url("")
    if not url.startswith("unix://"):
        return None  # a remote engine: let the tests themselves find out
    connection = _UnixHTTPConnection(url.removeprefix("unix://"))
    try:
        connection.request("GET", "/_ping")
        if connection.getresponse().read() != b"OK":
            return f"the Docker engine at {url} does not answer /_ping: run scripts/start-dockerd.sh"
        connection.request("GET", f"/images/{urllib.parse.quote(image, safe='')}/json")
        response = connection.getresponse()
        body = response.read()
        if response.status == 404:
            return f"image {image} is missing: run scripts/build-images.sh"
        if response.status != 200:
            return f"the Docker engine at {url} failed to inspect {image}: {json.loads(body).get('message', body)!r}"
    except OSError as exc:
        return f"no Docker engine at {url} ({exc}): run scripts/setup.sh (it starts dockerd)"
    finally:
        connection.close()
    return None


def _available(image: str) -> Callable[[], str | None]:
    return lambda: _probe(image)


@asynccontextmanager
async def open_docker() -> AsyncIterator[Provider]:
    provider = DockerProvider.from_settings({})
    try:
        yield provider
    finally:
        await provider.aclose()


ALL_LIMITS = frozenset({"memory", "cpus", "pids"})

TARGETS = [
    ConformanceTarget(
        name="docker-busybox",
        open_provider=open_docker,
        spec=SandboxSpec(image=BUSYBOX_IMAGE, workdir="/workspace"),
        enforces=ALL_LIMITS,
        available=_available(BUSYBOX_IMAGE),
    ),
    ConformanceTarget(
        # The image agents really run in, as its unprivileged user.
        name="docker-base",
        open_provider=open_docker,
        spec=SandboxSpec(image=BASE_IMAGE, workdir="/workspace", user="agent"),
        enforces=ALL_LIMITS,
        available=_available(BASE_IMAGE),
    ),
]
