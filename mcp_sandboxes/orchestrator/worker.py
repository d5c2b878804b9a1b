"""The worker of each live session: takes its queued turns one at a time and runs them in
the session's sandbox, records each outcome, and notices a sandbox removed behind our back."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from mcp_sandboxes.backends.base import Backend, Turn, TurnResult
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import McpSandboxesError, NotFoundError, SandboxGoneError
from mcp_sandboxes.events import (
    ErrorInfo,
    Event,
    SessionError,
    SessionStatusIdle,
    SessionStatusRunning,
    StopReason,
    TextBlock,
    UserMessage,
)
from mcp_sandboxes.orchestrator.journal import EventJournal
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.orchestrator.runner import OomWatch, RunningTurn, kill_marked, removed_reason, run_turn
from mcp_sandboxes.providers.base import Sandbox
from mcp_sandboxes.redaction import redact, redact_known
from mcp_sandboxes.store import Database, SessionRecord
from mcp_sandboxes.store.records import TurnRecord

logger = logging.getLogger(__name__)

# Bounds of recovery's kill of a cut-off turn's processes and of one sandbox liveness check.
LEFTOVER_KILL_TIMEOUT_S = 60.0
LIVENESS_CHECK_TIMEOUT_S = 30.0
# After a turn's command was killed: how long a sandbox that still looks alive is watched for a
# removal under way, and how often it is asked.
REMOVAL_SETTLE_S = 3.0
REMOVAL_POLL_S = 0.25
# Killed processes named in a cut-off turn's error.
LEFTOVERS_SHOWN = 10


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


class WorkerPool:
    """One worker task per live session, in the task group the orchestrator runs."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        journal: EventJournal,
        providers: ProviderPool,
        *,
        turn_timeout_s: float,
        secret_values: Callable[[], list[str]],
    ) -> None:
        self._settings = settings
        self._db = db
        self._journal = journal
        self._providers = providers
        self.turn_timeout_s = turn_timeout_s
        self._secret_values = secret_values
        self._workers: dict[str, SessionWorker] = {}
        self._task_group: TaskGroup | None = None

    def attach_to(self, task_group: TaskGroup | None) -> None:
        """Workers run in `task_group` (None: the orchestrator stopped)."""
        self._task_group = task_group

    def get(self, session_id: str) -> SessionWorker | None:
        return self._workers.get(session_id)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._workers

    def __iter__(self) -> Iterator[SessionWorker]:
        return iter(list(self._workers.values()))

    def spawn(self, worker: SessionWorker) -> None:
        if self._task_group is None:
            raise McpSandboxesError("the orchestrator is not running")
        self._workers[worker.session_id] = worker
        self._task_group.start_soon(self._work, worker, name=f"session-{worker.session_id}")

    async def sandbox_exists(self, provider_name: str, sandbox_id: str, *, settle_s: float = 0.0) -> bool:
        """False only when the provider says the sandbox is gone; an engine that does not answer
        (down, slow) is no proof, so then True. `settle_s`: keep asking that long while it seems
        to exist, for a removal under way (`docker rm -f` kills the processes first, and for a
        moment the container still looks alive, or refuses to start because it is being removed)."""
        deadline = anyio.current_time() + settle_s
        while True:
            try:
                with anyio.fail_after(LIVENESS_CHECK_TIMEOUT_S):
                    provider = await self._providers.get(provider_name)
                    if await provider.attach(sandbox_id) is None:
                        return False
            except SandboxGoneError:
                return False
            except (McpSandboxesError, TimeoutError) as exc:
                logger.warning("cannot tell whether sandbox %s still exists: %s", sandbox_id, exc)
            if anyio.current_time() >= deadline:
                return True
            await anyio.sleep(REMOVAL_POLL_S)

    async def check_sandbox(self, worker: SessionWorker) -> bool:
        """Whether the worker's sandbox still exists; when it does not, the worker is told (it
        fails the session and ends) and this returns False."""
        if worker.removed is not None:
            return False
        session = await self._db.get_session(worker.session_id)
        env = await self._db.find_environment(session.environment_id)
        if env is None or await self.sandbox_exists(env.provider, worker.sandbox.id):
            return True
        if worker.removed is None:
            worker.removed = removed_reason(worker.sandbox.id)
        worker.wake.set()
        return False

    async def watch_sandboxes(self) -> None:
        """Fail live sessions whose sandbox vanished while idle (a running turn finds out itself)."""
        interval = self._settings.server.liveness_interval_s
        while True:
            await anyio.sleep(interval)
            for worker in self:
                if worker.stopping or worker.current is not None or worker.removed is not None:
                    continue
                try:
                    await self.check_sandbox(worker)
                except NotFoundError:
                    continue  # the session was deleted meanwhile
                except Exception:  # a check that breaks must not take the server down with it
                    logger.exception("checking the sandbox of session %s failed", worker.session_id)

    async def end_leftovers(self, sandbox: Sandbox, session_id: str, turns: list[int], *, user: str | None) -> str:
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
        shown = redact("; ".join(killed[:LEFTOVERS_SHOWN]), self._secret_values())
        more = f" and {len(killed) - LEFTOVERS_SHOWN} more" if len(killed) > LEFTOVERS_SHOWN else ""
        return f"; killed {len(killed)} process(es) it left running: {shown}{more}"

    async def _end_removed(self, worker: SessionWorker, reason: str) -> None:
        """The sandbox is gone: queued turns fail, the session fails with the true cause."""
        await self._journal.fail_queued(worker.session_id, reason)
        await self._journal.fail(worker.session_id, reason)

    def home_of(self, sandbox: Sandbox) -> str:
        """The agent's HOME: the sandbox's own where it has one on the host (process), else the
        configured one inside the sandbox."""
        return str(getattr(sandbox, "host_home", None) or self._settings.server.sandbox_home)

    def user_of(self, sandbox: Sandbox) -> str | None:
        return None if getattr(sandbox, "host_home", None) else self._settings.server.sandbox_user

    async def _work(self, worker: SessionWorker) -> None:
        try:
            with worker.scope:
                while True:
                    if worker.removed is not None:
                        await self._end_removed(worker, worker.removed)
                        return
                    queued = await self._db.list_turns(worker.session_id, "queued")
                    if not queued:
                        worker.wake = anyio.Event()
                        # Re-check after arming the event, so a message enqueued in between is not missed.
                        if not await self._db.list_turns(worker.session_id, "queued"):
                            await worker.wake.wait()
                        continue
                    await self._run_one(worker, queued[0])
        except Exception as exc:  # a bug here must fail this session, not the whole server
            logger.exception("session %s worker crashed", worker.session_id)
            with anyio.CancelScope(shield=True):
                await self._journal.fail(worker.session_id, f"internal error: {exc}")
        finally:
            self._workers.pop(worker.session_id, None)
            worker.exited.set()

    async def _run_one(self, worker: SessionWorker, turn_record: TurnRecord) -> None:
        session_id = worker.session_id
        session = await self._db.get_session(session_id)
        env = await self._db.find_environment(session.environment_id)
        if env is None:
            raise McpSandboxesError(f"environment {session.environment_id} vanished")
        handle = RunningTurn(index=turn_record.idx)
        worker.current = handle
        await self._db.start_turn(session_id, turn_record.idx)
        await self._journal.set_status(session_id, "running")
        await self._journal.emit(
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
            home=self.home_of(worker.sandbox),
        )

        async def emit(events: Sequence[Event]) -> None:
            await self._journal.emit(session_id, events)

        async def save_native_id(native_id: str) -> None:
            # At once, not at the turn's end: a server killed mid-turn must still resume it.
            await self._db.update_session(session_id, native_session_id=native_id)

        provider_name = env.provider
        sandbox_id = worker.sandbox.id

        async def sandbox_exists() -> bool:
            return await self.sandbox_exists(provider_name, sandbox_id, settle_s=REMOVAL_SETTLE_S)

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
                user=env.spec.user or self.user_of(worker.sandbox),
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
        # What a turn keeps (its final text, error, refused calls) is shown like its events: no
        # credential the CLI was handed, even when the agent printed it.
        secrets = self._secret_values()
        result = result.model_copy(
            update={
                "final_text": None if result.final_text is None else redact_known(result.final_text, secrets),
                "error": None if result.error is None else redact_known(result.error, secrets),
                "denials": [redact_known(denial, secrets) for denial in result.denials],
            }
        )
        await self._db.finish_turn(
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
            await self._db.update_session(session.id, **fields)
            done = worker.turn_done.pop(idx, None)
            if done is not None:
                done.set()
            return
        await self._journal.set_status(session.id, "idle", **fields)
        await self._journal.emit(
            session.id, [SessionStatusIdle(stop_reason=StopReason(type=result.stop_reason))], status_changed=True
        )
        done = worker.turn_done.pop(idx, None)
        if done is not None:
            done.set()
