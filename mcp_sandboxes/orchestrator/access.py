"""What an agent caller may choose: never more than its own environment gave it.

The operator (the MCP client the user registered) may use any provider, image and network.
An agent (a call made with a session's token) may create environments and spawn into them
only within what the operator allowed: providers and images from the `subagents` allow-lists
(by default exactly its own environment's), a network no wider than its own, limits no
looser, the same read-only root and OCI runtime, and never a sandbox that is the host itself
(provider `process`, bubblewrap over `/`) unless the operator turned `allow_unsandboxed` on.

Workspaces (`confine_workspace`): an agent never widens what of the host its own environment
reaches. A host directory (to mount or copy) or a repository given by host path must lie inside a
host directory its own environment's workspace already names; it may be mounted read-write only
where its own is mounted read-write ('ro' and 'copy' only read). A repository URL must be exactly
its own environment's. And `workspaces.allowed_roots` binds agents as it binds the operator.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from mcp_sandboxes.config import SubagentSettings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.orchestrator.workspaces import host_directories, host_path_of, is_host_path, within
from mcp_sandboxes.providers.base import ResourceLimits, SandboxSpec
from mcp_sandboxes.store import Database, DirectoryWorkspace, EnvironmentRecord, GitWorkspace, WorkspaceSpec

# Wider networks reach more: an agent may only keep or narrow its own.
NETWORK_REACH: dict[str, int] = {"none": 0, "model": 1, "host": 2}


class AgentAccess:
    def __init__(self, db: Database, providers: ProviderPool, settings: SubagentSettings) -> None:
        self._db = db
        self._providers = providers
        self._settings = settings

    async def own_environment(self, session_id: str) -> EnvironmentRecord:
        session = await self._db.get_session(session_id)
        env = await self._db.find_environment(session.environment_id)
        if env is None:  # pragma: no cover - sessions keep their environment row (deletion is a mark)
            raise InvalidInputError("environment", "your own environment no longer exists")
        return env

    async def exposes_host(self, provider: str, spec: SandboxSpec) -> bool:
        """Whether a sandbox of this spec is the host itself (providers say so via `exposes_host`)."""
        found = getattr(await self._providers.get(provider), "exposes_host", None)
        return bool(found(spec)) if found is not None else False

    async def confine(self, session_id: str, provider: str, spec: SandboxSpec) -> SandboxSpec:
        """Check a spec an agent asks for against its own environment; returns it with the
        limits it left out inherited from its own (a child is never looser than its parent)."""
        own = await self.own_environment(session_id)
        if await self.exposes_host(provider, spec) and not self._settings.allow_unsandboxed:
            raise InvalidInputError(
                "provider",
                f"{provider!r} with image {spec.image!r} runs on the host itself, which agents may not use;"
                " the operator can allow it with subagents.allow_unsandboxed = true",
            )
        providers = self._settings.allowed_providers or [own.provider]
        if provider not in providers:
            raise InvalidInputError(
                "provider",
                f"agents here may use {', '.join(repr(p) for p in providers)}, not {provider!r}"
                " (the operator sets subagents.allowed_providers)",
            )
        images = self._settings.allowed_images or [own.spec.image]
        if not any(fnmatchcase(spec.image, pattern) for pattern in images):
            raise InvalidInputError(
                "image",
                f"agents here may use {', '.join(repr(i) for i in images)}, not {spec.image!r}"
                " (the operator sets subagents.allowed_images)",
            )
        if NETWORK_REACH.get(spec.network, 99) > NETWORK_REACH.get(own.spec.network, 0):
            raise InvalidInputError(
                "network",
                f"{spec.network!r} reaches further than your own environment's {own.spec.network!r};"
                f" use {own.spec.network!r} or narrower",
            )
        if spec.network == "model" and own.spec.network == "model":
            wider = sorted(set(spec.allowed_hosts) - set(own.spec.allowed_hosts))
            if wider:
                raise InvalidInputError(
                    "allowed_hosts",
                    f"{', '.join(wider)} not in your own environment's allow-list"
                    f" ({', '.join(own.spec.allowed_hosts) or 'empty'}); use those or fewer",
                )
        if own.spec.runtime is not None and spec.runtime != own.spec.runtime:
            raise InvalidInputError("runtime", f"must be {own.spec.runtime!r}, the runtime of your own environment")
        if own.spec.read_only_root and not spec.read_only_root:
            raise InvalidInputError("read_only_root", "must be true, as in your own environment")
        return spec.model_copy(update={"limits": _confined_limits(spec.limits, own.spec.limits)})

    async def confine_workspace(self, session_id: str, workspace: WorkspaceSpec | None) -> None:
        """Refuse a workspace that reaches more of the host than the agent's own environment's."""
        if workspace is None:
            return
        own = (await self.own_environment(session_id)).workspace
        reach = host_directories(own)
        if isinstance(workspace, GitWorkspace) and not is_host_path(workspace.url):
            if not (isinstance(own, GitWorkspace) and own.url == workspace.url):
                raise InvalidInputError(
                    "workspace.url",
                    "agents may clone only the repository of their own environment"
                    + (f" ({own.url})" if isinstance(own, GitWorkspace) else " (yours has none)"),
                )
            return
        if isinstance(workspace, DirectoryWorkspace):
            path, mode, field = workspace.path, workspace.mode, "workspace.path"
        else:
            path, mode, field = host_path_of(workspace.url), "copy", "workspace.url"
        inside = [own_mode for own_path, own_mode in reach if within(path, own_path)]
        if not inside:
            shown = ", ".join(own_path for own_path, _ in reach) or "none"
            raise InvalidInputError(
                field,
                f"{path!r} is outside the host directories your own environment's workspace has ({shown});"
                " agents may only use those or directories inside them",
            )
        if mode == "rw" and "rw" not in inside:
            raise InvalidInputError(
                "workspace.mode",
                "'rw' would let you change host files your own environment only reads; use 'ro' or 'copy'",
            )


FIELD_OF_LIMIT = {"cpus": "cpus", "memory_mb": "memory_mb", "pids": "pids_limit"}


def _confined_limits(wanted: ResourceLimits, own: ResourceLimits) -> ResourceLimits:
    values = {}
    for name, field in FIELD_OF_LIMIT.items():
        mine = getattr(own, name)
        asked = getattr(wanted, name)
        if mine is not None and asked is not None and asked > mine:
            raise InvalidInputError(field, f"{asked:g} is above your own environment's limit of {mine:g}")
        values[name] = asked if asked is not None else mine
    return ResourceLimits(**values)
