"""Runs one turn: the backend's command in the session's sandbox, stdout through the
translator, every event persisted then published, the outcome recorded."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio

from mcp_sandboxes.backends.base import Backend, Command, Translator, Turn, TurnResult
from mcp_sandboxes.errors import ProviderError
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
    outcome = _Attempt()
    with anyio.move_on_after(timeout_s) as deadline:
        attempt = 1
        while True:
            outcome = _Attempt()
            await _run_once(outcome, sandbox, command, translator, turn, handle, emit, user)
            retry = command.retry
            if handle.interrupted or retry is None:
                break
            if not retry.applies(
                attempt=attempt,
                exit_code=outcome.exit_code,
                printed_stdout=outcome.printed_stdout,
                stderr=outcome.stderr,
            ):
                break
            attempt += 1
    timed_out = deadline.cancelled_caught
    if timed_out:
        handle.interrupted = True
    await emit(translator.finish(outcome.exit_code, outcome.stderr))
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


@dataclass
class _Attempt:
    exit_code: int = -1
    stderr: str = ""
    printed_stdout: bool = False


async def _run_once(
    outcome: _Attempt,
    sandbox: Sandbox,
    command: Command,
    translator: Translator,
    turn: Turn,
    handle: RunningTurn,
    emit: Emit,
    user: str | None,
) -> None:
    """One run of the command, recorded into `outcome` (also when the turn's deadline cancels
    it: the process is killed first and what it left is kept)."""
    splitter = LineSplitter()
    stderr_tail = TailBuffer()
    try:
        async with sandbox.stream(command.argv, env=command.env, cwd=command.cwd or turn.workdir, user=user) as process:
            handle.stream = process
            try:
                if handle.interrupted:  # interrupted before the process existed
                    await process.signal(signal.SIGINT)
                try:
                    if command.stdin is not None:
                        await process.send_stdin(command.stdin)
                    await process.close_stdin()
                except ProviderError as exc:
                    # The CLI exited (or shut its stdin) before taking its prompt; its exit code
                    # and stderr say why, so the turn goes on to read them.
                    stderr_tail.write(f"[mcp-sandboxes] the prompt was not delivered on stdin: {exc}\n".encode())
                async for chunk in process:
                    if chunk.stream == "stdout":
                        for line in splitter.feed(chunk.data):
                            if line.strip():
                                outcome.printed_stdout = True
                                await emit(translator.feed(line))
                    else:
                        stderr_tail.write(chunk.data)
                for line in splitter.flush():
                    if line.strip():
                        outcome.printed_stdout = True
                        await emit(translator.feed(line))
                outcome.exit_code = await process.wait()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_GRACE_S):
                    await process.signal(signal.SIGKILL)
                    outcome.exit_code = await process.wait()
                raise
    finally:
        handle.stream = None
        outcome.stderr = stderr_tail.text()
