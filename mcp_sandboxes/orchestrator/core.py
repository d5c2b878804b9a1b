"""The orchestrator: one object that owns the database, the provider pool, the event bus
and one worker task per live session. The MCP layer talks only to this."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal, Self

import anyio
from anyio.abc import TaskGroup

from mcp_sandboxes.backends.base import AgentSpec, Backend, Turn, TurnResult
from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import (
    ConflictError,
    InvalidInputError,
    McpSandboxesError,
    NotFoundError,
    SandboxGoneError,
)
from mcp_sandboxes.events import (
    ErrorInfo,
    Event,
    SandboxDestroyed,
    SandboxProvisioned,
    SessionError,
    SessionStatusIdle,
    SessionStatusRunning,
    SessionStatusTerminated,
    SessionThreadCreated,
    StopReason,
    TextBlock,
    UserInterrupt,
    UserMessage,
)
from mcp_sandboxes.orchestrator.access import AgentAccess
from mcp_sandboxes.orchestrator.bus import EventBus, SessionChanged
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest, EnvironmentService
from mcp_sandboxes.orchestrator.permissions import PermissionBroker
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.orchestrator.runner import OomWatch, RunningTurn, kill_marked, removed_reason, run_turn
from mcp_sandboxes.orchestrator.subagents import (
    REDACTED_AUTHORIZATION,
    SERVER_NAME,
    Lineage,
    callback_server,
    new_token,
)
from mcp_sandboxes.orchestrator.views import (
    EnvironmentView,
    EventsPage,
    EventView,
    PermissionView,
    SessionView,
    TurnView,
)
from mcp_sandboxes.providers.base import Sandbox
from mcp_sandboxes.redaction import redact
from mcp_sandboxes.store import Database, SessionRecord
from mcp_sandboxes.store.database import utc_now
from mcp_sandboxes.store.records import LIVE_STATUSES, SessionStatus, TurnRecord

logger = logging.getLogger(__name__)

SETUP_COMMAND_TIMEOUT_S = 600.0
# Characters of a failing setup command's output shown when an agent made the environment.
SETUP_TAIL_FOR_AGENTS = 200
DESTROY_TIMEOUT_S = 60.0
DEFAULT_TURN_TIMEOUT_S = 3600.0
# A waiting call reports progress at least this often.
PROGRESS_INTERVAL_S = 5.0
# (done, total, message): how a long call tells its client it is alive.
Progress = Callable[[float, float | None, str | None], Awaitable[None]]
# The tool Claude Code asks before a tool call its permission mode asks about (server "sandboxes").
PERMISSION_PROMPT_TOOL = f"mcp__{SERVER_NAME}__approve_tool_use"
TRANSCRIPT_URI = "sandboxes://sessions/{session_id}/transcript"


@dataclass
class SessionWorker:
    """The in-memory side of a live session: its sandbox, backend and turn queue signal."""

    session_id: str
    sandbox: Sandbox
    backend: Backend
    wake: anyio.Event = field(default_factory=anyio.Event)
    current: RunningTurn | None = None
    turn_done: dict[int, anyio.Event] = field(default_factory=dict)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stopping: bool = False
    exited: anyio.Event = field(default_factory=anyio.Event)
    # Set (with the reason) once the sandbox is known to have been removed behind our back: the
    # worker then fails the session and ends.
    removed: str | None = None
    oom: OomWatch | None = None


class Orchestrator:
    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._environ = dict(os.environ if environ is None else environ)
        self.db = Database(settings.database_path)
        self.providers = ProviderPool(settings)
        self.access = AgentAccess(self.db, self.providers, settings.subagents)
        self.environments = EnvironmentService(self.db, self.providers, self.access)
        self.bus = EventBus()
        self.lineage = Lineage(self.db)
        self.permissions = PermissionBroker(self._emit, settings.permissions.timeout_s)
        # The MCP endpoint sandboxed agents call back (set by the server once it listens); None:
        # sub-agents cannot be offered.
        self.subagent_url: str | None = None
        # Further values to redact from what callers see (the server adds its operator token).
        self.extra_secrets: list[str] = []
        self._backends: dict[str, Backend] = {}
        self._workers: dict[str, SessionWorker] = {}
        self._task_group: TaskGroup | None = None
        self.turn_timeout_s = float(self._environ.get("MCP_SANDBOXES_TURN_TIMEOUT_S", DEFAULT_TURN_TIMEOUT_S))

    # -- lifecycle -----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """Open the store, reattach live sessions, run their workers; on exit stop the workers
        (sandboxes stay: sessions survive a server restart) and close everything."""
        await self.db.open()
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                try:
                    await self._recover()
                    task_group.start_soon(self._watch_sandboxes, name="sandbox-liveness")
                    yield self
                finally:
                    task_group.cancel_scope.cancel()
        finally:
            self._task_group = None
            with anyio.CancelScope(shield=True):
                self.bus.close()
                await self.providers.aclose()
                await self.db.aclose()

    def _spawn(self, worker: SessionWorker) -> None:
        if self._task_group is None:
            raise McpSandboxesError("the orchestrator is not running")
        self._workers[worker.session_id] = worker
        self._task_group.start_soon(self._work, worker, name=f"session-{worker.session_id}")

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
                backend = self._backend(session.backend)
            except McpSandboxesError as exc:
                logger.warning("session %s cannot be resumed: %s", session.id, exc)
                sandbox = None
            message = "the server restarted during this turn"
            if sandbox is not None and cut_off:
                turn_user = env.spec.user if env is not None else None
                message += await self._end_leftovers(
                    sandbox,
                    session.id,
                    [turn.idx for turn in cut_off],
                    user=turn_user or self._user_of(sandbox),
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
                await self._emit(
                    session.id,
                    [
                        SessionError(error=ErrorInfo(type="server_restarted", message=message)),
                        SessionStatusIdle(stop_reason=StopReason(type="error")),
                    ],
                )
            if sandbox is None:
                await self._fail(session.id, "its sandbox no longer exists (removed while the server was down)")
                continue
            await self.db.update_session(session.id, status="idle")
            self._spawn(SessionWorker(session_id=session.id, sandbox=sandbox, backend=backend))

    async def _end_leftovers(self, sandbox: Sandbox, session_id: str, turns: list[int], *, user: str | None) -> str:
        """Kill what the cut-off turns of the session left running (what earlier turns left on
        purpose, such as a server started in the background, stays); says what, for their error."""
        killed: list[str] = []
        try:
            with anyio.fail_after(LEFTOVER_KILL_TIMEOUT_S):
                for index in turns:
                    killed += await kill_marked(sandbox, session_id, index, user=user)
        except (McpSandboxesError, TimeoutError) as exc:
            logger.warning("session %s: the cut-off turn's processes could not be ended: %s", session_id, exc)
            return f"; what it left running could not be ended ({exc})"
        if not killed:
            return "; it left nothing running"
        shown = redact("; ".join(killed[:LEFTOVERS_SHOWN]), self.secret_values())
        more = f" and {len(killed) - LEFTOVERS_SHOWN} more" if len(killed) > LEFTOVERS_SHOWN else ""
        return f"; killed {len(killed)} process(es) it left running: {shown}{more}"

    # -- sandbox liveness --------------------------------------------------------------------

    async def _sandbox_exists(self, provider_name: str, sandbox_id: str, *, settle_s: float = 0.0) -> bool:
        """False only when the provider says the sandbox is gone; an engine that does not answer
        (down, slow) is no proof, so then True. `settle_s`: keep asking that long while it seems
        to exist, for a removal under way (`docker rm -f` kills the processes first, and for a
        moment the container still looks alive, or refuses to start because it is being removed)."""
        deadline = anyio.current_time() + settle_s
        while True:
            try:
                with anyio.fail_after(LIVENESS_CHECK_TIMEOUT_S):
                    provider = await self.providers.get(provider_name)
                    if await provider.attach(sandbox_id) is None:
                        return False
            except SandboxGoneError:
                return False
            except (McpSandboxesError, TimeoutError) as exc:
                logger.warning("cannot tell whether sandbox %s still exists: %s", sandbox_id, exc)
            if anyio.current_time() >= deadline:
                return True
            await anyio.sleep(REMOVAL_POLL_S)

    async def _check_worker_sandbox(self, worker: SessionWorker) -> bool:
        """Whether the worker's sandbox still exists; when it does not, the worker is told (it
        fails the session and ends) and this returns False."""
        if worker.removed is not None:
            return False
        session = await self.db.get_session(worker.session_id)
        env = await self.db.find_environment(session.environment_id)
        if env is None or await self._sandbox_exists(env.provider, worker.sandbox.id):
            return True
        if worker.removed is None:
            worker.removed = removed_reason(worker.sandbox.id)
        worker.wake.set()
        return False

    async def _watch_sandboxes(self) -> None:
        """Fail live sessions whose sandbox vanished while idle (a running turn finds out itself)."""
        interval = self.settings.server.liveness_interval_s
        while True:
            await anyio.sleep(interval)
            for worker in list(self._workers.values()):
                if worker.stopping or worker.current is not None or worker.removed is not None:
                    continue
                try:
                    await self._check_worker_sandbox(worker)
                except NotFoundError:
                    continue  # the session was deleted meanwhile
                except Exception:  # a check that breaks must not take the server down with it
                    logger.exception("checking the sandbox of session %s failed", worker.session_id)

    async def _end_removed(self, worker: SessionWorker, reason: str) -> None:
        """The sandbox is gone: queued turns fail, the session fails with the true cause."""
        for turn in await self.db.list_turns(worker.session_id, "queued"):
            await self.db.finish_turn(
                worker.session_id,
                turn.idx,
                status="failed",
                stop_reason=None,
                final_text=None,
                error=reason,
                usage=None,
            )
        await self._fail(worker.session_id, reason)

    # -- events ----------------------------------------------------------------------------

    async def _emit(self, session_id: str, events: Sequence[Event], *, status_changed: bool = False) -> None:
        if not events:
            return
        records = await self.db.append_events(session_id, events)
        self.bus.publish(SessionChanged(session_id, records[-1].seq, status_changed))

    async def _set_status(self, session_id: str, status: SessionStatus, **fields: object) -> None:
        await self.db.update_session(session_id, status=status, **fields)

    async def _fail(self, session_id: str, reason: str) -> None:
        await self._set_status(session_id, "failed", last_error=reason, stop_reason="error")
        await self._emit(
            session_id,
            [
                SessionError(error=ErrorInfo(type="session_failed", message=reason)),
                SessionStatusTerminated(reason=reason),
            ],
            status_changed=True,
        )

    # -- environments -----------------------------------------------------------------------

    async def create_environment(
        self, request: EnvironmentRequest, *, caller_session_id: str | None = None
    ) -> EnvironmentView:
        """`caller_session_id`: an agent creating it, confined to what its own environment allows."""
        return await self.environments.create(request, created_by_session=caller_session_id)

    async def list_environments(self) -> list[EnvironmentView]:
        return await self.environments.list_all()

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
            await self.stop_session(session_id)
        await self.db.delete_environment(record.id, purge=purge)
        return view.model_copy(update={"state": "deleted", "state_detail": None, "live_sessions": 0})

    # -- sessions ----------------------------------------------------------------------------

    def _backend(self, name: str) -> Backend:
        if name not in self._backends:
            if name not in backend_names():
                raise InvalidInputError(
                    "backend", f"unknown backend {name!r}; use one of: {', '.join(backend_names())}"
                )
            self._backends[name] = build_backend(name, self.settings.backend(name), self._environ)
        return self._backends[name]

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
        env = await self.environments.get(environment)
        backend = self._backend(agent.backend)
        self.environments.check_network(env.spec.network)
        env_spec = env.spec
        if parent_session_id is not None:
            # An agent spawning: only into what its own environment would allow it to create.
            env_spec = await self.access.confine(parent_session_id, env.provider, env.spec)
        if (
            subagents
            and await self.access.exposes_host(env.provider, env.spec)
            and not self.settings.subagents.allow_unsandboxed
        ):
            raise InvalidInputError(
                "subagents",
                f"environment {env.name!r} runs on the host itself ({env.provider}), where an agent could read"
                " the server's own files; use a container environment (or set subagents.allow_unsandboxed)",
            )
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
        provider = await self.providers.get(env.provider)
        session_id = f"ses_{uuid.uuid4().hex[:20]}"
        # A provider that runs everything as the server's own user (process) takes no user name.
        user = None if getattr(provider, "ignores_user", False) else self.settings.server.sandbox_user
        spec = env_spec.model_copy(
            update={
                "name": f"mcp-sandboxes-{session_id}",
                "mounts": [*env_spec.mounts, *backend.mounts()],
                "labels": {**env_spec.labels, "io.mcp-sandboxes.session": session_id},
                "user": env_spec.user or user,
            }
        )
        started = time.monotonic()
        sandbox = await provider.create(spec)
        try:
            await self._run_setup(sandbox, env.setup_commands, made_by_agent=env.created_by_session is not None)
            await backend.prepare(sandbox, prepared_agent, home=self._home_of(sandbox), user=spec.user)
            now = utc_now()
            await self.db.insert_session(
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
                ),
                prompt,
            )
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(DESTROY_TIMEOUT_S):
                await provider.destroy(sandbox.id)
            raise
        await self._emit(
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
            await self._emit(parent_session_id, [SessionThreadCreated(child_session_id=session_id)])
        self._spawn(SessionWorker(session_id=session_id, sandbox=sandbox, backend=backend))
        return await self.get_session(session_id)

    async def _subagent_url(self, network: str, parent_session_id: str | None, *, field: str = "subagents") -> str:
        """Where a new agent calls back (to spawn sub-agents, or only to ask about permissions with
        `field` 'ask_permissions'), once its depth and network allow it."""
        limit = self.settings.subagents.max_depth
        if field == "subagents" and limit == 0:
            raise InvalidInputError("subagents", "sub-agents are turned off here (subagents.max_depth = 0)")
        depth = 0 if parent_session_id is None else await self.lineage.depth(parent_session_id) + 1
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
        if network != "host":
            raise InvalidInputError(
                field,
                f"the environment's network is {network!r}, so the agent cannot reach this server;"
                " use an environment created with network='host'",
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
                tail = redact(output, self.secret_values())[-(SETUP_TAIL_FOR_AGENTS if made_by_agent else 800) :]
                raise InvalidInputError(
                    f"setup_commands[{index}]",
                    f"exited with code {result.exit_code}: {tail.strip()}; fix the command in the environment"
                    " (delete_environment, then create_environment)",
                )

    async def send_message(self, session_id: str, text: str) -> tuple[SessionView, int]:
        if not text.strip():
            raise InvalidInputError("text", "is empty; say what the agent should do next")
        session = await self.db.get_session(session_id)
        if session.status not in LIVE_STATUSES:
            cause = f" ({session.last_error})" if session.status == "failed" and session.last_error else ""
            raise ConflictError(
                f"session_id: session {session_id} is {session.status}{cause}; it cannot take messages."
                " Spawn a new agent with spawn_agent"
            )
        worker = self._workers.get(session_id)
        if worker is None:
            raise ConflictError(f"session_id: session {session_id} has no running worker; stop it and spawn anew")
        if worker.current is None and not await self._check_worker_sandbox(worker):
            # The worker fails the session with the cause; say the same to this caller.
            with anyio.move_on_after(KILL_TIMEOUT_S):
                await worker.exited.wait()
            raise ConflictError(
                f"session_id: session {session_id} failed: {worker.removed}. Spawn a new agent with spawn_agent"
            )
        turn = await self.db.enqueue_turn(session_id, text)
        worker.wake.set()
        return await self.get_session(session_id), turn.idx

    async def wait_for_turn(self, session_id: str, index: int, max_wait_s: float) -> TurnRecord | None:
        """Wait until turn `index` has ended; None when the wait timed out first."""
        deadline = anyio.current_time() + min(max_wait_s, self.settings.server.max_wait_s)
        while True:
            turn = await self.db.get_turn(session_id, index)
            if turn.status not in ("queued", "running"):
                return turn
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            await self.bus.wait(session_id, remaining)

    async def wait_for_sessions(
        self,
        session_ids: Sequence[str],
        *,
        mode: Literal["any", "all"],
        max_wait_s: float,
        progress: Progress | None = None,
    ) -> tuple[list[SessionView], bool]:
        """Wait until any / all of the sessions have settled (no turn running or queued), at most
        `max_wait_s`; returns their views and whether the wait timed out first. `progress` hears
        (settled, total, message) whenever that count changes, and at least every few seconds."""
        ids = list(dict.fromkeys(session_ids))
        deadline = anyio.current_time() + min(max_wait_s, self.settings.server.max_wait_s)
        reported = -1
        while True:
            views = [await self.get_session(session_id) for session_id in ids]
            settled = [view for view in views if settled_or_asking(view)]
            done = len(settled) == len(views) if mode == "all" else bool(settled)
            if progress is not None and (len(settled) != reported or done):
                reported = len(settled)
                busy = [view.session_id for view in views if view not in settled]
                await progress(len(settled), len(views), f"{len(settled)}/{len(views)} settled; running: {busy}")
            remaining = deadline - anyio.current_time()
            if done or remaining <= 0:
                return views, not done
            if not await self.bus.wait_any(ids, min(remaining, PROGRESS_INTERVAL_S)):
                reported = -1  # nothing changed for a while: say so again, so the client sees life

    async def interrupt(self, session_id: str) -> SessionView:
        session = await self.db.get_session(session_id)
        worker = self._workers.get(session_id)
        if worker is None or worker.current is None:
            raise ConflictError(
                f"session_id: session {session_id} is {session.status}, no turn is running; nothing to interrupt"
            )
        running = worker.current
        await self._emit(session_id, [UserInterrupt()])
        await running.interrupt()
        with anyio.move_on_after(1.0):
            await running.done.wait()
        return await self.get_session(session_id)

    async def stop_session(self, session_id: str) -> SessionView:
        """Stops the session and, first, every sub-agent it spawned (children before parents, so
        none outlives the agent it reports to)."""
        await self.db.get_session(session_id)  # NotFoundError for unknown ids
        for child_id in reversed(await self.lineage.descendants(session_id)):
            child = await self.db.get_session(child_id)
            if child.status in LIVE_STATUSES or child.sandbox_id:
                await self._stop_one(child_id)
        return await self._stop_one(session_id)

    async def _stop_one(self, session_id: str) -> SessionView:
        session = await self.db.get_session(session_id)
        if session.status in ("stopped", "failed") and session_id not in self._workers:
            if session.sandbox_id:
                await self._destroy_sandbox(session)
            return await self.get_session(session_id)
        worker = self._workers.get(session_id)
        if worker is not None:
            worker.stopping = True
            if worker.current is not None:
                await self._emit(session_id, [UserInterrupt()])
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
        for turn in await self.db.list_turns(session_id, "queued"):
            await self.db.finish_turn(
                session_id,
                turn.idx,
                status="failed",
                stop_reason=None,
                final_text=None,
                error="session stopped",
                usage=None,
            )
        await self._destroy_sandbox(session)
        await self._set_status(session_id, "stopped", stop_reason=session.stop_reason)
        await self._emit(session_id, [SessionStatusTerminated(reason="stopped by request")], status_changed=True)
        return await self.get_session(session_id)

    async def _destroy_sandbox(self, session: SessionRecord) -> None:
        env = await self.db.find_environment(session.environment_id)
        if env is None or not session.sandbox_id:
            return
        provider = await self.providers.get(env.provider)
        with anyio.CancelScope(shield=True), anyio.fail_after(DESTROY_TIMEOUT_S):
            await provider.destroy(session.sandbox_id)
        await self.db.update_session(session.id, sandbox_id=None)
        await self._emit(session.id, [SandboxDestroyed(provider=env.provider, sandbox_id=session.sandbox_id)])

    # -- the worker -----------------------------------------------------------------------

    async def _work(self, worker: SessionWorker) -> None:
        try:
            with worker.scope:
                while True:
                    if worker.removed is not None:
                        await self._end_removed(worker, worker.removed)
                        return
                    queued = await self.db.list_turns(worker.session_id, "queued")
                    if not queued:
                        worker.wake = anyio.Event()
                        # Re-check after arming the event, so a message enqueued in between is not missed.
                        if not await self.db.list_turns(worker.session_id, "queued"):
                            await worker.wake.wait()
                        continue
                    await self._run_one(worker, queued[0])
        except Exception as exc:  # a bug here must fail this session, not the whole server
            logger.exception("session %s worker crashed", worker.session_id)
            with anyio.CancelScope(shield=True):
                await self._fail(worker.session_id, f"internal error: {exc}")
        finally:
            self._workers.pop(worker.session_id, None)
            worker.exited.set()

    async def _run_one(self, worker: SessionWorker, turn_record: TurnRecord) -> None:
        session_id = worker.session_id
        session = await self.db.get_session(session_id)
        env = await self.db.find_environment(session.environment_id)
        if env is None:
            raise McpSandboxesError(f"environment {session.environment_id} vanished")
        handle = RunningTurn(index=turn_record.idx)
        worker.current = handle
        await self.db.start_turn(session_id, turn_record.idx)
        await self._set_status(session_id, "running")
        await self._emit(
            session_id,
            [UserMessage(content=[TextBlock(text=turn_record.prompt)]), SessionStatusRunning()],
            status_changed=True,
        )
        turn = Turn(
            session_id=session_id,
            index=turn_record.idx,
            prompt=turn_record.prompt,
            resume_id=session.native_session_id,
            agent=session.agent,
            workdir=env.spec.workdir,
            home=self._home_of(worker.sandbox),
        )

        async def emit(events: Sequence[Event]) -> None:
            await self._emit(session_id, events)

        async def save_native_id(native_id: str) -> None:
            # At once, not at the turn's end: a server killed mid-turn must still resume it.
            await self.db.update_session(session_id, native_session_id=native_id)

        provider_name = env.provider
        sandbox_id = worker.sandbox.id

        async def sandbox_exists() -> bool:
            return await self._sandbox_exists(provider_name, sandbox_id, settle_s=REMOVAL_SETTLE_S)

        if worker.oom is None:
            worker.oom = OomWatch(memory_mb=env.spec.limits.memory_mb)
        result: TurnResult
        try:
            result = await run_turn(
                sandbox=worker.sandbox,
                backend=worker.backend,
                turn=turn,
                handle=handle,
                emit=emit,
                user=env.spec.user or self._user_of(worker.sandbox),
                timeout_s=self.turn_timeout_s,
                on_native_id=save_native_id,
                sandbox_exists=sandbox_exists,
                oom=worker.oom,
            )
        except McpSandboxesError as exc:
            result = TurnResult(stop_reason="error", error=str(exc))
            await emit([SessionError(error=ErrorInfo(type="sandbox_error", message=str(exc)))])
        finally:
            handle.done.set()
            worker.current = None
        if handle.removed is not None:
            worker.removed = handle.removed
        with anyio.CancelScope(shield=True):
            await self._record_outcome(worker, session, turn_record.idx, result)

    async def _record_outcome(
        self, worker: SessionWorker, session: SessionRecord, idx: int, result: TurnResult
    ) -> None:
        status = {"interrupted": "interrupted", "error": "failed"}.get(result.stop_reason, "done")
        await self.db.finish_turn(
            session.id,
            idx,
            status=status,  # type: ignore[arg-type]
            stop_reason=result.stop_reason,
            final_text=result.final_text,
            error=result.error,
            usage=result.usage,
            denials=result.denials,
        )
        fields: dict[str, object] = {
            "stop_reason": result.stop_reason,
            "usage": session.usage + result.usage,
            "last_error": result.error,
        }
        if result.native_session_id:
            fields["native_session_id"] = result.native_session_id
        if worker.removed is not None:
            # The session fails next (the worker's loop); it does not pass through idle.
            del fields["stop_reason"], fields["last_error"]
            await self.db.update_session(session.id, **fields)
            done = worker.turn_done.pop(idx, None)
            if done is not None:
                done.set()
            return
        await self._set_status(session.id, "idle", **fields)
        await self._emit(
            session.id, [SessionStatusIdle(stop_reason=StopReason(type=result.stop_reason))], status_changed=True
        )
        done = worker.turn_done.pop(idx, None)
        if done is not None:
            done.set()

    # -- reads ---------------------------------------------------------------------------------

    async def get_session(self, session_id: str) -> SessionView:
        session = await self.db.get_session(session_id)
        turns = await self.db.list_turns(session_id)
        env = await self.db.find_environment(session.environment_id)
        finished = [t for t in turns if t.status not in ("queued", "running")]
        last = finished[-1] if finished else None
        return SessionView(
            session_id=session.id,
            environment_id=session.environment_id,
            environment_name=env.name if env else None,
            parent_session_id=session.parent_session_id,
            backend=session.backend,
            model=session.agent.model,
            status=session.status,
            stop_reason=session.stop_reason,
            last_error=session.last_error,
            sandbox_id=session.sandbox_id,
            agent_session_id=session.native_session_id,
            turns=len(turns),
            queued_turns=sum(1 for t in turns if t.status == "queued"),
            usage=session.usage,
            last_event_seq=await self.db.last_seq(session_id),
            created_at=session.created_at,
            updated_at=session.updated_at,
            last_turn=turn_view(last) if last else None,
            pending_permissions=[
                PermissionView(request_id=r.request_id, tool_name=r.tool_name, tool_input=r.tool_input)
                for r in self.permissions.pending(session.id)
                if r.result is None
            ],
            transcript_uri=TRANSCRIPT_URI.format(session_id=session.id),
        )

    async def list_sessions(self, statuses: Sequence[SessionStatus] | None = None) -> list[SessionView]:
        return [await self.get_session(s.id) for s in await self.db.list_sessions(statuses)]

    async def read_events(
        self,
        session_id: str,
        *,
        after: int = 0,
        limit: int = 100,
        wait_s: float = 0.0,
        types: Sequence[str] | None = None,
    ) -> EventsPage:
        await self.db.get_session(session_id)  # NotFoundError for unknown ids
        deadline = anyio.current_time() + min(wait_s, self.settings.server.max_wait_s)
        timed_out = False
        while True:
            records = await self.db.read_events(session_id, after=after, limit=limit, types=types)
            remaining = deadline - anyio.current_time()
            if records or remaining <= 0:
                timed_out = not records and wait_s > 0
                break
            await self.bus.wait(session_id, remaining)
        session = await self.db.get_session(session_id)
        return EventsPage(
            session_id=session_id,
            events=[EventView(seq=r.seq, type=r.type, created_at=r.created_at, data=r.data) for r in records],
            next_cursor=records[-1].seq if records else after,
            session_status=session.status,
            timed_out=timed_out,
        )

    def _home_of(self, sandbox: Sandbox) -> str:
        """The agent's HOME: the sandbox's own where it has one on the host (process), else the
        configured one inside the sandbox."""
        return str(getattr(sandbox, "host_home", None) or self.settings.server.sandbox_home)

    def _user_of(self, sandbox: Sandbox) -> str | None:
        return None if getattr(sandbox, "host_home", None) else self.settings.server.sandbox_user

    def backend_names(self) -> list[str]:
        return backend_names()

    def secret_values(self) -> list[str]:
        """Values no caller may see: the credentials handed to agent CLIs and the operator token."""
        names = {name for settings in self.settings.backends.values() for name in settings.pass_env}
        values = [self._environ[name] for name in names if self._environ.get(name)]
        return [*values, *self.extra_secrets]


KILL_TIMEOUT_S = 10.0
# Bounds of recovery's kill of a cut-off turn's processes and of one sandbox liveness check.
LEFTOVER_KILL_TIMEOUT_S = 60.0
LIVENESS_CHECK_TIMEOUT_S = 30.0
# After a turn's command was killed: how long a sandbox that still looks alive is watched for a
# removal under way, and how often it is asked.
REMOVAL_SETTLE_S = 3.0
REMOVAL_POLL_S = 0.25
# Killed processes named in a cut-off turn's error.
LEFTOVERS_SHOWN = 10


def settled_or_asking(view: SessionView) -> bool:
    """No turn running or queued, or waiting for someone to answer a permission prompt."""
    idle = view.status not in ("starting", "running") and not view.queued_turns
    return idle or bool(view.pending_permissions)


def turn_view(turn: TurnRecord) -> TurnView:
    return TurnView(
        index=turn.idx,
        status=turn.status,
        stop_reason=turn.stop_reason,
        final_message=turn.final_text,
        error=turn.error,
        usage=turn.usage,
        denied_tools=turn.denials,
    )


__all__ = ["NotFoundError", "Orchestrator"]
