"""Joins providers, backends and the store: environments, sessions, turns, the event bus.

The public surface is `__all__` (tests/test_public_surface.py keeps other rooms to it)."""

from mcp_sandboxes.backends import describe_backends
from mcp_sandboxes.orchestrator.core import PROGRESS_INTERVAL_S, Orchestrator, settled, turn_view
from mcp_sandboxes.orchestrator.egress import EGRESS_PROVIDERS
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.orchestrator.permissions import Decision, PermissionRequest
from mcp_sandboxes.orchestrator.providers import provider_names
from mcp_sandboxes.orchestrator.subagents import OPERATOR, Caller, Lineage
from mcp_sandboxes.orchestrator.transcript import render_transcript
from mcp_sandboxes.orchestrator.views import EnvironmentView, EventsPage, SessionView, WorkspaceView
from mcp_sandboxes.store.records import Packages, SessionStatus, WorkspaceSpec

__all__ = [
    "EGRESS_PROVIDERS",
    "OPERATOR",
    "PROGRESS_INTERVAL_S",
    "Caller",
    "Decision",
    "EnvironmentRequest",
    "EnvironmentView",
    "EventsPage",
    "Lineage",
    "Orchestrator",
    "Packages",
    "PermissionRequest",
    "SessionStatus",
    "SessionView",
    "WorkspaceSpec",
    "WorkspaceView",
    "describe_backends",
    "provider_names",
    "render_transcript",
    "settled",
    "turn_view",
]
