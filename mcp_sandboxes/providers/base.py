"""The contracts every sandbox provider implements.

A Provider creates and destroys sandboxes; a Sandbox runs commands and moves files.
Providers know their engine and nothing about agents.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

from pydantic import BaseModel

# The specs live on the ground floor (mcp_sandboxes.specs); re-exported for the providers.
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.specs import Mount as Mount
from mcp_sandboxes.specs import NetworkMode as NetworkMode
from mcp_sandboxes.specs import ResourceLimits as ResourceLimits
from mcp_sandboxes.specs import SandboxSpec as SandboxSpec

# Every sandbox we create carries this label (or the engine's equivalent), so
# `list_owned` finds orphans after a crash and never touches anything else.
OWNER_LABEL = "io.mcp-sandboxes.managed"
SANDBOX_NAME_LABEL = "io.mcp-sandboxes.name"
# On a prepared image: the hash of the recipe it was made from (its tag says the same).
RECIPE_LABEL = "io.mcp-sandboxes.recipe"

DEFAULT_EXEC_TIMEOUT_S = 300.0
DEFAULT_FILE_TIMEOUT_S = 60.0
DEFAULT_CREATE_TIMEOUT_S = 120.0


class Availability(BaseModel):
    provider: str
    available: bool
    reason: str | None = None
    fix: str | None = None


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: Literal["stdout", "stderr"]
    data: bytes


@runtime_checkable
class ExecStream(Protocol):
    """A running process. Iterate it for output chunks, in the order they arrived."""

    def __aiter__(self) -> AsyncIterator[OutputChunk]: ...

    async def send_stdin(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        """Send a signal to the process (and its children where the engine allows)."""
        ...

    async def wait(self) -> int:
        """Wait for the process to end and return its exit code (128+N when killed by signal N)."""
        ...


@runtime_checkable
class Sandbox(Protocol):
    id: str
    provider: str

    async def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT_S,  # noqa: ASYNC109 - a per-command limit the engine enforces
    ) -> ExecResult: ...

    def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AbstractAsyncContextManager[ExecStream]:
        """Start a process; leaving the context kills it if it is still running."""
        ...

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None: ...

    async def get_file(self, path: str) -> bytes: ...


@runtime_checkable
class Provider(Protocol):
    name: str

    async def check(self) -> Availability: ...

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create and start a sandbox. On failure nothing is left behind."""
        ...

    async def attach(self, sandbox_id: str) -> Sandbox | None:
        """Reconnect to a sandbox after a restart; None when it no longer exists."""
        ...

    async def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox. Destroying one that is already gone is not an error."""
        ...

    async def list_owned(self) -> list[str]: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@runtime_checkable
class ImageCommitter(Protocol):
    """A provider that can save a sandbox as an image (docker, podman): environments with packages
    or setup commands are then prepared once and every spawn starts from the result. Providers
    without it run setup commands in each new sandbox instead."""

    async def image_id(self, image: str) -> str | None:
        """The engine's id (digest) of an image, None when it has no such image."""
        ...

    async def commit(self, sandbox_id: str, tag: str, labels: dict[str, str]) -> str:
        """Save the sandbox's filesystem as image `tag`, with `labels` (and the owner label); the
        image keeps its base image's user. Returns the new image's id."""
        ...

    async def remove_image(self, image: str) -> bool:
        """Remove an image this server made; False when a container still uses it (it stays)."""
        ...


@runtime_checkable
class ListsByLabel(Protocol):
    """A provider that can find its sandboxes by label (docker, podman, containerd, bubblewrap,
    process): the orchestrator then reaps what its own instance left behind, and finds its warm
    pools again after a restart. Providers without it are never swept."""

    async def list_labelled(self, labels: Mapping[str, str]) -> list[str]:
        """Ids of the owned sandboxes that carry every one of `labels` with exactly that value."""
        ...


class ProviderLifecycle:
    """`async with provider:` closes it on the way out (every provider inherits this)."""

    async def aclose(self) -> None:
        """Release what the provider holds (clients, connections); nothing by default."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class LineSplitter:
    """Splits a byte stream into complete lines; keeps the unfinished tail for the next chunk."""

    def __init__(self, max_line_bytes: int = 16 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._max = max_line_bytes

    def feed(self, data: bytes) -> list[str]:
        self._buffer.extend(data)
        lines: list[str] = []
        while True:
            index = self._buffer.find(b"\n")
            if index < 0:
                break
            raw = bytes(self._buffer[:index])
            del self._buffer[: index + 1]
            lines.append(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if len(self._buffer) > self._max:
            # A runaway line without a newline: hand it over rather than grow forever.
            lines.append(self._buffer.decode("utf-8", errors="replace"))
            self._buffer.clear()
        return lines

    def flush(self) -> list[str]:
        if not self._buffer:
            return []
        tail = self._buffer.decode("utf-8", errors="replace").rstrip("\r")
        self._buffer.clear()
        return [tail]


class TailBuffer:
    """Keeps the last `limit` bytes written to it (for a failed turn's stderr)."""

    def __init__(self, limit: int = 8192) -> None:
        self._data = bytearray()
        self._limit = limit

    def write(self, data: bytes) -> None:
        self._data.extend(data)
        if len(self._data) > self._limit:
            del self._data[: len(self._data) - self._limit]

    def text(self) -> str:
        return self._data.decode("utf-8", errors="replace")


def check_exec_args(argv: list[str], env: dict[str, str] | None, cwd: str | None, user: str | None) -> None:
    """What every sandbox refuses before it runs anything: no program, NUL bytes, a variable name
    with '=' or NUL, a relative working directory, a user name with spaces."""
    if not argv or not argv[0]:
        raise InvalidInputError("argv", "is empty; give the program and its arguments")
    if any("\x00" in arg for arg in argv):
        raise InvalidInputError("argv", "arguments cannot contain NUL bytes")
    for key, value in (env or {}).items():
        if not key or "=" in key or "\x00" in key or "\x00" in value:
            raise InvalidInputError(f"env.{key}", "names must be non-empty without '=' or NUL; values without NUL")
    if cwd is not None and (not cwd.startswith("/") or "\x00" in cwd):
        raise InvalidInputError("cwd", f"{cwd!r} must be an absolute path inside the sandbox, e.g. /workspace")
    # "" means the sandbox's default user, as None does.
    if user and (not user.strip() or any(c.isspace() or c == "\x00" for c in user)):
        raise InvalidInputError("user", f"{user!r} is not a user; give a name or uid")
