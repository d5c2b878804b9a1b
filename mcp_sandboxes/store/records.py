"""Rows as pydantic models: what the store hands to the orchestrator."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from mcp_sandboxes.events import Usage
from mcp_sandboxes.specs import AgentSpec, SandboxSpec

SessionStatus = Literal["starting", "running", "idle", "stopped", "failed"]
TurnStatus = Literal["queued", "running", "done", "failed", "interrupted"]
LIVE_STATUSES: tuple[SessionStatus, ...] = ("starting", "running", "idle")


class DirectoryWorkspace(BaseModel):
    """A host directory: bind-mounted at the workdir ('ro', 'rw') or copied in at spawn ('copy')."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["directory"] = "directory"
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="Absolute host path, under one of the server's workspaces.allowed_roots.",
    )
    mode: Literal["ro", "rw", "copy"] = Field(
        default="copy",
        description="'ro'/'rw': bind-mounted at the workdir (rw: the agent changes the host's files);"
        " 'copy': copied into each sandbox at spawn.",
    )


class GitWorkspace(BaseModel):
    """A git repository cloned (on the host) into each sandbox's workdir at spawn."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["git"] = "git"
    url: str = Field(
        min_length=1,
        max_length=4096,
        description="A host path of a repository (under workspaces.allowed_roots) or a git URL (https, ssh, git).",
    )
    ref: str | None = Field(
        default=None, min_length=1, max_length=200, description="Branch, tag or commit to start from; default: HEAD."
    )


WorkspaceSpec = Annotated[DirectoryWorkspace | GitWorkspace, Field(discriminator="kind")]
WORKSPACE_ADAPTER: TypeAdapter[DirectoryWorkspace | GitWorkspace] = TypeAdapter(WorkspaceSpec)


PrepState = Literal["preparing", "ready", "failed"]


class Packages(BaseModel):
    """Packages an environment's prepared image installs, by package manager. Each name becomes
    one argv element of the manager's install command (never part of a shell string)."""

    model_config = ConfigDict(extra="forbid")

    apt: list[str] = Field(default_factory=list, description="Debian packages, e.g. ['git', 'ripgrep=13.0.0-4'].")
    pip: list[str] = Field(default_factory=list, description="Python packages, e.g. ['requests', 'ruff==0.6.9'].")
    npm: list[str] = Field(default_factory=list, description="npm packages (global), e.g. ['typescript@5'].")

    def empty(self) -> bool:
        return not (self.apt or self.pip or self.npm)


class EnvironmentRecord(BaseModel):
    id: str
    name: str
    provider: str
    spec: SandboxSpec
    setup_commands: list[str] = Field(default_factory=list)
    created_at: str
    # The session of the agent that created it; None when the operator did.
    created_by_session: str | None = None
    deleted_at: str | None = None
    workspace: WorkspaceSpec | None = None
    packages: Packages = Field(default_factory=Packages)
    # The preparation of its image (packages, setup commands): None when nothing is prepared
    # (no recipe, or a provider that cannot commit images: setup then runs at each spawn).
    prep_state: PrepState | None = None
    prep_detail: str | None = None
    prepared_image: str | None = None


class SessionRecord(BaseModel):
    id: str
    environment_id: str
    parent_session_id: str | None = None
    backend: str
    agent: AgentSpec
    status: SessionStatus
    sandbox_id: str | None = None
    native_session_id: str | None = None
    stop_reason: str | None = None
    last_error: str | None = None
    usage: Usage = Field(default_factory=Usage)
    created_at: str
    updated_at: str
    token_sha256: str | None = Field(
        default=None, description="SHA-256 of the bearer token its agent uses to call this server back, if any."
    )
    token_scope: str | None = Field(
        default=None, description="'full' (sub-agents) or 'permissions' (only its own permission prompts)."
    )
    workspace_base: str | None = Field(default=None, description="The commit its workspace started at, if any.")
    workspace_branch: str | None = Field(default=None, description="The git branch its workspace works on, if any.")


class TurnRecord(BaseModel):
    session_id: str
    idx: int
    prompt: str
    status: TurnStatus
    stop_reason: str | None = None
    final_text: str | None = None
    error: str | None = None
    usage: Usage | None = None
    denials: list[str] = Field(default_factory=list)
    created_at: str
    started_at: str | None = None
    ended_at: str | None = None


class EventRecord(BaseModel):
    session_id: str
    seq: int
    type: str
    created_at: str
    data: dict[str, Any]
