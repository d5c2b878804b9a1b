"""Sessions: spawn an agent in a new sandbox, send it messages, interrupt and stop it (its
sub-agents first). What an agent caller may ask for is checked here, before anything exists."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import anyio

from mcp_sandboxes.backends.base import AgentSpec, Backend
from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import Settings
from mcp_sandboxes.egress.plan import SANDBOX_EGRESS_DIR, SANDBOX_FORWARDER, EgressPlan
from mcp_sandboxes.errors import ConflictError, InvalidInputError
from mcp_sandboxes.events import (
    SandboxDestroyed,
    SandboxProvisioned,
    SessionStatusTerminated,
    SessionThreadCreated,
    UserInterrupt,
)
from mcp_sandboxes.orchestrator.access import AgentAccess
from mcp_sandboxes.orchestrator.budgets import TreeBudgets
from mcp_sandboxes.orchestrator.clis import MOUNTING_PROVIDERS, check_api_key, check_cli, mounts_for, with_host_cli
from mcp_sandboxes.orchestrator.egress import EgressService, provider_network
from mcp_sandboxes.orchestrator.environments import EnvironmentService
from mcp_sandboxes.orchestrator.journal import EventJournal
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.orchestrator.reads import SessionReads
from mcp_sandboxes.orchestrator.runner import OomWatch
from mcp_sandboxes.orchestrator.sandboxes import SESSION_LABEL, SandboxCap, sandbox_spec
from mcp_sandboxes.orchestrator.setup import apply_setup
from mcp_sandboxes.orchestrator.subagents import (
    REDACTED_AUTHORIZATION,
    SERVER_NAME,
    Lineage,
    callback_server,
    new_token,
)
from mcp_sandboxes.orchestrator.views import SessionView
from mcp_sandboxes.orchestrator.worker import SessionWorker, WorkerPool
from mcp_sandboxes.orchestrator.workspaces import SandboxWorkspace
from mcp_sandboxes.providers.base import Sandbox
from mcp_sandboxes.redaction import redact
from mcp_sandboxes.store import Database, SessionRecord
from mcp_sandboxes.store.database import utc_now
from mcp_sandboxes.store.records import LIVE_STATUSES

if TYPE_CHECKING:
    from mcp_sandboxes.orchestrator.pool import WarmPool

logger = logging.getLogger(__name__)

SETUP_COMMAND_TIMEOUT_S = 600.0
# Characters of a failing setup command's output shown when an agent made the environment.
SETUP_TAIL_FOR_AGENTS = 200
DESTROY_TIMEOUT_S = 60.0
# How long stopping waits for a killed turn and its worker to end.
KILL_TIMEOUT_S = 10.0
# How long interrupt_session waits for the turn to end before it answers.
INTERRUPT_ANSWER_WAIT_S = 1.0
# Mounts that differ per session without changing what the CLI probe would find.
EGRESS_TARGETS = frozenset({SANDBOX_EGRESS_DIR, SANDBOX_FORWARDER})
# The tool Claude Code asks before a tool call its permission mode asks about (server "sandboxes").
PERMISSION_PROMPT_TOOL = f"mcp__{SERVER_NAME}__approve_tool_use"


class SessionService:
    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        *,
        db: Database,
        journal: EventJournal,
        providers: ProviderPool,
        environments: EnvironmentService,
        access: AgentAccess,
        lineage: Lineage,
        workers: WorkerPool,
        reads: SessionReads,
        budgets: TreeBudgets,
        secret_values: Callable[[], list[str]],
        egress: EgressService | None = None,
    ) -> None:
        self._egress = egress
        self._budgets = budgets
        self._settings = settings
        self._environ = environ
        self._db = db
        self._journal = journal
        self._providers = providers
        self._environments = environments
        self._access = access
        self._lineage = lineage
        self._workers = workers
        self._reads = reads
        self._secret_values = secret_values
        self._backends: dict[str, Backend] = {}
        # (provider, image, backend, mounts) whose CLI probe passed in this server's run.
        self._clis_ok: set[tuple[str, str, str, tuple[str, ...]]] = set()
        # The MCP endpoint sandboxed agents call back (set by the server once it listens); None:
        # sub-agents cannot be offered.
        self.subagent_url: str | None = None
        # This server's instance id (set by the orchestrator at start): every sandbox carries it.
        self.instance_id = ""
        # server.max_sandboxes; the warm pools (set by the orchestrator) that spawns take from.
        self.cap = SandboxCap(settings.server.max_sandboxes, self._count_live)
        self.pool: WarmPool | None = None

    async def _count_live(self) -> int:
        """Sandboxes held by sessions: the live ones' (a stopped one's is removed as it stops)."""
        return sum(1 for s in await self._db.list_sessions(LIVE_STATUSES) if s.sandbox_id)

    async def spawn_agent(
        self,
        *,
        environment: str,
        agent: AgentSpec,
        prompt: str,
        parent_session_id: str | None = None,
        subagents: bool = False,
        ask_permissions: bool = False,
    ) -> SessionView:
        """Provision the sandbox, then record the session; a failure at any step leaves nothing behind.
        With `parent_session_id` the session is that one's child; with `subagents` its agent gets
        this server's tools (a token of its own) to spawn children."""
        if not prompt.strip():
            raise InvalidInputError("prompt", "is empty; say what the agent should do")
        # The arguments' own consistency first, then what the server and environment allow.
        if ask_permissions:
            if agent.backend != "claude":
                raise InvalidInputError(
                    "ask_permissions",
                    f"only the claude backend can route its permission prompts here, not {agent.backend!r};"
                    " for the others choose permission_mode / allowed_tools up front",
                )
            if agent.permission_mode == "bypassPermissions":
                raise InvalidInputError(
                    "ask_permissions", "permission_mode 'bypassPermissions' never asks; drop one of the two"
                )
        if parent_session_id is not None:
            await self._budgets.check(parent_session_id, new_session=True, field="spawn_agent")
        env = await self._environments.get(environment)
        backend = self.backend(agent.backend)
        check_api_key(agent.backend, self._settings.backend(agent.backend), self._environ)
        self._environments.check_network(env.spec.network)
        if env.spec.network == "none" and agent.backend != "custom" and env.provider != "process":
            raise InvalidInputError(
                "environment",
                f"{env.name!r} has network 'none', so the {agent.backend} CLI cannot reach its model API;"
                " create an environment with network 'model' (the default: the API through a proxy that keeps"
                " the key on the host) and spawn there",
            )
        env_spec = env.spec
        if parent_session_id is not None:
            # An agent spawning: only into what its own environment would allow it to create.
            env_spec = await self._access.confine(parent_session_id, env.provider, env.spec)
            await self._access.confine_workspace(parent_session_id, env.workspace)
        if (
            subagents
            and await self._access.exposes_host(env.provider, env.spec)
            and not self._settings.subagents.allow_unsandboxed
        ):
            raise InvalidInputError(
                "subagents",
                f"environment {env.name!r} runs on the host itself ({env.provider}), where an agent could read"
                " the server's own files; use a container environment (or set subagents.allow_unsandboxed)",
            )
        if self._environments.preparations is not None:
            # A prepared environment: its image (waiting for it, within the call), no setup commands.
            env, env_spec = await self._environments.preparations.ready_for_spawn(
                env, env_spec, max_wait_s=self._settings.server.max_call_s
            )
        session_id = f"ses_{uuid.uuid4().hex[:20]}"
        plan: EgressPlan | None = None
        if env.spec.network == "model":
            if self._egress is None:
                raise InvalidInputError("network", "mode 'model' is not available in this server")
            # The session's own backend: its CLI sees placeholder keys and local base URLs only.
            plan, backend = self._egress.backend_for(session_id, agent.backend, env_spec.allowed_hosts)
        token_sha256: str | None = None
        token_scope: str | None = None
        prepared_agent = agent
        if subagents or ask_permissions:
            url = await self._subagent_url(
                env.spec.network, parent_session_id, field="subagents" if subagents else "ask_permissions"
            )
            token, token_sha256 = new_token()
            token_scope = "full" if subagents else "permissions"
            update: dict[str, object] = {}
            if ask_permissions:
                update["permission_prompt_tool"] = PERMISSION_PROMPT_TOOL
            prepared_agent = agent.model_copy(
                update={
                    **update,
                    "mcp_servers": {**agent.mcp_servers, SERVER_NAME: callback_server(url, f"Bearer {token}")},
                }
            )
            agent = agent.model_copy(
                update={
                    **update,
                    "mcp_servers": {**agent.mcp_servers, SERVER_NAME: callback_server(url, REDACTED_AUTHORIZATION)},
                }
            )
        provider = await self._providers.get(env.provider)
        # A provider that runs everything as the server's own user (process) takes no user name.
        user = None if getattr(provider, "ignores_user", False) else self._settings.server.sandbox_user
        spec = sandbox_spec(
            env_spec,
            name=f"mcp-sandboxes-{session_id}",
            labels={SESSION_LABEL: session_id},
            mounts=mounts_for(env.provider, backend.mounts()),
            user=user,
            instance_id=self.instance_id,
            network=provider_network(env_spec),
        )
        started = time.monotonic()
        # A warm pool's sandbox when one fits (an agent's confined spec must be the environment's own).
        taken = None if self.pool is None or env_spec != env.spec else self.pool.take(env.id, spec)
        hold = taken[1] if taken else await self.cap.hold(for_environment=env.id)
        # Network "model": the sandbox's egress directory (a pooled sandbox has its own already).
        egress_key = taken[2] if taken and taken[2] else session_id
        try:
            if plan is not None and self._egress is not None and not taken:
                egress_mounts = await self._egress.sandbox_mounts(egress_key)
                spec = spec.model_copy(update={"mounts": [*spec.mounts, *egress_mounts]})
            sandbox = taken[0] if taken else await provider.create(spec)
        except BaseException:
            hold.release()
            if plan is not None and self._egress is not None:
                with anyio.CancelScope(shield=True):
                    await self._egress.close(session_id)
            raise
        try:
            if env.provider in MOUNTING_PROVIDERS:
                # The image runs the CLI (its own, or the host's mounted one), or the spawn says why.
                # Once per image and CLI: the answer does not depend on the sandbox (an exec is ~0.1 s).
                cli_mounts = tuple(m.source for m in spec.mounts if m.target not in EGRESS_TARGETS)
                probed = (env.provider, spec.image, backend.name, cli_mounts)
                if probed not in self._clis_ok:
                    await check_cli(sandbox, backend, image=spec.image, user=spec.user)
                    self._clis_ok.add(probed)
            if plan is not None and self._egress is not None:
                await self._egress.open(egress_key, session_id, plan, agent_endpoint=token_sha256 is not None)
            # The workspace first: setup commands may build what it brings in.
            base, branch = await SandboxWorkspace(sandbox, spec.workdir, spec.user).set_up(
                env.workspace, session_id, self._settings.workspaces
            )
            await self._run_setup(sandbox, env.setup_commands, made_by_agent=env.created_by_session is not None)
            await apply_setup(
                sandbox, backend.setup(prepared_agent, home=self._workers.home_of(sandbox)), user=spec.user
            )
            now = utc_now()
            await self._db.insert_session(
                SessionRecord(
                    id=session_id,
                    environment_id=env.id,
                    parent_session_id=parent_session_id,
                    backend=agent.backend,
                    agent=agent,
                    status="starting",
                    sandbox_id=sandbox.id,
                    created_at=now,
                    updated_at=now,
                    token_sha256=token_sha256,
                    token_scope=token_scope,
                    workspace_base=base,
                    workspace_branch=branch,
                ),
                prompt,
            )
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(DESTROY_TIMEOUT_S):
                await provider.destroy(sandbox.id)
                if plan is not None and self._egress is not None:
                    await self._egress.close(session_id)
            raise
        finally:
            hold.release()
        await self._journal.emit(
            session_id,
            [
                SandboxProvisioned(
                    provider=env.provider,
                    sandbox_id=sandbox.id,
                    duration_ms=int((time.monotonic() - started) * 1000),
                )
            ],
        )
        if parent_session_id is not None:
            await self._journal.emit(parent_session_id, [SessionThreadCreated(child_session_id=session_id)])
        # A sandbox no turn has run in yet has had no out-of-memory kill: the first turn need not
        # read the count before it starts (an exec, ~0.1 s of every spawn).
        oom = OomWatch(memory_mb=env_spec.limits.memory_mb, seen=0, read=True)
        self._workers.spawn(SessionWorker(session_id=session_id, sandbox=sandbox, backend=backend, oom=oom))
        return await self._reads.get_session(session_id)

    async def _subagent_url(self, network: str, parent_session_id: str | None, *, field: str = "subagents") -> str:
        """Where a new agent calls back (to spawn sub-agents, or only to ask about permissions with
        `field` 'ask_permissions'), once its depth and network allow it."""
        limit = self._settings.subagents.max_depth
        if field == "subagents" and limit == 0:
            raise InvalidInputError("subagents", "sub-agents are turned off here (subagents.max_depth = 0)")
        depth = 0 if parent_session_id is None else await self._lineage.depth(parent_session_id) + 1
        if field == "subagents" and depth >= limit:
            raise InvalidInputError(
                "subagents",
                f"this agent would be at depth {depth} and may not spawn its own: the limit is {limit}"
                " (subagents.max_depth); spawn it with subagents=false",
            )
        if self.subagent_url is None:
            raise InvalidInputError(
                field, "this server has no address agents can call back; serve it over stdio or http"
            )
        if network == "model" and self._egress is not None:
            # Through the session's proxy socket: the URL in the sandbox outlives server restarts.
            return self._egress.callback_url()
        if network != "host":
            raise InvalidInputError(
                field,
                f"the environment's network is {network!r}, so the agent cannot reach this server;"
                " use an environment created with network 'model' (the default) or 'host'",
            )
        return self.subagent_url

    async def _run_setup(self, sandbox: Sandbox, commands: list[str], *, made_by_agent: bool) -> None:
        """A failing command's output tail is shown to the caller: redacted always, and only a
        few lines of it for an environment an agent made (its commands may probe for secrets)."""
        for index, command in enumerate(commands):
            # Setup runs as root: it typically installs packages the agent user then uses.
            result = await sandbox.exec(["sh", "-c", command], user="0", timeout=SETUP_COMMAND_TIMEOUT_S)
            if not result.ok:
                output = (result.stderr or result.stdout).decode("utf-8", "replace")
                tail = redact(output, self._secret_values())[-(SETUP_TAIL_FOR_AGENTS if made_by_agent else 800) :]
                raise InvalidInputError(
                    f"setup_commands[{index}]",
                    f"exited with code {result.exit_code}: {tail.strip()}; fix the command in the environment"
                    " (delete_environment, then create_environment)",
                )

    async def send_message(self, session_id: str, text: str) -> tuple[SessionView, int]:
        if not text.strip():
            raise InvalidInputError("text", "is empty; say what the agent should do next")
        session = await self._db.get_session(session_id)
        if session.status not in LIVE_STATUSES:
            cause = f" ({session.last_error})" if session.status == "failed" and session.last_error else ""
            raise ConflictError(
                f"session_id: session {session_id} is {session.status}{cause}; it cannot take messages."
                " Spawn a new agent with spawn_agent"
            )
        worker = self._workers.get(session_id)
        if worker is None:
            raise ConflictError(f"session_id: session {session_id} has no running worker; stop it and spawn anew")
        if worker.current is None and not await self._workers.check_sandbox(worker):
            # The worker fails the session with the cause; say the same to this caller.
            with anyio.move_on_after(KILL_TIMEOUT_S):
                await worker.exited.wait()
            raise ConflictError(
                f"session_id: session {session_id} failed: {worker.removed}. Spawn a new agent with spawn_agent"
            )
        await self._budgets.check(session_id, new_session=False, field="send_message")
        turn = await self._db.enqueue_turn(session_id, text)
        worker.wake.set()
        return await self._reads.get_session(session_id), turn.idx

    async def interrupt(self, session_id: str) -> SessionView:
        session = await self._db.get_session(session_id)
        worker = self._workers.get(session_id)
        if worker is None or worker.current is None:
            raise ConflictError(
                f"session_id: session {session_id} is {session.status}, no turn is running; nothing to interrupt"
            )
        running = worker.current
        await self._journal.emit(session_id, [UserInterrupt()])
        await running.interrupt()
        with anyio.move_on_after(INTERRUPT_ANSWER_WAIT_S):
            await running.done.wait()
        return await self._reads.get_session(session_id)

    async def stop_session(self, session_id: str, *, reason: str | None = None) -> SessionView:
        """Stops the session and, first, every sub-agent it spawned (children before parents, so
        none outlives the agent it reports to). `reason` (default: by request) becomes each one's
        stop reason and is said in its session.status_terminated event."""
        await self._db.get_session(session_id)  # NotFoundError for unknown ids
        for child_id in reversed(await self._lineage.descendants(session_id)):
            child = await self._db.get_session(child_id)
            if child.status in LIVE_STATUSES or child.sandbox_id:
                await self._stop_one(child_id, reason)
        return await self._stop_one(session_id, reason)

    async def _stop_one(self, session_id: str, reason: str | None = None) -> SessionView:
        session = await self._db.get_session(session_id)
        if session.status in ("stopped", "failed") and session_id not in self._workers:
            if session.sandbox_id:
                await self._destroy_sandbox(session)
            return await self._reads.get_session(session_id)
        worker = self._workers.get(session_id)
        if worker is not None:
            worker.stopping = True
            if worker.current is not None:
                await self._journal.emit(session_id, [UserInterrupt()])
                # Stopping does not wait for a graceful exit: the container goes anyway.
                running = worker.current
                if running.stream is not None:
                    with anyio.move_on_after(KILL_TIMEOUT_S):
                        try:
                            await running.stream.signal(9)
                        except Exception:
                            logger.debug("signal on stop failed; the process may be gone already")
                running.interrupted = True
            worker.scope.cancel()
            with anyio.move_on_after(KILL_TIMEOUT_S):
                await worker.exited.wait()
        await self._journal.fail_queued(session_id, "session stopped")
        await self._destroy_sandbox(session)
        await self._journal.set_status(session_id, "stopped", stop_reason=reason or session.stop_reason)
        await self._journal.emit(
            session_id, [SessionStatusTerminated(reason=reason or "stopped by request")], status_changed=True
        )
        return await self._reads.get_session(session_id)

    async def _destroy_sandbox(self, session: SessionRecord) -> None:
        env = await self._db.find_environment(session.environment_id)
        if env is None or not session.sandbox_id:
            return
        provider = await self._providers.get(env.provider)
        with anyio.CancelScope(shield=True), anyio.fail_after(DESTROY_TIMEOUT_S):
            await provider.destroy(session.sandbox_id)
        await self._db.update_session(session.id, sandbox_id=None)
        if env.spec.network == "model" and self._egress is not None:
            await self._egress.close(session.id)
        await self._journal.emit(session.id, [SandboxDestroyed(provider=env.provider, sandbox_id=session.sandbox_id)])

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            if name not in backend_names():
                raise InvalidInputError(
                    "backend", f"unknown backend {name!r}; use one of: {', '.join(backend_names())}"
                )
            settings = self._settings.backend(name)
            self._backends[name] = with_host_cli(build_backend(name, settings, self._environ), settings)
        return self._backends[name]
