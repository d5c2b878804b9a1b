"""What the orchestrator returns to its callers (and the MCP layer returns as structured output)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field

from mcp_sandboxes.events import Usage
from mcp_sandboxes.providers.base import NetworkMode, ResourceLimits
from mcp_sandboxes.store import DirectoryWorkspace, GitWorkspace, Packages


class WorkspaceView(BaseModel):
    """What an environment brings into each sandbox: a host directory or a git repository."""

    kind: str = Field(description="'directory' or 'git'.")
    source: str = Field(description="The host path, or the repository's path or URL (without any credentials).")
    mode: str | None = Field(default=None, description="A directory's mode: 'copy', 'ro' or 'rw'.")
    ref: str | None = Field(default=None, description="A repository's starting branch, tag or commit (None: HEAD).")

    @classmethod
    def of(cls, workspace: DirectoryWorkspace | GitWorkspace | None) -> WorkspaceView | None:
        if workspace is None:
            return None
        if isinstance(workspace, DirectoryWorkspace):
            return cls(kind="directory", source=workspace.path, mode=workspace.mode)
        parts = urlsplit(workspace.url)
        source = workspace.url
        if parts.scheme and "@" in parts.netloc:
            # A token in https://user:token@host/... is never shown back.
            source = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        return cls(kind="git", source=source, ref=workspace.ref)


class EnvironmentView(BaseModel):
    id: str
    name: str
    provider: str
    image: str
    workdir: str
    network: NetworkMode
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Network 'model': domains reachable through the proxy besides the model API."
    )
    limits: ResourceLimits
    read_only_root: bool = False
    runtime: str | None = None
    created_by_session: str | None = Field(default=None, description="The agent's session that made it, if any.")
    env_keys: list[str] = Field(description="Names of the environment variables set (values are not echoed).")
    setup_commands: list[str]
    workspace: WorkspaceView | None = Field(default=None, description="What each sandbox starts with.")
    packages: Packages = Field(default_factory=Packages, description="Packages its prepared image installs.")
    prepared_image: str | None = Field(
        default=None,
        description="The image its packages and setup commands were prepared into once (docker, podman);"
        " every spawn starts from it.",
    )
    state: str = Field(
        description="'preparing' while its image is prepared, 'failed' when that failed (state_detail says where),"
        " 'ready' when its provider is reachable, else 'unavailable'; 'deleted' in delete_environment's answer."
    )
    state_detail: str | None = None
    live_sessions: int
    created_at: str
    warm_pool: int = Field(default=0, description="Sandboxes it keeps started for spawns to take.")
    warm_ready: int = Field(default=0, description="Of those, how many are started and waiting now.")
    warm_pool_error: str | None = Field(
        default=None, description="Why the pool is not full, when it is not (the last failure, or max_sandboxes)."
    )


class TurnView(BaseModel):
    index: int
    status: str
    stop_reason: str | None = None
    final_message: str | None = None
    error: str | None = None
    usage: Usage | None = None
    denied_tools: list[str] = Field(
        default_factory=list, description="Tool calls the agent's permission mode refused in this turn."
    )


class PermissionView(BaseModel):
    request_id: str
    tool_name: str
    tool_input: dict[str, Any]


class SubtreeView(BaseModel):
    """A session and every sub-agent below it, rolled up."""

    sessions: int
    live_sessions: int
    turns: int
    usage: Usage


class SessionView(BaseModel):
    session_id: str
    environment_id: str
    environment_name: str | None = None
    parent_session_id: str | None = None
    backend: str
    model: str | None = None
    status: str
    stop_reason: str | None = None
    last_error: str | None = None
    sandbox_id: str | None = None
    agent_session_id: str | None = Field(default=None, description="The agent CLI's own session id (for resume).")
    workspace_branch: str | None = Field(default=None, description="The git branch its workspace works on, if any.")
    workspace_base: str | None = Field(
        default=None, description="The commit its workspace started at (session_diff compares against it)."
    )
    turns: int
    queued_turns: int
    usage: Usage
    last_event_seq: int
    created_at: str
    updated_at: str
    last_turn: TurnView | None = None
    subtree: SubtreeView | None = Field(
        default=None, description="Usage and counts over this session and its sub-agents (when it has any)."
    )
    pending_permissions: list[PermissionView] = Field(
        default_factory=list, description="Tool calls waiting for a decision: answer with resolve_permission."
    )
    transcript_uri: str


class EventView(BaseModel):
    seq: int
    type: str
    created_at: str
    data: dict[str, Any]


class EventsPage(BaseModel):
    session_id: str
    events: list[EventView]
    next_cursor: int = Field(description="Pass as `after` to read the events that follow.")
    session_status: str
    timed_out: bool = Field(description="True when the long-poll ended without new events.")
