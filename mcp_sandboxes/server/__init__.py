"""The MCP surface: tools, resources and transports. Knows MCP, nothing about engines.

The public surface is `__all__` (tests/test_public_surface.py keeps other rooms to it)."""

from mcp_sandboxes.server.app import build_server, serve
from mcp_sandboxes.server.auth import load_or_create_operator_token

__all__ = ["build_server", "load_or_create_operator_token", "serve"]
