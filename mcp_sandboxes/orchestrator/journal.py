"""The event journal: every event is stored, then published (so a woken reader finds it), and
session status changes are written beside their events."""

from __future__ import annotations

from collections.abc import Sequence

from mcp_sandboxes.events import ErrorInfo, Event, SessionError, SessionStatusTerminated
from mcp_sandboxes.orchestrator.bus import EventBus, SessionChanged
from mcp_sandboxes.store import Database
from mcp_sandboxes.store.records import SessionStatus


class EventJournal:
    def __init__(self, db: Database, bus: EventBus) -> None:
        self.db = db
        self.bus = bus

    async def emit(self, session_id: str, events: Sequence[Event], *, status_changed: bool = False) -> None:
        if not events:
            return
        records = await self.db.append_events(session_id, events)
        self.bus.publish(SessionChanged(session_id, records[-1].seq, status_changed))

    async def set_status(self, session_id: str, status: SessionStatus, **fields: object) -> None:
        await self.db.update_session(session_id, status=status, **fields)

    async def fail(self, session_id: str, reason: str) -> None:
        await self.set_status(session_id, "failed", last_error=reason, stop_reason="error")
        await self.emit(
            session_id,
            [
                SessionError(error=ErrorInfo(type="session_failed", message=reason)),
                SessionStatusTerminated(reason=reason),
            ],
            status_changed=True,
        )

    async def fail_queued(self, session_id: str, error: str) -> None:
        """Turns still waiting in the queue end as failed with `error` (the session ends)."""
        for turn in await self.db.list_turns(session_id, "queued"):
            await self.db.finish_turn(
                session_id, turn.idx, status="failed", stop_reason=None, final_text=None, error=error, usage=None
            )
