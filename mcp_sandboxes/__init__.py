"""mcp-sandboxes: an MCP server that runs coding agents as sub-agents, each in its own sandbox."""

from mcp_sandboxes.errors import (
    BackendError,
    ConflictError,
    InvalidInputError,
    McpSandboxesError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConflictError",
    "InvalidInputError",
    "McpSandboxesError",
    "NotFoundError",
    "ProviderError",
    "ProviderUnavailableError",
    "__version__",
]
