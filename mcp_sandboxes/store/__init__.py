"""SQLite persistence: environments, sessions, turns and the per-session event log.

The public surface is `__all__` (tests/test_public_surface.py keeps other rooms to it)."""

from mcp_sandboxes.store.database import Database, make_private_dir, utc_now
from mcp_sandboxes.store.records import (
    LIVE_STATUSES,
    EnvironmentRecord,
    EventRecord,
    SessionRecord,
    SessionStatus,
    TurnRecord,
)

__all__ = [
    "LIVE_STATUSES",
    "Database",
    "EnvironmentRecord",
    "EventRecord",
    "SessionRecord",
    "SessionStatus",
    "TurnRecord",
    "make_private_dir",
    "utc_now",
]
