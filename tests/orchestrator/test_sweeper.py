"""The sweeper and max_sandboxes in-process: the `process` provider's real sandboxes (host
directories and processes), a real SQLite file, the scripted agent. Start-up reaping touches only
this server's instance; idle sessions are stopped with their history kept; max_sandboxes refuses
a spawn past the cap, race-free, and leaves nothing behind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import ConflictError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.orchestrator.sandboxes import INSTANCE_LABEL, SESSION_LABEL
from mcp_sandboxes.orchestrator.views import SessionView
from mcp_sandboxes.providers.base import SandboxSpec
from mcp_sandboxes.providers.local.process import ProcessProvider
from tests.orchestrator.spine import (
    POLL_WAIT_S,
    TURN_BUDGET_S,
    events_until_idle,
    orchestrator_of,
    sandbox_dir,
    spine_settings,
)

ENVIRONMENT = "sweep"


def later() -> datetime:
    """A clock an hour ahead: every session is past a minute's idle time by then."""
    return datetime.now(UTC) + timedelta(hours=1)


CUSTOM = AgentSpec(backend="custom")


def with_server(settings: Settings, **values: Any) -> Settings:
    return settings.model_copy(update={"server": settings.server.model_copy(update=values)})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return spine_settings(tmp_path)


async def spawn(orchestrator: Orchestrator, prompt: str = "hello") -> SessionView:
    if not await orchestrator.db.find_environment(ENVIRONMENT):
        await orchestrator.create_environment(EnvironmentRequest(name=ENVIRONMENT, provider="process", image="host"))
    return await orchestrator.spawn_agent(environment=ENVIRONMENT, agent=CUSTOM, prompt=prompt)


def instance_id(settings: Settings) -> str:
    return (settings.server.data_dir / "instance-id").read_text().strip()


def sandbox_ids(settings: Settings) -> set[str]:
    root = settings.server.data_dir / "sandboxes" / "process"
    return {path.name for path in root.iterdir()} if root.exists() else set()


async def test_every_spawned_sandbox_carries_this_servers_instance_id_kept_0600_in_the_data_dir(
    settings: Settings,
) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator)
        await events_until_idle(orchestrator, spawned.session_id)
    path = settings.server.data_dir / "instance-id"
    assert path.stat().st_mode & 0o777 == 0o600
    first = instance_id(settings)
    metadata = (sandbox_dir(settings, str(spawned.sandbox_id)) / "sandbox.json").read_text()
    assert f'"{INSTANCE_LABEL}": "{first}"' in metadata
    assert f'"{SESSION_LABEL}": "{spawned.session_id}"' in metadata
    # The same id after a restart: it is made once per data directory.
    async with orchestrator_of(settings).running():
        pass
    assert instance_id(settings) == first


async def test_start_up_reaps_only_this_instances_sandboxes_that_no_live_session_holds(settings: Settings) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        kept = await spawn(orchestrator)
        await events_until_idle(orchestrator, kept.session_id)
    ours = instance_id(settings)
    state_dir = settings.server.data_dir / "sandboxes" / "process"
    async with ProcessProvider.from_settings({"state_dir": str(state_dir)}) as provider:
        orphan = await provider.create(SandboxSpec(image="host", labels={INSTANCE_LABEL: ours}))
        foreign = await provider.create(SandboxSpec(image="host", labels={INSTANCE_LABEL: "another-server-01"}))
        unlabelled = await provider.create(SandboxSpec(image="host"))
    assert {orphan.id, foreign.id, unlabelled.id, str(kept.sandbox_id)} <= sandbox_ids(settings)

    async with orchestrator_of(settings).running() as orchestrator:
        after = sandbox_ids(settings)
        assert orphan.id not in after
        assert {foreign.id, unlabelled.id, str(kept.sandbox_id)} <= after
        # The live session still works in its kept sandbox.
        session = await orchestrator.get_session(kept.session_id)
        assert session.status == "idle" and session.sandbox_id == kept.sandbox_id


async def test_an_idle_session_is_stopped_by_the_sweeper_and_its_history_stays(settings: Settings) -> None:
    settings = with_server(settings, idle_timeout_s=0.3, sweep_interval_s=0.1)
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator)
        events = await events_until_idle(orchestrator, spawned.session_id)
        with anyio.fail_after(TURN_BUDGET_S):
            while (session := await orchestrator.get_session(spawned.session_id)).status != "stopped":
                await orchestrator.read_events(spawned.session_id, after=events[-1].seq, wait_s=POLL_WAIT_S)
        page = await orchestrator.read_events(spawned.session_id, after=0, limit=100)
    assert session.stop_reason is not None and session.stop_reason.startswith("idle for ")
    assert "sweeper" in session.stop_reason
    assert session.sandbox_id is None
    assert not sandbox_dir(settings, str(spawned.sandbox_id)).exists()
    types = [event.type for event in page.events]
    assert types[: len(events)] == [event.type for event in events]  # the first turn's history is all there
    terminated = [event for event in page.events if event.type == "session.status_terminated"]
    assert len(terminated) == 1 and "idle for" in terminated[0].data["reason"]
    assert session.last_turn is not None and session.last_turn.final_message


async def test_the_sweeper_leaves_a_session_alone_while_a_turn_runs_or_waits_and_when_off(settings: Settings) -> None:
    settings = with_server(settings, idle_timeout_s=60, sweep_interval_s=3600)
    async with orchestrator_of(settings).running() as orchestrator:
        busy = await spawn(orchestrator, "SLEEP")
        idle = await spawn(orchestrator)
        await events_until_idle(orchestrator, idle.session_id)
        assert await orchestrator.sweeper.idle_sessions() == []  # not idle long enough yet
        chosen = [session.id for session, _ in await orchestrator.sweeper.idle_sessions(later())]
        assert chosen == [idle.session_id]
        assert await orchestrator.sweeper.sweep(later()) == [idle.session_id]
        assert (await orchestrator.get_session(busy.session_id)).status in ("running", "starting")
        await orchestrator.stop_session(busy.session_id)
    off = with_server(settings, idle_timeout_s=0)
    async with orchestrator_of(off).running() as orchestrator:
        again = await spawn(orchestrator)
        await events_until_idle(orchestrator, again.session_id)
        assert await orchestrator.sweeper.sweep(later()) == []


async def test_max_sandboxes_refuses_a_spawn_past_the_cap_as_busy_and_leaves_nothing(settings: Settings) -> None:
    settings = with_server(settings, max_sandboxes=1)
    async with orchestrator_of(settings).running() as orchestrator:
        first = await spawn(orchestrator)
        before = sandbox_ids(settings)
        with pytest.raises(ConflictError) as refused:
            await spawn(orchestrator)
        message = str(refused.value)
        assert message.startswith("max_sandboxes: busy, all 1 sandboxes are in use (1 by live sessions)")
        assert "raise server.max_sandboxes" in message
        assert sandbox_ids(settings) == before
        assert len(await orchestrator.list_sessions()) == 1
        await orchestrator.stop_session(first.session_id)
        second = await spawn(orchestrator)
        assert second.sandbox_id and second.sandbox_id != first.sandbox_id


async def test_max_sandboxes_lets_exactly_one_of_two_concurrent_spawns_through(settings: Settings) -> None:
    settings = with_server(settings, max_sandboxes=1)
    outcomes: list[str] = []

    async def attempt(orchestrator: Orchestrator) -> None:
        try:
            await spawn(orchestrator)
            outcomes.append("spawned")
        except ConflictError as exc:
            outcomes.append(str(exc).split(",")[0])

    async with orchestrator_of(settings).running() as orchestrator:
        await orchestrator.create_environment(EnvironmentRequest(name=ENVIRONMENT, provider="process", image="host"))
        with anyio.fail_after(TURN_BUDGET_S):
            async with anyio.create_task_group() as group:
                group.start_soon(attempt, orchestrator)
                group.start_soon(attempt, orchestrator)
        assert sorted(outcomes) == ["max_sandboxes: busy", "spawned"]
        assert len(sandbox_ids(settings)) == 1
