"""The specs every room shares: what a sandbox is made of and what agent runs in it.

The ground floor, like `events.py` and `errors.py`: it imports no room, and every room
(server, orchestrator, store, backends, providers) may import it.

- `SandboxSpec` (with `Mount`, `ResourceLimits`, `NetworkMode`): what a provider creates.
- `AgentSpec`: what a caller asked for when spawning an agent; fixed for the session's life.
- `SandboxSetup`: what a backend's CLI needs in the sandbox before its first turn (its HOME,
  config directories, config files), as data: the backend says what, the orchestrator applies
  it (orchestrator/setup.py), so no backend runs commands in a sandbox itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# "none": loopback only. "model": loopback only, plus this server's egress proxy (the model API,
# this server's agent endpoint and the environment's allowed hosts; see mcp_sandboxes/egress).
# Providers get "model" sandboxes as "none" plus the proxy's mounts. "host": the host's network.
NetworkMode = Literal["none", "model", "host"]


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
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description='Network "model": domain names the egress proxy lets through besides the model API.',
    )
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


# -- what a backend needs in the sandbox before the first turn --------------------------------


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return path


class WriteFile(BaseModel):
    """A file written whole, owned by the setup's user (0600 by default: config files may carry
    tokens). With `keep_existing`, a file already at `path` (the image's own) is left alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["write"] = "write"
    path: str
    data: bytes
    mode: int = Field(default=0o600, ge=0, le=0o7777)
    keep_existing: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return _absolute(path)


class DeepMerge(BaseModel):
    """How `JsonMerge` combines its document with the object already in the file: objects merge
    key by key, recursively; any other value (string, number, list) replaces the one there. Under
    each key path in `whole_entries_under` (e.g. `("mcpServers",)`) the entries replace the
    existing ones whole instead: a server named like one in the image is ours, not a mix of both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["deep"] = "deep"
    whole_entries_under: tuple[tuple[str, ...], ...] = ()

    def apply(self, existing: Mapping[str, Any], document: Mapping[str, Any]) -> dict[str, Any]:
        """`document` merged into `existing` (neither is changed)."""
        return self._merge(existing, document, ())

    def _merge(self, base: Mapping[str, Any], override: Mapping[str, Any], at: tuple[str, ...]) -> dict[str, Any]:
        merged = dict(base)
        whole = at in self.whole_entries_under
        for key, value in override.items():
            current = merged.get(key)
            if not whole and isinstance(value, Mapping) and isinstance(current, Mapping):
                merged[key] = self._merge(current, value, (*at, key))
            else:
                merged[key] = value
        return merged


class JsonMerge(BaseModel):
    """A JSON settings file that may already exist in the sandbox (put there by the image): the
    JSON object `document` is merged into the object found there by `merge`, and the result
    written as a file owned by the setup's user. A file that is missing, not JSON or not a JSON
    object (some CLIs accept comments in theirs) is replaced by `document` rather than guessed at."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json_merge"] = "json_merge"
    path: str
    document: dict[str, Any]
    mode: int = Field(default=0o600, ge=0, le=0o7777)
    merge: DeepMerge = Field(default_factory=DeepMerge)

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return _absolute(path)

    def merged(self, existing: bytes | None) -> bytes:
        """The file's new content, given its current content (None when there is none)."""
        return json.dumps(self.merge.apply(json_object(existing), self.document), indent=2).encode("utf-8")


def json_object(raw: bytes | None) -> dict[str, Any]:
    """`raw` as a JSON object; {} when it is empty, not JSON or JSON of another kind."""
    try:
        data = json.loads(raw.decode("utf-8")) if raw and raw.strip() else {}
    except ValueError:  # UnicodeDecodeError is one
        return {}
    return data if isinstance(data, dict) else {}


SetupFile = Annotated[WriteFile | JsonMerge, Field(discriminator="kind")]


class SandboxSetup(BaseModel):
    """What a backend's CLI needs in a sandbox before its first turn, applied in this order:
    `home` and then `directories` created (with their parents) and, when a user is named, owned by
    that user; then `files`, in order, owned by the user too. Applying it twice changes nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field(description="The backend that asks for it; named in errors.")
    home: str = Field(description="The agent's HOME.")
    directories: list[str] = Field(default_factory=list, description="Further directories, e.g. HOME/.codex.")
    files: list[SetupFile] = Field(default_factory=list)

    @field_validator("home")
    @classmethod
    def _home(cls, home: str) -> str:
        return _absolute(home)

    @field_validator("directories")
    @classmethod
    def _directories(cls, directories: list[str]) -> list[str]:
        return [_absolute(path) for path in directories]
