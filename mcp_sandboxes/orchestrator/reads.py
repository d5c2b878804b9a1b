"""Reading sessions: their views, event pages, long-polls and waits over several sessions,
and the transcript and event-log documents the MCP resources serve."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import anyio

from mcp_sandboxes.orchestrator.budgets import TreeBudgets
from mcp_sandboxes.orchestrator.bus import EventBus
from mcp_sandboxes.orchestrator.permissions import PermissionBroker
from mcp_sandboxes.orchestrator.transcript import render_transcript
from mcp_sandboxes.orchestrator.views import EventsPage, EventView, PermissionView, SessionView, SubtreeView, TurnView
from mcp_sandboxes.store import Database, SessionRecord
from mcp_sandboxes.store.records import LIVE_STATUSES, SessionStatus, TurnRecord

# A waiting call reports progress at least this often.
PROGRESS_INTERVAL_S = 5.0
# (done, total, message): how a long call tells its client it is alive.
Progress = Callable[[float, float | None, str | None], Awaitable[None]]
TRANSCRIPT_URI = "sandboxes://sessions/{session_id}/transcript"
# The most events a transcript or event-log document holds.
MAX_EVENTS_IN_DOCUMENT = 10_000


class SessionReads:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        permissions: PermissionBroker,
        max_wait_s: float,
        budgets: TreeBudgets | None = None,
    ) -> None:
        self._budgets = budgets
        self._db = db
        self._bus = bus
        self._permissions = permissions
        self._max_wait_s = max_wait_s

    async def get_session(self, session_id: str) -> SessionView:
        session = await self._db.get_session(session_id)
        turns = await self._db.list_turns(session_id)
        env = await self._db.find_environment(session.environment_id)
        finished = [t for t in turns if t.status not in ("queued", "running")]
        last = finished[-1] if finished else None
        subtree: SubtreeView | None = None
        if self._budgets is not None:
            below = await self._budgets.usage_below(session_id)
            if len(below.sessions) > 1:
                subtree = SubtreeView(
                    sessions=len(below.sessions), live_sessions=below.live, turns=below.turns, usage=below.usage
                )
        return SessionView(
            subtree=subtree,
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
            workspace_branch=session.workspace_branch,
            workspace_base=session.workspace_base,
            turns=len(turns),
            queued_turns=sum(1 for t in turns if t.status == "queued"),
            usage=session.usage,
            last_event_seq=await self._db.last_seq(session_id),
            created_at=session.created_at,
            updated_at=session.updated_at,
            last_turn=turn_view(last) if last else None,
            pending_permissions=[
                PermissionView(request_id=r.request_id, tool_name=r.tool_name, tool_input=r.tool_input)
                for r in self._permissions.pending(session.id)
                if r.result is None
            ],
            transcript_uri=TRANSCRIPT_URI.format(session_id=session.id),
        )

    async def list_sessions(self, statuses: Sequence[SessionStatus] | None = None) -> list[SessionView]:
        return [await self.get_session(s.id) for s in await self._db.list_sessions(statuses)]

    async def read_events(
        self,
        session_id: str,
        *,
        after: int = 0,
        limit: int = 100,
        wait_s: float = 0.0,
        types: Sequence[str] | None = None,
    ) -> EventsPage:
        await self._db.get_session(session_id)  # NotFoundError for unknown ids
        deadline = anyio.current_time() + min(wait_s, self._max_wait_s)
        timed_out = False
        while True:
            records = await self._db.read_events(session_id, after=after, limit=limit, types=types)
            remaining = deadline - anyio.current_time()
            if records or remaining <= 0:
                timed_out = not records and wait_s > 0
                break
            await self._bus.wait(session_id, remaining)
        session = await self._db.get_session(session_id)
        return EventsPage(
            session_id=session_id,
            events=[EventView(seq=r.seq, type=r.type, created_at=r.created_at, data=r.data) for r in records],
            next_cursor=records[-1].seq if records else after,
            session_status=session.status,
            timed_out=timed_out,
        )

    async def wait_for_turn(self, session_id: str, index: int, max_wait_s: float) -> TurnRecord | None:
        """Wait until turn `index` has ended; None when the wait timed out first."""
        deadline = anyio.current_time() + min(max_wait_s, self._max_wait_s)
        while True:
            turn = await self._db.get_turn(session_id, index)
            if turn.status not in ("queued", "running"):
                return turn
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            await self._bus.wait(session_id, remaining)

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
        deadline = anyio.current_time() + min(max_wait_s, self._max_wait_s)
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
            if not await self._bus.wait_any(ids, min(remaining, PROGRESS_INTERVAL_S)):
                reported = -1  # nothing changed for a while: say so again, so the client sees life

    async def live_sessions(self) -> list[SessionRecord]:
        return await self._db.list_sessions(LIVE_STATUSES)

    async def transcript(self, session_id: str) -> str:
        """The session as markdown (NotFoundError for an unknown id)."""
        session = await self._db.get_session(session_id)
        events = await self._db.read_events(session_id, limit=MAX_EVENTS_IN_DOCUMENT)
        return render_transcript(session, events)

    async def events_document(self, session_id: str) -> str:
        """The session's event log as a JSON array (NotFoundError for an unknown id)."""
        await self._db.get_session(session_id)
        records = await self._db.read_events(session_id, limit=MAX_EVENTS_IN_DOCUMENT)
        return json.dumps([record.model_dump() for record in records], ensure_ascii=False)


def settled(view: SessionView) -> bool:
    """No turn running or queued."""
    return view.status not in ("starting", "running") and not view.queued_turns


def settled_or_asking(view: SessionView) -> bool:
    """Settled, or waiting for someone to answer a permission prompt."""
    return settled(view) or bool(view.pending_permissions)


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
