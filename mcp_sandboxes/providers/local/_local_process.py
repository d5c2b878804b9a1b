"""An ExecStream over a host process (anyio.open_process), shared by the local providers
(bubblewrap, process).

The process leads its own process group. Output is read by two pump tasks (stdout, stderr)
into one bounded memory stream, so chunks come out in the order they arrived and a slow
consumer holds the process back instead of growing a buffer. Leaving the `run_process`
context kills the process group, shielded and bounded: a cancelled caller neither leaks a
live process nor hangs on one.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal as _signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal

import anyio
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mcp_sandboxes.errors import ConflictError, ProviderError
from mcp_sandboxes.providers.base import ExecResult, ExecStream, OutputChunk
from mcp_sandboxes.providers.local._pipes import enlarge_output_pipes

READ_CHUNK_BYTES = 64 * 1024
# Output chunks buffered between the pumps and the consumer; the pumps wait when it is full.
STREAM_BUFFER_CHUNKS = 256
STDIN_WRITE_TIMEOUT_S = 60.0
# After SIGKILL of the command's own group, how long its parent gets to reap it and end.
REAP_GRACE_S = 2.0
# After SIGKILL, how long to wait for the process to be reaped.
KILL_GRACE_S = 5.0
# The whole shielded cleanup when a stream context is left.
CLEANUP_TIMEOUT_S = 10.0

# Given the process's pid, the process groups a signal should reach first; the process's own
# group is the fallback when none of them exists (yet).
SignalGroups = Callable[[int], Awaitable[list[int]]]

# Put before a command, `sh` execs it: a missing program becomes exit 127 and one that cannot
# run 126, as in a shell or docker exec, instead of an error from starting it (or bwrap's exit 1).
EXEC_SHIM = ["/bin/sh", "-c", 'exec "$@"', "sh"]


def exit_status(returncode: int) -> int:
    """Shell convention: 128+N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class LocalExecStream:
    """A running host process. Iterate for output chunks; `wait` for the exit code."""

    def __init__(self, process: Process, program: str, signal_groups: SignalGroups | None) -> None:
        self._process = process
        self._program = program
        self._signal_groups = signal_groups
        self._stdin_closed = False
        send, receive = anyio.create_memory_object_stream[OutputChunk](STREAM_BUFFER_CHUNKS)
        self._send: MemoryObjectSendStream[OutputChunk] = send
        self._receive: MemoryObjectReceiveStream[OutputChunk] = receive

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def __aiter__(self) -> AsyncIterator[OutputChunk]:
        async for chunk in self._receive:
            yield chunk

    async def send_stdin(self, data: bytes) -> None:
        stdin = self._process.stdin
        if self._stdin_closed or stdin is None:
            raise ConflictError(f"stdin of {self._program!r} is already closed")
        try:
            with anyio.fail_after(STDIN_WRITE_TIMEOUT_S):
                await stdin.send(data)
        except TimeoutError as exc:
            raise ProviderError(f"{self._program!r} did not read its stdin within {STDIN_WRITE_TIMEOUT_S:g}s") from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ProviderError(f"{self._program!r} no longer reads its stdin (it closed it or exited)") from exc

    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._process.stdin is not None:
            try:
                await self._process.stdin.aclose()
            except (anyio.BrokenResourceError, OSError):
                pass  # the process is gone; its stdin is closed either way

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self._process.returncode is not None:
            return
        groups = await self._signal_groups(self._process.pid) if self._signal_groups is not None else []
        for group in [*groups, self._process.pid]:
            try:
                os.killpg(group, signum)
                return
            except ProcessLookupError:
                continue  # this group is not there (yet or any more): try the next one

    async def wait(self) -> int:
        return exit_status(await self._process.wait())

    async def pump(
        self,
        source: ByteReceiveStream | None,
        name: Literal["stdout", "stderr"],
        send: MemoryObjectSendStream[OutputChunk],
    ) -> None:
        async with send:
            if source is None:
                return
            while True:
                try:
                    data = await source.receive(READ_CHUNK_BYTES)
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                try:
                    await send.send(OutputChunk(stream=name, data=data))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return  # nobody listens any more

    async def kill(self) -> None:
        """SIGKILL the groups `signal_groups` names and give the process a moment to reap
        them and end by itself, then SIGKILL its own group (stragglers too, even after the
        leader ended) and reap it. The order matters for bwrap: a command whose bwrap died
        first would be reparented outside its sandbox and linger there as a zombie."""
        groups: list[int] = []
        if self._signal_groups is not None and self._process.returncode is None:
            groups = await self._signal_groups(self._process.pid)
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, _signal.SIGKILL)
        if groups and self._process.returncode is None:
            with anyio.move_on_after(REAP_GRACE_S):
                await self._process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, _signal.SIGKILL)
        if self._process.returncode is None:
            with anyio.move_on_after(KILL_GRACE_S):
                await self._process.wait()

    async def close_pipes(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()
        with anyio.move_on_after(KILL_GRACE_S):
            await self._process.aclose()


@asynccontextmanager
async def run_process(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    cwd: str | None = None,
    program: str,
    pass_fds: Sequence[int] = (),
    signal_groups: SignalGroups | None = None,
    live: set[LocalExecStream] | None = None,
) -> AsyncIterator[LocalExecStream]:
    """Start `argv` in a new session; the context's end kills what is left of its group.
    While it runs, the stream is in `live` (see LiveStreams)."""
    try:
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    except OSError as exc:
        raise ProviderError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
    enlarge_output_pipes(process)
    stream = LocalExecStream(process, program, signal_groups)
    if live is not None:
        live.add(stream)
    try:
        async with anyio.create_task_group() as tasks:
            # The memory stream ends once both pumps (each holding a clone) are done.
            tasks.start_soon(stream.pump, process.stdout, "stdout", stream._send.clone())
            tasks.start_soon(stream.pump, process.stderr, "stderr", stream._send.clone())
            await stream._send.aclose()
            try:
                yield stream
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                    await stream.kill()
                    tasks.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
            await stream.close_pipes()
        if live is not None:
            live.discard(stream)


class LiveStreams:
    """The streams running in each sandbox of a provider, so destroying the sandbox (or
    closing the provider) ends them."""

    def __init__(self) -> None:
        self._by_sandbox: dict[str, set[LocalExecStream]] = {}

    def of(self, sandbox_id: str) -> set[LocalExecStream]:
        """The set `run_process(live=...)` keeps a sandbox's running streams in."""
        return self._by_sandbox.setdefault(sandbox_id, set())

    async def kill(self, sandbox_id: str) -> None:
        for stream in list(self._by_sandbox.pop(sandbox_id, ())):
            await stream.kill()

    async def kill_all(self) -> None:
        for streams in list(self._by_sandbox.values()):
            for stream in list(streams):
                await stream.kill()


async def exec_collected(
    stream: AbstractAsyncContextManager[ExecStream],
    argv: list[str],
    *,
    stdin: bytes | None,
    timeout: float | None,  # noqa: ASYNC109 - the limit of the whole command, as Sandbox.exec takes it
) -> ExecResult:
    """`exec` of `argv` through the sandbox's own stream of it; past `timeout` the stream's
    context kills the command and the error says so."""
    stdout, stderr = bytearray(), bytearray()
    async with stream as process:
        exit_code = await run_to_end(process, stdin=stdin, time_limit=timeout, stdout=stdout, stderr=stderr)
    if exit_code is None:
        assert timeout is not None  # without a time limit the command runs to its end
        raise _timed_out(argv, timeout)
    return ExecResult(exit_code=exit_code, stdout=bytes(stdout), stderr=bytes(stderr))


async def run_to_end(
    process: ExecStream,
    *,
    stdin: bytes | None,
    time_limit: float | None,
    stdout: bytearray,
    stderr: bytearray,
) -> int | None:
    """Feed stdin while reading output (a process that writes before it has read all its
    input must not deadlock against us). Returns the exit code, or None when `time_limit`
    (seconds) passed first (the caller's stream context then kills the process)."""
    exit_code: int | None = None
    with anyio.move_on_after(math.inf if time_limit is None else time_limit):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_feed_stdin, process, stdin)
            async for chunk in process:
                (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
        exit_code = await process.wait()
    return exit_code


def _timed_out(argv: list[str], timeout: float) -> ProviderError:
    return ProviderError(
        f"command {argv[0]!r} did not finish within {timeout:g}s and was killed;"
        " raise the timeout or make the command finish sooner"
    )


async def _feed_stdin(process: ExecStream, data: bytes | None) -> None:
    try:
        if data:
            await process.send_stdin(data)
    except ProviderError:
        pass  # the process ended without reading all of it; its exit code tells the story
    finally:
        await process.close_stdin()
