"""Any image runs agents as an unprivileged user: where the image lacks the sandbox user, the
Docker provider adds it (useradd, or /etc/passwd lines where the image has no useradd), with a
HOME of its own and the engine-made workdir handed to it. Real Docker, real images."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers.base import Sandbox, SandboxSpec
from mcp_sandboxes.providers.local.docker import DockerProvider
from tests.conftest import BUSYBOX_IMAGE
from tests.e2e.harness import owned_containers

pytestmark = pytest.mark.docker

DEBIAN_IMAGE = "mcp-sandboxes/debian:bookworm"
STEP_S = 60.0


@pytest.fixture
async def docker(docker_available: None) -> AsyncIterator[DockerProvider]:
    opened = DockerProvider.from_settings({})
    try:
        yield opened
    finally:
        await opened.aclose()


@asynccontextmanager
async def sandbox_of(provider: DockerProvider, spec: SandboxSpec) -> AsyncIterator[Sandbox]:
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        yield sandbox
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


async def sh(sandbox: Sandbox, script: str, *, user: str | None = None) -> str:
    with anyio.fail_after(STEP_S):
        result = await sandbox.exec(["sh", "-c", script], user=user)
    assert result.ok, (result.stdout + result.stderr).decode()
    return result.stdout.decode().strip()


async def test_a_plain_debian_image_gets_the_agent_user_its_home_and_the_workdir(docker: DockerProvider) -> None:
    spec = SandboxSpec(image=DEBIAN_IMAGE, user="agent", workdir="/workspace")
    async with sandbox_of(docker, spec) as sandbox:
        # Commands run as the new user by default, in a workdir it owns, with a HOME of its own.
        assert await sh(sandbox, "id -un; pwd; touch made-here && stat -c %U made-here") == "agent\n/workspace\nagent"
        assert await sh(sandbox, 'stat -c "%U %a" /home/agent') in ("agent 755", "agent 750", "agent 700")
        assert int(await sh(sandbox, "id -u")) >= 1000
        await sandbox.put_file("/home/agent/.config/x.json", b"{}")
        assert await sh(sandbox, "stat -c %U /home/agent/.config/x.json") == "agent"


async def test_an_image_without_useradd_gets_the_user_from_passwd_lines(docker: DockerProvider) -> None:
    spec = SandboxSpec(image=BUSYBOX_IMAGE, user="builder", workdir="/srv/work")
    async with sandbox_of(docker, spec) as sandbox:
        assert await sh(sandbox, "command -v useradd || echo none") == "none"
        assert await sh(sandbox, "id -un; pwd; touch f && ls -ln f | awk '{print $3}'") == (
            f"builder\n/srv/work\n{await sh(sandbox, 'id -u builder')}"
        )
        # Its uid is its own: not root's, not the image's existing agent's.
        assert await sh(sandbox, "id -u builder") not in ("0", await sh(sandbox, "id -u agent"))
        assert await sh(sandbox, "stat -c %U /home/builder") == "builder"


async def test_an_image_that_has_the_user_is_left_as_it_is(docker: DockerProvider) -> None:
    async with sandbox_of(docker, SandboxSpec(image=BUSYBOX_IMAGE, user="agent")) as sandbox:
        assert await sh(sandbox, "grep -c '^agent:' /etc/passwd") == "1"


async def test_a_user_that_cannot_be_added_is_refused_clearly_and_nothing_is_left(docker: DockerProvider) -> None:
    before = owned_containers()
    with pytest.raises(InvalidInputError) as read_only:
        await docker.create(SandboxSpec(image=DEBIAN_IMAGE, user="agent", read_only_root=True))
    assert read_only.value.field == "image" and "read_only_root" in str(read_only.value)
    with pytest.raises(InvalidInputError) as bad_name:
        await docker.create(SandboxSpec(image=DEBIAN_IMAGE, user="Not.A-Name"))
    assert bad_name.value.field == "user"
    assert owned_containers() == before
