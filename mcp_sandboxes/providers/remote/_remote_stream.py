"""The ExecStream plumbing every remote provider shares: its process's output is read by a
background task (a poll loop, a log stream, a WebSocket, a pipe of a CLI) into an
`OutputQueue`, which the caller iterates and waits on.

`followed` runs that reader for as long as the caller holds the stream and, when the caller
leaves, stops the process (shielded and bounded: a cancelled caller neither leaks a running
command nor hangs on a sandbox that no longer answers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mcp_sandboxes.errors import ProviderError
from mcp_sandboxes.providers.base import ExecResult, ExecStream, OutputChunk

# Output chunks buffered between a reader task that can hold its process back and the consumer.
STREAM_BUFFER_CHUNKS = 64

StreamT = TypeVar("StreamT")


class OutputQueue:
    """Output chunks of one remote process, in arrival order, then its exit code.

    The reader task calls `put` (or `put_nowait`) for each chunk and `finish` once the
    process has ended or the reading failed. `limit` is how many chunks wait for a consumer
    who is behind: when the reader can hold the process back (a pipe, a WebSocket) a bounded
    queue does so and `put` waits; when the vendor keeps the output and runs the process
    whether or not we read (Fly, Vercel, Sprites), holding back would only keep a caller who
    waits for the exit code without reading from ever seeing it, so that queue is unbounded.
    """

    def __init__(self, limit: float = STREAM_BUFFER_CHUNKS) -> None:
        send, receive = anyio.create_memory_object_stream[OutputChunk](limit)
        self._send: MemoryObjectSendStream[OutputChunk] = send
        self._receive: MemoryObjectReceiveStream[OutputChunk] = receive
        self._ended = anyio.Event()
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    async def put(self, stream: str, data: bytes) -> None:
        if not data:
            return
        try:
            await self._send.send(_chunk(stream, data))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # nobody reads any more; the exit code still matters

    def put_nowait(self, stream: str, data: bytes) -> None:
        """`put` for an unbounded queue; output after `finish` is dropped."""
        if data and not self.ended:
            self._send.send_nowait(_chunk(stream, data))

    def finish(self, exit_code: int | None, error: BaseException | None = None) -> None:
        if self._ended.is_set():
            return
        self.exit_code = exit_code
        self.error = error
        self._send.close()
        self._ended.set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def chunks(self) -> AsyncIterator[OutputChunk]:
        async for chunk in self._receive:
            yield chunk
        if self.error is not None:
            raise self.error

    async def wait(self) -> int:
        await self._ended.wait()
        if self.error is not None:
            raise self.error
        return -1 if self.exit_code is None else self.exit_code


def _chunk(stream: str, data: bytes) -> OutputChunk:
    return OutputChunk("stderr" if stream == "stderr" else "stdout", data)


class QueuedStream:
    """The reading half of an ExecStream whose reader task fills `self.output`."""

    def __init__(self, limit: float = STREAM_BUFFER_CHUNKS) -> None:
        self.output = OutputQueue(limit)

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self.output.chunks()

    async def wait(self) -> int:
        return await self.output.wait()


@asynccontextmanager
async def followed(
    process: StreamT,
    follow: Callable[[], Coroutine[Any, Any, object]],
    stop: Callable[[], Awaitable[object]],
    *,
    cleanup_timeout_s: float,
) -> AsyncIterator[StreamT]:
    """`process`, with `follow` (its reader) running in the background until the caller
    leaves; then `stop` runs (shielded, for at most `cleanup_timeout_s`) and the reader ends."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        try:
            yield process
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(cleanup_timeout_s):
                await stop()
            tg.cancel_scope.cancel()


async def run_collected(
    stream: AbstractAsyncContextManager[ExecStream],
    *,
    provider: str,
    argv: list[str],
    stdin: bytes | None,
    timeout: float | None,  # noqa: ASYNC109 - the limit of the whole command, as Sandbox.exec takes it
) -> ExecResult:
    """`exec` through a provider's own stream of `argv`: stdin first (then closed), all the
    output, the exit code. Past `timeout` the stream's context kills the command."""
    stdout = bytearray()
    stderr = bytearray()
    try:
        with anyio.fail_after(timeout):
            async with stream as process:
                if stdin:
                    await process.send_stdin(stdin)
                await process.close_stdin()
                async for chunk in process:
                    (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
                code = await process.wait()
    except TimeoutError:
        name = argv[0] if argv else "command"
        raise ProviderError(f"{provider}: {name} did not finish within {timeout} s (timed out; killed)") from None
    return ExecResult(exit_code=code, stdout=bytes(stdout), stderr=bytes(stderr))


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside a task group's exception group, so callers see the error
    itself; a group with several errors is returned unchanged."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group
