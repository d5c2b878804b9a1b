"""Warm pools: an environment may keep `warm_pool` sandboxes started, so that spawn_agent takes
one instead of waiting for the engine.

A pooled sandbox is made by the same `sandbox_spec` a spawn uses, with a pool name
(mcp-sandboxes-pool-<random>), POOL_LABEL (its environment), POOL_SPEC_LABEL (the hash of its
spec) and the instance label, and no session label. Which agent CLI it will run is not known
before the spawn, so it gets every backend's mounts (read-only host CLI paths; a backend whose
CLI is not configured adds none): one pool then serves every backend, and a spawn takes a
pooled sandbox only when its backend's mounts are among the pooled one's and the rest of the
spec is equal (else it creates one cold, as without a pool).

The pool's state is in memory. At start-up `adopt` finds its sandboxes again by their labels:
those of an environment that still wants them, made from the spec it would make now, are
taken back; the sweeper reaps the rest. A refill runs in the background per environment,
one sandbox at a time, backing off after failures (the last one shows in the environment's
view); it never makes a sandbox past server.max_sandboxes, and a spawn that needs the room
takes a pooled sandbox away (`make_room`).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from mcp_sandboxes.errors import ConflictError, McpSandboxesError
from mcp_sandboxes.orchestrator.clis import mounts_for
from mcp_sandboxes.orchestrator.egress import EgressService, provider_network
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.orchestrator.sandboxes import (
    INSTANCE_LABEL,
    POOL_LABEL,
    POOL_SPEC_LABEL,
    Hold,
    SandboxCap,
    sandbox_spec,
    spec_hash,
)
from mcp_sandboxes.providers import ListsByLabel, Mount, Provider, Sandbox, SandboxSpec
from mcp_sandboxes.redaction import redact
from mcp_sandboxes.store import Database, EnvironmentRecord
from mcp_sandboxes.store.records import LIVE_STATUSES

logger = logging.getLogger(__name__)

MAX_WARM_POOL = 16
CREATE_TIMEOUT_S = 300.0
DESTROY_TIMEOUT_S = 60.0
# After a failed create the refill waits this long, doubling up to the maximum.
# How long after a take the refill starts (bench/bench_spawn.py: the spawn's CLI start first).
REFILL_DELAY_S = 1.0
RETRY_MIN_S = 1.0
RETRY_MAX_S = 300.0
# While max_sandboxes leaves no room, the refill looks again this often (or when woken).
BUSY_RECHECK_S = 5.0


@dataclass
class Pooled:
    sandbox: Sandbox
    spec: SandboxSpec
    # Network "model": the name of its egress directory (made with the sandbox, served once taken).
    egress_key: str | None = None


@dataclass
class EnvironmentPool:
    environment: EnvironmentRecord
    want: int
    ready: list[Pooled] = field(default_factory=list)
    wake: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    last_error: str | None = None
    closed: bool = False


def fits(pooled: SandboxSpec, wanted: SandboxSpec) -> bool:
    """Whether a pooled sandbox can stand in for a new one made with `wanted`: equal but for the
    name and labels, and holding (at least) the wanted mounts."""

    def bare(spec: SandboxSpec) -> SandboxSpec:
        return spec.model_copy(update={"name": None, "labels": {}, "mounts": []})

    return bare(pooled) == bare(wanted) and all(mount in pooled.mounts for mount in wanted.mounts)


class WarmPool:
    def __init__(
        self,
        db: Database,
        providers: ProviderPool,
        cap: SandboxCap,
        *,
        instance_id: Callable[[], str],
        mounts: Callable[[], list[Mount]],
        sandbox_user: str | None,
        secret_values: Callable[[], list[str]],
        egress: EgressService | None = None,
    ) -> None:
        self._egress = egress
        self._db = db
        self._providers = providers
        self._cap = cap
        self._instance_id = instance_id
        self._mounts = mounts
        self._sandbox_user = sandbox_user
        self._secret_values = secret_values
        self._pools: dict[str, EnvironmentPool] = {}
        self._task_group: TaskGroup | None = None
        cap.count_pooled = self.count
        cap.make_room = self.make_room

    def attach_to(self, task_group: TaskGroup | None) -> None:
        self._task_group = task_group

    # -- what the rest asks ------------------------------------------------------------------

    def count(self) -> int:
        return sum(len(pool.ready) for pool in self._pools.values())

    def sandbox_ids(self) -> set[str]:
        return {pooled.sandbox.id for pool in self._pools.values() for pooled in pool.ready}

    def describe(self, environment_id: str) -> dict[str, object]:
        """The environment view's pool fields."""
        pool = self._pools.get(environment_id)
        if pool is None:
            return {"warm_pool": 0, "warm_ready": 0, "warm_pool_error": None}
        return {"warm_pool": pool.want, "warm_ready": len(pool.ready), "warm_pool_error": pool.last_error}

    def take(self, environment_id: str, wanted: SandboxSpec) -> tuple[Sandbox, Hold, str | None] | None:
        """A ready sandbox that fits `wanted`, with the cap's place it keeps until the session's row
        exists; None when there is none (the caller creates one). Wakes the refill."""
        pool = self._pools.get(environment_id)
        if pool is None:
            return None
        for index, pooled in enumerate(pool.ready):
            if fits(pooled.spec, wanted):
                del pool.ready[index]
                hold = self._cap.hold_now()  # no await between the two: the count never dips
                self._refill_soon(pool)
                return pooled.sandbox, hold, pooled.egress_key
        return None

    def _refill_soon(self, pool: EnvironmentPool) -> None:
        """Wake the refill after REFILL_DELAY_S: a create started at once competes with the
        taken sandbox's CLI start for the CPU and the engine (measured: ~0.1 s of the spawn)."""
        if self._task_group is None:
            pool.wake.set()
            return

        async def later() -> None:
            await anyio.sleep(REFILL_DELAY_S)
            pool.wake.set()

        self._task_group.start_soon(later, name=f"warm-pool-wake-{pool.environment.id}")

    # -- configuring ---------------------------------------------------------------------------

    async def configure(self, environment: EnvironmentRecord, want: int, *, adopt: bool = False) -> None:
        """Keep `want` sandboxes for the environment (0: none). With `adopt` (start-up), take back
        its pooled sandboxes that are still made the way it would make them now."""
        if want <= 0:
            await self.drain(environment.id)
            return
        pool = self._pools.get(environment.id)
        if pool is not None:
            pool.want = want
            pool.wake.set()
            return
        pool = EnvironmentPool(environment=environment, want=want)
        self._pools[environment.id] = pool
        if adopt:
            await self._adopt(pool)
        if self._task_group is not None:
            self._task_group.start_soon(self._run, pool, name=f"warm-pool-{environment.id}")

    async def _adopt(self, pool: EnvironmentPool) -> None:
        env = pool.environment
        try:
            provider = await self._providers.get(env.provider)
            if not isinstance(provider, ListsByLabel) or env.spec.network == "model":
                return  # "model" sandboxes' egress directories are per server run: the reaper takes them
            spec = self._spec(env, provider)
            held = {s.sandbox_id for s in await self._db.list_sessions(LIVE_STATUSES) if s.sandbox_id}
            labels = {
                INSTANCE_LABEL: self._instance_id(),
                POOL_LABEL: env.id,
                POOL_SPEC_LABEL: spec.labels[POOL_SPEC_LABEL],
            }
            for sandbox_id in await provider.list_labelled(labels):
                if sandbox_id in held or len(pool.ready) >= pool.want:
                    continue  # a session's, or surplus: the reaper removes what nobody holds
                sandbox = await provider.attach(sandbox_id)
                if sandbox is not None:
                    pool.ready.append(Pooled(sandbox, spec))
                    logger.info("warm pool of %s: adopted sandbox %s", env.name, sandbox_id)
        except McpSandboxesError as exc:
            pool.last_error = f"adopting its sandboxes after a restart: {exc}"

    async def drain(self, environment_id: str) -> None:
        """Stop refilling and remove the environment's pooled sandboxes."""
        pool = self._pools.pop(environment_id, None)
        if pool is None:
            return
        pool.closed = True
        pool.scope.cancel()
        ready, pool.ready = pool.ready, []
        for pooled in ready:
            await self._destroy(pool.environment.provider, pooled.sandbox.id, pooled.egress_key)

    async def trim(self) -> None:
        """The sweeper's part: pools of environments that are gone are drained; sandboxes beyond
        what an environment wants, or no longer made the way it makes them now, are removed."""
        for environment_id, pool in list(self._pools.items()):
            env = await self._db.find_environment(environment_id)
            if env is None or env.deleted_at is not None:
                await self.drain(environment_id)
                continue
            try:
                current = self._spec(env, await self._providers.get(env.provider))
            except McpSandboxesError as exc:
                pool.last_error = str(exc)
                continue
            keep = [pooled for pooled in pool.ready if fits(pooled.spec, current)][: pool.want]
            surplus = [pooled for pooled in pool.ready if pooled not in keep]
            pool.ready = keep
            for pooled in surplus:
                await self._destroy(env.provider, pooled.sandbox.id, pooled.egress_key)
            if surplus:
                pool.wake.set()

    async def make_room(self, _for_environment: str | None) -> bool:
        """Give one pooled sandbox up so a spawn fits under max_sandboxes; False: none to give."""
        candidates = [pool for pool in self._pools.values() if pool.ready]
        if not candidates:
            return False
        pool = max(candidates, key=lambda p: len(p.ready))
        pooled = pool.ready.pop()
        await self._destroy(pool.environment.provider, pooled.sandbox.id, pooled.egress_key)
        pool.wake.set()  # its refill finds no room, and says so in the environment's view
        return True

    async def aclose(self) -> None:
        """Pooled sandboxes stay when the server stops (the next start adopts them)."""
        for pool in self._pools.values():
            pool.scope.cancel()
        self._pools.clear()

    # -- the refill ----------------------------------------------------------------------------

    def _spec(self, env: EnvironmentRecord, provider: Provider) -> SandboxSpec:
        user = None if getattr(provider, "ignores_user", False) else self._sandbox_user
        # A prepared environment's sandboxes start from its prepared image (named at creation; until
        # its preparation ends a create fails and the refill backs off).
        base = env.spec if env.prepared_image is None else env.spec.model_copy(update={"image": env.prepared_image})
        spec = sandbox_spec(
            base,
            name=f"mcp-sandboxes-pool-{uuid.uuid4().hex[:12]}",
            labels={POOL_LABEL: env.id},
            mounts=mounts_for(env.provider, self._mounts()),
            user=user,
            instance_id=self._instance_id(),
            network=provider_network(env.spec),
        )
        return spec.model_copy(update={"labels": {**spec.labels, POOL_SPEC_LABEL: spec_hash(spec)}})

    async def _run(self, pool: EnvironmentPool) -> None:
        with pool.scope:
            delay = RETRY_MIN_S
            while not pool.closed:
                pool.wake = anyio.Event()
                wait = math.inf
                if len(pool.ready) < pool.want:
                    try:
                        await self._create_one(pool)
                        pool.last_error = None
                        delay = RETRY_MIN_S
                        continue
                    except ConflictError as exc:  # max_sandboxes: wait for room
                        pool.last_error = str(exc)
                        wait = BUSY_RECHECK_S
                    except (McpSandboxesError, TimeoutError, OSError) as exc:
                        pool.last_error = f"creating a pooled sandbox failed: {redact(str(exc), self._secret_values())}"
                        logger.warning("warm pool of %s: %s", pool.environment.name, pool.last_error)
                        wait, delay = delay, min(delay * 2, RETRY_MAX_S)
                with anyio.move_on_after(wait):
                    await pool.wake.wait()

    async def _create_one(self, pool: EnvironmentPool) -> None:
        env = pool.environment
        provider = await self._providers.get(env.provider)
        spec = self._spec(env, provider)
        egress_key = None
        if env.spec.network == "model" and self._egress is not None:
            egress_key = spec.name or f"pool-{uuid.uuid4().hex[:12]}"
            spec = spec.model_copy(update={"mounts": [*spec.mounts, *await self._egress.sandbox_mounts(egress_key)]})
        async with self._cap.slot(evict=False):
            with anyio.fail_after(CREATE_TIMEOUT_S):
                sandbox = await provider.create(spec)
            if pool.closed:
                await self._destroy(env.provider, sandbox.id, egress_key)
                return
            pool.ready.append(Pooled(sandbox, spec, egress_key))

    async def _destroy(self, provider_name: str, sandbox_id: str, egress_key: str | None = None) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(DESTROY_TIMEOUT_S):
            try:
                provider = await self._providers.get(provider_name)
                await provider.destroy(sandbox_id)
            except McpSandboxesError as exc:
                logger.warning("cannot remove pooled sandbox %s: %s", sandbox_id, exc)
            if egress_key is not None and self._egress is not None:
                await self._egress.discard(egress_key)


__all__ = ["MAX_WARM_POOL", "WarmPool", "fits"]
