"""Warm pools in-process: the `process` provider's real sandboxes, a real SQLite file, the
scripted agent. A pool fills to its size, a spawn takes one of its sandboxes and it refills;
deleting the environment drains it; after a restart its sandboxes are adopted (never more than
it wants; the rest reaped); under max_sandboxes a spawn pushes a pooled sandbox out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.orchestrator.sandboxes import POOL_LABEL
from mcp_sandboxes.orchestrator.views import EnvironmentView
from tests.orchestrator.spine import TURN_BUDGET_S, events_until_idle, orchestrator_of, spine_settings

CUSTOM = AgentSpec(backend="custom")
POLL_S = 0.02


def with_server(settings: Settings, **values: Any) -> Settings:
    return settings.model_copy(update={"server": settings.server.model_copy(update=values)})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return spine_settings(tmp_path)


def sandbox_ids(settings: Settings) -> set[str]:
    root = settings.server.data_dir / "sandboxes" / "process"
    return {path.name for path in root.iterdir()} if root.exists() else set()


def pooled_ids(settings: Settings, environment_id: str) -> set[str]:
    root = settings.server.data_dir / "sandboxes" / "process"
    return {
        name
        for name in sandbox_ids(settings)
        if f'"{POOL_LABEL}": "{environment_id}"' in (root / name / "sandbox.json").read_text()
    }


async def environment(orchestrator: Orchestrator, name: str) -> EnvironmentView:
    [view] = [view for view in await orchestrator.list_environments() if view.name == name]
    return view


async def until_ready(orchestrator: Orchestrator, name: str, count: int) -> EnvironmentView:
    """Polls the environment's view (bounded) until `count` pooled sandboxes are ready."""
    with anyio.fail_after(TURN_BUDGET_S):
        while True:
            view = await environment(orchestrator, name)
            if view.warm_ready == count:
                return view
            await anyio.sleep(POLL_S)


async def test_a_spawn_takes_a_pooled_sandbox_and_the_pool_refills(settings: Settings) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        created = await orchestrator.create_environment(
            EnvironmentRequest(name="warm", provider="process", image="host", warm_pool=2)
        )
        assert created.warm_pool == 2
        await until_ready(orchestrator, "warm", 2)
        pooled = pooled_ids(settings, created.id)
        assert len(pooled) == 2

        spawned = await orchestrator.spawn_agent(environment="warm", agent=CUSTOM, prompt="hello")
        assert spawned.sandbox_id in pooled
        events = await events_until_idle(orchestrator, spawned.session_id)
        assert events[-1].data["stop_reason"] == {"type": "end_turn"}
        view = await until_ready(orchestrator, "warm", 2)
        assert view.warm_pool_error is None
        assert len(pooled_ids(settings, created.id)) == 3  # the session's (taken from the pool) and two new

        await orchestrator.stop_session(spawned.session_id)
        await orchestrator.delete_environment("warm")
        assert sandbox_ids(settings) == set()


async def test_after_a_restart_the_pool_adopts_its_sandboxes_and_a_lowered_size_is_reclaimed(
    settings: Settings,
) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        created = await orchestrator.create_environment(
            EnvironmentRequest(name="warm", provider="process", image="host", warm_pool=2)
        )
        await until_ready(orchestrator, "warm", 2)
    before = sandbox_ids(settings)
    assert len(before) == 2

    async with orchestrator_of(settings).running() as orchestrator:
        await until_ready(orchestrator, "warm", 2)
        assert sandbox_ids(settings) == before  # adopted, none made anew

        # Lowered while it runs: the sweeper gives the surplus up.
        await orchestrator.db.set_warm_pool(created.id, 1)
        await orchestrator.pool.configure(await orchestrator.environments.get(created.id), 1)
        await orchestrator.sweeper.sweep()
        assert (await environment(orchestrator, "warm")).warm_ready == 1
        assert len(sandbox_ids(settings)) == 1 and sandbox_ids(settings) <= before


async def test_a_spawn_under_max_sandboxes_pushes_a_pooled_sandbox_out_and_the_pool_says_why_it_is_short(
    settings: Settings,
) -> None:
    settings = with_server(settings, max_sandboxes=2)
    async with orchestrator_of(settings).running() as orchestrator:
        await orchestrator.create_environment(
            EnvironmentRequest(name="warm", provider="process", image="host", warm_pool=2)
        )
        await orchestrator.create_environment(EnvironmentRequest(name="cold", provider="process", image="host"))
        await until_ready(orchestrator, "warm", 2)
        spawned = await orchestrator.spawn_agent(environment="cold", agent=CUSTOM, prompt="hello")
        assert len(sandbox_ids(settings)) == 2
        view = await environment(orchestrator, "warm")
        assert view.warm_ready == 1
        with anyio.fail_after(TURN_BUDGET_S):
            while True:
                view = await environment(orchestrator, "warm")
                if view.warm_pool_error:
                    break
                await anyio.sleep(POLL_S)
        assert view.warm_pool_error.startswith("max_sandboxes: busy")
        await orchestrator.stop_session(spawned.session_id)
        await orchestrator.pool.configure(await orchestrator.environments.get("warm"), 2)  # wakes the refill
        await until_ready(orchestrator, "warm", 2)


async def test_a_warm_pool_is_refused_past_max_sandboxes_and_for_agents(settings: Settings) -> None:
    settings = with_server(settings, max_sandboxes=1)
    async with orchestrator_of(settings).running() as orchestrator:
        with pytest.raises(InvalidInputError, match=r"^warm_pool: 2 is more than server.max_sandboxes \(1\)"):
            await orchestrator.create_environment(
                EnvironmentRequest(name="warm", provider="process", image="host", warm_pool=2)
            )
        with pytest.raises(InvalidInputError, match=r"^warm_pool: only the operator"):
            await orchestrator.create_environment(
                EnvironmentRequest(name="warm", provider="process", image="host", warm_pool=1),
                caller_session_id="ses_x",
            )
        assert await orchestrator.list_environments() == []
