"""Sandbox providers: where a sandbox runs. Each module speaks to one engine.

The public surface is `__all__` (tests/test_public_surface.py keeps other rooms to it)."""

from mcp_sandboxes.providers.base import (
    RECIPE_LABEL,
    Availability,
    ExecStream,
    ImageCommitter,
    LineSplitter,
    ListsByLabel,
    Mount,
    NetworkMode,
    Provider,
    ResourceLimits,
    Sandbox,
    SandboxSpec,
    TailBuffer,
)
from mcp_sandboxes.providers.registry import build_provider, provider_names

__all__ = [
    "RECIPE_LABEL",
    "Availability",
    "ExecStream",
    "ImageCommitter",
    "LineSplitter",
    "ListsByLabel",
    "Mount",
    "NetworkMode",
    "Provider",
    "ResourceLimits",
    "Sandbox",
    "SandboxSpec",
    "TailBuffer",
    "build_provider",
    "provider_names",
]
