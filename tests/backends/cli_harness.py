"""What the host-run real-CLI backend tests share: a stand-in sandbox that is this host (for
`apply_setup()` of a backend's `setup()`), one turn of a backend's argv run as a host subprocess
with its stdout fed through the backend's translator, and the Turn/HOME/workdir plumbing around
it. What differs per CLI (binary, timeout, extra environment, a wrapper such as strace, how to
interrupt) is a parameter."""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.abc

from mcp_sandboxes.backends.base import AgentSpec, Backend, Command, Turn, TurnResult
from mcp_sandboxes.events import Event
from mcp_sandboxes.providers.base import ExecResult, ExecStream, LineSplitter
from mcp_sandboxes.providers.local._pipes import enlarge_output_pipes


class HostSandbox:
    """Runs apply_setup()'s commands on this host for real (as root here), files in real paths."""

    id = "host"
    provider = "host"

    async def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = 30.0,  # noqa: ASYNC109 - the Sandbox protocol's signature
    ) -> ExecResult:
        assert user in (None, "0"), "apply_setup only runs commands as root or the default user"
        with anyio.fail_after(timeout):
            done = await anyio.run_process(argv, input=stdin, cwd=cwd, check=False)
        return ExecResult(exit_code=done.returncode, stdout=done.stdout, stderr=done.stderr)

    def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AbstractAsyncContextManager[ExecStream]:
        raise NotImplementedError("these tests run the CLI themselves")

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        target = anyio.Path(path)
        await target.write_bytes(data)
        await target.chmod(mode)
        if user is not None:
            os.chown(path, *user_ids(user))

    async def get_file(self, path: str) -> bytes:
        return await anyio.Path(path).read_bytes()


def user_ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


@dataclass
class Outcome:
    events: list[Event]
    result: TurnResult
    exit_code: int
    stderr: str = ""
    lines: list[str] = field(default_factory=list)
    runs: int = 1


OnEvent = Callable[[Event, anyio.abc.Process], None]
OnLine = Callable[[str, anyio.abc.Process], Awaitable[None]]


async def run_turn(
    backend: Backend,
    turn: Turn,
    executable: Path,
    *,
    timeout_s: float,
    on_event: OnEvent | None = None,
    on_line: OnLine | None = None,
    prefix: Sequence[str] = (),
    extra_env: Callable[[Command], Mapping[str, str]] | None = None,
    withhold_stdin: int = 0,
) -> Outcome:
    """One turn: `executable` stands in for the argv's CLI path (the in-sandbox target), `prefix`
    wraps it (e.g. strace), `extra_env` adds variables under the command's own env. The command's
    retry rule is followed as the orchestrator's runner follows it; the first `withhold_stdin` runs
    get an open stdin that stays empty (a CLI's stdin window then passes, as on a stalled
    machine), closed once their output ends. `Outcome.runs` counts runs."""
    command = backend.command(turn)
    argv = [*prefix, str(executable), *command.argv[1:]]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(extra_env(command) if extra_env else {}), **command.env}
    translator = backend.translator()
    events: list[Event] = []
    lines: list[str] = []
    runs = 0
    with anyio.fail_after(timeout_s):
        while True:
            runs += 1
            splitter = LineSplitter()
            async with await anyio.open_process(argv, cwd=command.cwd, env=env) as process:
                assert process.stdin and process.stdout and process.stderr
                enlarge_output_pipes(process)  # as the local providers do (see providers/_pipes.py)
                withheld = runs <= withhold_stdin
                if not withheld:
                    with contextlib.suppress(anyio.BrokenResourceError):  # it may exit without reading
                        await process.stdin.send(command.stdin or b"")
                    await process.stdin.aclose()
                async for chunk in process.stdout:
                    for line in splitter.feed(chunk):
                        lines.append(line)
                        new = translator.feed(line)
                        events.extend(new)
                        for event in new:
                            if on_event is not None:
                                on_event(event, process)
                        if on_line is not None:
                            await on_line(line, process)
                stderr = b"".join([chunk async for chunk in process.stderr]).decode("utf-8", "replace")
                exit_code = await process.wait()
                if withheld:
                    await process.stdin.aclose()
            retry = command.retry
            printed = any(line.strip() for line in lines)
            if retry is None or not retry.applies(
                attempt=runs, exit_code=exit_code, printed_stdout=printed, stderr=stderr
            ):
                break
    events.extend(translator.finish(exit_code, stderr))
    return Outcome(events=events, result=translator.result, exit_code=exit_code, stderr=stderr, lines=lines, runs=runs)


T = TypeVar("T")


def of_type(events: list[Event], kind: type[T]) -> list[T]:
    return [event for event in events if isinstance(event, kind)]


def home_and_work(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh HOME (left for apply_setup() to create) and an existing workdir under the test's tmp."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    return home, work


def make_turn(agent: AgentSpec, prompt: str, dirs: tuple[Path, Path], resume_id: str | None = None) -> Turn:
    home, work = dirs
    return Turn(
        session_id="ses_test",
        index=1 if resume_id else 0,
        prompt=prompt,
        resume_id=resume_id,
        agent=agent,
        workdir=str(work),
        home=str(home),
    )
