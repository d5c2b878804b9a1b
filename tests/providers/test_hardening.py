"""Sandbox hardening on the local container engines, checked from the engine's records and
from inside real containers: capabilities dropped but for what root-run setup needs, none at
all for the agent user, no-new-privileges (a setuid binary lifts nobody), no raw sockets,
a read-only root with a writable workdir, HOME and /tmp, and gVisor (runsc) as a runtime."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers.base import Sandbox, SandboxSpec
from mcp_sandboxes.providers.local.containerd import ContainerdProvider
from mcp_sandboxes.providers.local.docker import SETUP_CAPABILITIES, DockerProvider
from mcp_sandboxes.providers.local.podman import PodmanProvider
from mcp_sandboxes.providers.local.process import ProcessProvider
from mcp_sandboxes.providers.remote._remote_shell import reject_unsupported
from mcp_sandboxes.providers.remote._remote_support import refuse_mounts
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, unavailable
from tests.providers.targets.containerd import probe_containerd
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = pytest.mark.docker

STEP_S = 60.0
# Bits of /proc/<pid>/status Cap* masks (linux/capability.h).
CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7}
FORBIDDEN_BITS = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "MKNOD": 27}
SETUP_MASK = sum(1 << bit for bit in CAP_BITS.values())
RAW_SOCKET = "use Socket; socket(my $s, PF_INET, SOCK_RAW, 1) or die qq(raw: $!\\n); print qq(raw socket made\\n)"
SUID_ID = "/usr/local/bin/suid-id"


@pytest.fixture
async def docker(docker_available: None) -> AsyncIterator[DockerProvider]:
    opened = DockerProvider.from_settings({})
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
async def containerd() -> AsyncIterator[ContainerdProvider]:
    reason = probe_containerd(BASE_IMAGE)
    if reason is not None:
        unavailable(reason)
    yield ContainerdProvider.from_settings({})


@asynccontextmanager
async def sandbox_of(provider: DockerProvider | ContainerdProvider, spec: SandboxSpec) -> AsyncIterator[Sandbox]:
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    try:
        yield sandbox
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)


async def run(sandbox: Sandbox, script: str, *, user: str | None = None) -> tuple[int, str]:
    with anyio.fail_after(STEP_S):
        result = await sandbox.exec(["sh", "-c", script], user=user)
    return result.exit_code, (result.stdout + result.stderr).decode("utf-8", "replace")


async def status_masks(sandbox: Sandbox, *, user: str | None) -> dict[str, int]:
    code, out = await run(sandbox, "grep -E '^(Cap|NoNewPrivs)' /proc/self/status", user=user)
    assert code == 0, out
    fields = dict(line.split(":", 1) for line in out.splitlines())
    return {key: int(value.strip(), 16 if key.startswith("Cap") else 10) for key, value in fields.items()}


async def inspect(docker: DockerProvider, sandbox: Sandbox) -> dict[str, Any]:
    with anyio.fail_after(STEP_S):
        container = await docker.client().containers.get(sandbox.id)
    host_config: dict[str, Any] = container["HostConfig"]
    return host_config


def agent_spec(**changes: Any) -> SandboxSpec:
    name = f"mcp-sandboxes-hard-{uuid.uuid4().hex[:10]}"
    return SandboxSpec.model_validate({"image": BASE_IMAGE, "user": "agent", "name": name, **changes})


# -- Docker -------------------------------------------------------------------------------


async def test_docker_drops_every_capability_but_setup_ones_and_sets_no_new_privileges(docker: DockerProvider) -> None:
    async with sandbox_of(docker, SandboxSpec(image=BUSYBOX_IMAGE)) as sandbox:
        host_config = await inspect(docker, sandbox)
    assert host_config["CapDrop"] == ["ALL"]
    assert sorted(c.removeprefix("CAP_") for c in host_config["CapAdd"]) == sorted(SETUP_CAPABILITIES)
    assert "no-new-privileges:true" in host_config["SecurityOpt"]
    assert host_config["ReadonlyRootfs"] is False
    assert host_config["Runtime"] == "runc"


async def test_docker_agent_holds_no_capability_and_a_setuid_binary_lifts_it_nowhere(docker: DockerProvider) -> None:
    async with sandbox_of(docker, agent_spec(network="host")) as sandbox:
        # Setup as root: a setuid-root copy of `id` (with the old defaults it reported euid 0).
        code, out = await run(sandbox, f"cp /usr/bin/id {SUID_ID} && chmod 4755 {SUID_ID}", user="0")
        assert code == 0, out
        agent = await status_masks(sandbox, user=None)
        assert agent["CapEff"] == 0 and agent["CapPrm"] == 0 and agent["CapAmb"] == 0
        assert agent["NoNewPrivs"] == 1
        assert agent["CapBnd"] == SETUP_MASK
        code, out = await run(sandbox, f"{SUID_ID} -u; {SUID_ID}")
        assert code == 0, out
        assert out.splitlines()[0] == "1000", out
        assert "euid=0" not in out
        # Nor do file capabilities or the bounding set give an agent's process a raw socket.
        code, out = await run(sandbox, f"perl -e '{RAW_SOCKET}'")
        assert code != 0 and "raw socket made" not in out, out


async def test_docker_root_setup_commands_work_but_root_has_no_raw_sockets(docker: DockerProvider) -> None:
    async with sandbox_of(docker, agent_spec(network="host")) as sandbox:
        root = await status_masks(sandbox, user="0")
        assert root["CapEff"] == SETUP_MASK
        assert all(not root["CapBnd"] & (1 << bit) for bit in FORBIDDEN_BITS.values())
        code, out = await run(sandbox, f"perl -e '{RAW_SOCKET}'", user="0")
        assert code != 0 and "Operation not permitted" in out, out
        code, out = await run(sandbox, "mknod /tmp/null c 1 3", user="0")
        assert code != 0, out
        # What setup_commands do: users, groups, ownership, a package install through apt
        # (it drops to its _apt user), and a setuid root tool used as root.
        setup = (
            "set -e; useradd -m bob; groupadd crew; usermod -aG crew bob;"
            " mkdir -p /srv/shared && chown bob:crew /srv/shared && chmod 2775 /srv/shared;"
            " mkdir -p /tmp/pkg/DEBIAN /tmp/pkg/usr/local/share/hello; echo hi > /tmp/pkg/usr/local/share/hello/f;"
            " printf 'Package: hello-local\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: t <t@t>\\n'"
            " > /tmp/pkg/DEBIAN/control; echo 'Description: t' >> /tmp/pkg/DEBIAN/control;"
            " dpkg-deb --build /tmp/pkg /tmp/hello.deb >/dev/null;"
            " apt-get install -y -qq /tmp/hello.deb >/dev/null 2>&1;"
            " dpkg -s hello-local | grep -q 'Status: install ok';"
            " su -s /bin/sh bob -c 'id -un'; stat -c %U:%G /srv/shared"
        )
        code, out = await run(sandbox, setup, user="0")
        assert code == 0, out
        assert "bob\n" in out and "bob:crew" in out
        # put_file hands the file to its owner; signals reach an agent process (root's KILL).
        await sandbox.put_file("/workspace/owned.txt", b"x", user="agent")
        code, out = await run(sandbox, "stat -c %U /workspace/owned.txt")
        assert out.strip() == "agent"
        with anyio.fail_after(STEP_S):
            async with sandbox.stream(["sleep", "300"]) as process:
                await process.signal(15)
                assert await process.wait() == 143


async def test_docker_read_only_root_keeps_workdir_home_and_tmp_writable(docker: DockerProvider) -> None:
    async with sandbox_of(docker, agent_spec(read_only_root=True)) as sandbox:
        host_config = await inspect(docker, sandbox)
        assert host_config["ReadonlyRootfs"] is True
        volumes = sorted(m["Target"] for m in host_config["Mounts"] if m["Type"] == "volume")
        assert volumes == ["/home/agent", "/tmp", "/workspace"]
        code, out = await run(
            sandbox, "set -e; touch /workspace/a ~/b /tmp/c; stat -c %U:%a /workspace ~ /tmp; test -f ~/.bashrc"
        )
        assert code == 0, out
        assert out.split() == ["agent:755", "agent:755", "root:1777"]
        for path, user in (("/etc/x", "agent"), ("/usr/x", "0"), ("/x", "0")):
            code, out = await run(sandbox, f"touch {path}", user=user)
            assert code != 0 and "Read-only file system" in out, (path, out)
        # put_file writes through the engine's archive API, into the volumes.
        await sandbox.put_file("/home/agent/.claude/settings.json", b"{}")
        await sandbox.put_file("/workspace/task.md", b"do it")
        assert await sandbox.get_file("/home/agent/.claude/settings.json") == b"{}"
        code, out = await run(sandbox, "stat -c %U ~/.claude ~/.claude/settings.json /workspace/task.md")
        assert out.split() == ["agent", "agent", "agent"], out
        with pytest.raises(InvalidInputError, match="read-only root filesystem"):
            await sandbox.put_file("/etc/motd.d", b"x")
    with anyio.fail_after(STEP_S):
        leftover = await docker.client().volumes.list()  # type: ignore[no-untyped-call]
    assert all(not v["Name"].startswith(sandbox.id) for v in leftover.get("Volumes") or [])


async def test_docker_read_only_root_runs_claude_code_and_its_tools(docker: DockerProvider) -> None:
    script = Script()
    script.on(user_contains="write it", reply=Reply(tool_calls=[ToolCall("Bash", {"command": "echo made > out.txt"})]))
    script.on(after_tool_result=True, reply=Reply(text="DONE"))
    spec = agent_spec(image="mcp-sandboxes/agent:latest", read_only_root=True, network="host")
    async with ScriptedModelServer(script) as server, sandbox_of(docker, spec) as sandbox:
        await sandbox.put_file("/workspace/task.md", b"write it")
        env = {
            "ANTHROPIC_BASE_URL": server.url,
            "ANTHROPIC_API_KEY": "sk-test",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "HOME": "/home/agent",
        }
        argv = ["claude", "-p", "write it", "--output-format", "stream-json", "--verbose"]
        argv += ["--permission-mode", "bypassPermissions"]
        with anyio.fail_after(120):
            result = await sandbox.exec(argv, env=env, cwd="/workspace")
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        assert result.exit_code == 0, output[-2000:]
        assert "DONE" in output
        assert await sandbox.get_file("/workspace/out.txt") == b"made\n"
        code, out = await run(sandbox, "test -d ~/.claude && stat -c %U /workspace/out.txt")
        assert code == 0 and out.strip() == "agent", out
        code, out = await run(sandbox, "touch /usr/x", user="0")
        assert code != 0 and "Read-only file system" in out, out


async def test_docker_runs_gvisor_when_asked(docker: DockerProvider) -> None:
    for network in ("none", "host"):
        spec = agent_spec(runtime="runsc", network=network)
        async with sandbox_of(docker, spec) as sandbox:
            host_config = await inspect(docker, sandbox)
            assert host_config["Runtime"] == "runsc"
            assert host_config["CapDrop"] == ["ALL"]
            code, out = await run(sandbox, "dmesg | head -3")
            assert code == 0 and "gVisor" in out, out
            agent = await status_masks(sandbox, user=None)
            assert agent["CapEff"] == 0
            await sandbox.put_file("/workspace/in.txt", b"one")
            await sandbox.put_file("/workspace/in.txt", b"two")  # seen inside, not a stale cache
            code, out = await run(sandbox, "cat /workspace/in.txt")
            assert out == "two"
            code, out = await run(sandbox, "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '")
            interfaces = set(out.split())
            assert ("lo" in interfaces) and (len(interfaces) > 1) == (network == "host"), out


async def test_docker_refuses_a_runtime_the_engine_lacks(docker: DockerProvider) -> None:
    spec = SandboxSpec(image=BUSYBOX_IMAGE, runtime="kata-nope")
    with (
        anyio.fail_after(STEP_S),
        pytest.raises(InvalidInputError, match=r"^runtime: .*has no runtime 'kata-nope'.*runc"),
    ):
        await docker.validate_spec(spec)
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match=r"^runtime:"):
        await docker.create(spec)


async def test_podman_refuses_a_runtime_with_the_field_named() -> None:
    podman = PodmanProvider()
    with pytest.raises(InvalidInputError, match=r"^runtime: the podman provider cannot choose"):
        await podman.validate_spec(SandboxSpec(image=BUSYBOX_IMAGE, runtime="runsc"))
    await podman.aclose()


async def test_podman_hardens_and_offers_a_read_only_root() -> None:
    podman = PodmanProvider()
    try:
        with anyio.fail_after(STEP_S):
            availability = await podman.check()
        if not availability.available:
            unavailable(f"podman: {availability.reason}")
        with anyio.fail_after(STEP_S):
            sandbox = await podman.create(agent_spec(read_only_root=True))
        try:
            agent = await status_masks(sandbox, user=None)
            assert agent["CapEff"] == 0 and agent["NoNewPrivs"] == 1
            assert (await status_masks(sandbox, user="0"))["CapEff"] == SETUP_MASK
            code, out = await run(sandbox, "set -e; touch /workspace/a ~/b /tmp/c; stat -c %U:%a /workspace ~ /tmp")
            assert code == 0 and out.split() == ["agent:755", "agent:755", "root:1777"], out
            code, out = await run(sandbox, "touch /usr/x", user="0")
            assert code != 0 and "Read-only file system" in out, out
            await sandbox.put_file("/home/agent/.claude/settings.json", b"{}")
            assert await sandbox.get_file("/home/agent/.claude/settings.json") == b"{}"
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
                await podman.destroy(sandbox.id)
    finally:
        await podman.aclose()


# -- containerd ---------------------------------------------------------------------------


async def test_containerd_drops_capabilities_and_the_agent_has_none(containerd: ContainerdProvider) -> None:
    async with sandbox_of(containerd, agent_spec(network="host")) as sandbox:
        root = await status_masks(sandbox, user="0")
        assert root["CapEff"] == SETUP_MASK and root["CapBnd"] == SETUP_MASK
        assert root["NoNewPrivs"] == 1
        agent = await status_masks(sandbox, user=None)
        assert agent["CapEff"] == 0 and agent["NoNewPrivs"] == 1
        code, out = await run(sandbox, f"perl -e '{RAW_SOCKET}'", user="0")
        assert code != 0 and "raw socket made" not in out, out
        code, out = await run(sandbox, f"cp /usr/bin/id {SUID_ID} && chmod 4755 {SUID_ID}", user="0")
        assert code == 0, out
        code, out = await run(sandbox, f"{SUID_ID} -u")
        assert out.strip() == "1000", out
        code, out = await run(sandbox, "set -e; useradd -m bob; chown bob /workspace; stat -c %U /workspace", user="0")
        assert code == 0 and out.strip() == "bob", out


async def test_containerd_read_only_root_keeps_workdir_home_and_tmp_writable(containerd: ContainerdProvider) -> None:
    async with sandbox_of(containerd, agent_spec(read_only_root=True)) as sandbox:
        code, out = await run(sandbox, "set -e; touch /workspace/a ~/b /tmp/c; stat -c %U:%a /workspace ~ /tmp")
        assert code == 0, out
        assert out.split() == ["agent:755", "agent:755", "root:1777"]
        code, out = await run(sandbox, "touch /usr/x", user="0")
        assert code != 0 and "Read-only file system" in out, out
        await sandbox.put_file("/home/agent/.claude/settings.json", b"{}")
        assert await sandbox.get_file("/home/agent/.claude/settings.json") == b"{}"
        with pytest.raises(InvalidInputError, match=r"^path:"):
            await sandbox.put_file("/etc/x", b"x")


async def test_containerd_runs_gvisor_through_the_runc_shim(containerd: ContainerdProvider) -> None:
    for network in ("none", "host"):
        async with sandbox_of(containerd, agent_spec(runtime="runsc", network=network)) as sandbox:
            code, out = await run(sandbox, "dmesg | head -3")
            assert code == 0 and "gVisor" in out, out
            agent = await status_masks(sandbox, user=None)
            assert agent["CapEff"] == 0
            await sandbox.put_file("/workspace/in.txt", b"two")
            assert await sandbox.get_file("/workspace/in.txt") == b"two"


async def test_containerd_refuses_a_runtime_it_cannot_run(containerd: ContainerdProvider) -> None:
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match=r"^runtime: 'kata'"):
        await containerd.validate_spec(SandboxSpec(image=BUSYBOX_IMAGE, runtime="kata"))
    missing = ContainerdProvider.from_settings({"runsc_path": "/nonexistent/runsc"})
    with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match=r"^runtime: runsc for containerd needs"):
        await missing.create(SandboxSpec(image=BUSYBOX_IMAGE, runtime="runsc"))


# -- providers that cannot -----------------------------------------------------------------


@pytest.mark.parametrize("field", ["runtime", "read_only_root"])
async def test_other_providers_refuse_what_they_cannot_honour(field: str, tmp_path: Any) -> None:
    spec = SandboxSpec.model_validate({"image": "default", field: "runsc" if field == "runtime" else True})
    with pytest.raises(InvalidInputError, match=f"^{field}: the e2b provider cannot"):
        refuse_mounts(spec, "e2b")
    with pytest.raises(InvalidInputError, match=f"^{field}: the Fly provider cannot"):
        reject_unsupported(spec, "Fly", network_none=False)
    process = ProcessProvider.from_settings({"state_dir": str(tmp_path)})
    with pytest.raises(InvalidInputError, match=f"^{field}: the process provider cannot"):
        await process.create(spec.model_copy(update={"workdir": str(tmp_path)}))
