"""Docker-specific behaviour beyond the shared contract: how a SandboxSpec becomes a
container (labels, limits, init, network, mounts, user, workdir), process-group signals,
and reattaching to a container the engine stopped."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.errors import ConflictError
from mcp_sandboxes.providers.base import OWNER_LABEL, SANDBOX_NAME_LABEL, Mount, ResourceLimits, SandboxSpec
from mcp_sandboxes.providers.local.docker import DockerProvider, DockerSandbox
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE

STEP_S = 30.0


@pytest.fixture
async def provider(docker_available: None) -> AsyncIterator[DockerProvider]:
    opened = DockerProvider.from_settings({})
    try:
        yield opened
    finally:
        await opened.aclose()


@asynccontextmanager
async def sandbox_of(provider: DockerProvider, spec: SandboxSpec) -> AsyncIterator[DockerSandbox]:
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        yield sandbox
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


def host_interfaces() -> list[str]:
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


async def test_the_spec_becomes_the_container_config(provider: DockerProvider) -> None:
    name = f"mcp-sandboxes-test-{uuid.uuid4().hex[:12]}"
    spec = SandboxSpec(
        image=BUSYBOX_IMAGE,
        name=name,
        env={"GREETING": "hello"},
        workdir="/workspace",
        user="1000",
        limits=ResourceLimits(memory_mb=128, cpus=1.5, pids=64),
        labels={"team": "tests"},
    )
    async with sandbox_of(provider, spec) as sandbox:
        with anyio.fail_after(STEP_S):
            info = await provider.client().containers.get(sandbox.id)
    config, host = info["Config"], info["HostConfig"]
    assert info["Name"] == f"/{name}"
    assert config["Labels"][OWNER_LABEL] == "true"
    assert config["Labels"][SANDBOX_NAME_LABEL] == name
    assert config["Labels"]["team"] == "tests"
    assert "GREETING=hello" in config["Env"]
    # The container runs as root (so root execs keep the setup capabilities); execs run as the user.
    assert (config["User"], config["WorkingDir"], config["Cmd"]) == ("0", "/workspace", ["sleep", "infinity"])
    assert config["Labels"]["io.mcp-sandboxes.user"] == "1000"
    assert host["Init"] is True
    assert host["NetworkMode"] == "none"
    assert host["Memory"] == host["MemorySwap"] == 128 * 1024 * 1024
    assert host["NanoCpus"] == 1_500_000_000
    assert host["PidsLimit"] == 64


async def test_network_none_has_only_loopback_and_host_shares_the_host_network(provider: DockerProvider) -> None:
    read_interfaces = ["sh", "-c", "cat /proc/net/dev"]
    async with sandbox_of(provider, SandboxSpec(image=BUSYBOX_IMAGE, network="none")) as isolated:
        with anyio.fail_after(STEP_S):
            none_dev = (await isolated.exec(read_interfaces)).stdout.decode()
    async with sandbox_of(provider, SandboxSpec(image=BUSYBOX_IMAGE, network="host")) as shared:
        with anyio.fail_after(STEP_S):
            host_dev = (await shared.exec(read_interfaces)).stdout.decode()

    def names(dev: str) -> list[str]:
        return sorted(line.split(":", 1)[0].strip() for line in dev.splitlines()[2:])

    assert names(none_dev) == ["lo"]
    assert names(host_dev) == host_interfaces()


async def test_read_only_mounts_refuse_writes_and_writable_mounts_reach_the_host(
    provider: DockerProvider, tmp_path: Path
) -> None:
    shared_ro = tmp_path / "ro"
    shared_rw = tmp_path / "rw"
    shared_ro.mkdir()
    shared_rw.mkdir()
    (shared_ro / "given.txt").write_text("from the host")
    spec = SandboxSpec(
        image=BUSYBOX_IMAGE,
        mounts=[
            Mount(source=str(shared_ro), target="/mnt/ro"),
            Mount(source=str(shared_rw), target="/mnt/rw", read_only=False),
        ],
    )
    async with sandbox_of(provider, spec) as sandbox:
        with anyio.fail_after(STEP_S):
            read = await sandbox.exec(["cat", "/mnt/ro/given.txt"])
            write_ro = await sandbox.exec(["sh", "-c", "echo x > /mnt/ro/new.txt"])
            write_rw = await sandbox.exec(["sh", "-c", "echo from the sandbox > /mnt/rw/out.txt"])
    assert read.stdout == b"from the host"
    assert not write_ro.ok
    assert b"Read-only" in write_ro.stderr
    assert not (shared_ro / "new.txt").exists()
    assert write_rw.ok
    assert (shared_rw / "out.txt").read_text() == "from the sandbox\n"


async def test_the_spec_user_runs_commands_and_owns_written_files(provider: DockerProvider) -> None:
    spec = SandboxSpec(image=BASE_IMAGE, user="agent", workdir="/workspace")
    async with sandbox_of(provider, spec) as sandbox:
        with anyio.fail_after(STEP_S):
            as_default = await sandbox.exec(["id", "-un"])
            as_root = await sandbox.exec(["id", "-u"], user="0")
            await sandbox.put_file("/workspace/new/dir/owned.txt", b"mine", mode=0o640)
            await sandbox.put_file("/tmp/root-owned.txt", b"root's", user="root")
            owned = await sandbox.exec(
                ["stat", "-c", "%U %G %a", "/workspace/new/dir/owned.txt", "/workspace/new/dir", "/tmp/root-owned.txt"]
            )
    assert as_default.stdout == b"agent\n"
    assert as_root.stdout == b"0\n"
    assert owned.stdout.decode().splitlines() == ["agent agent 640", "agent agent 755", "root root 644"]


async def test_a_missing_workdir_is_created(provider: DockerProvider) -> None:
    spec = SandboxSpec(image=BUSYBOX_IMAGE, workdir="/srv/not/yet/there")
    async with sandbox_of(provider, spec) as sandbox:
        with anyio.fail_after(STEP_S):
            result = await sandbox.exec(["pwd"])
    assert result.stdout == b"/srv/not/yet/there\n"


async def test_a_signal_reaches_the_children_of_the_process(provider: DockerProvider) -> None:
    # The shell waits on a child that holds stdout: output only ends once the child is gone,
    # so the stream ending proves the signal reached the whole process group.
    async with (
        sandbox_of(provider, SandboxSpec(image=BUSYBOX_IMAGE)) as sandbox,
        sandbox.stream(["sh", "-c", "sleep 600 & echo ready; wait"]) as process,
    ):
        chunks = aiter(process)
        with anyio.fail_after(STEP_S):
            assert (await anext(chunks)).data == b"ready\n"
        started = time.monotonic()
        with anyio.fail_after(10):
            await process.signal(signal.SIGTERM)
            async for _ in chunks:
                pass
            assert await process.wait() == 128 + signal.SIGTERM
        assert time.monotonic() - started < 10


async def test_stdin_cannot_be_written_after_it_is_closed(provider: DockerProvider) -> None:
    async with sandbox_of(provider, SandboxSpec(image=BUSYBOX_IMAGE)) as sandbox:
        with anyio.fail_after(STEP_S):
            async with sandbox.stream(["cat"]) as process:
                await process.send_stdin(b"once")
                await process.close_stdin()
                with pytest.raises(ConflictError, match="closed"):
                    await process.send_stdin(b"twice")
                chunks = [chunk.data async for chunk in process]
                assert await process.wait() == 0
    assert b"".join(chunks) == b"once"


async def test_attach_restarts_a_container_the_engine_stopped(provider: DockerProvider) -> None:
    async with sandbox_of(provider, SandboxSpec(image=BUSYBOX_IMAGE)) as sandbox:
        with anyio.fail_after(STEP_S):
            await sandbox.put_file("/workspace/kept.txt", b"survives a stop")
            await provider.client().containers.container(sandbox.id).stop(t=0)
            attached = await provider.attach(sandbox.id)
            assert attached is not None
            assert await attached.get_file("/workspace/kept.txt") == b"survives a stop"
            assert (await attached.exec(["echo", "running again"])).stdout == b"running again\n"
