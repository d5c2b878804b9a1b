"""Runs one turn: the backend's command in the session's sandbox, stdout through the
translator, every event persisted then published, the outcome recorded.

Every turn's command gets TURN_MARKER_ENV=<session id>:<turn index> in its environment, which
every process it starts inherits: after a crash of the server, `kill_marked` finds what a cut-off
turn left running in a reattached sandbox, however its processes were re-parented. A failed
command is explained before it is reported: a sandbox removed behind our back, or a kill by the
sandbox's out-of-memory killer, is said as such rather than as the CLI's exit code."""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio

from mcp_sandboxes.backends.base import Backend, Command, Translator, Turn, TurnResult
from mcp_sandboxes.errors import McpSandboxesError, ProviderError
from mcp_sandboxes.events import ErrorInfo, Event, SessionError
from mcp_sandboxes.providers.base import ExecStream, LineSplitter, Sandbox, TailBuffer

logger = logging.getLogger(__name__)

# After SIGINT the CLI gets this long to save its state and exit before SIGTERM, then SIGKILL.
INTERRUPT_GRACE_S = 10.0
KILL_GRACE_S = 5.0
# Bounds of the small shell reads and kills the runner does in a sandbox besides the turn itself.
PROBE_TIMEOUT_S = 30.0
KILLED_BY_SIGKILL = 128 + signal.SIGKILL

# Not under the MCP_SANDBOXES_ prefix: every variable there is read as a setting, so a server
# started inside a turn (an agent working on this project) would refuse its environment.
TURN_MARKER_ENV = "MCP_SANDBOX_TURN"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Kills every process in the sandbox whose environment carries the marker line ($1) and that
# the user it runs as may see and signal; prints "PID COMMAND" for each. POSIX sh plus
# tr/grep/cut: busybox and Debian alike.
# Each pass first stops all it finds, then kills them, so no parent sees its children die and
# reacts (exits cleanly, starts others); further passes catch what forked meanwhile.
KILL_MARKED_SCRIPT = r"""
marker=$1
pass=0
while [ "$pass" -lt 5 ]; do
  found=""
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [ "$pid" = "$$" ] && continue
    if tr '\000' '\n' < "$dir/environ" 2>/dev/null | grep -qxF "$marker" && kill -STOP "$pid" 2>/dev/null; then
      found="$found $pid"
      echo "$pid $(tr '\000' ' ' < "$dir/cmdline" 2>/dev/null | cut -c1-120)"
    fi
  done
  [ -z "$found" ] && break
  # A stopped group's last outside parent dying gets it SIGHUP+SIGCONT from the kernel, so some
  # may be gone before their turn here: that is fine, they were named above.
  for pid in $found; do kill -9 "$pid" 2>/dev/null; done
  pass=$((pass + 1))
done
exit 0
"""

OOM_READ_RETRIES = 4
OOM_READ_RETRY_S = 0.5
# Prints the sandbox's cgroup count of out-of-memory kills (cgroup v2, then v1), or exits 1.
OOM_KILLS_SCRIPT = r"""
for f in /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control; do
  if [ -r "$f" ]; then
    while read -r key value; do
      if [ "$key" = oom_kill ]; then echo "$value"; exit 0; fi
    done < "$f"
  fi
done
exit 1
"""

Emit = Callable[[Sequence[Event]], Awaitable[None]]
# Told the CLI's own session id as soon as the translator knows it (so a crash cannot lose it).
NativeIdSink = Callable[[str], Awaitable[None]]
# Whether the sandbox still exists; asked only when the command was killed or lost, the moment
# it ended, so the answer must allow for an engine still busy removing it.
SandboxExists = Callable[[], Awaitable[bool]]


def turn_marker(session_id: str, index: int) -> str:
    """The value of TURN_MARKER_ENV for one turn."""
    return f"{session_id}:{index}"


def removed_reason(sandbox_id: str) -> str:
    return f"its sandbox {sandbox_id} was removed outside mcp-sandboxes"


async def kill_marked(sandbox: Sandbox, session_id: str, index: int, *, user: str | None = None) -> list[str]:
    """SIGKILL every process in the sandbox that turn `index` of `session_id` started (call it
    only when that turn no longer runs); returns "PID COMMAND" of each killed process.

    The scan runs as the turn's `user`, then as root: a process's environment is readable only
    by its own user or a holder of CAP_SYS_PTRACE, which container root lacks (dropped)."""
    if not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"not a session id: {session_id!r}")
    marker = f"{TURN_MARKER_ENV}={turn_marker(session_id, index)}"
    killed: list[str] = []
    for as_user in dict.fromkeys([user or "0", "0"]):
        result = await sandbox.exec(
            ["sh", "-c", KILL_MARKED_SCRIPT, "sh", marker], user=as_user, timeout=PROBE_TIMEOUT_S
        )
        if not result.ok:
            raise ProviderError(
                f"sandbox {sandbox.id}: killing the processes of a cut-off turn exited {result.exit_code}:"
                f" {result.stderr.decode('utf-8', 'replace').strip()[-300:]}"
            )
        killed += [line.strip() for line in result.stdout.decode("utf-8", "replace").splitlines() if line.strip()]
    return list(dict.fromkeys(killed))


async def read_oom_kills(sandbox: Sandbox) -> int | None:
    """The sandbox cgroup's count of out-of-memory kills; None where it cannot be read."""
    try:
        result = await sandbox.exec(["sh", "-c", OOM_KILLS_SCRIPT], timeout=PROBE_TIMEOUT_S)
    except McpSandboxesError as exc:
        logger.debug("reading the OOM kill count of %s failed: %s", sandbox.id, exc)
        return None
    text = result.stdout.decode("utf-8", "replace").strip()
    return int(text) if result.ok and text.isdigit() else None


@dataclass
class OomWatch:
    """A sandbox's count of out-of-memory kills as last seen, so that a SIGKILL can be told
    apart from a kill by its memory limit (the count only grows, over the sandbox's life)."""

    memory_mb: int | None
    seen: int | None = None
    read: bool = False

    async def baseline(self, sandbox: Sandbox) -> None:
        if not self.read:
            self.seen = await read_oom_kills(sandbox)
            self.read = True

    async def killed_since(self, sandbox: Sandbox) -> bool:
        now = await read_oom_kills(sandbox)
        for _ in range(OOM_READ_RETRIES):
            if now is not None:
                break
            # Right after a kill the sandbox may still be at its memory limit, and the reading
            # shell itself is refused or killed (seen in CI): ask again once memory is freed.
            await anyio.sleep(OOM_READ_RETRY_S)
            now = await read_oom_kills(sandbox)
        killed = now is not None and now > (self.seen or 0)
        if now is not None:
            self.seen = now
        return killed

    def message(self) -> str:
        if self.memory_mb is None:
            return (
                "killed for running out of memory: the environment has no memory limit (memory_mb), so the"
                " host itself ran short; free memory on the host or give the environment a memory_mb"
            )
        return (
            f"killed for running out of memory: the environment's memory limit is {self.memory_mb} MiB"
            " (memory_mb); raise it"
        )


@dataclass
class RunningTurn:
    """The live handle of a running turn, so another task can interrupt it."""

    index: int
    stream: ExecStream | None = None
    interrupted: bool = False
    # Set when the turn failed because its sandbox was removed: the reason to report.
    removed: str | None = None
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
    on_native_id: NativeIdSink | None = None,
    sandbox_exists: SandboxExists | None = None,
    oom: OomWatch | None = None,
) -> TurnResult:
    """`on_native_id` hears the CLI's session id the moment it is known; `sandbox_exists` and
    `oom` explain a failed command (sandbox removed: `handle.removed` is set and the CLI's own
    error dropped; killed by the memory limit: said so in the turn's error)."""
    command = backend.command(turn)
    marker = {TURN_MARKER_ENV: turn_marker(turn.session_id, turn.index)}
    command = command.model_copy(update={"env": {**command.env, **marker}})
    translator = backend.translator()
    native = _NativeId(translator, on_native_id, turn.resume_id)
    if oom is not None:
        await oom.baseline(sandbox)
    outcome = _Attempt()
    with anyio.move_on_after(timeout_s) as deadline:
        attempt = 1
        while True:
            outcome = _Attempt()
            try:
                await _run_once(outcome, sandbox, command, translator, turn, handle, native.emitter(emit), user)
            except ProviderError:
                if sandbox_exists is None or handle.interrupted or await sandbox_exists():
                    raise
                handle.removed = removed_reason(sandbox.id)
                break
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
    # Killed by a signal, or no exit code at all: what a sandbox's removal looks like from here.
    killed = not handle.interrupted and (outcome.exit_code < 0 or outcome.exit_code > 128)
    out_of_memory = (
        killed
        and handle.removed is None
        and outcome.exit_code == KILLED_BY_SIGKILL
        and oom is not None
        and await oom.killed_since(sandbox)
    )
    if (
        killed
        and not out_of_memory
        and handle.removed is None
        and sandbox_exists is not None
        and not await sandbox_exists()
    ):
        handle.removed = removed_reason(sandbox.id)
    finished = translator.finish(outcome.exit_code, outcome.stderr)
    if handle.removed is not None:
        # The CLI's own error ("exit 137") would blame it for what was done to its sandbox.
        finished = [event for event in finished if not isinstance(event, SessionError)]
    await native.emitter(emit)(finished)
    result = translator.result.model_copy()
    if handle.removed is not None:
        await emit([SessionError(error=ErrorInfo(type="sandbox_removed", message=handle.removed))])
        result.stop_reason = "error"
        result.error = handle.removed
    elif out_of_memory and oom is not None:
        await emit([SessionError(error=ErrorInfo(type="out_of_memory", message=oom.message()))])
        result.stop_reason = "error"
        result.error = oom.message()
    elif timed_out:
        await emit(
            [SessionError(error=ErrorInfo(type="turn_timeout", message=f"the turn ran longer than {timeout_s:g}s"))]
        )
        result.stop_reason = "error"
        result.error = f"turn timed out after {timeout_s:g}s"
    elif handle.interrupted:
        result.stop_reason = "interrupted"
    return result


class _NativeId:
    """Passes the CLI's session id on as soon as the translator has it, and again if it changes."""

    def __init__(self, translator: Translator, sink: NativeIdSink | None, known: str | None) -> None:
        self._translator, self._sink, self._known = translator, sink, known

    def emitter(self, emit: Emit) -> Emit:
        async def emit_then_check(events: Sequence[Event]) -> None:
            await emit(events)
            current = self._translator.result.native_session_id
            if self._sink is not None and current and current != self._known:
                self._known = current
                await self._sink(current)

        return emit_then_check


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
