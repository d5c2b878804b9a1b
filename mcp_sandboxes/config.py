"""Settings: embedded defaults (default.toml), then an optional TOML file, then
environment variables. Validated with pydantic so a typo fails at start-up, by name."""

from __future__ import annotations

import json
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mcp_sandboxes.errors import InvalidInputError

ENV_PREFIX = "MCP_SANDBOXES_"


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Path("~/.local/share/mcp-sandboxes")
    default_provider: str = "docker"
    default_image: str = "mcp-sandboxes/base:latest"
    max_wait_s: float = Field(default=600, gt=0)
    max_call_s: float = Field(
        default=100,
        gt=0,
        le=3600,
        description="No tool call blocks longer than this: a wait that would returns what is known so far"
        " (Claude Code moves calls past 120 s to the background, where their results are often lost).",
    )
    liveness_interval_s: float = Field(
        default=10,
        gt=0,
        le=3600,
        description="How often live sessions' sandboxes are checked for removal behind the server's back"
        " (a session whose sandbox vanished becomes failed).",
    )
    idle_timeout_s: float = Field(
        default=3600,
        ge=0,
        description="A live session with no turn running or queued for this long is stopped by the sweeper"
        " (its history stays; its sandbox is removed). 0: never.",
    )
    sweep_interval_s: float = Field(
        default=60, gt=0, le=3600, description="How often the sweeper looks for idle sessions and surplus pools."
    )
    max_sandboxes: int = Field(
        default=0,
        ge=0,
        description="At most this many sandboxes at once (live sessions' plus warm pools'); a spawn beyond it"
        " is refused as busy. 0: no cap.",
    )
    sandbox_user: str | None = "agent"
    sandbox_home: str = "/home/agent"
    auth_token: str | None = Field(
        default=None, description="When set, the HTTP transport requires `Authorization: Bearer <token>`."
    )
    operator_auth: Literal["token", "none"] = Field(
        default="token",
        description="'token': the HTTP transport always requires the operator's bearer token; without"
        " auth_token the server makes one and keeps it in <data_dir>/operator-token (mode 0600). 'none': no"
        " token on loopback; then no sandbox may use the host network, since it could call in as the operator.",
    )

    @property
    def operator_token_path(self) -> Path:
        return self.data_dir.expanduser() / "operator-token"


class SubagentSettings(BaseModel):
    """Agents that spawn their own sub-agents by calling this server back."""

    model_config = ConfigDict(extra="forbid")

    max_depth: int = Field(
        default=2, ge=0, le=8, description="Levels of sub-agents below a top-level agent; 0 turns sub-agents off."
    )
    url: str = Field(
        default="",
        description="The MCP endpoint sandboxed agents call back. Empty: the agent listener's own loopback address.",
    )
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the agent listener (loopback; admits sub-agent tokens only). 0: a free port.",
    )
    allowed_providers: list[str] = Field(
        default_factory=list,
        description="Providers an agent may create environments on or spawn into. Empty: only the provider"
        " of the agent's own environment.",
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        description="Images (shell-style patterns, e.g. 'mcp-sandboxes/*') an agent may use. Empty: only the"
        " image of the agent's own environment.",
    )
    allow_unsandboxed: bool = Field(
        default=False,
        description="Let agents use sandboxes that run on the host itself (provider 'process', or bubblewrap"
        " over the host's root '/'). Off: never, whatever the lists above say.",
    )


class PermissionSettings(BaseModel):
    """Permission prompts of sub-agents spawned with ask_permissions=true."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(
        default=300,
        gt=0,
        le=3600,
        description="A prompt nobody answers within this many seconds is denied.",
    )
    elicit: bool = Field(
        default=True,
        description="Ask the human through MCP elicitation when the operator's client supports it.",
    )


class BudgetSettings(BaseModel):
    """Caps over a tree of agents (a top-level session and all its sub-agents); 0: no cap."""

    model_config = ConfigDict(extra="forbid")

    max_live_sessions: int = Field(default=32, ge=0, description="Live sessions at once in one tree.")
    max_turns: int = Field(default=0, ge=0, description="Turns in all, over the tree's sessions.")
    max_tokens: int = Field(default=0, ge=0, description="Input plus output tokens the tree's backends reported.")
    max_cost_usd: float = Field(default=0, ge=0, description="Cost the tree's backends reported, in USD.")
    max_wall_s: float = Field(default=0, ge=0, description="Seconds since the tree's top session was spawned.")


class EgressSettings(BaseModel):
    """Network mode "model" (mcp_sandboxes/egress)."""

    model_config = ConfigDict(extra="forbid")

    forwarder_path: str = Field(
        default="", description="A prebuilt static forwarder (forward.c); empty: built once with the C compiler."
    )
    allow_private_addresses: bool = Field(
        default=False,
        description="Let allowed_hosts names that resolve to loopback, private or link-local addresses through"
        " (e.g. 'localhost'); off, such a name is refused, so no allowed name can be pointed at this host's"
        " services or a cloud metadata address.",
    )


class WorkspaceSettings(BaseModel):
    """Workspaces: host directories and git repositories brought into sandboxes, and the work
    read back out of them."""

    model_config = ConfigDict(extra="forbid")

    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Host directories under which environments may name a workspace (a directory to mount or"
        " copy, or a repository to clone). Empty: no host directory may be used.",
    )
    max_read_bytes: int = Field(
        default=1_048_576, ge=1024, le=64 * 1_048_576, description="Most bytes one read_file call returns."
    )
    max_write_bytes: int = Field(
        default=4 * 1_048_576, ge=1024, le=64 * 1_048_576, description="Most bytes one write_file call writes."
    )
    max_diff_bytes: int = Field(
        default=1_048_576, ge=1024, le=64 * 1_048_576, description="Most bytes of diff, patch or bundle returned."
    )
    max_list_entries: int = Field(default=1000, ge=10, le=100_000, description="Most entries list_files returns.")
    clone_timeout_s: float = Field(
        default=300, gt=0, le=3600, description="Bound on cloning or copying a workspace in at spawn."
    )

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _roots_from_a_string(cls, value: Any) -> Any:
        """From the environment (MCP_SANDBOXES_WORKSPACES__ALLOWED_ROOTS): a JSON list, or paths
        separated by the OS's path separator (':')."""
        if isinstance(value, str):
            return json.loads(value) if value.lstrip().startswith("[") else [p for p in value.split(os.pathsep) if p]
        return value


class BackendSettings(BaseModel):
    """Per-backend settings; the backend module reads what applies to it."""

    model_config = ConfigDict(extra="allow")

    cli_path: str = ""
    pass_env: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    api_key_env: list[str] = Field(
        default_factory=list, description="The CLI needs at least one of these set (doctor reports when none is)."
    )


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    subagents: SubagentSettings = Field(default_factory=SubagentSettings)
    permissions: PermissionSettings = Field(default_factory=PermissionSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    workspaces: WorkspaceSettings = Field(default_factory=WorkspaceSettings)
    egress: EgressSettings = Field(default_factory=EgressSettings)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    backends: dict[str, BackendSettings] = Field(default_factory=dict)

    @property
    def database_path(self) -> Path:
        return self.server.data_dir.expanduser() / "mcp-sandboxes.sqlite3"

    def backend(self, name: str) -> BackendSettings:
        return self.backends.get(name, BackendSettings())

    def provider(self, name: str) -> dict[str, Any]:
        return self.providers.get(name, {})


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """MCP_SANDBOXES_DATA_DIR=... sets server.data_dir; MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH=...
    sets backends.claude.cli_path (double underscore separates levels below the server table);
    MCP_SANDBOXES_BACKENDS__CLAUDE__ENV__SOME_VAR=1 sets the variable SOME_VAR for the claude CLI."""
    overrides: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        raw_path = key[len(ENV_PREFIX) :].split("__")
        # Keys inside an `env` table are variable names: their case is kept.
        path = [
            part if index and raw_path[index - 1].lower() == "env" else part.lower()
            for index, part in enumerate(raw_path)
        ]
        if len(path) == 1:
            path = ["server", path[0]]
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return overrides


def load_settings(config_file: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ) if environ is None else environ
    default_text = resources.files("mcp_sandboxes").joinpath("default.toml").read_text("utf-8")
    data = tomllib.loads(default_text)
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        path = Path(config_file).expanduser()
        try:
            data = _merge(data, tomllib.loads(path.read_text("utf-8")))
        except FileNotFoundError:
            raise InvalidInputError("--config", f"file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError("--config", f"{path} is not valid TOML: {exc}") from exc
    data = _merge(data, _env_overrides(environ))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidInputError(field, f"{first['msg']} (check the config file or {ENV_PREFIX}* variables)") from exc
