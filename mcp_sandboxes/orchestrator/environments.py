"""Environments: named sandbox templates (provider, image, env, limits, setup commands)."""

from __future__ import annotations

import re
import uuid

from pydantic import BaseModel, ConfigDict, Field

from mcp_sandboxes.config import WorkspaceSettings
from mcp_sandboxes.errors import ConflictError, InvalidInputError, NotFoundError
from mcp_sandboxes.orchestrator.access import AgentAccess
from mcp_sandboxes.orchestrator.egress import (
    EgressService,
    provider_network,
    refuse_model_network,
    supports_model_network,
)
from mcp_sandboxes.orchestrator.preparation import Preparations
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.orchestrator.views import EnvironmentView, WorkspaceView
from mcp_sandboxes.orchestrator.workspaces import check_workspace, workspace_mounts
from mcp_sandboxes.providers.base import NetworkMode, ResourceLimits, SandboxSpec
from mcp_sandboxes.redaction import looks_like_secret_name, looks_like_secret_value
from mcp_sandboxes.store import Database, EnvironmentRecord, Packages, WorkspaceSpec
from mcp_sandboxes.store.database import utc_now
from mcp_sandboxes.store.records import LIVE_STATUSES

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ENV_KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvironmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    provider: str
    image: str
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str = "/workspace"
    # None: "model" where the provider can do it (the safe choice that reaches a model API), else "none".
    network: NetworkMode | None = None
    allowed_hosts: list[str] = Field(default_factory=list)
    limits: ResourceLimits = Field(default_factory=ResourceLimits)
    setup_commands: list[str] = Field(default_factory=list)
    packages: Packages = Field(default_factory=Packages)
    read_only_root: bool = False
    runtime: str | None = None
    workspace: WorkspaceSpec | None = None
    warm_pool: int = Field(
        default=0, ge=0, le=16, description="Sandboxes kept started for spawns to take (a warm pool); 0: none."
    )


class EnvironmentService:
    def __init__(
        self,
        db: Database,
        providers: ProviderPool,
        access: AgentAccess,
        workspaces: WorkspaceSettings | None = None,
    ) -> None:
        self._db = db
        self._providers = providers
        self._access = access
        self._workspaces = workspaces or WorkspaceSettings()
        # Prepared images (set by the orchestrator): packages and setup commands run once.
        self.preparations: Preparations | None = None
        # Network mode "model" (set by the orchestrator): checked at creation, so that a missing
        # forwarder shows here and not at the first spawn.
        self.egress: EgressService | None = None
        # Set by the server when a host-network sandbox could call in as the operator (an operator
        # endpoint without a token): then no environment may use the host network.
        self.host_network_refusal: str | None = None

    def check_network(self, network: str) -> None:
        if network == "host" and self.host_network_refusal is not None:
            raise InvalidInputError("network", self.host_network_refusal)

    async def create(self, request: EnvironmentRequest, *, created_by_session: str | None = None) -> EnvironmentView:
        """`created_by_session`: the agent asking, confined to what its own environment allows."""
        if not NAME_PATTERN.match(request.name):
            raise InvalidInputError(
                "name", "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if not request.workdir.startswith("/"):
            raise InvalidInputError("workdir", f"{request.workdir!r} is not an absolute path; use e.g. /workspace")
        for key, value in request.env.items():
            if not ENV_KEY_PATTERN.match(key):
                raise InvalidInputError(f"env.{key}", "not a valid variable name (letters, digits, '_')")
            if looks_like_secret_name(key) or looks_like_secret_value(value):
                raise InvalidInputError(
                    f"env.{key}",
                    "looks like a credential; environments are stored and shown, so secrets may not go here."
                    " Set it in the server's own environment and name it in backends.<backend>.pass_env"
                    " (API keys), or pass it to the agent some other way",
                )
        network = request.network or ("model" if supports_model_network(request.provider) else "none")
        self.check_network(network)
        if network == "model":
            refuse_model_network(request.provider)
        elif request.allowed_hosts:
            raise InvalidInputError(
                "allowed_hosts", f"applies to network 'model' only, not {network!r}; drop it or use network 'model'"
            )
        workspace = None if request.workspace is None else check_workspace(request.workspace, self._workspaces)
        if workspace is not None and created_by_session is not None:
            await self._access.confine_workspace(created_by_session, workspace)
        if request.provider == "process" and workspace_mounts(workspace, request.workdir):
            # Its sandboxes are host directories: nothing is mounted, so the agent would see none of it.
            raise InvalidInputError(
                "workspace.mode", "the process provider mounts nothing; use mode 'copy' (or a container provider)"
            )
        for index, command in enumerate(request.setup_commands):
            if not command.strip():
                raise InvalidInputError(f"setup_commands[{index}]", "empty command; remove it")
        if await self._db.find_environment(request.name) is not None:
            raise ConflictError(
                f"name: an environment named {request.name!r} already exists; pick another name or delete it first"
            )
        provider = await self._providers.get(request.provider)
        availability = await provider.check()
        if not availability.available:
            raise InvalidInputError(
                "provider",
                f"{request.provider} is not usable here: {availability.reason}"
                + (f"; fix: {availability.fix}" if availability.fix else ""),
            )
        spec = SandboxSpec(
            image=request.image,
            env=request.env,
            workdir=request.workdir,
            network=network,
            allowed_hosts=sorted(set(request.allowed_hosts)),
            limits=request.limits,
            read_only_root=request.read_only_root,
            runtime=request.runtime,
            mounts=workspace_mounts(workspace, request.workdir),
        )
        if created_by_session is not None:
            spec = await self._access.confine(created_by_session, request.provider, spec)
        await self._providers.validate_spec(
            request.provider, spec.model_copy(update={"network": provider_network(spec)})
        )
        if network == "model" and self.egress is not None:
            await self.egress.check_available()
        prepared_image, prep_note = (None, None)
        if self.preparations is not None:
            prepared_image, prep_note = await self.preparations.plan(
                request.provider, spec, request.packages, request.setup_commands
            )
        elif not request.packages.empty():
            raise InvalidInputError("packages", "this server cannot prepare images; use setup_commands")
        record = EnvironmentRecord(
            id=f"env_{uuid.uuid4().hex[:16]}",
            name=request.name,
            provider=request.provider,
            spec=spec,
            setup_commands=request.setup_commands,
            packages=request.packages,
            prep_state=None if prepared_image is None else "preparing",
            prep_detail=prep_note,
            prepared_image=prepared_image,
            created_at=utc_now(),
            created_by_session=created_by_session,
            workspace=workspace,
        )
        await self._db.insert_environment(record)
        if prepared_image is not None and self.preparations is not None:
            self.preparations.start(record)
        return await self.view(record)

    async def get(self, id_or_name: str) -> EnvironmentRecord:
        record = await self._db.find_environment(id_or_name)
        if record is None or record.deleted_at is not None:
            raise NotFoundError(
                f"environment: no environment {id_or_name!r}; list_environments shows the ones that exist,"
                " create_environment makes one"
            )
        return record

    async def view(self, record: EnvironmentRecord) -> EnvironmentView:
        live = await self._db.list_sessions(LIVE_STATUSES, environment_id=record.id)
        state: str = record.prep_state or "ready"
        detail = record.prep_detail
        if state == "preparing" and self.preparations is not None:
            step = self.preparations.current_step(record.id)
            detail = f"preparing the image: {step}" if step else "preparing the image (resumes at the next start)"
        availability = await self._providers.availability(record.provider)
        if not availability.available and state != "failed":
            state, detail = "unavailable", availability.reason
        return EnvironmentView(
            id=record.id,
            name=record.name,
            provider=record.provider,
            image=record.spec.image,
            workdir=record.spec.workdir,
            network=record.spec.network,
            allowed_hosts=record.spec.allowed_hosts,
            limits=record.spec.limits,
            read_only_root=record.spec.read_only_root,
            runtime=record.spec.runtime,
            created_by_session=record.created_by_session,
            env_keys=sorted(record.spec.env),
            setup_commands=record.setup_commands,
            workspace=WorkspaceView.of(record.workspace),
            packages=record.packages,
            prepared_image=record.prepared_image,
            state=state,
            state_detail=detail,
            live_sessions=len(live),
            created_at=record.created_at,
        )

    async def list_all(self) -> list[EnvironmentView]:
        return [await self.view(record) for record in await self._db.list_environments()]

    async def live_session_ids(self, record: EnvironmentRecord) -> list[str]:
        return [s.id for s in await self._db.list_sessions(LIVE_STATUSES, environment_id=record.id)]
