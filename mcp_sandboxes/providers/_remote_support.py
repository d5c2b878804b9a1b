"""Pieces shared by the providers that drive a sandbox service we do not run ourselves
(E2B, Daytona, Modal, Apple `container`): secrets handling, error translation, shell
quoting for wrapper scripts, and an ExecStream fed by a background reader task.

Secrets (API keys, tokens) come from the provider settings or an environment variable,
never from tool arguments, and every message built here is scrubbed of them.
"""

from __future__ import annotations

import os
import shlex
import signal as _signal
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import anyio
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mcp_sandboxes.errors import ProviderError, ProviderUnavailableError
from mcp_sandboxes.providers.base import OutputChunk

# Control-plane calls (create, list, delete) and data-plane calls (files, signals).
CONTROL_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 15.0
# How long cleanup (kill, delete) may take when a caller leaves a stream or is cancelled.
CLEANUP_TIMEOUT_S = 15.0
# Output chunks buffered between the reader task and the consumer; the reader waits when full.
STREAM_BUFFER_CHUNKS = 64
# Where wrapper scripts keep per-process state (pid, stdin FIFO) inside a sandbox.
STATE_DIR = "/tmp/.mcp-sandboxes"

ROOT_USERS = frozenset({"0", "root"})


def setting_or_env(settings: Mapping[str, Any], key: str, env_var: str) -> str | None:
    """A secret or option from the provider settings first, then the environment."""
    value = settings.get(key)
    if isinstance(value, str) and value:
        return value
    env_value = os.environ.get(env_var, "")
    return env_value or None


def redact(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def http_timeout(read: float | None = CONTROL_TIMEOUT_S) -> httpx.Timeout:
    return httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=read, write=CONTROL_TIMEOUT_S, pool=CONNECT_TIMEOUT_S)


def vendor_message(response: httpx.Response) -> str:
    """The human part of a vendor error body (`message`, `error`, `detail`), or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return str(value["message"])
    return str(body)[:500]


def status_error(
    provider: str, action: str, response: httpx.Response, secrets: Iterable[str | None], *, key_hint: str
) -> ProviderError:
    """Translate a failed vendor response into our error, naming what to fix."""
    message = redact(vendor_message(response), secrets)
    status = response.status_code
    if status in (401, 403):
        return ProviderUnavailableError(f"{provider}: {action} was refused ({status} {message}); check {key_hint}")
    return ProviderError(f"{provider}: {action} failed ({status} {message})")


def transport_error(provider: str, action: str, exc: Exception, secrets: Iterable[str | None]) -> ProviderError:
    detail = redact(f"{type(exc).__name__}: {exc}", secrets)
    return ProviderUnavailableError(f"{provider}: {action} could not reach the service ({detail})")


def quote(argv: Iterable[str]) -> str:
    return " ".join(shlex.quote(part) for part in argv)


def env_prefix(env: Mapping[str, str] | None) -> list[str]:
    """`env -- K=V ...` so a command gets exactly these variables added, whatever shell runs it."""
    if not env:
        return []
    for key in env:
        if not key or "=" in key:
            raise ProviderError(f"environment variable name {key!r} is not valid: names must be non-empty without '='")
    return ["env", "--", *(f"{key}={value}" for key, value in env.items())]


def signal_exit_code(signum: int) -> int:
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return str(signum)


class OutputQueue:
    """The consumer side of an ExecStream: a bounded channel of output chunks plus the exit code.

    A reader task (one per process) calls `put` for each chunk as it arrives and `finish`
    once the process has ended; `put` waits while the consumer is behind.
    """

    def __init__(self) -> None:
        send, receive = anyio.create_memory_object_stream[OutputChunk](STREAM_BUFFER_CHUNKS)
        self._send: MemoryObjectSendStream[OutputChunk] = send
        self._receive: MemoryObjectReceiveStream[OutputChunk] = receive
        self._ended = anyio.Event()
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    async def put(self, stream: str, data: bytes) -> None:
        if not data:
            return
        chunk = OutputChunk(stream="stderr" if stream == "stderr" else "stdout", data=data)
        try:
            await self._send.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # nobody reads any more; the exit code still matters

    def finish(self, exit_code: int | None, error: BaseException | None = None) -> None:
        if self._ended.is_set():
            return
        self.exit_code = exit_code
        self.error = error
        self._send.close()
        self._ended.set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def chunks(self) -> AsyncIterator[OutputChunk]:
        async for chunk in self._receive:
            yield chunk
        if self.error is not None:
            raise self.error

    async def wait(self) -> int:
        await self._ended.wait()
        if self.error is not None:
            raise self.error
        return -1 if self.exit_code is None else self.exit_code

    def close_reader(self) -> None:
        self._receive.close()


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside a task group's exception group, so callers see the error
    itself; a group with several errors is returned unchanged."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group
