"""Tool inputs and outputs: the pydantic models at the MCP boundary."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from annotated_types import Ge, Le
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from mcp_sandboxes.events import EVENT_TYPES, Usage
from mcp_sandboxes.orchestrator import Packages, SessionStatus, WorkspaceSpec, describe_backends, provider_names
from mcp_sandboxes.orchestrator.views import EnvironmentView, SessionView
from mcp_sandboxes.specs import ResourceLimits

MAX_WAIT_S = 600.0
MAX_LONG_POLL_S = 60.0

# Bounds checked here, at the door, so that a value the layers below cannot take is refused by
# name instead of failing later (at spawn, in SQLite, or in the kernel's execve).
# SQLite integers are signed 64-bit.
MAX_CURSOR = 2**63 - 1
# Docker's NanoCpus resolution allows far less, but below a hundredth of a core nothing runs.
MIN_CPUS = 0.01
# Linux refuses a single argv element over 128 KiB (MAX_ARG_STRLEN); UTF-8 takes up to 4 bytes
# a character, so an argv-bound text of at most 32,000 characters always fits.
MAX_ARGUMENT_CHARS = 32_000
# Prompts and messages go to the agent CLIs on stdin, so they may be long.
MAX_PROMPT_CHARS = 1_000_000
MAX_NAME_CHARS = 63
MAX_REF_CHARS = 128
MAX_MODEL_CHARS = 200
MAX_TOOL_RULE_CHARS = 256
MAX_TOOL_RULES = 100
MAX_IMAGE_CHARS = 512
MAX_PATH_CHARS = 1024
MAX_ENV_VARS = 100
MAX_ENV_KEY_CHARS = 128
# All variables together: the environment of every process in the sandbox shares execve's limit.
MAX_ENV_TOTAL_CHARS = 100_000
MAX_SETUP_COMMANDS = 50
MAX_EVENT_TYPES = 50

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
ENV_KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MODEL_PATTERN = re.compile(r"[A-Za-z0-9_.:/@+=\[\]-]+")
# Tool names and Claude's permission rules: "Bash", "mcp__srv__tool", "Bash(git diff:*)", "Read(~/src/**)".
TOOL_RULE_PATTERN = re.compile(r"[A-Za-z0-9_.:*()/ ~@=,+?\[\]-]+")


def _limit(field: str, kind: type[Ge] | type[Le]) -> int:
    """A bound of ResourceLimits, so the schema and the providers agree on one number."""
    for item in ResourceLimits.model_fields[field].metadata:
        bound: object = item.ge if isinstance(item, Ge) and kind is Ge else None
        bound = item.le if isinstance(item, Le) and kind is Le else bound
        if isinstance(bound, int):
            return bound
    raise LookupError(f"ResourceLimits.{field} has no {kind.__name__} bound")  # pragma: no cover


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL character; remove it")
    return value


def _no_controls(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("contains control characters (newline, tab, escape or NUL); remove them")
    return value


def _not_an_option(value: str) -> str:
    # Values that end up as command-line arguments must never be read as an option.
    if value.startswith("-"):
        raise ValueError("must not start with '-' (it would be read as a command-line option)")
    return value


def _matches(pattern: re.Pattern[str], allowed: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"has characters that are not allowed; use {allowed}")
        return value

    return AfterValidator(check)


# A required name, id or short token: one line, no control characters.
Ref = Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS), AfterValidator(_no_controls)]
# A short name that may become a command-line argument (a provider, a backend).
Word = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_controls), AfterValidator(_not_an_option)]
EnvironmentName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_NAME_CHARS),
    _matches(NAME_PATTERN, "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"),
]
MAX_ALLOWED_HOSTS = 64
_HOST_NAME = re.compile(
    r"^(\*\.)?(?=.*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _host_name(value: str) -> str:
    if not _HOST_NAME.match(value) or len(value) > 253:
        raise ValueError(
            "must be a domain name like 'pypi.org' or '*.example.com' (no scheme, port, path or IP address)"
        )
    return value.lower()


HostName = Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_host_name)]
Image = Annotated[
    str,
    Field(min_length=1, max_length=MAX_IMAGE_CHARS),
    AfterValidator(_no_controls),
    AfterValidator(_not_an_option),
]
SandboxPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS), AfterValidator(_no_controls)]
EnvKey = Annotated[
    str,
    Field(min_length=1, max_length=MAX_ENV_KEY_CHARS),
    _matches(ENV_KEY_PATTERN, "letters, digits and '_', not starting with a digit"),
]
EnvValue = Annotated[str, Field(max_length=MAX_ARGUMENT_CHARS), AfterValidator(_no_nul)]
SetupCommand = Annotated[str, Field(min_length=1, max_length=MAX_ARGUMENT_CHARS), AfterValidator(_no_nul)]
Model = Annotated[
    str,
    Field(min_length=1, max_length=MAX_MODEL_CHARS),
    AfterValidator(_not_an_option),
    _matches(MODEL_PATTERN, "letters, digits and . _ : / @ + = [ ] -, e.g. claude-sonnet-4-5"),
]
ToolRule = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TOOL_RULE_CHARS),
    AfterValidator(_not_an_option),
    _matches(TOOL_RULE_PATTERN, "a tool name or rule such as Bash, mcp__server__tool or Bash(git diff:*)"),
]
SystemPrompt = Annotated[
    str, Field(max_length=MAX_ARGUMENT_CHARS), AfterValidator(_no_nul), AfterValidator(_not_an_option)
]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_no_nul)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateEnvironmentInput(_Input):
    name: EnvironmentName = Field(description="Unique name, e.g. 'py-project'. 1-63 letters, digits, '.', '_' or '-'.")
    provider: Word | None = Field(
        default=None,
        description=f"Sandbox provider, one of: {', '.join(provider_names())}. Default from config (docker).",
    )
    image: Image | None = Field(default=None, description="Image to run, e.g. 'mcp-sandboxes/base:latest'.")
    env: dict[EnvKey, EnvValue] = Field(
        default_factory=dict,
        max_length=MAX_ENV_VARS,
        description=f"Environment variables set in every sandbox (at most {MAX_ENV_VARS},"
        f" {MAX_ENV_TOTAL_CHARS:,} characters in all).",
    )
    workdir: SandboxPath = Field(default="/workspace", description="Absolute working directory inside the sandbox.")
    network: Literal["none", "model", "host"] | None = Field(
        default=None,
        description="'model' (the default where the provider can: docker, podman, containerd, bubblewrap): no route"
        " out; the agent reaches its model API, this server (for sub-agents) and `allowed_hosts` only, through"
        " a proxy on the host that keeps the real API key (the sandbox holds a placeholder). 'none': loopback only"
        " (no model API: only for the custom backend or setup-only use). 'host': the host's whole network,"
        " every local service included, and the API key inside the sandbox; WARNING: opt in only when you"
        " trust the agent with both.",
    )
    allowed_hosts: list[HostName] = Field(
        default_factory=list,
        max_length=MAX_ALLOWED_HOSTS,
        description="Network 'model': further domain names the sandbox may reach through the proxy (HTTPS_PROXY),"
        " e.g. 'pypi.org', 'files.pythonhosted.org' or '*.github.com'. Names only, no IP addresses.",
    )
    cpus: float | None = Field(
        default=None,
        ge=MIN_CPUS,
        le=256,
        allow_inf_nan=False,
        description=f"CPU limit in cores, e.g. 1.5 ({MIN_CPUS} up to the engine's CPU count).",
    )
    memory_mb: int | None = Field(
        default=None,
        ge=_limit("memory_mb", Ge),
        le=_limit("memory_mb", Le),
        description="Memory limit in MiB, e.g. 2048.",
    )
    pids_limit: int | None = Field(
        default=None, ge=_limit("pids", Ge), le=_limit("pids", Le), description="Maximum number of processes."
    )
    setup_commands: list[SetupCommand] = Field(
        default_factory=list,
        max_length=MAX_SETUP_COMMANDS,
        description="Shell commands run as root before agents start: once, into a prepared image every spawn starts"
        " from (docker, podman: the environment is 'preparing', then 'ready' or 'failed'), else in each new sandbox.",
    )
    packages: Packages = Field(
        default_factory=Packages,
        description="Packages by manager, installed once into the prepared image before the setup commands, e.g."
        ' {"apt": ["git"], "pip": ["requests==2.32.3"], "npm": ["typescript"]} (docker, podman; needs network'
        " 'host'). Names only, optionally with a version.",
    )
    wait: bool = Field(
        default=False, description="Wait for the image preparation (packages, setup commands) to end, with progress."
    )
    timeout_s: float = Field(
        default=300, gt=0, le=MAX_WAIT_S, allow_inf_nan=False, description="How long `wait` waits, in seconds."
    )
    read_only_root: bool = Field(
        default=False,
        description="Read-only root filesystem; only the workdir, the agent's HOME and /tmp stay writable"
        " (docker, podman, containerd). Setup commands that install packages need a writable root.",
    )
    runtime: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="OCI runtime, e.g. 'runsc' for gVisor (docker, containerd; `mcp-sandboxes doctor` lists them).",
    )
    workspace: WorkspaceSpec | None = Field(
        default=None,
        description="What each sandbox's workdir starts with, where the agent starts: a host directory"
        ' {"kind": "directory", "path": "/abs/path", "mode": "ro" | "rw" | "copy"} or a git repository'
        ' {"kind": "git", "url": "/abs/repo or https://...", "ref": "main"} (cloned on the host). Host paths'
        " only under the server's workspaces.allowed_roots. Each session of a git or copied workspace works"
        " on its own branch mcp-sandboxes/<session_id>; session_diff and export_changes take the work out.",
    )
    warm_pool: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Sandboxes kept started for this environment, so spawn_agent takes one instead of waiting"
        " for the engine (refilled in the background; they count toward server.max_sandboxes). 0: none.",
    )

    @field_validator("env")
    @classmethod
    def _env_fits(cls, value: dict[str, str]) -> dict[str, str]:
        if sum(len(key) + len(item) + 2 for key, item in value.items()) > MAX_ENV_TOTAL_CHARS:
            raise ValueError(f"more than {MAX_ENV_TOTAL_CHARS:,} characters in all; pass large data as a file")
        return value


class EnvironmentRefInput(_Input):
    environment: Ref = Field(description="Environment id or name.")


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
    environment: Ref = Field(description="Environment id or name to run the agent in.")
    prompt: Prompt = Field(description=f"The first message to the agent (at most {MAX_PROMPT_CHARS:,} characters).")
    backend: Word = Field(
        default="claude",
        description=f"Agent CLI, one of: {describe_backends()}.",
    )
    model: Model | None = Field(default=None, description="Model name passed to the CLI, e.g. 'claude-sonnet-4-5'.")
    system_prompt: SystemPrompt | None = Field(
        default=None,
        description=f"Extra system prompt appended for the agent (at most {MAX_ARGUMENT_CHARS:,} characters).",
    )
    allowed_tools: list[ToolRule] | None = Field(
        default=None,
        max_length=MAX_TOOL_RULES,
        description="Tools the agent may use without asking, e.g. ['Bash', 'Edit', 'Read', 'Bash(git diff:*)'].",
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
        " sub-agents, within the depth limit. Needs an environment with network 'model' or 'host'.",
    )
    ask_permissions: bool = Field(
        default=False,
        description="Claude only: when its permission mode asks about a tool call, ask here instead of refusing:"
        " the session shows session.requires_action, the human is asked through elicitation when the client"
        " supports it, and resolve_permission answers; unanswered prompts are denied after"
        " permissions.timeout_s. Needs network 'model' or 'host'.",
    )
    wait: bool = Field(default=False, description="Wait for the first turn to end and return its final message.")
    timeout_s: float = Field(
        default=300, gt=0, le=MAX_WAIT_S, allow_inf_nan=False, description="How long `wait` waits, in seconds."
    )


class SessionRefInput(_Input):
    session_id: Ref = Field(description="Session id, as returned by spawn_agent (ses_...).")


class SendMessageInput(SessionRefInput):
    text: Prompt = Field(description="The message. Sent while a turn runs, it is queued and becomes the next turn.")
    wait: bool = Field(default=False, description="Wait for this message's turn to end.")
    timeout_s: float = Field(
        default=300, gt=0, le=MAX_WAIT_S, allow_inf_nan=False, description="How long `wait` waits, in seconds."
    )


class ReadEventsInput(SessionRefInput):
    after: int = Field(default=0, ge=0, le=MAX_CURSOR, description="Cursor: return events with seq greater than this.")
    limit: int = Field(default=100, ge=1, le=1000, description="Maximum number of events returned.")
    wait_s: float = Field(
        default=0,
        ge=0,
        le=MAX_LONG_POLL_S,
        allow_inf_nan=False,
        description="Long-poll: wait up to this many seconds for new events.",
    )
    types: list[Annotated[str, Field(max_length=MAX_REF_CHARS)]] | None = Field(
        default=None, max_length=MAX_EVENT_TYPES, description="Only these event types, e.g. ['agent.message']."
    )

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


class ResolvePermissionInput(SessionRefInput):
    request_id: str = Field(
        max_length=64, description="The request's id (perm_...), from session.requires_action or get_session."
    )
    decision: Literal["allow", "deny"] = Field(description="allow: the tool call runs; deny: it is refused.")
    message: str | None = Field(default=None, max_length=2000, description="Why; told to the sub-agent.")


class WaitForInput(_Input):
    session_ids: list[Ref] = Field(
        min_length=1, max_length=100, description="Sessions to wait for (ses_...), e.g. the children you fanned out."
    )
    mode: Literal["all", "any"] = Field(
        default="all", description="'all': until every session has settled; 'any': until the first one has."
    )
    timeout_s: float = Field(
        default=90,
        gt=0,
        le=MAX_WAIT_S,
        allow_inf_nan=False,
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
    denied_tools: list[str] = Field(
        default_factory=list, description="Tool calls the agent's permission mode refused in this turn."
    )
    note: str | None = Field(default=None, description="What to do next when the turn has not ended yet.")
