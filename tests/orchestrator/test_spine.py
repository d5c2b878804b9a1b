"""The orchestrator's spine in-process, in seconds: spawn -> events -> send -> interrupt -> stop
with real parts (the `process` provider's host processes, a SQLite file under tmp_path, the
`custom` backend running tests/support/scripted_agent.py). No Docker, no mocks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import ConflictError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.orchestrator.runner import INTERRUPT_GRACE_S
from mcp_sandboxes.orchestrator.views import SessionView
from tests.orchestrator.spine import (
    TURN_BUDGET_S,
    answer_field,
    events_until_idle,
    first_event,
    orchestrator_of,
    process_alive,
    sandbox_dir,
    spine_settings,
    texts,
)

ENVIRONMENT = "spine"
CUSTOM = AgentSpec(backend="custom")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return spine_settings(tmp_path)


async def spawn(orchestrator: Orchestrator, prompt: str) -> SessionView:
    if not await orchestrator.db.find_environment(ENVIRONMENT):
        await orchestrator.create_environment(EnvironmentRequest(name=ENVIRONMENT, provider="process", image="host"))
    return await orchestrator.spawn_agent(environment=ENVIRONMENT, agent=CUSTOM, prompt=prompt)


async def running_pid(orchestrator: Orchestrator, session_id: str) -> int:
    """The scripted agent's pid, from its first answer (so its turn is under way)."""
    answer = await first_event(orchestrator, session_id, "agent.message", "| pid ")
    return int(answer_field(texts([answer])[0], "pid"))


async def test_a_spawned_agent_runs_its_first_turn_with_the_prompt_as_one_argument_and_goes_idle(
    settings: Settings,
) -> None:
    prompt = 'hello "quoted" $(touch pwned) ; rm -rf / # {session}'
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator, prompt)
        assert spawned.status in ("starting", "running", "idle") and spawned.sandbox_id
        events = await events_until_idle(orchestrator, spawned.session_id)
        session = await orchestrator.get_session(spawned.session_id)

    assert [event.type for event in events] == [
        "sandbox.provisioned",
        "user.message",
        "session.status_running",
        "agent.tool_use",
        "agent.tool_result",
        "span.model_request_end",
        "agent.message",
        "session.status_idle",
    ]
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    assert events[-1].data["stop_reason"] == {"type": "end_turn"}
    [answer] = texts(events)
    assert answer_field(answer, "echo") == prompt
    assert answer_field(answer, "resumed") == "-"
    # The sandbox's own HOME on the host, never the configured in-sandbox /home/agent.
    assert answer_field(answer, "home") == str(sandbox_dir(settings, spawned.sandbox_id) / "home")
    assert settings.server.sandbox_user == "agent"  # the default, which the process provider ignores
    workspace = sandbox_dir(settings, spawned.sandbox_id) / "workspace"
    assert answer_field(answer, "cwd") == str(workspace)
    assert not (workspace / "pwned").exists()
    assert session.status == "idle" and session.stop_reason == "end_turn"
    assert session.agent_session_id == f"sa-{spawned.session_id}-0"
    assert session.usage.output_tokens == 4
    assert session.last_turn is not None and session.last_turn.final_message == answer
    assert settings.database_path.is_file() and settings.database_path.is_relative_to(settings.server.data_dir)


async def test_a_message_sent_during_a_turn_is_queued_and_becomes_the_next_turn_which_resumes(
    settings: Settings, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator, f"GATE {gate}")
        sid = spawned.session_id
        await running_pid(orchestrator, sid)
        queued, index = await orchestrator.send_message(sid, "second message")
        assert index == 1
        assert queued.status == "running" and queued.queued_turns == 1 and queued.turns == 2
        with anyio.fail_after(TURN_BUDGET_S):
            writer = await anyio.to_thread.run_sync(os.open, gate, os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, b"go\n")
            os.close(writer)
        first = await orchestrator.wait_for_turn(sid, 0, TURN_BUDGET_S)
        second = await orchestrator.wait_for_turn(sid, 1, TURN_BUDGET_S)
        page = await orchestrator.read_events(sid, limit=1000)
        session = await orchestrator.get_session(sid)

    assert first is not None and first.status == "done" and first.final_text == "gate said go"
    assert second is not None and second.status == "done"
    kinds = [event.type for event in page.events]
    assert kinds.count("user.message") == 2 and kinds.count("session.status_idle") == 2
    # The second turn starts after the first has ended, never inside it.
    assert kinds.index("session.status_idle") < len(kinds) - 1 - kinds[::-1].index("user.message")
    said = texts(page.events)
    assert said[1] == "gate said go"
    assert answer_field(said[2], "echo") == "second message"
    assert answer_field(said[2], "resumed") == f"sa-{sid}-0"
    assert session.turns == 2 and session.queued_turns == 0
    assert session.agent_session_id == f"sa-{sid}-1"
    assert session.usage.output_tokens == 8


async def test_interrupting_a_long_turn_stops_it_as_interrupted_the_process_is_gone_and_the_session_goes_on(
    settings: Settings,
) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator, "SLEEP for a minute")
        sid = spawned.session_id
        pid = await running_pid(orchestrator, sid)
        assert process_alive(pid)
        started = time.monotonic()
        await orchestrator.interrupt(sid)
        events = await events_until_idle(orchestrator, sid)
        took = time.monotonic() - started
        assert not process_alive(pid)
        session = await orchestrator.get_session(sid)
        _, index = await orchestrator.send_message(sid, "after the interrupt")
        follow_up = await orchestrator.wait_for_turn(sid, index, TURN_BUDGET_S)
        with pytest.raises(ConflictError, match="nothing to interrupt"):
            await orchestrator.interrupt(sid)

    kinds = [event.type for event in events]
    assert "user.interrupt" in kinds
    assert events[-1].data["stop_reason"] == {"type": "interrupted"}
    assert texts(events)[-1] == "interrupted, leaving"  # it took SIGINT, not a kill
    assert "slept to the end" not in texts(events)
    assert took < INTERRUPT_GRACE_S
    assert session.status == "idle" and session.stop_reason == "interrupted"
    assert session.last_turn is not None and session.last_turn.status == "interrupted"
    assert follow_up is not None and follow_up.status == "done"
    assert follow_up.final_text is not None and answer_field(follow_up.final_text, "resumed") == f"sa-{sid}-0"


async def test_stop_session_ends_the_turn_destroys_the_sandbox_and_keeps_the_events_readable(
    settings: Settings,
) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator, "SLEEP until stopped")
        sid = spawned.session_id
        assert spawned.sandbox_id is not None
        home = sandbox_dir(settings, spawned.sandbox_id)
        pid = await running_pid(orchestrator, sid)
        assert home.is_dir() and process_alive(pid)
        with anyio.fail_after(TURN_BUDGET_S):
            stopped = await orchestrator.stop_session(sid)
        assert not process_alive(pid)
        assert not home.exists()
        provider = await orchestrator.providers.get("process")
        assert spawned.sandbox_id not in await provider.list_owned()
        page = await orchestrator.read_events(sid, limit=1000)
        with pytest.raises(ConflictError, match="stopped"):
            await orchestrator.send_message(sid, "too late")
        again = await orchestrator.stop_session(sid)

    assert stopped.status == "stopped" and stopped.sandbox_id is None
    assert again.status == "stopped"
    kinds = [event.type for event in page.events]
    assert kinds[-3:] == ["user.interrupt", "sandbox.destroyed", "session.status_terminated"] or kinds[-2:] == [
        "sandbox.destroyed",
        "session.status_terminated",
    ], kinds
    assert page.events[0].type == "sandbox.provisioned" and "user.message" in kinds
    assert page.session_status == "stopped"
    destroyed = next(event for event in page.events if event.type == "sandbox.destroyed")
    assert destroyed.data["sandbox_id"] == spawned.sandbox_id


async def test_a_crashing_agent_reports_its_exit_code_and_stderr_tail_and_takes_the_next_message(
    settings: Settings,
) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator, "CRASH the disk is on fire")
        sid = spawned.session_id
        events = await events_until_idle(orchestrator, sid)
        crashed = await orchestrator.get_session(sid)
        _, index = await orchestrator.send_message(sid, "still there?")
        follow_up = await orchestrator.wait_for_turn(sid, index, TURN_BUDGET_S)

    errors = [event.data["error"] for event in events if event.type == "session.error"]
    assert [error["type"] for error in errors] == ["command_failed"]
    message = errors[0]["message"]
    assert "exited with code 3" in message and message.endswith("the disk is on fire")
    assert len(message) < 2200  # the tail of 5000+ characters of stderr, not all of it
    assert events[-1].data["stop_reason"] == {"type": "error"}
    assert crashed.status == "idle" and crashed.stop_reason == "error"
    assert crashed.last_error is not None and "the disk is on fire" in crashed.last_error
    assert crashed.last_turn is not None and crashed.last_turn.status == "failed"
    assert follow_up is not None and follow_up.status == "done"
    # The crash printed no native id, so the next turn starts afresh.
    assert follow_up.final_text is not None and answer_field(follow_up.final_text, "resumed") == "-"


async def test_an_idle_session_survives_a_restart_on_the_same_data_dir_and_resumes(settings: Settings) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator, "remember me")
        await events_until_idle(orchestrator, spawned.session_id)
    assert spawned.sandbox_id is not None
    assert sandbox_dir(settings, spawned.sandbox_id).is_dir()  # a restart keeps sandboxes

    async with orchestrator_of(settings).running() as orchestrator:
        recovered = await orchestrator.get_session(spawned.session_id)
        assert recovered.status == "idle" and recovered.sandbox_id == spawned.sandbox_id
        _, index = await orchestrator.send_message(spawned.session_id, "do you remember?")
        turn = await orchestrator.wait_for_turn(spawned.session_id, index, TURN_BUDGET_S)
        page = await orchestrator.read_events(spawned.session_id, limit=1000)

    assert turn is not None and turn.status == "done" and turn.final_text is not None
    assert answer_field(turn.final_text, "resumed") == f"sa-{spawned.session_id}-0"
    assert answer_field(turn.final_text, "cwd") == str(sandbox_dir(settings, spawned.sandbox_id) / "workspace")
    assert [event.type for event in page.events].count("session.status_idle") == 2


async def test_a_turn_cut_off_by_a_restart_is_closed_as_failed_its_process_is_gone_and_the_session_goes_on(
    settings: Settings,
) -> None:
    async with orchestrator_of(settings).running() as orchestrator:
        spawned = await spawn(orchestrator, "SLEEP through the restart")
        pid = await running_pid(orchestrator, spawned.session_id)
    assert not process_alive(pid)

    async with orchestrator_of(settings).running() as orchestrator:
        events = await events_until_idle(orchestrator, spawned.session_id)
        recovered = await orchestrator.get_session(spawned.session_id)
        _, index = await orchestrator.send_message(spawned.session_id, "after the restart")
        turn = await orchestrator.wait_for_turn(spawned.session_id, index, TURN_BUDGET_S)

    errors = [event.data["error"] for event in events if event.type == "session.error"]
    assert errors[-1]["type"] == "server_restarted"
    assert events[-1].data["stop_reason"] == {"type": "error"}
    assert recovered.status == "idle" and recovered.last_turn is not None
    assert recovered.last_turn.status == "failed"
    assert turn is not None and turn.status == "done"
