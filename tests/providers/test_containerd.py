"""containerd provider specifics, against the containerd dockerd runs: errors that name the
problem and the fix, failures that leave nothing, isolation from Docker's `moby` namespace,
and the ctr quirks the provider works around (stdin end-of-input race, user lookups through
a second overlay mount, no --user on run, no pids flag)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.errors import (
    ConflictError,
    ImageNotFoundError,
    InvalidInputError,
    ProviderUnavailableError,
)
from mcp_sandboxes.providers.base import OWNER_LABEL, Mount, ResourceLimits, SandboxSpec
from mcp_sandboxes.providers.local.containerd import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    ContainerdProvider,
    image_reference,
)
from mcp_sandboxes.providers.local.docker import DockerProvider
from mcp_sandboxes.providers.registry import build_provider
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, unavailable
from tests.providers.targets.containerd import probe_containerd

STEP_S = 30.0
TEST_LABEL = "io.mcp-sandboxes.test-run"
MISSING_IMAGE = "mcp-sandboxes/does-not-exist:latest"


def require(image: str) -> None:
    reason = probe_containerd(image)
    if reason is None:
        return
    unavailable(reason)


@pytest.fixture
async def provider() -> AsyncIterator[ContainerdProvider]:
    require(BUSYBOX_IMAGE)
    opened = ContainerdProvider.from_settings({})
    try:
        yield opened
    finally:
        await opened.aclose()


def tagged_spec(**changes: object) -> tuple[SandboxSpec, str]:
    token = uuid.uuid4().hex
    spec = SandboxSpec(image=BUSYBOX_IMAGE, labels={TEST_LABEL: token})
    return spec.model_copy(update=changes), token


async def run(*argv: str) -> str:
    with anyio.fail_after(STEP_S):
        done = await anyio.run_process(list(argv), check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


async def ctr(namespace: str, *args: str) -> str:
    return await run("ctr", "-a", DEFAULT_ADDRESS, "-n", namespace, *args)


async def containers_tagged(token: str) -> list[str]:
    return (await ctr(DEFAULT_NAMESPACE, "containers", "list", "-q", f'labels."{TEST_LABEL}"=={token}')).split()


# -- names and settings -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "reference"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("mcp-sandboxes/base:latest", "docker.io/mcp-sandboxes/base:latest"),
        ("mcp-sandboxes/base", "docker.io/mcp-sandboxes/base:latest"),
        ("ghcr.io/org/tool:1.2", "ghcr.io/org/tool:1.2"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("localhost/x:2", "localhost/x:2"),
        ("debian@sha256:" + "a" * 64, "docker.io/library/debian@sha256:" + "a" * 64),
    ],
)
def test_image_names_are_normalized_as_docker_does(image: str, reference: str) -> None:
    assert image_reference(image) == reference


@pytest.mark.parametrize(
    ("settings", "field", "says"),
    [
        ({"namespace": "moby"}, "providers.containerd.namespace", "Docker's own namespace"),
        ({"namespace": "two words"}, "providers.containerd.namespace", "letters and digits"),
        ({"adress": "/x"}, "providers.containerd.adress", "Extra inputs"),
    ],
)
def test_bad_settings_name_the_setting(settings: dict[str, object], field: str, says: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        build_provider("containerd", settings)
    assert raised.value.field == field
    assert says in str(raised.value)


def test_a_unix_url_is_taken_as_the_socket_path() -> None:
    provider = ContainerdProvider.from_settings({"address": f"unix://{DEFAULT_ADDRESS}"})
    assert provider.settings.address == DEFAULT_ADDRESS


# -- unavailable ------------------------------------------------------------------------


async def test_a_containerd_that_is_not_running_is_reported_with_its_address_and_the_fix(tmp_path: Path) -> None:
    address = f"{tmp_path}/no-containerd.sock"
    provider = build_provider("containerd", {"address": address})
    with anyio.fail_after(STEP_S):
        availability = await provider.check()
        assert not availability.available
        assert availability.reason is not None and address in availability.reason
        assert availability.fix is not None and "scripts/start-dockerd.sh" in availability.fix
        for call in (
            provider.create(SandboxSpec(image=BUSYBOX_IMAGE)),
            provider.list_owned(),
            provider.attach("some-sandbox"),
            provider.destroy("some-sandbox"),
        ):
            with pytest.raises(ProviderUnavailableError) as raised:
                await call
            assert address in str(raised.value) and "providers.containerd.address" in str(raised.value)


async def test_without_ctr_check_and_create_say_how_to_install_it(tmp_path: Path) -> None:
    provider = ContainerdProvider.from_settings({"ctr_path": str(tmp_path / "ctr")})
    with anyio.fail_after(STEP_S):
        availability = await provider.check()
        assert not availability.available
        assert availability.reason is not None and "not installed" in availability.reason
        assert availability.fix is not None and "scripts/setup-system.sh" in availability.fix
        with pytest.raises(ProviderUnavailableError, match=r"scripts/setup-system\.sh"):
            await provider.create(SandboxSpec(image=BUSYBOX_IMAGE))


# -- failed creates leave nothing ---------------------------------------------------------


async def test_a_missing_image_names_the_namespace_and_the_import_and_leaves_nothing(
    provider: ContainerdProvider,
) -> None:
    spec, token = tagged_spec(image=MISSING_IMAGE)
    with anyio.fail_after(STEP_S), pytest.raises(ImageNotFoundError) as raised:
        await provider.create(spec)
    message = str(raised.value)
    assert MISSING_IMAGE in message and DEFAULT_NAMESPACE in message and "scripts/import-images.sh" in message
    assert await containers_tagged(token) == []
    with anyio.fail_after(STEP_S), pytest.raises(ImageNotFoundError):
        await provider.validate_spec(spec)


async def test_a_task_that_cannot_start_leaves_no_container_record(
    provider: ContainerdProvider, tmp_path: Path
) -> None:
    # runc cannot mount a file over a directory: ctr run has made the container by then.
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    spec, token = tagged_spec(mounts=[Mount(source=str(a_file), target="/bin")])
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError) as raised:
        await provider.create(spec)
    assert raised.value.field == "mounts[0].target"
    assert await containers_tagged(token) == []


async def test_a_taken_name_is_a_conflict_and_the_first_sandbox_survives(provider: ContainerdProvider) -> None:
    name = f"mcp-test-{uuid.uuid4().hex[:12]}"
    spec, token = tagged_spec(name=name)
    with anyio.fail_after(STEP_S):
        first = await provider.create(spec)
    try:
        with anyio.fail_after(STEP_S), pytest.raises(ConflictError, match=name):
            await provider.create(spec)
        assert await containers_tagged(token) == [name]
        with anyio.fail_after(STEP_S):
            assert (await first.exec(["echo", "alive"])).stdout == b"alive\n"
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(first.id)


async def test_a_mount_source_missing_on_the_host_is_named(provider: ContainerdProvider, tmp_path: Path) -> None:
    spec, token = tagged_spec(mounts=[Mount(source=str(tmp_path / "absent"), target="/data")])
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError) as raised:
        await provider.create(spec)
    assert raised.value.field == "mounts[0].source"
    assert await containers_tagged(token) == []


# -- isolation from Docker -----------------------------------------------------------------


async def test_sandboxes_live_in_our_namespace_and_never_mix_with_dockers(provider: ContainerdProvider) -> None:
    spec, token = tagged_spec()
    docker = DockerProvider.from_settings({})
    with anyio.fail_after(STEP_S):
        ours = await provider.create(spec)
        theirs = await docker.create(spec)
    try:
        with anyio.fail_after(STEP_S):
            # Ours is in our namespace only: not in Docker's moby, not in `docker ps`.
            assert await containers_tagged(token) == [ours.id]
            assert ours.id not in (await ctr("moby", "containers", "list", "-q")).split()
            docker_ps = (
                await run("docker", "ps", "-aq", "--no-trunc", "--filter", f"label={TEST_LABEL}={token}")
            ).split()
            assert docker_ps == [theirs.id]
            # Both carry the owner label, yet each provider lists and removes only its own.
            assert ours.id in await provider.list_owned()
            assert theirs.id not in await provider.list_owned()
            assert ours.id not in await docker.list_owned()
            assert await provider.attach(theirs.id) is None
            await provider.destroy(theirs.id)  # not in our namespace: nothing to do
            assert (await theirs.exec(["echo", "still here"])).stdout == b"still here\n"
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(ours.id)
            await docker.destroy(theirs.id)
            await docker.aclose()
    assert await containers_tagged(token) == []


async def test_destroy_refuses_a_container_it_does_not_own(provider: ContainerdProvider) -> None:
    name = f"mcp-test-foreign-{uuid.uuid4().hex[:12]}"
    await ctr(DEFAULT_NAMESPACE, "containers", "create", image_reference(BUSYBOX_IMAGE), name, "true")
    try:
        with anyio.fail_after(STEP_S):
            assert await provider.attach(name) is None
            assert name not in await provider.list_owned()
            with pytest.raises(ConflictError, match="not managed"):
                await provider.destroy(name)
        assert name in (await ctr(DEFAULT_NAMESPACE, "containers", "list", "-q")).split()
    finally:
        await ctr(DEFAULT_NAMESPACE, "containers", "delete", name)


# -- ctr quirks ------------------------------------------------------------------------------


async def test_commands_without_stdin_always_see_end_of_input(provider: ContainerdProvider) -> None:
    """ctr loses an end of stdin that comes before the shim opened the FIFO; without the
    provider's preamble most of these would wait for input forever."""
    spec, _ = tagged_spec()
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        with anyio.fail_after(STEP_S):
            for index in range(15):
                result = await sandbox.exec(["sh", "-c", f"cat; echo done-{index}"], timeout=10)
                assert result.stdout == f"done-{index}\n".encode(), result
            piped = await sandbox.exec(["cat"], stdin=b"\nleading newline kept\n")
        assert piped.stdout == b"\nleading newline kept\n"
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


async def test_users_by_name_write_into_fresh_directories_of_the_image(provider: ContainerdProvider) -> None:
    """A name given to ctr exec --user makes ctr mount the live overlay a second time, after
    which creating files fails with ENOENT; the provider passes uid:gid it resolved itself."""
    require(BASE_IMAGE)
    spec, _ = tagged_spec(image=BASE_IMAGE, user="agent")
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        with anyio.fail_after(STEP_S):
            first = await sandbox.exec(["sh", "-c", "mkdir -p /tmp/a/b && touch /tmp/a/b/c && id -un && echo $HOME"])
            as_root = await sandbox.exec(["sh", "-c", "mkdir -p /opt/new/dir && id -u"], user="root")
            with_group = await sandbox.exec(["id", "-g"], user="agent:root")
            with pytest.raises(InvalidInputError) as raised:
                await sandbox.exec(["true"], user="nosuchuser")
        assert first.stdout.decode().split() == ["agent", "/home/agent"], first
        assert as_root.stdout == b"0\n", as_root
        assert with_group.stdout == b"0\n", with_group
        assert raised.value.field == "user" and "nosuchuser" in str(raised.value)
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


async def test_attach_restarts_a_stopped_sandbox_with_its_files_user_and_pids_limit(
    provider: ContainerdProvider,
) -> None:
    spec, _ = tagged_spec(user="agent", limits=ResourceLimits(pids=24))
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        with anyio.fail_after(STEP_S):
            await sandbox.put_file("/workspace/kept.txt", b"kept\n")
            # What a containerd restart leaves: the container and its snapshot, no live task.
            await ctr(DEFAULT_NAMESPACE, "tasks", "kill", "--all", "--signal", "SIGKILL", sandbox.id)
            for _ in range(200):  # bounded: the kill lands within milliseconds
                tasks = (await ctr(DEFAULT_NAMESPACE, "tasks", "list")).splitlines()
                if not any(sandbox.id in line and "RUNNING" in line for line in tasks):
                    break
                await anyio.sleep(0.05)
            attached = await provider.attach(sandbox.id)
            assert attached is not None
            result = await attached.exec(["sh", "-c", "cat kept.txt; id -un; cat /sys/fs/cgroup/pids/pids.max"])
        assert result.stdout.decode().split() == ["kept", "agent", "24"], result
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


async def test_network_none_has_only_loopback_and_host_shares_the_hosts_interfaces(
    provider: ContainerdProvider,
) -> None:
    net_dev = await anyio.Path("/proc/net/dev").read_text()
    host_interfaces = sorted(line.split(":")[0].strip() for line in net_dev.splitlines()[2:])
    script = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort"
    seen = {}
    for network in ("none", "host"):
        spec, _ = tagged_spec(network=network)
        with anyio.fail_after(STEP_S):
            sandbox = await provider.create(spec)
        try:
            with anyio.fail_after(STEP_S):
                seen[network] = (await sandbox.exec(["sh", "-c", script])).stdout.decode().split()
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
                await provider.destroy(sandbox.id)
    assert seen["none"] == ["lo"]
    assert seen["host"] == host_interfaces


async def test_every_sandbox_carries_the_owner_label_and_the_provider_name(provider: ContainerdProvider) -> None:
    spec, token = tagged_spec()
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        assert sandbox.provider == "containerd"
        owned = (await ctr(DEFAULT_NAMESPACE, "containers", "list", "-q", f'labels."{OWNER_LABEL}"==true')).split()
        assert sandbox.id in owned
        assert await containers_tagged(token) == [sandbox.id]
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


async def test_an_image_without_the_sandbox_user_gets_it_with_home_and_workdir(provider: ContainerdProvider) -> None:
    """As on Docker: busybox has no `builder`; the provider adds it (passwd lines: no useradd)."""
    spec, _ = tagged_spec(user="builder", workdir="/srv/work")
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        with anyio.fail_after(STEP_S):
            made = await sandbox.exec(["sh", "-c", "id -un; pwd; touch f && stat -c %U f /home/builder; id -u"])
        assert made.ok, made
        name, workdir, owner, home_owner, uid = made.stdout.decode().split()
        assert (name, workdir, owner, home_owner) == ("builder", "/srv/work", "builder", "builder")
        assert uid != "0"
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)
