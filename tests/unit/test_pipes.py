"""Output pipes of host processes are grown so a Node CLI's last burst survives its exit."""

from __future__ import annotations

import fcntl
import shutil
import subprocess

import anyio
import pytest

from mcp_sandboxes.providers.local._pipes import (
    F_GETPIPE_SZ,
    OUTPUT_PIPE_BYTES,
    enlarge_output_pipes,
    output_pipe_fds,
    pipe_ceiling,
)

BURST = 300_000
# Writes a burst larger than a default pipe, then exits at once, as Node CLIs do.
NODE_BURST_THEN_EXIT = f"process.stdout.write('x'.repeat({BURST})); process.exit(0)"


async def test_output_pipes_are_enlarged() -> None:
    async with await anyio.open_process(
        ["sleep", "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        fds = output_pipe_fds(process)
        assert len(fds) == 2, "anyio's process internals changed: providers/_pipes.py needs a new way to the pipes"
        assert enlarge_output_pipes(process) == 2
        expected = min(OUTPUT_PIPE_BYTES, pipe_ceiling())
        assert [fcntl.fcntl(fd, F_GETPIPE_SZ) for fd in fds] == [expected, expected]
        process.kill()


async def read_after_exit(*, enlarge: bool) -> int:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: scripts/setup-system.sh installs it")
    async with await anyio.open_process(
        [node, "-e", NODE_BURST_THEN_EXIT], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    ) as process:
        if enlarge:
            enlarge_output_pipes(process)
        with anyio.fail_after(30):
            # Nothing reads until the process has exited, like a reader starved on a busy machine.
            assert await process.wait() == 0
            assert process.stdout is not None
            return sum([len(chunk) async for chunk in process.stdout])


async def test_a_node_burst_written_just_before_exit_survives_in_a_grown_pipe() -> None:
    assert await read_after_exit(enlarge=True) == BURST


async def test_a_default_pipe_loses_the_burst_which_is_why_pipes_are_grown() -> None:
    assert await read_after_exit(enlarge=False) < BURST
