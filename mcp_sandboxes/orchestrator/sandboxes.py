"""What every sandbox this server makes has in common, and how many may exist at once.

- Labels: each carries INSTANCE_LABEL with this server's instance id (kept in
  `<data_dir>/instance-id`), so start-up clean-up removes only what this server left behind,
  never the sandboxes of another server (another data directory) on the same engine. A
  session's sandbox also carries SESSION_LABEL; a warm pool's carries POOL_LABEL (its
  environment) and POOL_SPEC_LABEL (a hash of the spec it was made from).
- `sandbox_spec`: the spec of a new sandbox of an environment, one function for a spawn's
  sandbox and a warm pool's alike (so a pooled sandbox is what a cold spawn would have made).
- `SandboxCap`: `server.max_sandboxes`, counted over live sessions, warm pools and sandboxes
  being made, and checked under one lock so two spawns cannot both take the last slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

import anyio

from mcp_sandboxes.errors import ConflictError
from mcp_sandboxes.providers.base import Mount, NetworkMode, SandboxSpec

INSTANCE_LABEL = "io.mcp-sandboxes.instance"
SESSION_LABEL = "io.mcp-sandboxes.session"
POOL_LABEL = "io.mcp-sandboxes.pool"
POOL_SPEC_LABEL = "io.mcp-sandboxes.pool-spec"


def sandbox_spec(
    env_spec: SandboxSpec,
    *,
    name: str,
    labels: Mapping[str, str],
    mounts: Sequence[Mount],
    user: str | None,
    instance_id: str,
    network: NetworkMode | None = None,
) -> SandboxSpec:
    """The spec a new sandbox of an environment is created with: the environment's spec, named
    `name`, with the backends' `mounts` (read-only host CLI paths) after the environment's own,
    `labels` and the instance label beside its labels, and `user` unless the environment names one.
    `network`: what the engine is told, where that differs from the environment's mode."""
    return env_spec.model_copy(
        update={
            "name": name,
            "network": network or env_spec.network,
            "mounts": [*env_spec.mounts, *mounts],
            "labels": {**env_spec.labels, **labels, INSTANCE_LABEL: instance_id},
            "user": env_spec.user or user,
        }
    )


def spec_hash(spec: SandboxSpec) -> str:
    """What makes two sandboxes interchangeable: everything in the spec but its name and labels."""
    data = spec.model_copy(update={"name": None, "labels": {}}).model_dump_json()
    return hashlib.sha256(data.encode()).hexdigest()[:24]


class SandboxCap:
    """`server.max_sandboxes` (0: no cap). A cold create holds a slot from before the sandbox is
    made until its session row exists (`slot`); taking a pooled sandbox holds one too, without a
    check (the sandbox exists already, and counted in the pool until it was taken)."""

    def __init__(self, limit: int, count_live: Callable[[], Awaitable[int]]) -> None:
        self.limit = limit
        self._count_live = count_live
        # Set by the warm pool: how many ready sandboxes it holds (one being made holds a slot).
        self.count_pooled: Callable[[], int] = lambda: 0
        # Set by the warm pool: remove one pooled sandbox not wanted by `environment_id` to make
        # room for a spawn; True when one was removed.
        self.make_room: Callable[[str | None], Awaitable[bool]] | None = None
        self._held = 0
        self._lock = anyio.Lock()

    async def in_use(self) -> tuple[int, int, int]:
        """Live sessions' sandboxes, pooled ones, and ones being made or handed over."""
        return await self._count_live(), self.count_pooled(), self._held

    async def hold(self, *, check: bool = True, evict: bool = True, for_environment: str | None = None) -> Hold:
        """Hold one sandbox's place until `Hold.release()`. With `check`, refuse (ConflictError)
        when every place is taken; with `evict` (a spawn), a warm pool not of `for_environment`
        gives a sandbox up first."""
        async with self._lock:
            if check and self.limit:
                while True:
                    live, pooled, held = await self.in_use()
                    if live + pooled + held < self.limit:
                        break
                    if not evict or self.make_room is None or not await self.make_room(for_environment):
                        raise ConflictError(busy_message(self.limit, live, pooled, held))
            self._held += 1
        return Hold(self)

    def hold_now(self) -> Hold:
        """A place for a sandbox that exists already (taken from a warm pool): no check, no await."""
        self._held += 1
        return Hold(self)

    @asynccontextmanager
    async def slot(self, *, check: bool = True, evict: bool = True) -> AsyncIterator[None]:
        hold = await self.hold(check=check, evict=evict)
        try:
            yield
        finally:
            hold.release()

    def _release(self) -> None:
        self._held -= 1


class Hold:
    """One place held in a SandboxCap; `release` gives it back (once, however often called)."""

    def __init__(self, cap: SandboxCap) -> None:
        self._cap: SandboxCap | None = cap

    def release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap._release()


def busy_message(limit: int, live: int, pooled: int, held: int) -> str:
    parts = [f"{live} by live sessions"]
    if pooled:
        parts.append(f"{pooled} in warm pools")
    if held:
        parts.append(f"{held} being started")
    return (
        f"max_sandboxes: busy, all {limit} sandboxes are in use ({', '.join(parts)}); stop a session"
        " (stop_session) or raise server.max_sandboxes"
    )


__all__ = [
    "INSTANCE_LABEL",
    "POOL_LABEL",
    "POOL_SPEC_LABEL",
    "SESSION_LABEL",
    "Hold",
    "SandboxCap",
    "busy_message",
    "sandbox_spec",
    "spec_hash",
]
