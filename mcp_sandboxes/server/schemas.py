"""Tool inputs and outputs: the pydantic models at the MCP boundary."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mcp_sandboxes.events import EVENT_TYPES, Usage
from mcp_sandboxes.orchestrator.views import EnvironmentView, SessionView
from mcp_sandboxes.store.records import SessionStatus

MAX_WAIT_S = 600.0
MAX_LONG_POLL_S = 60.0


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateEnvironmentInput(_Input):
    name: str = Field(description="Unique name, e.g. 'py-project'. Letters, digits, '.', '_' or '-'.")
    provider: str | None = Field(default=None, description="Sandbox provider, e.g. 'docker'. Default from config.")
    image: str | None = Field(default=None, description="Image to run, e.g. 'mcp-sandboxes/base:latest'.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables set in every sandbox.")
    workdir: str = Field(default="/workspace", description="Absolute working directory inside the sandbox.")
    network: Literal["none", "host"] = Field(
        default="none", description="'none': loopback only. 'host': the host's network (agents reaching a model API)."
    )
    cpus: float | None = Field(default=None, gt=0, le=256, description="CPU limit in cores, e.g. 1.5.")
    memory_mb: int | None = Field(default=None, ge=16, description="Memory limit in MiB, e.g. 2048.")
    pids_limit: int | None = Field(default=None, ge=8, description="Maximum number of processes.")
    setup_commands: list[str] = Field(
        default_factory=list,
        description="Shell commands run once, as root, in each new sandbox before the agent starts.",
    )


class EnvironmentRefInput(_Input):
    environment: str = Field(description="Environment id or name.")


class DeleteEnvironmentInput(EnvironmentRefInput):
    force: bool = Field(default=False, description="Also stop the live sessions that use it.")
    purge: bool = Field(
        default=False,
        description="Also erase its sessions' history (events, transcripts). Without it, that history stays"
        " readable through get_session, read_events and the transcript resources.",
    )


class NoInput(_Input):
    pass


class SpawnAgentInput(_Input):
    environment: str = Field(description="Environment id or name to run the agent in.")
    prompt: str = Field(description="The first message to the agent.")
    backend: str = Field(
        default="claude",
        description="Agent CLI: 'claude', 'codex', 'gemini', 'opencode', 'factory' (Droid) or 'custom' (from config).",
    )
    model: str | None = Field(default=None, description="Model name passed to the CLI, e.g. 'claude-sonnet-4-5'.")
    system_prompt: str | None = Field(default=None, description="Extra system prompt appended for the agent.")
    allowed_tools: list[str] | None = Field(
        default=None, description="Tools the agent may use without asking, e.g. ['Bash', 'Edit', 'Read']."
    )
    permission_mode: Literal["default", "acceptEdits", "plan", "bypassPermissions", "dontAsk", "auto"] | None = Field(
        default=None,
        description="Claude's permission modes. 'bypassPermissions' lets any agent act freely inside its sandbox"
        " (codex: bypass its own sandbox, gemini: yolo, opencode/droid: skip permission prompts).",
    )
    max_turns: int | None = Field(default=None, ge=1, le=10_000, description="Stop after this many agent turns.")
    subagents: bool = Field(
        default=False,
        description="Give the agent this server's tools (MCP server 'sandboxes') so it can spawn and steer its own"
        " sub-agents, within the depth limit. Needs an environment with network='host'.",
    )
    wait: bool = Field(default=False, description="Wait for the first turn to end and return its final message.")
    timeout_s: float = Field(default=300, gt=0, le=MAX_WAIT_S, description="How long `wait` waits, in seconds.")


class SessionRefInput(_Input):
    session_id: str = Field(description="Session id, as returned by spawn_agent (ses_...).")


class SendMessageInput(SessionRefInput):
    text: str = Field(description="The message. Sent while a turn runs, it is queued and becomes the next turn.")
    wait: bool = Field(default=False, description="Wait for this message's turn to end.")
    timeout_s: float = Field(default=300, gt=0, le=MAX_WAIT_S, description="How long `wait` waits, in seconds.")


class ReadEventsInput(SessionRefInput):
    after: int = Field(default=0, ge=0, description="Cursor: return events with seq greater than this.")
    limit: int = Field(default=100, ge=1, le=1000, description="Maximum number of events returned.")
    wait_s: float = Field(
        default=0, ge=0, le=MAX_LONG_POLL_S, description="Long-poll: wait up to this many seconds for new events."
    )
    types: list[str] | None = Field(default=None, description="Only these event types, e.g. ['agent.message'].")

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if name not in EVENT_TYPES:
                raise ValueError(f"unknown event type {name!r}; known: {', '.join(sorted(EVENT_TYPES))}")
        return value


class ListSessionsInput(_Input):
    status: list[SessionStatus] | None = Field(
        default=None, description="Only sessions in these states: starting, running, idle, stopped, failed."
    )


class EnvironmentList(BaseModel):
    environments: list[EnvironmentView]


class SessionList(BaseModel):
    sessions: list[SessionView]


class WaitForInput(_Input):
    session_ids: list[str] = Field(
        min_length=1, max_length=100, description="Sessions to wait for (ses_...), e.g. the children you fanned out."
    )
    mode: Literal["all", "any"] = Field(
        default="all", description="'all': until every session has settled; 'any': until the first one has."
    )
    timeout_s: float = Field(
        default=90,
        gt=0,
        le=MAX_WAIT_S,
        description="How long to wait, in seconds; capped by the server (max_call_s, default 100) so that"
        " clients do not move the call to the background. Call again to keep waiting.",
    )


class WaitForResult(BaseModel):
    sessions: list[SessionView]
    settled: list[str] = Field(description="Ids of the sessions with no turn running or queued.")
    timed_out: bool = Field(description="True when the wait ended before the condition held; call again.")


class TurnOutcome(BaseModel):
    """Returned by spawn_agent and send_message."""

    session: SessionView
    turn_index: int = Field(description="Which turn this message started (0 for the first).")
    completed: bool = Field(description="True when `wait` was set and the turn ended in time.")
    final_message: str | None = None
    stop_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    note: str | None = Field(default=None, description="What to do next when the turn has not ended yet.")
