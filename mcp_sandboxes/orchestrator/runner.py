"""Runs one turn: the backend's command in the session's sandbox, stdout through the
translator, every event persisted then published, the outcome recorded."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio

from mcp_sandboxes.backends.base import Backend, Turn, TurnResult
from mcp_sandboxes.events import ErrorInfo, Event, SessionError
from mcp_sandboxes.providers.base import ExecStream, LineSplitter, Sandbox, TailBuffer

# After SIGINT the CLI gets this long to save its state and exit before SIGTERM, then SIGKILL.
INTERRUPT_GRACE_S = 10.0
KILL_GRACE_S = 5.0

Emit = Callable[[Sequence[Event]], Awaitable[None]]


@dataclass
class RunningTurn:
    """The live handle of a running turn, so another task can interrupt it."""

    index: int
    stream: ExecStream | None = None
    interrupted: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)

    async def interrupt(self) -> None:
        if self.interrupted:
            return
        self.interrupted = True
        if self.stream is None:
            return
        for signum, grace in ((signal.SIGINT, INTERRUPT_GRACE_S), (signal.SIGTERM, KILL_GRACE_S)):
            try:
                await self.stream.signal(signum)
            except Exception:  # the process may already be gone; then there is nothing to stop
                return
            with anyio.move_on_after(grace):
                await self.done.wait()
                return
        try:
            await self.stream.signal(signal.SIGKILL)
        except Exception:
            return


async def run_turn(
    *,
    sandbox: Sandbox,
    backend: Backend,
    turn: Turn,
    handle: RunningTurn,
    emit: Emit,
    user: str | None,
    timeout_s: float,
) -> TurnResult:
    command = backend.command(turn)
    translator = backend.translator()
    splitter = LineSplitter()
    stderr_tail = TailBuffer()
    exit_code = -1
    timed_out = False
    try:
        async with sandbox.stream(command.argv, env=command.env, cwd=command.cwd or turn.workdir, user=user) as process:
            handle.stream = process
            if handle.interrupted:  # interrupted before the process existed
                await process.signal(signal.SIGINT)
            if command.stdin is not None:
                await process.send_stdin(command.stdin)
            await process.close_stdin()
            with anyio.move_on_after(timeout_s) as deadline:
                async for chunk in process:
                    if chunk.stream == "stdout":
                        for line in splitter.feed(chunk.data):
                            if line.strip():
                                await emit(translator.feed(line))
                    else:
                        stderr_tail.write(chunk.data)
                for line in splitter.flush():
                    if line.strip():
                        await emit(translator.feed(line))
                exit_code = await process.wait()
            if deadline.cancelled_caught:
                timed_out = True
                handle.interrupted = True
                await process.signal(signal.SIGKILL)
                with anyio.move_on_after(KILL_GRACE_S):
                    exit_code = await process.wait()
    finally:
        handle.stream = None
    await emit(translator.finish(exit_code, stderr_tail.text()))
    result = translator.result.model_copy()
    if timed_out:
        await emit(
            [SessionError(error=ErrorInfo(type="turn_timeout", message=f"the turn ran longer than {timeout_s:g}s"))]
        )
        result.stop_reason = "error"
        result.error = f"turn timed out after {timeout_s:g}s"
    elif handle.interrupted:
        result.stop_reason = "interrupted"
    return result
