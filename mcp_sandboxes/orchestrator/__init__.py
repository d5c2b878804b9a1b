"""Joins providers, backends and the store: environments, sessions, turns, the event bus."""

from mcp_sandboxes.orchestrator.core import Orchestrator

__all__ = ["Orchestrator"]
