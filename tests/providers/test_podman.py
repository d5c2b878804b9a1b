"""Podman provider specifics, against the real Podman API service (scripts/start-podman.sh):
what a missing service, a missing podman or a missing image says, that failures leave
nothing behind, and that the service's containers.conf solved the rlimit start failure."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.errors import ImageNotFoundError, InvalidInputError, ProviderUnavailableError
from mcp_sandboxes.providers.base import SandboxSpec
from mcp_sandboxes.providers.local.podman import DEFAULT_SOCKET, PodmanProvider
from mcp_sandboxes.providers.registry import build_provider
from tests.conftest import BUSYBOX_IMAGE, unavailable
from tests.providers.targets.podman import probe_podman

STEP_S = 30.0
TEST_LABEL = "io.mcp-sandboxes.test-run"
MISSING_IMAGE = "mcp-sandboxes/does-not-exist:latest"
SERVICE_CONF = Path(DEFAULT_SOCKET).parent / "podman-containers.conf"


@pytest.fixture
async def provider() -> AsyncIterator[PodmanProvider]:
    reason = probe_podman(BUSYBOX_IMAGE)
    if reason is not None:
        unavailable(reason)
    opened = PodmanProvider.from_settings({})
    try:
        yield opened
    finally:
        await opened.aclose()


def tagged_spec(**changes: object) -> tuple[SandboxSpec, str]:
    token = uuid.uuid4().hex
    spec = SandboxSpec(image=BUSYBOX_IMAGE, labels={TEST_LABEL: token})
    return spec.model_copy(update=changes), token


async def containers_tagged(provider: PodmanProvider, token: str) -> list[str]:
    with anyio.fail_after(STEP_S):
        found = await provider.client().containers.list(all=True, filters={"label": [f"{TEST_LABEL}={token}"]})
    return [str(container.id) for container in found]


async def test_a_service_that_is_not_running_is_reported_with_its_address_and_the_fix(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/no-podman.sock"
    provider = build_provider("podman", {"url": url})
    try:
        assert provider.name == "podman"
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
            assert not availability.available
            assert availability.reason is not None and url in availability.reason
            assert "Podman API service" in availability.reason
            assert availability.fix is not None and "scripts/start-podman.sh" in availability.fix
            with pytest.raises(ProviderUnavailableError) as raised:
                await provider.create(SandboxSpec(image=BUSYBOX_IMAGE))
        message = str(raised.value)
        assert url in message and "scripts/start-podman.sh" in message and "providers.podman.url" in message
        # aiodocker's own cause text may say "Docker Engine"; the fix must not point at dockerd.
        assert "start-dockerd" not in message and "providers.docker" not in message
    finally:
        await provider.aclose()


async def test_without_podman_installed_check_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PATH without podman on it: what a host without the package looks like to the provider.
    monkeypatch.setenv("PATH", str(tmp_path))
    provider = PodmanProvider.from_settings({"url": f"unix://{tmp_path}/no-podman.sock"})
    try:
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
        assert not availability.available
        assert availability.reason is not None and "podman is not installed" in availability.reason
        assert availability.fix is not None and "scripts/setup-system.sh" in availability.fix
    finally:
        await provider.aclose()


def test_bad_settings_name_the_podman_setting() -> None:
    with pytest.raises(InvalidInputError) as raised:
        PodmanProvider.from_settings({"url": "unix:///x", "no_such_setting": 1})
    assert raised.value.field == "providers.podman.no_such_setting"


async def test_a_missing_image_names_podmans_store_and_the_import_and_leaves_nothing(provider: PodmanProvider) -> None:
    spec, token = tagged_spec(image=MISSING_IMAGE)
    with anyio.fail_after(STEP_S), pytest.raises(ImageNotFoundError) as raised:
        await provider.create(spec)
    message = str(raised.value)
    assert MISSING_IMAGE in message and "Podman" in message and "scripts/import-images.sh" in message
    assert await containers_tagged(provider, token) == []
    with anyio.fail_after(STEP_S), pytest.raises(ImageNotFoundError, match=MISSING_IMAGE):
        await provider.validate_spec(spec)


async def test_a_user_missing_from_the_image_fails_create_and_leaves_nothing(provider: PodmanProvider) -> None:
    # A missing user with a usable name is added; one the server cannot add is refused.
    spec, token = tagged_spec(user="NoSuchUser")
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError) as raised:
        await provider.create(spec)
    assert raised.value.field == "user"
    assert await containers_tagged(provider, token) == []


async def test_sandboxes_run_under_the_services_ulimits_and_say_podman(provider: PodmanProvider) -> None:
    """Podman's default ulimits are above this machine's hard limits and runc cannot raise
    them; start-podman.sh's containers.conf sets them to the limits the service runs with."""
    conf = await anyio.Path(SERVICE_CONF).read_text()
    configured = dict(re.findall(r'"(nofile|nproc)=(\d+):\d+"', conf))
    assert set(configured) == {"nofile", "nproc"}, conf
    spec, _ = tagged_spec()
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        assert sandbox.provider == "podman"
        with anyio.fail_after(STEP_S):
            result = await sandbox.exec(["sh", "-c", "ulimit -n; ulimit -u"])
            assert sandbox.id in await provider.list_owned()
        assert result.ok, result
        assert result.stdout.decode().split() == [configured["nofile"], configured["nproc"]]
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)
    with anyio.fail_after(STEP_S):
        assert await provider.attach(sandbox.id) is None
