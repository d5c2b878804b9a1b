"""Agent backends: which CLI runs in the sandbox and how its output is read.

The public surface is `__all__` (tests/test_public_surface.py keeps other rooms to it)."""

from mcp_sandboxes.backends.base import AgentSpec, Backend, Command, Translator, Turn, TurnResult
from mcp_sandboxes.backends.registry import backend_names, build_backend, describe_backends, model_urls

__all__ = [
    "AgentSpec",
    "Backend",
    "Command",
    "Translator",
    "Turn",
    "TurnResult",
    "backend_names",
    "build_backend",
    "describe_backends",
    "model_urls",
]
