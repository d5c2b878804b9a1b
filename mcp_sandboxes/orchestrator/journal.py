"""The event journal: every event is stored, then published (so a woken reader finds it), and
session status changes are written beside their events."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from mcp_sandboxes.events import ErrorInfo, Event, SessionError, SessionStatusTerminated, parse_event
from mcp_sandboxes.orchestrator.bus import EventBus, SessionChanged
from mcp_sandboxes.redaction import MIN_SECRET_LENGTH, redact_known
from mcp_sandboxes.store import Database
from mcp_sandboxes.store.records import SessionStatus


class EventJournal:
    def __init__(self, db: Database, bus: EventBus, credentials: Callable[[], list[str]] | None = None) -> None:
        self.db = db
        self.bus = bus
        # Credential values no event may carry (an agent printing its key, a CLI echoing its
        # config): replaced by a marker before the event is stored, so transcripts never see them.
        self._credentials = credentials

    async def emit(self, session_id: str, events: Sequence[Event], *, status_changed: bool = False) -> None:
        if not events:
            return
        if self._credentials is not None:
            events = redact_events(events, self._credentials())
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


def redact_events(events: Sequence[Event], secrets: list[str]) -> Sequence[Event]:
    """`events` with every string holding one of `secrets` redacted (events without one are
    returned as they are)."""
    secrets = [secret for secret in secrets if len(secret) >= MIN_SECRET_LENGTH]
    if not secrets:
        return events
    out: list[Event] = []
    for event in events:
        data = event.model_dump(mode="json")
        if any(secret in json.dumps(data, ensure_ascii=False) for secret in secrets):
            event = parse_event(_redact_strings(data, secrets))
        out.append(event)
    return out


def _redact_strings(node: Any, secrets: list[str]) -> Any:
    if isinstance(node, str):
        return redact_known(node, secrets)
    if isinstance(node, dict):
        return {key: _redact_strings(value, secrets) for key, value in node.items()}
    if isinstance(node, list):
        return [_redact_strings(item, secrets) for item in node]
    return node
