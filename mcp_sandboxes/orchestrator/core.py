"""The orchestrator: the facade the MCP layer talks to. It owns the store, the provider pool,
the event bus and the task group the session workers run in, recovers live sessions after a
restart, and hands each job to the module that does it:

    journal      store every event, then publish it
    environments named sandbox templates
    sessions     spawn, send, interrupt, stop
    worker       one task per live session: runs its turns, notices a vanished sandbox
    reads        session views, event pages, waits, transcript documents
    permissions  sub-agents' permission prompts and their answers
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Literal, Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.backends.registry import backend_names
from mcp_sandboxes.config import Settings
from mcp_sandboxes.egress.plan import is_credential
from mcp_sandboxes.errors import ConflictError, InvalidInputError, McpSandboxesError
from mcp_sandboxes.events import ErrorInfo, SessionError, SessionStatusIdle, StopReason
from mcp_sandboxes.files import load_or_create_instance_id
from mcp_sandboxes.orchestrator.access import AgentAccess
from mcp_sandboxes.orchestrator.budgets import TreeBudgets
from mcp_sandboxes.orchestrator.bus import EventBus, SessionChanged
from mcp_sandboxes.orchestrator.egress import EgressService
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest, EnvironmentService
from mcp_sandboxes.orchestrator.journal import EventJournal
from mcp_sandboxes.orchestrator.permissions import PermissionBroker
from mcp_sandboxes.orchestrator.pool import WarmPool
from mcp_sandboxes.orchestrator.preparation import Preparations
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.orchestrator.reads import (
    PROGRESS_INTERVAL_S,
    TRANSCRIPT_URI,
    Progress,
    SessionReads,
    settled,
    settled_or_asking,
    turn_view,
)
from mcp_sandboxes.orchestrator.sessions import PERMISSION_PROMPT_TOOL, SessionService
from mcp_sandboxes.orchestrator.subagents import Caller, Lineage
from mcp_sandboxes.orchestrator.sweeper import Sweeper
from mcp_sandboxes.orchestrator.views import EnvironmentView, EventsPage, SessionView
from mcp_sandboxes.orchestrator.worker import SessionWorker, WorkerPool
from mcp_sandboxes.orchestrator.workspaces import (
    Diff,
    Entry,
    Export,
    FileContent,
    SandboxWorkspace,
    check_read_size,
    decode_content,
    export_session,
    workspace_base,
)
from mcp_sandboxes.providers import ImageCommitter
from mcp_sandboxes.providers.base import Mount, Sandbox
from mcp_sandboxes.store import Database, EnvironmentRecord, EventRecord, SessionRecord
from mcp_sandboxes.store.records import LIVE_STATUSES, SessionStatus, TurnRecord

logger = logging.getLogger(__name__)

DEFAULT_TURN_TIMEOUT_S = 3600.0


class Orchestrator:
    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._environ = dict(os.environ if environ is None else environ)
        self.db = Database(settings.database_path)
        self.bus = EventBus()
        self.journal = EventJournal(self.db, self.bus, self.credential_values)
        self.egress = EgressService(settings, self._environ, self.journal.emit)
        self.providers = ProviderPool(settings)
        self.access = AgentAccess(self.db, self.providers, settings.subagents)
        self.environments = EnvironmentService(self.db, self.providers, self.access, settings.workspaces)
        self.preparations = Preparations(self.db, self.providers, self.secret_values)
        self.environments.preparations = self.preparations
        self.environments.egress = self.egress
        self.lineage = Lineage(self.db)
        self.permissions = PermissionBroker(self.journal.emit, settings.permissions.timeout_s)
        # Further values to redact from what callers see (the server adds its operator token).
        self.extra_secrets: list[str] = []
        turn_timeout_s = float(self._environ.get("MCP_SANDBOXES_TURN_TIMEOUT_S", DEFAULT_TURN_TIMEOUT_S))
        self.workers = WorkerPool(
            settings,
            self.db,
            self.journal,
            self.providers,
            turn_timeout_s=turn_timeout_s,
            secret_values=self.secret_values,
        )
        self.budgets = TreeBudgets(self.db, self.lineage, self.journal, settings.budgets)
        self.reads = SessionReads(self.db, self.bus, self.permissions, settings.server.max_wait_s, self.budgets)
        self.sessions = SessionService(
            settings,
            self._environ,
            db=self.db,
            journal=self.journal,
            providers=self.providers,
            environments=self.environments,
            access=self.access,
            lineage=self.lineage,
            workers=self.workers,
            reads=self.reads,
            budgets=self.budgets,
            secret_values=self.secret_values,
            egress=self.egress,
        )
        self.sweeper = Sweeper(settings, self.db, self.providers, self.workers, self.lineage, self.sessions)
        self.pool = WarmPool(
            self.db,
            self.providers,
            self.sessions.cap,
            instance_id=lambda: self.sessions.instance_id,
            mounts=self._pool_mounts,
            sandbox_user=settings.server.sandbox_user,
            secret_values=self.secret_values,
            egress=self.egress,
        )
        self.sessions.pool = self.sweeper.pool = self.pool
        self.sweeper.egress = self.egress

    # -- lifecycle -----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """Open the store, reattach live sessions, run their workers; on exit stop the workers
        (sandboxes stay: sessions survive a server restart) and close everything."""
        await self.db.open()
        try:
            self.sessions.instance_id = await anyio.to_thread.run_sync(
                load_or_create_instance_id, self.settings.server.data_dir.expanduser() / "instance-id"
            )
            async with anyio.create_task_group() as task_group, self.egress.proxy() as proxy:
                self.workers.attach_to(task_group)
                self.preparations.attach_to(task_group)
                self.pool.attach_to(task_group)
                self.egress.attach(proxy)
                try:
                    await self._recover()
                    await self.preparations.resume()
                    await self._adopt_pools()
                    await self.sweeper.reap_orphans()
                    await self.egress.prune({s.id for s in await self.db.list_sessions(LIVE_STATUSES)})
                    task_group.start_soon(self.workers.watch_sandboxes, name="sandbox-liveness")
                    task_group.start_soon(self.sweeper.run, name="sweeper")
                    yield self
                finally:
                    task_group.cancel_scope.cancel()
        finally:
            self.workers.attach_to(None)
            self.preparations.attach_to(None)
            self.pool.attach_to(None)
            await self.pool.aclose()
            self.egress.attach(None)
            with anyio.CancelScope(shield=True):
                self.bus.close()
                await self.providers.aclose()
                await self.db.aclose()

    async def _adopt_pools(self) -> None:
        """After a restart: the warm pools refill, taking back their sandboxes that still fit."""
        for environment_id, size in (await self.db.warm_pools()).items():
            env = await self.db.find_environment(environment_id)
            if env is not None:
                await self.pool.configure(env, size, adopt=True)

    def _pool_mounts(self) -> list[Mount]:
        """Every backend's mounts, one per target: a pooled sandbox may run any agent (a backend
        whose CLI is not configured, or is broken, adds nothing; its spawns then start cold)."""
        mounts: dict[str, Mount] = {}
        for name in backend_names():
            try:
                for mount in self.sessions.backend(name).mounts():
                    mounts.setdefault(mount.target, mount)
            except McpSandboxesError:
                continue
        return list(mounts.values())

    async def _recover(self) -> None:
        """After a restart: reattach live sessions' sandboxes, close turns cut off mid-way and
        kill what those turns left running in the sandbox (found by their turn marker, since the
        CLI and its tools keep running when the server dies)."""
        for session in await self.db.list_sessions(LIVE_STATUSES):
            cut_off = await self.db.list_turns(session.id, "running")
            sandbox: Sandbox | None = None
            env = await self.db.find_environment(session.environment_id)
            try:
                if env is not None and session.sandbox_id:
                    provider = await self.providers.get(env.provider)
                    sandbox = await provider.attach(session.sandbox_id)
                backend = self.sessions.backend(session.backend)
                if env is not None and env.spec.network == "model" and sandbox is not None:
                    plan, backend = self.egress.backend_for(session.id, session.backend, env.spec.allowed_hosts)
                    await self.egress.open(
                        session.id, session.id, plan, agent_endpoint=session.token_sha256 is not None
                    )
            except McpSandboxesError as exc:
                logger.warning("session %s cannot be resumed: %s", session.id, exc)
                sandbox = None
            message = "the server restarted during this turn"
            if sandbox is not None and cut_off:
                turn_user = env.spec.user if env is not None else None
                message += await self.workers.end_leftovers(
                    sandbox,
                    session.id,
                    [turn.idx for turn in cut_off],
                    user=turn_user or self.workers.user_of(sandbox),
                )
            for turn in cut_off:
                await self.db.finish_turn(
                    session.id,
                    turn.idx,
                    status="failed",
                    stop_reason="error",
                    final_text=None,
                    error=message,
                    usage=None,
                )
                await self.journal.emit(
                    session.id,
                    [
                        SessionError(error=ErrorInfo(type="server_restarted", message=message)),
                        SessionStatusIdle(stop_reason=StopReason(type="error")),
                    ],
                )
            if sandbox is None:
                await self.journal.fail(session.id, "its sandbox no longer exists (removed while the server was down)")
                continue
            await self.db.update_session(session.id, status="idle")
            self.workers.spawn(SessionWorker(session_id=session.id, sandbox=sandbox, backend=backend))

    # -- settings the server sets once it listens ------------------------------------------

    @property
    def subagent_url(self) -> str | None:
        """The MCP endpoint sandboxed agents call back; None: sub-agents cannot be offered."""
        return self.sessions.subagent_url

    @subagent_url.setter
    def subagent_url(self, url: str | None) -> None:
        self.sessions.subagent_url = url

    async def set_subagent_url(self, url: str | None) -> None:
        """Where agents call back, once the server listens; "model" sandboxes reach it through
        their proxy, which forwards there from now on."""
        self.sessions.subagent_url = url
        await self.egress.set_agent_url(url)

    @property
    def turn_timeout_s(self) -> float:
        return self.workers.turn_timeout_s

    @turn_timeout_s.setter
    def turn_timeout_s(self, seconds: float) -> None:
        self.workers.turn_timeout_s = seconds

    def credential_values(self) -> list[str]:
        """The credentials agent CLIs use (API keys passed on, or swapped in by the egress proxy):
        no event, transcript or log line may show them."""
        values = {
            self._environ[name]
            for settings in self.settings.backends.values()
            for name in settings.pass_env
            if self._environ.get(name) and is_credential(name, settings)
        }
        return sorted(values | set(self.egress.credential_values()))

    def secret_values(self) -> list[str]:
        """Values no caller may see: the credentials handed to agent CLIs and the operator token."""
        return [*self.credential_values(), *self.extra_secrets]

    def backend_names(self) -> list[str]:
        return backend_names()

    # -- environments -----------------------------------------------------------------------

    async def create_environment(
        self, request: EnvironmentRequest, *, caller_session_id: str | None = None
    ) -> EnvironmentView:
        """`caller_session_id`: an agent creating it, confined to what its own environment allows.
        `request.warm_pool`: sandboxes kept started for its spawns (the operator's choice only)."""
        size = request.warm_pool
        if size:
            self._check_warm_pool(request, size, caller_session_id)
        view = await self.environments.create(request, created_by_session=caller_session_id)
        if size:
            await self.db.set_warm_pool(view.id, size)
            await self.pool.configure(await self.environments.get(view.id), size)
        return self._with_pool(view)

    def _check_warm_pool(self, request: EnvironmentRequest, size: int, caller_session_id: str | None) -> None:
        if caller_session_id is not None:
            raise InvalidInputError("warm_pool", "only the operator may keep sandboxes started; leave it 0")
        cap = self.settings.server.max_sandboxes
        if cap and size > cap:
            raise InvalidInputError(
                "warm_pool", f"{size} is more than server.max_sandboxes ({cap}); ask for {cap} or fewer"
            )

    def _with_pool(self, view: EnvironmentView) -> EnvironmentView:
        return view.model_copy(update=self.pool.describe(view.id))

    async def wait_for_environment(
        self, id_or_name: str, max_wait_s: float, progress: Progress | None = None
    ) -> EnvironmentView:
        """Until the environment's image preparation ends (or `max_wait_s`); `progress` hears each step."""
        record = await self.environments.get(id_or_name)
        await self.preparations.wait(record.id, max_wait_s, progress)
        return await self.environments.view(await self.environments.get(record.id))

    async def list_environments(self) -> list[EnvironmentView]:
        return [self._with_pool(view) for view in await self.environments.list_all()]

    async def delete_environment(self, id_or_name: str, *, force: bool = False, purge: bool = False) -> EnvironmentView:
        """Stopped sessions keep their history (events, transcripts) unless `purge`."""
        record = await self.environments.get(id_or_name)
        view = await self.environments.view(record)
        live = await self.environments.live_session_ids(record)
        if live and not force:
            raise ConflictError(
                f"environment: {record.name!r} is used by live sessions {', '.join(live)}; stop them first"
                " (stop_session) or pass force=true to stop them and delete"
            )
        for session_id in live:
            await self.sessions.stop_session(session_id)
        await self.pool.drain(record.id)
        self.preparations.cancel(record.id)
        await self.db.delete_environment(record.id, purge=purge)
        await self._remove_prepared_image(record)
        return view.model_copy(update={"state": "deleted", "state_detail": None, "live_sessions": 0, "warm_ready": 0})

    async def _remove_prepared_image(self, record: EnvironmentRecord) -> None:
        """A prepared image no remaining environment uses goes with the last one that did (images
        are large; the same recipe is prepared again if it comes back)."""
        image = record.prepared_image
        if image is None or any(env.prepared_image == image for env in await self.db.list_environments()):
            return
        provider = await self.providers.get(record.provider)
        if not isinstance(provider, ImageCommitter):
            return
        try:
            if not await provider.remove_image(image):
                logger.info("prepared image %s is still used by a container; it stays", image)
        except McpSandboxesError as exc:
            logger.warning("could not remove prepared image %s: %s", image, exc)

    # -- sessions ----------------------------------------------------------------------------

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
        return await self.sessions.spawn_agent(
            environment=environment,
            agent=agent,
            prompt=prompt,
            parent_session_id=parent_session_id,
            subagents=subagents,
            ask_permissions=ask_permissions,
        )

    async def send_message(self, session_id: str, text: str) -> tuple[SessionView, int]:
        return await self.sessions.send_message(session_id, text)

    async def interrupt(self, session_id: str) -> SessionView:
        return await self.sessions.interrupt(session_id)

    async def stop_session(self, session_id: str) -> SessionView:
        return await self.sessions.stop_session(session_id)

    # -- reads -------------------------------------------------------------------------------

    async def get_session(self, session_id: str) -> SessionView:
        return await self.reads.get_session(session_id)

    async def list_sessions(self, statuses: Sequence[SessionStatus] | None = None) -> list[SessionView]:
        return await self.reads.list_sessions(statuses)

    async def read_events(
        self,
        session_id: str,
        *,
        after: int = 0,
        limit: int = 100,
        wait_s: float = 0.0,
        types: Sequence[str] | None = None,
    ) -> EventsPage:
        return await self.reads.read_events(session_id, after=after, limit=limit, wait_s=wait_s, types=types)

    async def wait_for_turn(self, session_id: str, index: int, max_wait_s: float) -> TurnRecord | None:
        return await self.reads.wait_for_turn(session_id, index, max_wait_s)

    async def wait_for_sessions(
        self,
        session_ids: Sequence[str],
        *,
        mode: Literal["any", "all"],
        max_wait_s: float,
        progress: Progress | None = None,
    ) -> tuple[list[SessionView], bool]:
        return await self.reads.wait_for_sessions(session_ids, mode=mode, max_wait_s=max_wait_s, progress=progress)

    async def session_record(self, session_id: str) -> SessionRecord:
        return await self.db.get_session(session_id)

    async def event_records(self, session_id: str, *, after: int = 0, limit: int = 100) -> list[EventRecord]:
        return await self.db.read_events(session_id, after=after, limit=limit)

    async def live_sessions(self) -> list[SessionRecord]:
        return await self.reads.live_sessions()

    async def transcript(self, session_id: str) -> str:
        return await self.reads.transcript(session_id)

    async def events_document(self, session_id: str) -> str:
        return await self.reads.events_document(session_id)

    def subscribe(self) -> MemoryObjectReceiveStream[SessionChanged]:
        """Every change to any session's log, as it is published."""
        return self.bus.subscribe()

    async def check_reach(self, caller: Caller, session_id: str) -> None:
        """NotFoundError unless `caller` may reach the session (an agent: only its descendants)."""
        await self.lineage.check_reach(caller, session_id)

    async def descendants(self, session_id: str) -> list[str]:
        return await self.lineage.descendants(session_id)

    # -- workspaces: a session's files and work, read and taken out (orchestrator/workspaces.py) --

    async def _workspace(self, session_id: str) -> tuple[SessionRecord, EnvironmentRecord, SandboxWorkspace]:
        session = await self.db.get_session(session_id)
        worker = self.workers.get(session_id)
        env = await self.db.find_environment(session.environment_id)
        if worker is None or env is None:
            raise ConflictError(
                f"session_id: session {session_id} is {session.status} and its sandbox is gone, so its workspace"
                " cannot be reached; spawn a new agent (export_changes before stop_session keeps the work)"
            )
        user = env.spec.user or self.workers.user_of(worker.sandbox)
        return session, env, SandboxWorkspace(worker.sandbox, env.spec.workdir, user)

    async def read_workspace_file(self, session_id: str, path: str, *, offset: int, max_bytes: int) -> FileContent:
        check_read_size(max_bytes, self.settings.workspaces)
        _, _, workspace = await self._workspace(session_id)
        return await workspace.read(path, offset=offset, max_bytes=max_bytes)

    async def write_workspace_file(
        self, session_id: str, path: str, content: str, encoding: Literal["text", "base64"]
    ) -> tuple[str, int]:
        data = decode_content(content, encoding, self.settings.workspaces)
        _, _, workspace = await self._workspace(session_id)
        return (await workspace.write(path, data)).relative, len(data)

    async def list_workspace(self, session_id: str, path: str, *, depth: int) -> tuple[str, list[Entry], bool]:
        _, _, workspace = await self._workspace(session_id)
        return await workspace.listing(path, depth=depth, limit=self.settings.workspaces.max_list_entries)

    async def session_diff(self, session_id: str) -> Diff:
        session, _, workspace = await self._workspace(session_id)
        return await workspace.diff(workspace_base(session), max_bytes=self.settings.workspaces.max_diff_bytes)

    async def export_changes(
        self, session_id: str, *, format: Literal["auto", "bundle", "patch"], to_host: bool
    ) -> Export:
        """`to_host`: the caller may put a branch into the host repository (the operator)."""
        session, env, workspace = await self._workspace(session_id)
        return await export_session(
            workspace, session, env.workspace, format=format, to_host=to_host, settings=self.settings.workspaces
        )


__all__ = [
    "PERMISSION_PROMPT_TOOL",
    "PROGRESS_INTERVAL_S",
    "TRANSCRIPT_URI",
    "Orchestrator",
    "SessionWorker",
    "settled",
    "settled_or_asking",
    "turn_view",
]
