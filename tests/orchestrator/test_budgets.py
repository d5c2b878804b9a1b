"""Budgets over a tree of agents, in-process on the `process` provider with the scripted agent:
a tree that reaches a cap is refused its next spawn or turn, with the reason to the caller and
an event on the top session; usage rolls up over each subtree."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import ConflictError
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from tests.orchestrator.spine import events_until_idle, orchestrator_of, spine_settings

CUSTOM = AgentSpec(backend="custom")


def with_budgets(tmp_path: Path, **caps: float) -> Settings:
    settings = spine_settings(tmp_path)
    budgets = settings.budgets.model_copy(update=caps)
    # Sub-agents on the process provider: only because the operator says so explicitly.
    subagents = settings.subagents.model_copy(update={"allow_unsandboxed": True})
    return settings.model_copy(update={"budgets": budgets, "subagents": subagents})


async def test_a_tree_out_of_turns_is_refused_its_next_spawn_and_message_and_says_so(tmp_path: Path) -> None:
    settings = with_budgets(tmp_path, max_turns=3)
    async with orchestrator_of(settings).running() as orchestrator:
        await orchestrator.create_environment(EnvironmentRequest(name="b", provider="process", image="host"))
        root = await orchestrator.spawn_agent(environment="b", agent=CUSTOM, prompt="root")
        await events_until_idle(orchestrator, root.session_id)
        child = await orchestrator.spawn_agent(
            environment="b", agent=CUSTOM, prompt="child", parent_session_id=root.session_id
        )
        await events_until_idle(orchestrator, child.session_id)
        grandchild = await orchestrator.spawn_agent(
            environment="b", agent=CUSTOM, prompt="grandchild", parent_session_id=child.session_id
        )
        await events_until_idle(orchestrator, grandchild.session_id)

        with pytest.raises(ConflictError, match=r"spawn_agent: the agent tree of .* 3 turns \(budgets.max_turns = 3\)"):
            await orchestrator.spawn_agent(
                environment="b", agent=CUSTOM, prompt="one too many", parent_session_id=child.session_id
            )
        with pytest.raises(ConflictError, match="send_message: the agent tree"):
            await orchestrator.send_message(grandchild.session_id, "more")
        # Another tree is not affected.
        other = await orchestrator.spawn_agent(environment="b", agent=CUSTOM, prompt="other tree")
        await events_until_idle(orchestrator, other.session_id)

        events = (await orchestrator.read_events(root.session_id, types=["session.error"])).events
        assert [e.data["error"]["type"] for e in events] == ["budget_exceeded", "budget_exceeded"]

        top = await orchestrator.get_session(root.session_id)
        assert top.subtree is not None
        assert (top.subtree.sessions, top.subtree.turns) == (3, 3)
        per_session = (await orchestrator.get_session(child.session_id)).usage.output_tokens
        assert per_session > 0 and top.subtree.usage.output_tokens == 3 * per_session
        assert (await orchestrator.get_session(grandchild.session_id)).subtree is None


async def test_live_sessions_are_capped_per_tree(tmp_path: Path) -> None:
    settings = with_budgets(tmp_path, max_live_sessions=2)
    async with orchestrator_of(settings).running() as orchestrator:
        await orchestrator.create_environment(EnvironmentRequest(name="b", provider="process", image="host"))
        root = await orchestrator.spawn_agent(environment="b", agent=CUSTOM, prompt="root")
        await orchestrator.spawn_agent(environment="b", agent=CUSTOM, prompt="c1", parent_session_id=root.session_id)
        with pytest.raises(ConflictError, match=r"2 live sessions \(budgets.max_live_sessions = 2\)"):
            await orchestrator.spawn_agent(
                environment="b", agent=CUSTOM, prompt="c2", parent_session_id=root.session_id
            )
        sessions = await orchestrator.list_sessions()
        assert len(sessions) == 2  # the refused spawn left nothing
        await orchestrator.stop_session(root.session_id)
