"""The orchestrator's turn runner on real processes (the `process` provider): a command's retry
rule, a CLI that exits without reading its prompt, and the turn deadline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcp_sandboxes.backends.base import AgentSpec, Command, RetryIf, Turn, TurnResult
from mcp_sandboxes.backends.custom import CustomTranslator
from mcp_sandboxes.events import AgentMessage, Event, SessionError
from mcp_sandboxes.orchestrator.runner import RunningTurn, run_turn
from mcp_sandboxes.providers.base import Mount, Sandbox, SandboxSpec
from mcp_sandboxes.providers.process import ProcessProvider, ProcessSettings

RACE = RetryIf(exit_code=42, stderr_contains="no input", attempts=3)


class ScriptBackend:
    """A CLI that is a shell script; its stdout lines are agent messages."""

    name = "script"

    def __init__(self, script: str, *, stdin: bytes | None = None, retry: RetryIf | None = None) -> None:
        self.script, self.stdin, self.retry = script, stdin, retry

    def command(self, turn: Turn) -> Command:
        return Command(argv=["sh", "-c", self.script], stdin=self.stdin, retry=self.retry)

    def translator(self) -> CustomTranslator:
        return CustomTranslator("text")

    def mounts(self) -> list[Mount]:
        return []

    async def prepare(self, sandbox: Sandbox, agent: AgentSpec, *, home: str, user: str | None) -> None:
        return None


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


async def run(sandbox: Sandbox, backend: ScriptBackend, timeout_s: float = 30.0) -> Ran:
    events: list[Event] = []

    async def emit(batch: Sequence[Event]) -> None:
        events.extend(batch)

    turn = Turn(session_id="ses_runner", index=0, prompt="p", agent=AgentSpec(backend="script"))
    handle = RunningTurn(index=0)
    result = await run_turn(
        sandbox=sandbox, backend=backend, turn=turn, handle=handle, emit=emit, user=None, timeout_s=timeout_s
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
