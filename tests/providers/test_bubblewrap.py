"""Bubblewrap specifics beyond the conformance suite: namespaces (network, pids, files),
users, mounts, secrets, restarts, limit fallbacks and the holder; all on the real bwrap."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from mcp_sandboxes.errors import ImageNotFoundError, InvalidInputError, NotFoundError, SandboxGoneError
from mcp_sandboxes.providers.base import Mount, ResourceLimits, SandboxSpec
from mcp_sandboxes.providers.local.bubblewrap import BubblewrapProvider, BubblewrapSandbox
from mcp_sandboxes.providers.registry import build_provider
from tests.providers.targets.bubblewrap import ROOTFS

STEP_S = 30.0
HOST = SandboxSpec(image="host")
# With image "host": the host's system directories, what bwrap and we mount, the root's home.
HOST_ROOT_ENTRIES = {".", "..", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc"} | {
    "dev",
    "proc",
    "sys",
    "tmp",
    "workspace",
    "root",
}


@pytest.fixture(scope="module", autouse=True)
def bwrap_installed() -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bwrap is not installed: run scripts/setup-system.sh")


@asynccontextmanager
async def bubblewrap(state_dir: Path, **settings: Any) -> AsyncIterator[BubblewrapProvider]:
    provider = BubblewrapProvider.from_settings({"state_dir": str(state_dir), **settings})
    try:
        yield provider
    finally:
        await provider.aclose()


@asynccontextmanager
async def sandbox_of(provider: BubblewrapProvider, spec: SandboxSpec) -> AsyncIterator[BubblewrapSandbox]:
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        yield sandbox
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[BubblewrapProvider]:
    async with bubblewrap(tmp_path / "state") as opened:
        yield opened


async def run(sandbox: BubblewrapSandbox, script: str, **kwargs: Any) -> str:
    with anyio.fail_after(STEP_S):
        result = await sandbox.exec(["sh", "-c", script], **kwargs)
    assert result.ok, result
    return result.stdout.decode()


def interfaces(proc_net_dev: str) -> list[str]:
    return sorted(line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:] if ":" in line)


# -- network ---------------------------------------------------------------------------------


async def test_network_none_leaves_only_loopback(provider: BubblewrapProvider) -> None:
    async with sandbox_of(provider, HOST) as sandbox:
        inside = interfaces(await run(sandbox, "cat /proc/net/dev"))
    host = interfaces(await anyio.Path("/proc/net/dev").read_text())
    assert inside == ["lo"]
    assert len(host) > 1, f"the host should have more than lo for this test to mean something: {host}"


async def _serve_greeting(stream: SocketStream) -> None:
    async with stream:
        await stream.send(b"hello from the host\n")


async def test_network_host_reaches_a_loopback_server_and_none_cannot(provider: BubblewrapProvider) -> None:
    # bash's /dev/tcp: a TCP client that exists in both the host and the Debian root.
    probe = 'exec 3<>/dev/tcp/127.0.0.1/"$1" && head -n1 <&3'
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, _serve_greeting)
        async with sandbox_of(provider, HOST.model_copy(update={"network": "host"})) as shared:
            with anyio.fail_after(STEP_S):
                reached = await shared.exec(["bash", "-c", probe, "bash", str(port)])
        async with sandbox_of(provider, HOST) as isolated:
            with anyio.fail_after(STEP_S):
                refused = await isolated.exec(["bash", "-c", probe, "bash", str(port)])
        tg.cancel_scope.cancel()
    assert reached.stdout == b"hello from the host\n", reached
    assert not refused.ok
    assert b"hello" not in refused.stdout


# -- file system -------------------------------------------------------------------------------


async def test_the_host_outside_the_binds_is_neither_visible_nor_writable(
    provider: BubblewrapProvider, tmp_path: Path
) -> None:
    marker = tmp_path / "host-only-marker"
    marker.write_text("host secret")
    async with sandbox_of(provider, HOST) as sandbox:
        with anyio.fail_after(STEP_S):
            seen = await sandbox.exec(["cat", str(marker)])
            listing = await run(sandbox, "ls -a /")
            writes = await sandbox.exec(
                ["sh", "-c", "for p in /usr/x /etc/x /x /bin/x; do touch $p 2>/dev/null && echo wrote $p; done; true"]
            )
            state = await sandbox.exec(["ls", str(provider.state_dir)])
            in_workspace = await run(sandbox, "touch /workspace/ok /tmp/ok ~/ok && echo ok")
    assert not seen.ok and b"host secret" not in seen.stdout
    assert set(listing.split()) <= HOST_ROOT_ENTRIES
    for hidden in ("home", "work", "var", "opt", "srv"):
        assert hidden not in listing.split()
    assert writes.stdout == b""
    assert not state.ok
    assert in_workspace.strip() == "ok"
    assert not (await anyio.Path("/usr/x").exists() or await anyio.Path("/etc/x").exists())


async def test_what_the_host_keeps_from_other_users_stays_hidden(provider: BubblewrapProvider) -> None:
    shadow = anyio.Path("/etc/shadow")
    mode = (await shadow.stat()).st_mode
    assert not mode & 0o004, "this test needs a host /etc/shadow that is not world-readable"
    async with sandbox_of(provider, HOST.model_copy(update={"user": "agent"})) as sandbox:
        with anyio.fail_after(STEP_S):
            as_command = await sandbox.exec(["cat", "/etc/shadow"])
            listing = await sandbox.exec(["ls", "/etc/ssl/private"])
            with pytest.raises(InvalidInputError, match="Permission denied"):
                await sandbox.get_file("/etc/shadow")
            readable = await run(sandbox, "head -c 4 /etc/os-release")
    assert not as_command.ok and b"Permission denied" in as_command.stderr
    assert b"root:" not in as_command.stdout
    assert not listing.ok or listing.stdout == b""
    assert len(readable) == 4


async def test_the_pid_namespace_holds_only_the_sandbox_and_is_shared_between_commands(
    provider: BubblewrapProvider,
) -> None:
    async with sandbox_of(provider, HOST) as sandbox:
        # A background process outlives the command that started it, as in a container.
        pid = (await run(sandbox, "sleep 600 >/dev/null 2>&1 </dev/null & echo $!")).strip()
        pids = (await run(sandbox, "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '")).split()
        alive = await run(sandbox, f"kill -0 {pid} && echo alive")
        killed = await run(sandbox, f"kill {pid}; sleep 0.2; kill -0 {pid} 2>/dev/null || echo gone")
    assert pid in pids
    assert str(os.getpid()) not in pids and len(pids) < 10, pids
    assert alive.strip() == "alive"
    assert killed.strip() == "gone"


async def test_destroy_ends_background_processes(provider: BubblewrapProvider) -> None:
    sandbox = await provider.create(HOST)
    with anyio.fail_after(STEP_S):
        await run(sandbox, "sleep 600 >/dev/null 2>&1 </dev/null & echo started")
        holder = provider._holders[sandbox.id]
        init_pid = holder.init_pid
        await provider.destroy(sandbox.id)
    # Gone, not a zombie: the holder's bwrap reaped its init before it ended itself.
    assert not await anyio.Path(f"/proc/{init_pid}").exists()
    assert not await anyio.Path(sandbox.host_dir).exists()


async def test_files_through_a_planted_symlink_never_touch_the_host(
    provider: BubblewrapProvider, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    async with sandbox_of(provider, HOST) as sandbox:
        await run(sandbox, f"ln -s {victim} /workspace/link; mkdir -p /tmp/d; ln -s {tmp_path} /workspace/dirlink")
        with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError):
            await sandbox.put_file("/workspace/link", b"overwritten")
        with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError):
            await sandbox.put_file("/workspace/dirlink/victim.txt", b"overwritten")
        with anyio.fail_after(STEP_S), pytest.raises(NotFoundError):
            await sandbox.get_file("/workspace/link")
        # A link that resolves inside the sandbox works, resolved there.
        await run(sandbox, "echo inside > /tmp/real; ln -s /tmp/real /workspace/good")
        with anyio.fail_after(STEP_S):
            through_link = await sandbox.get_file("/workspace/good")
    assert victim.read_text() == "untouched"
    assert through_link == b"inside\n"


async def test_files_outside_the_writable_binds_go_through_the_sandbox(provider: BubblewrapProvider) -> None:
    async with sandbox_of(provider, HOST) as sandbox:
        with anyio.fail_after(STEP_S):
            hostname = await sandbox.get_file("/etc/passwd")
        with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match="Read-only"):
            await sandbox.put_file("/usr/local/new-file", b"x")
    assert b"root:" in hostname


async def test_mounts_are_bound_read_only_or_read_write_as_asked(provider: BubblewrapProvider, tmp_path: Path) -> None:
    shared_ro, shared_rw = tmp_path / "ro", tmp_path / "rw"
    shared_ro.mkdir()
    shared_rw.mkdir()
    (shared_ro / "given.txt").write_text("from the host")
    spec = HOST.model_copy(
        update={
            "mounts": [
                Mount(source=str(shared_ro), target="/data/ro"),
                Mount(source=str(shared_rw), target="/workspace/out", read_only=False),
            ]
        }
    )
    async with sandbox_of(provider, spec) as sandbox:
        read = await run(sandbox, "cat /data/ro/given.txt")
        refused = await sandbox.exec(["sh", "-c", "echo x > /data/ro/new"])
        await run(sandbox, "echo result > /workspace/out/result.txt")
        # put_file must not write under the mount's host-side shadow in the workspace.
        await sandbox.put_file("/workspace/out/put.txt", b"put")
    assert read == "from the host"
    assert not refused.ok and b"Read-only" in refused.stderr
    assert (shared_rw / "result.txt").read_text() == "result\n"
    assert (shared_rw / "put.txt").read_text() == "put"


async def test_a_missing_mount_source_or_root_is_named(provider: BubblewrapProvider, tmp_path: Path) -> None:
    spec = HOST.model_copy(update={"mounts": [Mount(source=str(tmp_path / "absent"), target="/data")]})
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match=r"mounts\[0\]\.source"):
        await provider.create(spec)
    with anyio.fail_after(STEP_S), pytest.raises(ImageNotFoundError, match="does not exist"):
        await provider.create(SandboxSpec(image=str(tmp_path / "no-root")))
    assert await provider.list_owned() == []


# -- users and environment -----------------------------------------------------------------------


async def test_a_user_the_host_lacks_is_added_with_its_own_home(provider: BubblewrapProvider) -> None:
    async with sandbox_of(provider, HOST.model_copy(update={"user": "agent"})) as sandbox:
        who = await run(sandbox, 'id -un; echo "$HOME"; touch ~/.profile-test && echo home-writable')
        as_root = await run(sandbox, "id -un", user="0")
        with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match="one user"):
            await sandbox.exec(["id"], user="nobody")
    assert who.split() == ["agent", "/home/agent", "home-writable"]
    assert as_root.strip() == "agent"


async def test_a_workdir_that_is_the_home_is_one_writable_directory(provider: BubblewrapProvider) -> None:
    async with sandbox_of(provider, HOST.model_copy(update={"workdir": "/root"})) as sandbox:
        await sandbox.put_file("/root/notes.txt", b"in the workspace")
        seen = await run(sandbox, 'pwd; echo "$HOME"; cat /root/notes.txt')
        on_host = await anyio.Path(sandbox.host_dir / "workspace" / "notes.txt").read_bytes()
    assert seen.splitlines() == ["/root", "/root", "in the workspace"]
    assert on_host == b"in the workspace"


async def test_the_debian_root_runs_as_its_agent_user(provider: BubblewrapProvider) -> None:
    if not (ROOTFS / "bin").exists():
        pytest.fail(f"{ROOTFS} is missing: run scripts/build-images.sh")
    spec = SandboxSpec(image=str(ROOTFS), user="agent")
    async with sandbox_of(provider, spec) as sandbox:
        release = await run(sandbox, "cat /etc/debian_version; id -u; pwd")
    version, uid, cwd = release.split()
    assert version.startswith("12")
    assert (uid, cwd) == ("1000", "/workspace")


async def test_only_the_given_environment_reaches_the_command_and_none_is_on_a_command_line(
    provider: BubblewrapProvider,
) -> None:
    secret = "sk-test-" + os.urandom(8).hex()
    spec = HOST.model_copy(update={"env": {"FROM_SPEC": "1"}})
    argv = ["sh", "-c", "env; echo end-of-env; exec sleep 600"]
    async with sandbox_of(provider, spec) as sandbox, sandbox.stream(argv, env={"API_KEY": secret}) as process:
        with anyio.fail_after(STEP_S):
            seen = b""
            async for chunk in process:
                seen += chunk.data
                if b"end-of-env" in seen:
                    break
        command_lines = [
            (await anyio.Path(f"/proc/{pid}/cmdline").read_bytes())
            for pid in [process.pid, *(await _children(process.pid))]
        ]
    assert len(command_lines) == 2  # bwrap and the command itself
    names = {line.split("=", 1)[0] for line in seen.decode().splitlines() if "=" in line}
    assert names <= {"PATH", "HOME", "FROM_SPEC", "API_KEY", "PWD", "SHLVL", "_"}, names
    assert f"API_KEY={secret}".encode() in seen
    assert all(secret.encode() not in line for line in command_lines)


async def _children(pid: int) -> list[int]:
    text = await anyio.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


# -- lifecycle -----------------------------------------------------------------------------------


async def test_a_restarted_provider_attaches_to_and_destroys_an_existing_sandbox(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with bubblewrap(state) as first:
        sandbox = await first.create(HOST.model_copy(update={"labels": {"purpose": "restart"}}))
        await sandbox.put_file("/workspace/kept.txt", b"survives a restart")
    # The first provider is closed: its holder (and every process of the sandbox) is gone.
    restarted = build_provider("bubblewrap", {"state_dir": str(state)})
    assert isinstance(restarted, BubblewrapProvider)
    try:
        with anyio.fail_after(STEP_S):
            assert await restarted.list_owned() == [sandbox.id]
            attached = await restarted.attach(sandbox.id)
            assert attached is not None
            kept = await attached.exec(["cat", "/workspace/kept.txt"])
            await restarted.destroy(sandbox.id)
            assert await restarted.list_owned() == []
            assert await restarted.attach(sandbox.id) is None
            with pytest.raises(SandboxGoneError):
                await attached.exec(["true"])
    finally:
        await restarted.aclose()
    assert kept.stdout == b"survives a restart"
    assert not sandbox.host_dir.exists()


async def test_a_killed_holder_is_restarted_by_the_next_command(provider: BubblewrapProvider) -> None:
    async with sandbox_of(provider, HOST) as sandbox:
        await sandbox.put_file("/workspace/file", b"still here")
        first = provider._holders[sandbox.id]
        await first.stop()
        with anyio.fail_after(STEP_S):
            result = await sandbox.exec(["cat", "/workspace/file"])
        assert provider._holders[sandbox.id] is not first
    assert result.stdout == b"still here"


async def test_ids_that_are_not_ours_are_never_paths(provider: BubblewrapProvider, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(exist_ok=True)
    outside = tmp_path / "precious"
    outside.mkdir()
    with anyio.fail_after(STEP_S):
        assert await provider.attach("../precious") is None
        await provider.destroy("../precious")
    assert outside.exists()


async def test_check_names_a_missing_bwrap_and_the_fix(tmp_path: Path) -> None:
    async with bubblewrap(tmp_path, bwrap_path="/nonexistent/bwrap") as provider:
        availability = await provider.check()
    assert not availability.available
    assert "not installed" in (availability.reason or "")
    assert "apt-get install bubblewrap" in (availability.fix or "")


def test_settings_typos_are_named() -> None:
    with pytest.raises(InvalidInputError, match=r"providers\.bubblewrap\.rootfss"):
        BubblewrapProvider.from_settings({"rootfss": "/x"})


# -- limits ----------------------------------------------------------------------------------------


async def test_cgroup_cpu_quota_throttles_a_busy_loop(provider: BubblewrapProvider) -> None:
    limiter = await provider.limiter()
    if "cpus" not in limiter.enforces:
        pytest.fail(f"this host should allow cgroup cpu limits (limits via {limiter.method}: {limiter.detail})")
    spec = HOST.model_copy(update={"limits": ResourceLimits(cpus=0.25)})
    async with sandbox_of(provider, spec) as sandbox:
        with anyio.fail_after(STEP_S):
            await sandbox.exec(["timeout", "2", "sh", "-c", "while :; do :; done"])
        # cgroup v1 binds the cpu controller at /sys/fs/cgroup/cpu, v2 the sandbox's cgroup itself.
        usage = await run(sandbox, "cat /sys/fs/cgroup/cpu/cpu.stat 2>/dev/null || cat /sys/fs/cgroup/cpu.stat")
    # nr_throttled counts the periods in which the quota ran out: a busy loop must hit it.
    stats = dict(line.split() for line in usage.splitlines())
    assert int(stats["nr_throttled"]) > 0, usage


async def test_rlimit_fallback_enforces_memory_per_process(tmp_path: Path) -> None:
    async with bubblewrap(tmp_path / "state", limits_method="rlimit") as provider:
        limiter = await provider.limiter()
        assert limiter.method == "rlimit" and limiter.enforces == frozenset({"memory"})
        spec = HOST.model_copy(update={"limits": ResourceLimits(memory_mb=64, pids=16)})
        async with sandbox_of(provider, spec) as sandbox:
            small = await sandbox.exec(["dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1"])
            large = await sandbox.exec(["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"])
    assert small.ok, small
    assert not large.ok and b"memory exhausted" in large.stderr, large


async def test_destroy_removes_the_sandbox_cgroups(provider: BubblewrapProvider) -> None:
    limiter = await provider.limiter()
    if not limiter.method.startswith("cgroup"):
        pytest.fail(f"this host should allow cgroups (limits via {limiter.method}: {limiter.detail})")
    sandbox = await provider.create(HOST.model_copy(update={"limits": ResourceLimits(memory_mb=128)}))
    directories = [anyio.Path(parent) / sandbox.id for parent in limiter.parents.values()]
    assert all([await directory.is_dir() for directory in directories])
    script = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"
    limit = (await run(sandbox, script)).strip()
    await provider.destroy(sandbox.id)
    assert limit == str(128 * 1024 * 1024)
    assert not any([await directory.exists() for directory in directories])
