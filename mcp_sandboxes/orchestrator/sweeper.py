"""The sweeper: reclaims what nobody uses.

- At start-up (after recovery), `reap_orphans` removes the sandboxes this server's instance
  left behind: those labelled with its instance id that no live session holds and no warm pool
  adopted (a crash between create and the session row, a pool of an environment since deleted).
  Sandboxes without the label or with another instance's id are never touched: two servers
  with different data directories can share one engine.
- Every `server.sweep_interval_s`, `sweep` stops sessions idle (no turn running or queued) for
  `server.idle_timeout_s`, the way stop_session does (their history stays), and has the warm
  pools give up sandboxes beyond what their environments ask for.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import McpSandboxesError
from mcp_sandboxes.orchestrator.egress import EgressService
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.orchestrator.sandboxes import INSTANCE_LABEL
from mcp_sandboxes.orchestrator.subagents import Lineage
from mcp_sandboxes.orchestrator.worker import WorkerPool
from mcp_sandboxes.providers import ListsByLabel
from mcp_sandboxes.store import Database, SessionRecord
from mcp_sandboxes.store.records import LIVE_STATUSES

if TYPE_CHECKING:
    from mcp_sandboxes.orchestrator.pool import WarmPool
    from mcp_sandboxes.orchestrator.sessions import SessionService

logger = logging.getLogger(__name__)

# One engine call of the reaper (list, destroy) takes at most this long.
REAP_CALL_TIMEOUT_S = 60.0


def idle_seconds(session: SessionRecord, now: datetime) -> float:
    """Since the session last changed (a turn ended, a message came, its status moved)."""
    changed = datetime.fromisoformat(session.updated_at.replace("Z", "+00:00"))
    return (now - changed).total_seconds()


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        providers: ProviderPool,
        workers: WorkerPool,
        lineage: Lineage,
        sessions: SessionService,
    ) -> None:
        self._settings = settings
        self._db = db
        self._providers = providers
        self._workers = workers
        self._lineage = lineage
        self._sessions = sessions
        # Set by the orchestrator: network "model" sockets of ended sessions are closed each pass.
        self.egress: EgressService | None = None
        self.pool: WarmPool | None = None

    @property
    def instance_id(self) -> str:
        return self._sessions.instance_id

    async def reap_orphans(self) -> list[str]:
        """Remove this instance's sandboxes that no live session holds and no warm pool keeps;
        returns their ids. A provider that cannot list by label, or does not answer, is skipped."""
        if not self.instance_id:
            return []
        held = {session.sandbox_id for session in await self._db.list_sessions(LIVE_STATUSES) if session.sandbox_id}
        if self.pool is not None:
            held |= self.pool.sandbox_ids()
        reaped: list[str] = []
        for name in await self._db.environment_providers():
            try:
                provider = await self._providers.get(name)
                if not isinstance(provider, ListsByLabel):
                    logger.info("provider %s cannot list sandboxes by label; none of its sandboxes are reaped", name)
                    continue
                with anyio.fail_after(REAP_CALL_TIMEOUT_S):
                    ours = await provider.list_labelled({INSTANCE_LABEL: self.instance_id})
                for sandbox_id in ours:
                    if sandbox_id in held:
                        continue
                    with anyio.fail_after(REAP_CALL_TIMEOUT_S):
                        await provider.destroy(sandbox_id)
                    logger.warning(
                        "reaped sandbox %s (%s): this server made it, and no session or pool holds it", sandbox_id, name
                    )
                    reaped.append(sandbox_id)
            except (McpSandboxesError, TimeoutError) as exc:
                logger.warning("cannot reap the %s provider's leftover sandboxes: %s", name, exc)
        return reaped

    async def idle_sessions(self, now: datetime | None = None) -> list[tuple[SessionRecord, float]]:
        """Sessions to stop for being idle (as of `now`): none of their turns runs or waits, they
        have not changed for idle_timeout_s, and no sub-agent of theirs is still busy (stopping a
        session stops its subtree)."""
        timeout = self._settings.server.idle_timeout_s
        if not timeout:
            return []
        now = now or datetime.now(UTC)
        live = await self._db.list_sessions(LIVE_STATUSES)
        expired: dict[str, float] = {}
        for session in live:
            if session.status != "idle":
                continue
            worker = self._workers.get(session.id)
            if worker is not None and worker.current is not None:
                continue
            if await self._db.list_turns(session.id, "queued"):
                continue
            seconds = idle_seconds(session, now)
            if seconds >= timeout:
                expired[session.id] = seconds
        live_ids = {session.id for session in live}
        found: list[tuple[SessionRecord, float]] = []
        for session in live:
            if session.id not in expired:
                continue
            below = [child for child in await self._lineage.descendants(session.id) if child in live_ids]
            if all(child in expired for child in below):
                found.append((session, expired[session.id]))
        return found

    async def sweep(self, now: datetime | None = None) -> list[str]:
        """One pass: stop idle sessions, trim the warm pools. Returns the sessions stopped."""
        stopped: list[str] = []
        for session, seconds in await self.idle_sessions(now):
            # Looked at again just before: a message may have come in since the list was made.
            current = await self._db.get_session(session.id)
            worker = self._workers.get(session.id)
            if current.status != "idle" or current.updated_at != session.updated_at:
                continue
            if worker is not None and worker.current is not None:
                continue
            if current.id in stopped:
                continue
            reason = f"idle for {int(seconds)} s; sweeper (server.idle_timeout_s)"
            logger.info("stopping session %s: %s", session.id, reason)
            try:
                await self._sessions.stop_session(session.id, reason=reason)
            except McpSandboxesError as exc:
                logger.warning("sweeper could not stop idle session %s: %s", session.id, exc)
                continue
            stopped.append(session.id)
        if self.pool is not None:
            await self.pool.trim()
        if self.egress is not None:
            # A session that failed (its sandbox removed behind our back) stops being served.
            await self.egress.close_ended({s.id for s in await self._db.list_sessions(LIVE_STATUSES)})
        return stopped

    async def run(self) -> None:
        """Sweep every sweep_interval_s until cancelled; a failing pass is logged, the next goes on."""
        while True:
            await anyio.sleep(self._settings.server.sweep_interval_s)
            try:
                await self.sweep()
            except McpSandboxesError as exc:
                logger.warning("sweep failed: %s", exc)


__all__ = ["Sweeper", "idle_seconds"]
