"""Shielded, bounded cleanup shared by the providers.

`create` promises that a failure leaves nothing behind: whatever went wrong after the
sandbox came to exist (its setup failed, the caller was cancelled, it never became ready),
the sandbox is removed before the error goes on. The removal is shielded, so a cancelled
caller still gets it, and bounded, so a hanging engine cannot keep the caller forever.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio

from mcp_sandboxes.errors import ProviderError

Remove = Callable[[], Awaitable[object]]


async def _remove_shielded(remove: Remove, timeout_s: float) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
        await remove()


@asynccontextmanager
async def removed_on_failure(remove: Remove, *, cleanup_timeout_s: float) -> AsyncIterator[None]:
    """Run `remove` (for at most `cleanup_timeout_s`) when the block fails, then re-raise."""
    try:
        yield
    except BaseException:
        await _remove_shielded(remove, cleanup_timeout_s)
        raise


@asynccontextmanager
async def removed_unless_ready(
    remove: Remove, *, what: str, within_s: float, cleanup_timeout_s: float
) -> AsyncIterator[None]:
    """Like `removed_on_failure`, and the block gets only `within_s` to make `what` (e.g.
    "Fly: the new machine") usable: past that, the error says it was not ready and removed."""
    try:
        with anyio.fail_after(within_s):
            yield
    except BaseException as exc:
        await _remove_shielded(remove, cleanup_timeout_s)
        if isinstance(exc, TimeoutError):
            raise ProviderError(f"{what} was not ready within {within_s:g}s; it was removed") from None
        raise
