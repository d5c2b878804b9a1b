"""The contracts every agent backend implements.

A Backend builds the argv for a turn (first or resumed) and says, as data, what its CLI needs
in the sandbox (a `SandboxSetup`, which the orchestrator applies); its Translator turns the
CLI's machine-readable stdout into normalized events. Backends know their CLI and nothing about
where it runs: they import no provider.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.events import Event, StopReasonType, Usage
from mcp_sandboxes.specs import AgentSpec as AgentSpec
from mcp_sandboxes.specs import Mount, SandboxSetup


def argument(field: str, value: str) -> str:
    """A caller's value that becomes one argv element after its option: refused when the CLI
    could read it as an option of its own (`--permission-mode` smuggled in as a tool name) or
    when execve could not pass it. The MCP schema refuses these first; this is the second lock."""
    if value.startswith("-") or "\x00" in value:
        raise InvalidInputError(
            field, "must not start with '-' or contain NUL: it is passed as a command-line argument"
        )
    return value


class Turn(BaseModel):
    """One turn of a session: a prompt, and the CLI's own session id when resuming."""

    model_config = ConfigDict(extra="forbid")

    session_id: str
    index: int = Field(ge=0)
    prompt: str
    resume_id: str | None = None
    agent: AgentSpec
    workdir: str = "/workspace"
    home: str = "/home/agent"


class RetryIf(BaseModel):
    """When a CLI run that never got going is simply run again: it exited with `exit_code`,
    printed nothing on stdout and said `stderr_contains`. For races inside a CLI that lose
    its input before any model call (so a rerun repeats no work and costs nothing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exit_code: int
    stderr_contains: str = Field(min_length=1)
    attempts: int = Field(default=3, ge=1, le=10, description="Runs in all, the first included.")

    def applies(self, *, attempt: int, exit_code: int, printed_stdout: bool, stderr: str) -> bool:
        """Whether run number `attempt` (from 1) is to be followed by another."""
        return (
            attempt < self.attempts
            and exit_code == self.exit_code
            and not printed_stdout
            and self.stderr_contains in stderr
        )


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    stdin: bytes | None = None
    cwd: str | None = None
    retry: RetryIf | None = None


class TurnResult(BaseModel):
    """What a translator concluded about a finished turn."""

    stop_reason: StopReasonType = "end_turn"
    final_text: str | None = None
    usage: Usage = Field(default_factory=Usage)
    native_session_id: str | None = Field(
        default=None, description="The CLI's own session/thread id, used to resume the next turn."
    )
    error: str | None = None
    denials: list[str] = Field(
        default_factory=list, description="Tool calls the CLI's permission mode refused, e.g. 'Bash: rm -rf x'."
    )


@runtime_checkable
class Translator(Protocol):
    """Stateful, one per turn. Never raises on bad input: a malformed line becomes an event."""

    def feed(self, line: str) -> list[Event]: ...

    def finish(self, exit_code: int, stderr_tail: str) -> list[Event]: ...

    @property
    def result(self) -> TurnResult: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    # The program the CLI needs on the sandbox's PATH when no host `cli_path` is mounted
    # ("claude", "droid", ...; for custom, its command's argv[0]). `doctor` looks for it.
    executable: str

    def command(self, turn: Turn) -> Command: ...

    def translator(self) -> Translator: ...

    def mounts(self) -> list[Mount]:
        """Host paths to mount into the sandbox (e.g. a CLI binary), read-only."""
        ...

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        """What the CLI needs in the sandbox before its first turn, for `agent` with HOME at
        `home`: directories and config files (mcp_sandboxes.orchestrator.setup applies it, owned
        by the sandbox's user). Raises InvalidInputError for an agent spec the CLI cannot run, so
        a bad spawn fails before any turn."""
        ...
