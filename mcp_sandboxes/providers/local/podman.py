"""Podman provider: the Docker provider, pointed at Podman's Docker-compatible API service.

`podman system service --time=0 unix:///run/mcp-sandboxes/podman.sock` serves the Docker
Engine API, so containers, execs, archives and labels work as in docker.py, which this
reuses whole; only the names in messages, the fixes they suggest and the default address
differ. scripts/start-podman.sh starts the service with the containers.conf it needs here
(default ulimits equal to the hard limits; podman's defaults are above them and runc cannot
raise them), and scripts/import-images.sh loads the project's images into Podman's own
store (`docker save | podman load`; podman names them localhost/<name>, and short names
resolve to them).

Settings (`[providers.podman]`): url (the service's socket), pull_missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError

from mcp_sandboxes.errors import ImageNotFoundError, InvalidInputError
from mcp_sandboxes.providers.base import Availability, SandboxSpec
from mcp_sandboxes.providers.local.docker import DockerProvider, DockerSettings

PROVIDER_NAME = "podman"
DEFAULT_SOCKET = "/run/mcp-sandboxes/podman.sock"
START_PODMAN_FIX = "start the Podman API service (scripts/start-podman.sh) or set providers.podman.url"
INSTALL_PODMAN_FIX = "install podman (scripts/setup-system.sh), then start its API service (scripts/start-podman.sh)"


class PodmanSettings(DockerSettings):
    url: str = Field(
        default=f"unix://{DEFAULT_SOCKET}",
        description="Address of `podman system service`, e.g. unix:///run/mcp-sandboxes/podman.sock.",
    )


class PodmanProvider(DockerProvider):
    """Creates and removes sandbox containers through one Podman API service."""

    name = PROVIDER_NAME
    engine = "Podman API service"
    start_fix = START_PODMAN_FIX
    stuck_fix = "check the service's log (podman system service), or restart it (scripts/start-podman.sh)"

    def __init__(self, settings: PodmanSettings | None = None) -> None:
        super().__init__(settings or PodmanSettings())

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> PodmanProvider:
        try:
            return cls(PodmanSettings.model_validate(dict(settings)))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise InvalidInputError(f"providers.podman.{field}", f"{first['msg']} (fix the config file)") from exc

    async def check(self) -> Availability:
        availability = await super().check()
        if availability.available or not self.url.startswith("unix://"):
            return availability
        if shutil.which("podman") is None:
            # A local socket nobody serves, on a host without podman: say what is really missing.
            return Availability(
                provider=self.name,
                available=False,
                reason=f"podman is not installed, so nothing serves {self.url}",
                fix=INSTALL_PODMAN_FIX,
            )
        return availability

    async def check_runtime(self, spec: SandboxSpec) -> None:
        if spec.runtime is not None:
            # Podman picks its runtime from containers.conf, not per container through the
            # Docker-compatible API; and runsc would meet the network namespace check that
            # fails here (see scripts/start-dockerd.sh).
            raise InvalidInputError(
                "runtime", "the podman provider cannot choose an OCI runtime per sandbox; remove it, or use docker"
            )

    def image_missing(self, image: str) -> ImageNotFoundError:
        return ImageNotFoundError(
            f"image {image!r} does not exist in Podman's store (service at {self.url}); Podman keeps its own"
            " images: import the project's (scripts/import-images.sh, or `docker save IMAGE | podman load`),"
            " or set providers.podman.pull_missing = true to pull it from a registry"
        )
