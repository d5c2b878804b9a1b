"""Docker provider failures: each names the problem and the fix, and leaves nothing behind."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from pydantic import ValidationError

from mcp_sandboxes.errors import (
    ConflictError,
    ImageNotFoundError,
    InvalidInputError,
    ProviderError,
    ProviderUnavailableError,
)
from mcp_sandboxes.providers.base import OWNER_LABEL, Mount, ResourceLimits, SandboxSpec
from mcp_sandboxes.providers.local.docker import DockerProvider
from mcp_sandboxes.providers.registry import build_provider
from tests.conftest import BUSYBOX_IMAGE

STEP_S = 30.0
TEST_LABEL = "io.mcp-sandboxes.test-run"
MISSING_IMAGE = "mcp-sandboxes/does-not-exist:latest"


@pytest.fixture
async def provider(docker_available: None) -> AsyncIterator[DockerProvider]:
    opened = DockerProvider.from_settings({})
    try:
        yield opened
    finally:
        await opened.aclose()


def tagged_spec(**changes: object) -> tuple[SandboxSpec, str]:
    """A busybox spec carrying a label unique to this test, so leftovers are found exactly
    (other tests may create and remove sandboxes on the same engine meanwhile)."""
    token = uuid.uuid4().hex
    spec = SandboxSpec(image=BUSYBOX_IMAGE, labels={TEST_LABEL: token})
    return spec.model_copy(update=changes), token


async def containers_tagged(provider: DockerProvider, token: str) -> list[str]:
    with anyio.fail_after(STEP_S):
        found = await provider.client().containers.list(all=True, filters={"label": [f"{TEST_LABEL}={token}"]})
    return [str(container.id) for container in found]


# -- engine unreachable -----------------------------------------------------------------


async def test_an_unreachable_engine_is_reported_with_its_address_and_the_fix(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/no-such-docker.sock"
    provider = build_provider("docker", {"url": url})
    try:
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
            assert not availability.available
            assert availability.reason is not None and url in availability.reason
            assert availability.fix is not None and "scripts/start-dockerd.sh" in availability.fix
            with pytest.raises(ProviderUnavailableError) as raised:
                await provider.create(SandboxSpec(image=BUSYBOX_IMAGE))
            message = str(raised.value)
            assert url in message
            assert "scripts/start-dockerd.sh" in message and "providers.docker.url" in message
            with pytest.raises(ProviderUnavailableError):
                await provider.list_owned()
            with pytest.raises(ProviderUnavailableError):
                await provider.attach("0123456789ab")
            with pytest.raises(ProviderUnavailableError):
                await provider.destroy("0123456789ab")
    finally:
        await provider.aclose()


async def test_docker_host_is_used_when_no_url_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"unix://{tmp_path}/from-docker-host.sock"
    monkeypatch.setenv("DOCKER_HOST", url)
    provider = DockerProvider.from_settings({"url": ""})
    try:
        assert provider.url == url
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
        assert not availability.available
        assert availability.reason is not None and url in availability.reason
    finally:
        await provider.aclose()


async def test_a_closed_provider_refuses_further_use(provider: DockerProvider) -> None:
    await provider.aclose()
    with pytest.raises(ProviderError, match="closed"):
        await provider.list_owned()


# -- images -----------------------------------------------------------------------------


async def test_a_missing_image_names_the_image_and_how_to_build_it_and_leaves_nothing(
    provider: DockerProvider,
) -> None:
    spec, token = tagged_spec(image=MISSING_IMAGE)
    assert await containers_tagged(provider, token) == []
    with anyio.fail_after(STEP_S), pytest.raises(ImageNotFoundError) as raised:
        await provider.create(spec)
    message = str(raised.value)
    assert MISSING_IMAGE in message
    assert "scripts/build-images.sh" in message
    assert "pull_missing" in message
    assert await containers_tagged(provider, token) == []
    with anyio.fail_after(STEP_S), pytest.raises(ImageNotFoundError, match=MISSING_IMAGE):
        await provider.validate_spec(spec)


async def test_validate_spec_accepts_a_present_image(provider: DockerProvider) -> None:
    with anyio.fail_after(STEP_S):
        await provider.validate_spec(SandboxSpec(image=BUSYBOX_IMAGE))


# -- failures after the container exists ------------------------------------------------


async def test_a_user_missing_from_the_image_fails_create_and_leaves_nothing(provider: DockerProvider) -> None:
    # A missing user with a usable name is added (tests/providers/test_any_image.py); one the
    # server cannot add is refused.
    spec, token = tagged_spec(user="NoSuchUser")
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match="NoSuchUser") as raised:
        await provider.create(spec)
    assert raised.value.field == "user"
    assert await containers_tagged(provider, token) == []


async def test_a_missing_mount_source_fails_create_naming_the_mount(provider: DockerProvider, tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    spec, token = tagged_spec(mounts=[Mount(source=str(missing), target="/mnt/data")])
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match="not-there") as raised:
        await provider.create(spec)
    assert raised.value.field == "mounts[0].source"
    assert await containers_tagged(provider, token) == []


async def test_a_taken_name_is_a_conflict_and_the_first_sandbox_survives(provider: DockerProvider) -> None:
    name = f"mcp-sandboxes-test-{uuid.uuid4().hex[:12]}"
    spec, token = tagged_spec(name=name)
    with anyio.fail_after(STEP_S):
        first = await provider.create(spec)
    try:
        with anyio.fail_after(STEP_S):
            with pytest.raises(ConflictError, match=name):
                await provider.create(spec)
            assert (await first.exec(["echo", "still here"])).stdout == b"still here\n"
            assert await containers_tagged(provider, token) == [first.id]
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(first.id)


async def test_a_cancelled_create_leaves_nothing_behind(provider: DockerProvider) -> None:
    # Cancel at several points of create (request in flight, container made, starting);
    # whichever step was cut short, the shielded cleanup removes what was made.
    for delay in (0.005, 0.02, 0.05, 0.1, 0.15):
        spec, token = tagged_spec()
        finished = None
        with anyio.move_on_after(delay):
            finished = await provider.create(spec)
        if finished is not None:  # quicker than the deadline: an ordinary sandbox
            with anyio.fail_after(STEP_S):
                await provider.destroy(finished.id)
        assert await containers_tagged(provider, token) == [], f"leftover after cancelling at {delay}s"


async def test_destroy_refuses_a_container_it_does_not_own(provider: DockerProvider) -> None:
    client = provider.client()
    with anyio.fail_after(STEP_S):
        foreign = await client.containers.create(
            {"Image": BUSYBOX_IMAGE, "Cmd": ["sleep", "600"], "HostConfig": {"NetworkMode": "none"}}
        )
    try:
        with anyio.fail_after(STEP_S):
            with pytest.raises(ConflictError, match="not managed"):
                await provider.destroy(foreign.id)
            assert await provider.attach(foreign.id) is None
            assert foreign.id not in await provider.list_owned()
            assert (await client.containers.get(foreign.id))["Id"] == foreign.id
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await foreign.delete(force=True)


# -- bad values, rejected before the engine is asked -------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"workdir": "relative/dir"}, "workdir"),
        ({"env": {"BAD=KEY": "x"}}, "env.BAD=KEY"),
        ({"env": {"": "x"}}, "env."),
        ({"name": "bad name!"}, "name"),
        ({"image": "has space:latest"}, "image"),
        ({"user": "  "}, "user"),
        ({"mounts": [Mount(source="relative", target="/mnt")]}, "mounts[0].source"),
        ({"mounts": [Mount(source="/tmp", target="mnt")]}, "mounts[0].target"),
    ],
    ids=["relative-workdir", "env-key-with-equals", "empty-env-key", "bad-name", "bad-image", "blank-user",
         "relative-mount-source", "relative-mount-target"],
)  # fmt: skip
async def test_bad_spec_values_are_rejected_naming_the_field(
    provider: DockerProvider, changes: dict[str, object], field: str
) -> None:
    spec, token = tagged_spec(**changes)
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError) as raised:
        await provider.create(spec)
    assert raised.value.field == field
    assert await containers_tagged(provider, token) == []


def test_out_of_range_limits_are_rejected_by_the_spec() -> None:
    with pytest.raises(ValidationError):
        ResourceLimits(memory_mb=1)
    with pytest.raises(ValidationError):
        ResourceLimits(pids=0)
    with pytest.raises(ValidationError):
        ResourceLimits(cpus=0)


@pytest.mark.parametrize(
    ("settings", "field"),
    [({"urll": "unix:///x"}, "providers.docker.urll"), ({"pull_missing": "maybe"}, "providers.docker.pull_missing")],
)
def test_bad_settings_are_rejected_naming_the_setting(settings: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        DockerProvider.from_settings(settings)
    assert raised.value.field == field


async def test_bad_exec_and_file_arguments_are_rejected_naming_the_argument(provider: DockerProvider) -> None:
    spec, _ = tagged_spec()
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        with anyio.fail_after(STEP_S):
            calls: list[tuple[Callable[[], Awaitable[object]], str]] = [
                (lambda: sandbox.exec([]), "argv"),
                (lambda: sandbox.exec(["pwd"], cwd="relative"), "cwd"),
                (lambda: sandbox.exec(["env"], env={"A=B": "c"}), "env.A=B"),
                (lambda: sandbox.put_file("relative.txt", b"x"), "path"),
                (lambda: sandbox.put_file("/workspace/", b"x"), "path"),
                (lambda: sandbox.get_file("/workspace"), "path"),  # a directory
                (lambda: sandbox.put_file("/workspace/x", b"x", user="nosuchuser"), "user"),
            ]
            for call, field in calls:
                with pytest.raises(InvalidInputError) as raised:
                    await call()
                assert raised.value.field == field, raised.value
            await sandbox.put_file("/workspace/plain", b"a file")
            with pytest.raises(InvalidInputError, match="plain"):
                await sandbox.put_file("/workspace/plain/below", b"x")  # parent is a file
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


async def test_owner_label_marks_every_sandbox(provider: DockerProvider) -> None:
    spec, token = tagged_spec()
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        with anyio.fail_after(STEP_S):
            info = await provider.client().containers.get(sandbox.id)
        assert OWNER_LABEL in info["Config"]["Labels"]
        assert await containers_tagged(provider, token) == [sandbox.id]
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)
