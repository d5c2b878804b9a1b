"""SQLite persistence: environments, sessions, turns and the per-session event log."""

from mcp_sandboxes.store.database import Database
from mcp_sandboxes.store.records import EnvironmentRecord, EventRecord, SessionRecord, TurnRecord

__all__ = ["Database", "EnvironmentRecord", "EventRecord", "SessionRecord", "TurnRecord"]
