"""The normalized event vocabulary every backend's translator speaks.

Names follow Anthropic's Managed Agents API (`{domain}.{action}`). Events are a
discriminated union on `type`, so a stored event round-trips to its model. Output a
translator does not understand becomes `agent.raw`; it is never dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Model):
    type: Literal["text"] = "text"
    text: str


class Usage(_Model):
    """Token usage normalized across CLIs. `cost_usd` only when the CLI reports it."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None

    def __add__(self, other: Usage) -> Usage:
        cost: float | None
        if self.cost_usd is None and other.cost_usd is None:
            cost = None
        else:
            # Rounded: sums of binary floats otherwise show noise like 0.30000000000000004.
            cost = round((self.cost_usd or 0.0) + (other.cost_usd or 0.0), 8)
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_creation_input_tokens=self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cost_usd=cost,
        )


StopReasonType = Literal["end_turn", "max_turns", "error", "requires_action", "interrupted"]


class StopReason(_Model):
    type: StopReasonType


class ErrorInfo(_Model):
    type: str = Field(description="A short machine-readable kind, e.g. api_error, cli_crashed, parse_error.")
    message: str


class UserMessage(_Model):
    type: Literal["user.message"] = "user.message"
    content: list[TextBlock]


class UserInterrupt(_Model):
    type: Literal["user.interrupt"] = "user.interrupt"


class AgentMessage(_Model):
    type: Literal["agent.message"] = "agent.message"
    content: list[TextBlock]

    @property
    def text(self) -> str:
        return "".join(block.text for block in self.content)


class AgentThinking(_Model):
    type: Literal["agent.thinking"] = "agent.thinking"
    thinking: str


class AgentToolUse(_Model):
    type: Literal["agent.tool_use"] = "agent.tool_use"
    tool_use_id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class AgentToolResult(_Model):
    type: Literal["agent.tool_result"] = "agent.tool_result"
    tool_use_id: str
    content: str
    is_error: bool = False


class AgentMcpToolUse(_Model):
    type: Literal["agent.mcp_tool_use"] = "agent.mcp_tool_use"
    tool_use_id: str
    server_name: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class AgentMcpToolResult(_Model):
    type: Literal["agent.mcp_tool_result"] = "agent.mcp_tool_result"
    tool_use_id: str
    content: str
    is_error: bool = False


class AgentRaw(_Model):
    """CLI output no translator rule matched: kept verbatim so nothing is lost."""

    type: Literal["agent.raw"] = "agent.raw"
    source: str = Field(description="The backend that printed it.")
    data: Any


class SessionStatusRunning(_Model):
    type: Literal["session.status_running"] = "session.status_running"


class SessionStatusIdle(_Model):
    type: Literal["session.status_idle"] = "session.status_idle"
    stop_reason: StopReason


class SessionStatusTerminated(_Model):
    type: Literal["session.status_terminated"] = "session.status_terminated"
    reason: str


class SessionError(_Model):
    type: Literal["session.error"] = "session.error"
    error: ErrorInfo


class SessionThreadCreated(_Model):
    type: Literal["session.thread_created"] = "session.thread_created"
    child_session_id: str


class SessionRequiresAction(_Model):
    """The agent waits for a decision: a tool call its permission mode asks about."""

    type: Literal["session.requires_action"] = "session.requires_action"
    request_id: str
    tool_name: str
    tool_input: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float


class UserToolConfirmation(_Model):
    """The answer to a session.requires_action: allow or deny, by whom."""

    type: Literal["user.tool_confirmation"] = "user.tool_confirmation"
    request_id: str
    result: Literal["allow", "deny"]
    decided_by: str = Field(description="'operator' (elicitation), 'timeout', or the session id that answered.")
    message: str | None = None


class SpanModelRequestEnd(_Model):
    """Usage for a turn (or a step of it, for CLIs that report per step)."""

    type: Literal["span.model_request_end"] = "span.model_request_end"
    model: str | None = None
    model_usage: Usage


class SandboxProvisioned(_Model):
    type: Literal["sandbox.provisioned"] = "sandbox.provisioned"
    provider: str
    sandbox_id: str
    duration_ms: int


class SandboxDestroyed(_Model):
    type: Literal["sandbox.destroyed"] = "sandbox.destroyed"
    provider: str
    sandbox_id: str


class NetworkRefused(_Model):
    """The egress proxy of a sandbox in network mode "model" refused a request: a host not in
    the environment's allow-list, an IP address, or a path that is no route."""

    type: Literal["network.refused"] = "network.refused"
    method: str
    target: str
    reason: str


Event = Annotated[
    UserMessage
    | UserInterrupt
    | AgentMessage
    | AgentThinking
    | AgentToolUse
    | AgentToolResult
    | AgentMcpToolUse
    | AgentMcpToolResult
    | AgentRaw
    | SessionStatusRunning
    | SessionStatusIdle
    | SessionStatusTerminated
    | SessionError
    | SessionThreadCreated
    | SessionRequiresAction
    | UserToolConfirmation
    | SpanModelRequestEnd
    | SandboxProvisioned
    | SandboxDestroyed
    | NetworkRefused,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

EVENT_TYPES: frozenset[str] = frozenset(
    member.model_fields["type"].default
    for member in (
        UserMessage,
        UserInterrupt,
        AgentMessage,
        AgentThinking,
        AgentToolUse,
        AgentToolResult,
        AgentMcpToolUse,
        AgentMcpToolResult,
        AgentRaw,
        SessionStatusRunning,
        SessionStatusIdle,
        SessionStatusTerminated,
        SessionError,
        SessionThreadCreated,
        SessionRequiresAction,
        UserToolConfirmation,
        SpanModelRequestEnd,
        SandboxProvisioned,
        SandboxDestroyed,
        NetworkRefused,
    )
)


def parse_event(data: dict[str, Any]) -> Event:
    return EVENT_ADAPTER.validate_python(data)
