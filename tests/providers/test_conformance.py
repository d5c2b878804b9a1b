"""The provider contract, run against every target in tests/providers/targets/.

Every provider must:
- run commands: exit code, stdout and stderr apart, stdin (fed while output is read), env
  from the spec and per command, cwd (default: the spec's workdir);
- stream output while the process runs, take signals (exit code 128+N), and kill a process
  still running when its stream context is left;
- raise ProviderError when `exec` passes its timeout, with the process gone;
- move files both ways byte for byte (creating parent directories, honouring the mode), and
  raise NotFoundError naming a missing path;
- list, attach, destroy idempotently; a destroyed sandbox raises SandboxGoneError;
- enforce each limit the target claims in `enforces`.

Commands are limited to what busybox has (sh, cat, echo, sleep, head, dd, env, pwd, kill).
A target that cannot run here fails with its reason; MCP_SANDBOXES_ALLOW_UNAVAILABLE=1
turns that into a skip (for machines that lack an engine on purpose, never for CI).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from mcp_sandboxes.errors import NotFoundError, ProviderError, SandboxGoneError
from mcp_sandboxes.providers.base import (
    ExecStream,
    OutputChunk,
    Provider,
    ResourceLimits,
    Sandbox,
    SandboxSpec,
)
from tests.conftest import unavailable
from tests.providers.targets import ConformanceTarget, discover_targets

TARGETS = discover_targets()
LIMIT_CASES = [
    pytest.param(target, limit, id=f"{target.name}-{limit}") for target in TARGETS for limit in sorted(target.enforces)
]

CREATE_S = 60.0
DESTROY_S = 30.0
STEP_S = 30.0  # one exec or file transfer
PROMPT_S = 10.0  # how soon a signalled or abandoned process must be gone
LARGE_FILE_BYTES = 20 * 1024 * 1024


def require_available(target: ConformanceTarget) -> None:
    reason = target.available()
    if reason is None:
        return
    unavailable(f"{target.name} cannot run here: {reason}")


@pytest.fixture(params=TARGETS, ids=lambda target: target.name)
def target(request: pytest.FixtureRequest) -> ConformanceTarget:
    chosen: ConformanceTarget = request.param
    require_available(chosen)
    return chosen


@pytest.fixture
async def provider(target: ConformanceTarget) -> AsyncIterator[Provider]:
    async with target.open_provider() as opened:
        yield opened


@asynccontextmanager
async def open_sandbox(provider: Provider, spec: SandboxSpec) -> AsyncIterator[Sandbox]:
    with anyio.fail_after(CREATE_S):
        sandbox = await provider.create(spec)
    try:
        yield sandbox
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(DESTROY_S):
            await provider.destroy(sandbox.id)


@pytest.fixture
async def sandbox(provider: Provider, target: ConformanceTarget) -> AsyncIterator[Sandbox]:
    async with open_sandbox(provider, target.spec) as opened:
        yield opened


async def read_until(chunks: AsyncIterator[OutputChunk], marker: bytes) -> bytes:
    """Reads stdout until `marker` appears; the caller bounds the time."""
    seen = b""
    async for chunk in chunks:
        if chunk.stream == "stdout":
            seen += chunk.data
            if marker in seen:
                return seen
    raise AssertionError(f"output ended before {marker!r}; got {seen!r}")


async def drain(process: ExecStream) -> tuple[bytes, bytes]:
    out, err = b"", b""
    async for chunk in process:
        if chunk.stream == "stdout":
            out += chunk.data
        else:
            err += chunk.data
    return out, err


async def process_is_gone(sandbox: Sandbox, pid: int) -> bool:
    probe = await sandbox.exec(["sh", "-c", f"kill -0 {pid} 2>/dev/null && echo alive || echo gone"], timeout=STEP_S)
    assert probe.ok, probe
    return probe.stdout.strip() == b"gone"


def scratch(target: ConformanceTarget, name: str) -> str:
    return f"{target.spec.workdir.rstrip('/')}/conformance-{name}"


# -- exec -------------------------------------------------------------------------------


async def test_exec_returns_the_exit_code_and_stdout_and_stderr_apart(sandbox: Sandbox) -> None:
    with anyio.fail_after(STEP_S):
        result = await sandbox.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    assert not result.ok
    with anyio.fail_after(STEP_S):
        assert (await sandbox.exec(["sh", "-c", "exit 0"])).ok


async def test_exec_feeds_stdin_while_reading_output(sandbox: Sandbox) -> None:
    # 2 MiB in and out through cat: deadlocks if stdin is written before output is read.
    payload = os.urandom(2 * 1024 * 1024) + bytes(range(256))
    with anyio.fail_after(STEP_S):
        result = await sandbox.exec(["cat"], stdin=payload)
    assert result.exit_code == 0
    assert result.stdout == payload


async def test_exec_without_stdin_sees_end_of_input(sandbox: Sandbox) -> None:
    with anyio.fail_after(STEP_S):
        result = await sandbox.exec(["sh", "-c", "cat; echo done"])
    assert result.stdout == b"done\n"


async def test_exec_applies_env_from_spec_and_command_and_cwd(provider: Provider, target: ConformanceTarget) -> None:
    spec = target.spec.model_copy(update={"env": {**target.spec.env, "FROM_SPEC": "spec value"}})
    async with open_sandbox(provider, spec) as sandbox:
        with anyio.fail_after(STEP_S):
            result = await sandbox.exec(
                ["sh", "-c", 'echo "$FROM_SPEC|$FROM_EXEC"; pwd'],
                env={"FROM_EXEC": "exec value; with $pecial chars"},
                cwd="/tmp",
            )
            default_cwd = await sandbox.exec(["pwd"])
    assert result.exit_code == 0, result
    assert result.stdout.decode().splitlines() == ["spec value|exec value; with $pecial chars", "/tmp"]
    assert default_cwd.stdout.decode().strip() == target.spec.workdir


async def test_exec_reports_a_missing_program_as_a_failed_exit(sandbox: Sandbox) -> None:
    with anyio.fail_after(STEP_S):
        result = await sandbox.exec(["/no/such/program"])
    assert result.exit_code in (126, 127), result


# -- streaming and signals ----------------------------------------------------------------


async def test_stream_delivers_output_while_the_process_is_still_running(sandbox: Sandbox) -> None:
    script = 'echo first; read reply; echo "second:$reply"; echo third >&2'
    with anyio.fail_after(STEP_S):
        async with sandbox.stream(["sh", "-c", script]) as process:
            chunks = aiter(process)
            # The process cannot end before it reads a line from us, so seeing "first" here
            # proves output arrives while it runs.
            assert await read_until(chunks, b"first\n") == b"first\n"
            await process.send_stdin(b"go\n")
            await process.close_stdin()
            out, err = b"", b""
            async for chunk in chunks:
                if chunk.stream == "stdout":
                    out += chunk.data
                else:
                    err += chunk.data
            assert await process.wait() == 0
    assert out == b"second:go\n"
    assert err == b"third\n"


async def test_signal_ends_a_long_running_process_promptly(sandbox: Sandbox) -> None:
    async with sandbox.stream(["sh", "-c", "echo ready; exec sleep 600"]) as process:
        with anyio.fail_after(STEP_S):
            chunks = aiter(process)
            await read_until(chunks, b"ready")
        started = time.monotonic()
        with anyio.fail_after(PROMPT_S):
            await process.signal(signal.SIGTERM)
            async for _ in chunks:
                pass
            code = await process.wait()
    assert code == 128 + signal.SIGTERM
    assert time.monotonic() - started < PROMPT_S


async def test_signal_can_be_sent_right_after_start(sandbox: Sandbox) -> None:
    async with sandbox.stream(["sleep", "600"]) as process:
        with anyio.fail_after(PROMPT_S):
            await process.signal(signal.SIGKILL)
            assert await process.wait() == 128 + signal.SIGKILL


async def test_leaving_the_stream_context_kills_a_running_process(sandbox: Sandbox) -> None:
    started = time.monotonic()
    async with sandbox.stream(["sh", "-c", "echo $$; exec sleep 600"]) as process:
        with anyio.fail_after(STEP_S):
            pid = int((await read_until(aiter(process), b"\n")).strip())
    assert time.monotonic() - started < STEP_S
    with anyio.fail_after(STEP_S):
        assert await process_is_gone(sandbox, pid)


async def test_exec_past_its_timeout_raises_and_kills_the_process(sandbox: Sandbox, target: ConformanceTarget) -> None:
    pid_file = scratch(target, "timeout.pid")
    started = time.monotonic()
    with anyio.fail_after(STEP_S), pytest.raises(ProviderError, match=r"timeout|within|timed out"):
        await sandbox.exec(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 600"], timeout=1.0)
    assert time.monotonic() - started < 1.0 + PROMPT_S
    with anyio.fail_after(STEP_S):
        pid = int((await sandbox.get_file(pid_file)).strip())
        assert await process_is_gone(sandbox, pid)


# -- files --------------------------------------------------------------------------------


async def test_files_round_trip_every_byte_value_into_new_directories(
    sandbox: Sandbox, target: ConformanceTarget
) -> None:
    path = f"{scratch(target, 'files')}/nested/deeper/bytes.bin"
    data = bytes(range(256)) * 3
    with anyio.fail_after(STEP_S):
        await sandbox.put_file(path, data)
        assert await sandbox.get_file(path) == data
        seen_inside = await sandbox.exec(["cat", path])
        await sandbox.put_file(path, b"replaced")
        replaced = await sandbox.get_file(path)
    assert seen_inside.stdout == data
    assert replaced == b"replaced"


async def test_put_file_honours_the_mode(sandbox: Sandbox, target: ConformanceTarget) -> None:
    script = f"{scratch(target, 'mode')}/hello.sh"
    private = f"{scratch(target, 'mode')}/private.txt"
    with anyio.fail_after(STEP_S):
        await sandbox.put_file(script, b"#!/bin/sh\necho hello from a script\n", mode=0o755)
        await sandbox.put_file(private, b"secret", mode=0o600)
        ran = await sandbox.exec([script])
        check = f"[ -x {script} ] && echo x; [ -x {private} ] || echo not-x; cat {private}"
        modes = await sandbox.exec(["sh", "-c", check])
    assert ran.stdout == b"hello from a script\n", ran
    assert modes.stdout == b"x\nnot-x\nsecret", modes


async def test_a_20_mib_file_round_trips_and_streams_back_out(sandbox: Sandbox, target: ConformanceTarget) -> None:
    path = scratch(target, "large.bin")
    data = os.urandom(LARGE_FILE_BYTES)
    with anyio.fail_after(STEP_S * 2):
        await sandbox.put_file(path, data)
        assert await sandbox.get_file(path) == data
        through_stdout = await sandbox.exec(["cat", path])
    assert len(through_stdout.stdout) == LARGE_FILE_BYTES
    assert through_stdout.stdout == data


async def test_get_file_of_a_missing_path_raises_not_found_naming_it(
    sandbox: Sandbox, target: ConformanceTarget
) -> None:
    path = scratch(target, "never-written.txt")
    with anyio.fail_after(STEP_S), pytest.raises(NotFoundError, match=r"never-written\.txt"):
        await sandbox.get_file(path)


# -- lifecycle ----------------------------------------------------------------------------


async def test_check_reports_the_provider_available(provider: Provider) -> None:
    with anyio.fail_after(STEP_S):
        availability = await provider.check()
    assert availability.available, availability
    assert availability.provider == provider.name


async def test_lifecycle_create_list_attach_destroy_is_idempotent(
    provider: Provider, target: ConformanceTarget
) -> None:
    with anyio.fail_after(CREATE_S):
        sandbox = await provider.create(target.spec)
    try:
        with anyio.fail_after(STEP_S):
            assert sandbox.id in await provider.list_owned()
            attached = await provider.attach(sandbox.id)
            assert attached is not None
            assert attached.id == sandbox.id
            assert (await attached.exec(["echo", "attached"])).stdout == b"attached\n"
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(DESTROY_S):
            await provider.destroy(sandbox.id)
    with anyio.fail_after(STEP_S):
        assert sandbox.id not in await provider.list_owned()
        await provider.destroy(sandbox.id)  # already gone: not an error
        assert await provider.attach(sandbox.id) is None
        with pytest.raises(SandboxGoneError):
            await sandbox.exec(["echo", "too late"])


# -- limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "limit"), LIMIT_CASES, indirect=["target"])
async def test_the_engine_enforces_the_limit(provider: Provider, target: ConformanceTarget, limit: str) -> None:
    limits = {
        "memory": ResourceLimits(memory_mb=64),
        "pids": ResourceLimits(pids=16),
        "cpus": ResourceLimits(cpus=0.5),
    }[limit]
    spec = target.spec.model_copy(update={"limits": limits})
    async with open_sandbox(provider, spec) as sandbox:
        with anyio.fail_after(STEP_S * 2):
            if limit == "memory":
                await prove_memory_limit(sandbox)
            elif limit == "pids":
                await prove_pids_limit(sandbox)
            else:
                await prove_cpu_limit(sandbox)


async def prove_memory_limit(sandbox: Sandbox) -> None:
    # dd allocates its block size up front and fills it: 8 MiB fits in 64 MiB, 256 MiB cannot.
    small = await sandbox.exec(["dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1"])
    assert small.ok, small
    large = await sandbox.exec(["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"])
    assert not large.ok, f"a 256 MiB allocation survived a 64 MiB limit: {large}"


async def prove_pids_limit(sandbox: Sandbox) -> None:
    # A bounded fork bomb: 64 attempts under a limit of 16; the shell stops at the first
    # fork that fails. Children keep no pipe open, so the exec ends with the shell.
    script = "i=0; while [ $i -lt 64 ]; do sleep 600 >/dev/null 2>&1 </dev/null & echo started; i=$((i+1)); done"
    result = await sandbox.exec(["sh", "-c", script], timeout=STEP_S)
    started = result.stdout.count(b"started")
    assert 0 < started < 16, f"{started} processes started under a pids limit of 16: {result}"


async def prove_cpu_limit(sandbox: Sandbox) -> None:
    script = (
        "if [ -r /sys/fs/cgroup/cpu.max ]; then cat /sys/fs/cgroup/cpu.max; "
        "else for d in /sys/fs/cgroup/cpu /sys/fs/cgroup/cpu,cpuacct; do "
        '[ -r $d/cpu.cfs_quota_us ] && echo "$(cat $d/cpu.cfs_quota_us) $(cat $d/cpu.cfs_period_us)" && break; '
        "done; fi"
    )
    result = await sandbox.exec(["sh", "-c", script])
    fields = result.stdout.split()
    assert result.ok and len(fields) == 2, f"no cgroup cpu quota visible in the sandbox: {result}"
    quota, period = int(fields[0]), int(fields[1])
    assert quota / period == pytest.approx(0.5), f"cpu quota {quota}/{period} is not 0.5 CPU"
