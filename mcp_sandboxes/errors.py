"""One exception hierarchy for the whole package.

    McpSandboxesError
    ├── InvalidInputError        a caller-supplied value is wrong (names the field and the fix)
    ├── NotFoundError            an id that does not exist
    ├── ConflictError            the request is valid but the current state forbids it
    ├── ProviderError            a sandbox engine failed
    │   ├── ProviderUnavailableError   the engine cannot be reached or is not installed
    │   ├── ImageNotFoundError         the image does not exist locally
    │   └── SandboxGoneError           the sandbox was removed behind our back
    └── BackendError             an agent CLI could not be prepared or run

Errors of the layers below (aiodocker, httpx, aiosqlite) are translated where they enter.
The MCP layer turns every McpSandboxesError into a ToolError carrying its message.
"""

from __future__ import annotations


class McpSandboxesError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidInputError(McpSandboxesError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class NotFoundError(McpSandboxesError):
    pass


class ConflictError(McpSandboxesError):
    pass


class ProviderError(McpSandboxesError):
    pass


class ProviderUnavailableError(ProviderError):
    pass


class ImageNotFoundError(ProviderError):
    pass


class SandboxGoneError(ProviderError):
    pass


class BackendError(McpSandboxesError):
    pass
