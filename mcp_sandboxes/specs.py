"""The specs every room shares: what a sandbox is made of and what agent runs in it.

The ground floor, like `events.py` and `errors.py`: it imports no room, and every room
(server, orchestrator, store, backends, providers) may import it.

- `SandboxSpec` (with `Mount`, `ResourceLimits`, `NetworkMode`): what a provider creates.
- `AgentSpec`: what a caller asked for when spawning an agent; fixed for the session's life.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NetworkMode = Literal["none", "host"]


class ResourceLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(default=None, gt=0, le=256, description="CPU cores, fractional allowed.")
    memory_mb: int | None = Field(default=None, ge=16, le=1_048_576, description="Memory limit in MiB.")
    pids: int | None = Field(default=None, ge=8, le=1_000_000, description="Maximum number of processes.")


class Mount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Absolute path on the host.")
    target: str = Field(description="Absolute path inside the sandbox.")
    read_only: bool = True


class SandboxSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str
    name: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str = "/workspace"
    user: str | None = Field(default=None, description="User commands run as by default (name or uid).")
    network: NetworkMode = "none"
    limits: ResourceLimits = Field(default_factory=ResourceLimits)
    mounts: list[Mount] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    read_only_root: bool = Field(
        default=False,
        description="Read-only root filesystem; only the workdir, the user's HOME and /tmp stay writable.",
    )
    runtime: str | None = Field(
        default=None,
        description='OCI runtime for the sandbox, e.g. "runsc" (gVisor); None = the engine\'s default.',
    )


class AgentSpec(BaseModel):
    """What the caller asked for when spawning an agent; fixed for the session's life."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    model: str | None = None
    system_prompt: str | None = None
    allowed_tools: list[str] | None = None
    permission_mode: str | None = None
    max_turns: int | None = None
    extra_args: list[str] = Field(default_factory=list)
    mcp_servers: dict[str, Any] = Field(
        default_factory=dict, description="MCP servers for the agent, in the `mcpServers` JSON shape."
    )
    permission_prompt_tool: str | None = Field(
        default=None, description="An MCP tool (mcp__server__tool) the CLI asks before a tool call its mode asks about."
    )
