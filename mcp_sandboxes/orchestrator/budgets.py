"""Budgets over a tree of agents: a top-level session and every sub-agent below it share caps
on live sessions, turns, tokens, cost and wall time. A request that would go past one is
refused before anything starts, with an error to whoever asked and an event on the tree's
top session; usage is rolled up over each session's subtree for get_session."""

from __future__ import annotations

from datetime import UTC, datetime

from mcp_sandboxes.config import BudgetSettings
from mcp_sandboxes.errors import ConflictError
from mcp_sandboxes.events import ErrorInfo, SessionError, Usage
from mcp_sandboxes.orchestrator.journal import EventJournal
from mcp_sandboxes.orchestrator.subagents import Lineage
from mcp_sandboxes.store import Database, SessionRecord
from mcp_sandboxes.store.records import LIVE_STATUSES


class TreeUsage:
    def __init__(self, sessions: list[SessionRecord], turns: int) -> None:
        self.sessions = sessions
        self.turns = turns
        self.usage = sum((s.usage for s in sessions), Usage())

    @property
    def live(self) -> int:
        return sum(1 for s in self.sessions if s.status in LIVE_STATUSES)

    @property
    def tokens(self) -> int:
        return self.usage.input_tokens + self.usage.output_tokens

    def wall_s(self, now: datetime) -> float:
        started = min(_parse(s.created_at) for s in self.sessions)
        return (now - started).total_seconds()


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


class TreeBudgets:
    def __init__(self, db: Database, lineage: Lineage, journal: EventJournal, settings: BudgetSettings) -> None:
        self._db = db
        self._lineage = lineage
        self._journal = journal
        self._settings = settings

    async def usage_below(self, session_id: str) -> TreeUsage:
        """The session and everything below it."""
        ids = [session_id, *await self._lineage.descendants(session_id)]
        sessions = [await self._db.get_session(i) for i in ids]
        turns = sum([len(await self._db.list_turns(i)) for i in ids])
        return TreeUsage(sessions, turns)

    async def check(self, session_id: str, *, new_session: bool, field: str) -> None:
        """Before a new session (a child of `session_id`) or a new turn of `session_id`: refuse
        when its tree is at a cap. `field` names the caller's argument in the error."""
        limits = self._settings
        root = await self._lineage.root(session_id)
        tree = await self.usage_below(root)
        problems: list[str] = []
        if new_session and limits.max_live_sessions and tree.live + 1 > limits.max_live_sessions:
            problems.append(f"{tree.live} live sessions (budgets.max_live_sessions = {limits.max_live_sessions})")
        if limits.max_turns and tree.turns + 1 > limits.max_turns:
            problems.append(f"{tree.turns} turns (budgets.max_turns = {limits.max_turns})")
        if limits.max_tokens and tree.tokens >= limits.max_tokens:
            problems.append(f"{tree.tokens} tokens (budgets.max_tokens = {limits.max_tokens})")
        cost = tree.usage.cost_usd or 0.0
        if limits.max_cost_usd and cost >= limits.max_cost_usd:
            problems.append(f"${cost:.4f} spent (budgets.max_cost_usd = {limits.max_cost_usd:g})")
        wall = tree.wall_s(datetime.now(UTC))
        if limits.max_wall_s and wall >= limits.max_wall_s:
            problems.append(f"{wall:.0f}s since it started (budgets.max_wall_s = {limits.max_wall_s:g})")
        if not problems:
            return
        message = (
            f"the agent tree of {root} is out of budget: {'; '.join(problems)}. Stop sessions you no longer"
            " need (stop_session), or ask the operator to raise the budget"
        )
        await self._journal.emit(root, [SessionError(error=ErrorInfo(type="budget_exceeded", message=message))])
        raise ConflictError(f"{field}: {message}")
