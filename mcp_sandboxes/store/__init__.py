"""SQLite persistence: environments, sessions, turns and the per-session event log.

The public surface is `__all__` (tests/test_public_surface.py keeps other rooms to it)."""

from mcp_sandboxes.store.database import Database, utc_now
from mcp_sandboxes.store.records import (
    LIVE_STATUSES,
    WORKSPACE_ADAPTER,
    DirectoryWorkspace,
    EnvironmentRecord,
    EventRecord,
    GitWorkspace,
    Packages,
    PrepState,
    SessionRecord,
    SessionStatus,
    TurnRecord,
    WorkspaceSpec,
)

__all__ = [
    "LIVE_STATUSES",
    "WORKSPACE_ADAPTER",
    "Database",
    "DirectoryWorkspace",
    "EnvironmentRecord",
    "EventRecord",
    "GitWorkspace",
    "Packages",
    "PrepState",
    "SessionRecord",
    "SessionStatus",
    "TurnRecord",
    "WorkspaceSpec",
    "utc_now",
]
