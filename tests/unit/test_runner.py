"""The orchestrator's turn runner on real processes (the `process` provider): a command's retry
rule, a CLI that exits without reading its prompt, and the turn deadline."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.backends.base import AgentSpec, Command, RetryIf, Turn, TurnResult
from mcp_sandboxes.backends.custom import CustomTranslator
from mcp_sandboxes.events import AgentMessage, Event, SessionError
from mcp_sandboxes.orchestrator.runner import (
    TURN_MARKER_ENV,
    NativeIdSink,
    OomWatch,
    RunningTurn,
    SandboxExists,
    kill_marked,
    run_turn,
)
from mcp_sandboxes.providers.base import Mount, Sandbox, SandboxSpec
from mcp_sandboxes.providers.local.process import ProcessProvider, ProcessSettings
from mcp_sandboxes.specs import SandboxSetup

RACE = RetryIf(exit_code=42, stderr_contains="no input", attempts=3)


class ScriptBackend:
    """A CLI that is a shell script; its stdout lines are agent messages."""

    name = "script"
    executable = "sh"

    def __init__(self, script: str, *, stdin: bytes | None = None, retry: RetryIf | None = None) -> None:
        self.script, self.stdin, self.retry = script, stdin, retry

    def command(self, turn: Turn) -> Command:
        return Command(argv=["sh", "-c", self.script], stdin=self.stdin, retry=self.retry)

    def translator(self) -> CustomTranslator:
        return CustomTranslator("text")

    def mounts(self) -> list[Mount]:
        return []

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        return SandboxSetup(backend=self.name, home=home)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with ProcessProvider(ProcessSettings(state_dir=str(tmp_path / "state"))) as provider:
        created = await provider.create(SandboxSpec(image="host"))  # a private /workspace
        try:
            yield created
        finally:
            await provider.destroy(created.id)


@dataclass
class Ran:
    events: list[Event]
    result: TurnResult
    handle: RunningTurn

    @property
    def messages(self) -> list[str]:
        return [block.text for event in self.events if isinstance(event, AgentMessage) for block in event.content]

    @property
    def errors(self) -> list[SessionError]:
        return [event for event in self.events if isinstance(event, SessionError)]


async def run(
    sandbox: Sandbox,
    backend: ScriptBackend,
    timeout_s: float = 30.0,
    *,
    on_native_id: NativeIdSink | None = None,
    resume_id: str | None = None,
    sandbox_exists: SandboxExists | None = None,
    oom: OomWatch | None = None,
    also: Callable[[Sequence[Event]], Awaitable[None]] | None = None,
) -> Ran:
    events: list[Event] = []

    async def emit(batch: Sequence[Event]) -> None:
        events.extend(batch)
        if also is not None:
            await also(batch)

    turn = Turn(session_id="ses_runner", index=0, prompt="p", resume_id=resume_id, agent=AgentSpec(backend="script"))
    handle = RunningTurn(index=0)
    result = await run_turn(
        sandbox=sandbox,
        backend=backend,
        turn=turn,
        handle=handle,
        emit=emit,
        user=None,
        timeout_s=timeout_s,
        on_native_id=on_native_id,
        sandbox_exists=sandbox_exists,
        oom=oom,
    )
    return Ran(events, result, handle)


def counted(tmp_path: Path, fail_runs: int, then: str) -> str:
    """A script that, for its first `fail_runs` runs, says "no input" and exits 42."""
    counter = tmp_path / "runs"
    return (
        f"n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter}; "
        f'if [ $n -le {fail_runs} ]; then echo "no input" >&2; exit 42; fi; {then}'
    )


async def test_a_run_that_matches_the_retry_rule_is_run_again(sandbox: Sandbox, tmp_path: Path) -> None:
    ran = await run(sandbox, ScriptBackend(counted(tmp_path, 2, "echo ran; exit 0"), retry=RACE))
    assert (tmp_path / "runs").read_text().strip() == "3"
    assert ran.messages == ["ran"] and ran.errors == []
    assert ran.result.stop_reason == "end_turn"


async def test_retries_stop_after_the_rules_attempts_and_the_last_failure_stands(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    ran = await run(sandbox, ScriptBackend(counted(tmp_path, 5, "echo ran"), retry=RACE))
    assert (tmp_path / "runs").read_text().strip() == "3"
    assert ran.messages == []
    assert ran.result.stop_reason == "error" and "no input" in ran.errors[-1].error.message


@pytest.mark.parametrize(
    ("then_fail", "why"),
    [
        ('echo partial; echo "no input" >&2; exit 42', "it printed on stdout"),
        ('echo "no input" >&2; exit 41', "another exit code"),
        ('echo "other" >&2; exit 42', "another message"),
    ],
)
async def test_a_run_is_not_repeated_unless_every_condition_holds(
    sandbox: Sandbox, tmp_path: Path, then_fail: str, why: str
) -> None:
    counter = tmp_path / "runs"
    script = f"echo x >> {counter}; {then_fail}"
    await run(sandbox, ScriptBackend(script, retry=RACE))
    assert counter.read_text().count("x") == 1, why


async def test_without_a_rule_a_matching_failure_runs_once(sandbox: Sandbox, tmp_path: Path) -> None:
    await run(sandbox, ScriptBackend(counted(tmp_path, 1, "echo ran")))
    assert (tmp_path / "runs").read_text().strip() == "1"


async def test_a_cli_that_exits_without_reading_a_large_prompt_ends_the_turn_with_its_own_error(
    sandbox: Sandbox,
) -> None:
    # 4 MiB cannot sit in a pipe: the write fails once the script has exited.
    ran = await run(sandbox, ScriptBackend("echo 'bad flag' >&2; exit 3", stdin=b"x" * (4 << 20)))
    assert ran.result.stop_reason == "error"
    assert "bad flag" in ran.errors[-1].error.message
    assert "not delivered on stdin" in ran.errors[-1].error.message


async def test_the_deadline_covers_every_run_and_kills_the_one_running(sandbox: Sandbox, tmp_path: Path) -> None:
    ran = await run(
        sandbox, ScriptBackend(counted(tmp_path, 1, "echo started; exec sleep 60"), retry=RACE), timeout_s=3.0
    )
    assert (tmp_path / "runs").read_text().strip() == "2"
    assert ran.messages == ["started"]
    assert ran.errors[-1].error.type == "turn_timeout" and ran.result.stop_reason == "error"
    assert ran.handle.interrupted and ran.handle.stream is None


# -- crash and removal recovery -------------------------------------------------------------


class JsonlBackend(ScriptBackend):
    """A CLI whose stdout lines are our own JSONL events (the custom backend's `jsonl` output)."""

    def translator(self) -> CustomTranslator:
        return CustomTranslator("jsonl")


def message_line(text: str) -> str:
    return json.dumps({"type": "agent.message", "content": [{"type": "text", "text": text}]})


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[ProcessProvider]:
    async with ProcessProvider(ProcessSettings(state_dir=str(tmp_path / "state"))) as opened:
        yield opened


async def test_the_cli_session_id_is_handed_over_while_the_cli_still_runs(sandbox: Sandbox, tmp_path: Path) -> None:
    # The script reports its id, then waits for the sink to have seen it: if the id were only
    # saved at the turn's end, the script would never go on and the turn would time out.
    go = tmp_path / "go"
    script = (
        f"echo '{json.dumps({'type': 'session.native_id', 'id': 'native-1'})}'; "
        f"while [ ! -e {go} ]; do sleep 0.05; done; echo '{message_line('went on')}'"
    )
    seen: list[str] = []

    async def sink(native_id: str) -> None:
        seen.append(native_id)
        go.touch()

    ran = await run(sandbox, JsonlBackend(script), timeout_s=20.0, on_native_id=sink)
    assert seen == ["native-1"]
    assert ran.messages == ["went on"] and ran.result.stop_reason == "end_turn"
    assert ran.result.native_session_id == "native-1"


async def test_an_id_the_turn_resumed_from_is_not_saved_again(sandbox: Sandbox) -> None:
    script = f"echo '{json.dumps({'type': 'session.native_id', 'id': 'known'})}'"
    seen: list[str] = []

    async def sink(native_id: str) -> None:
        seen.append(native_id)

    await run(sandbox, JsonlBackend(script), on_native_id=sink, resume_id="known")
    assert seen == []


async def test_every_process_of_a_turn_carries_its_marker(sandbox: Sandbox) -> None:
    ran = await run(sandbox, ScriptBackend(f'echo "${TURN_MARKER_ENV}"; sh -c \'echo "child ${TURN_MARKER_ENV}"\''))
    assert ran.messages == ["ses_runner:0\nchild ses_runner:0"]


async def test_kill_marked_ends_what_a_turn_left_behind_and_nothing_else(sandbox: Sandbox, tmp_path: Path) -> None:
    # The turn starts a process in a session of its own, which outlives the turn (as a CLI's
    # tools do when the server dies); an unmarked one started the same way must survive.
    pids = tmp_path / "pids"
    # Each writes its pid once in its own session, so the turn's end cannot kill it before.
    script = "".join(
        f"{prefix}setsid sh -c 'echo $$ > {pids}.{n}; exec sleep {n}' >/dev/null 2>&1 </dev/null & "
        f"while [ ! -s {pids}.{n} ]; do sleep 0.01; done; "
        for prefix, n in (("", 301), (f"env -u {TURN_MARKER_ENV} ", 302))
    )
    assert (await run(sandbox, ScriptBackend(script))).result.stop_reason == "end_turn"
    left, unmarked = (int((tmp_path / f"pids.{n}").read_text()) for n in (301, 302))
    left_fd = os.pidfd_open(left)  # readable once the process has ended, whoever reaps it
    try:
        assert running(left) and running(unmarked)
        killed = await kill_marked(sandbox, "ses_runner", 0)
        assert [entry.split()[0] for entry in killed] == [str(left)]
        assert "sleep 301" in killed[0]
        with anyio.fail_after(10):
            await anyio.wait_readable(left_fd)
        assert running(unmarked)
        assert await kill_marked(sandbox, "ses_other", 0) == []
        assert await kill_marked(sandbox, "ses_runner", 1) == []
    finally:
        os.close(left_fd)
        for pid in (left, unmarked):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_sandbox_removed_mid_turn_is_reported_as_removed_not_as_the_cli_crashing(
    provider: ProcessProvider,
) -> None:
    sandbox = await provider.create(SandboxSpec(image="host"))
    removed = False

    async def exists() -> bool:
        return await provider.attach(sandbox.id) is not None

    async def remove_once_started(events: Sequence[Event]) -> None:
        nonlocal removed
        if any(isinstance(e, AgentMessage) for e in events) and not removed:
            removed = True
            await provider.destroy(sandbox.id)  # kills the turn's process group: exit 137

    backend = JsonlBackend(f"echo '{message_line('started')}'; exec sleep 60")
    ran = await run(sandbox, backend, timeout_s=30.0, sandbox_exists=exists, also=remove_once_started)
    assert removed
    assert ran.result.stop_reason == "error"
    assert ran.result.error == f"its sandbox {sandbox.id} was removed outside mcp-sandboxes"
    assert ran.handle.removed == ran.result.error
    assert [e.error.type for e in ran.errors] == ["sandbox_removed"], "the CLI's own exit-137 error is not reported"


async def test_a_command_failing_in_a_sandbox_that_still_exists_is_the_cli_failing(sandbox: Sandbox) -> None:
    checked: list[bool] = []

    async def exists() -> bool:
        checked.append(True)
        return True

    ran = await run(sandbox, ScriptBackend("echo boom >&2; kill -9 $$"), sandbox_exists=exists, oom=OomWatch(64))
    assert checked == [True]
    assert ran.handle.removed is None
    assert ran.result.stop_reason == "error" and "out of memory" not in (ran.result.error or "")
    assert [e.error.type for e in ran.errors] != ["sandbox_removed"]
