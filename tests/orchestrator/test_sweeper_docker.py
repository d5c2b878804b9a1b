"""The sweeper, max_sandboxes and warm pools on the real Docker engine: an orchestrator in-process
(real SQLite under tmp_path) spawning the `custom` backend (a sh one-liner printing one event) in
containers of the project's base image. Containers are looked at with the docker CLI."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.config import Settings, load_settings
from mcp_sandboxes.errors import ConflictError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.orchestrator.sandboxes import INSTANCE_LABEL, POOL_LABEL
from tests.conftest import BASE_IMAGE
from tests.orchestrator.spine import events_until_idle

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

CUSTOM = AgentSpec(backend="custom")
ANSWER = '{"type":"agent.message","content":[{"type":"text","text":"done"}]}'
BUDGET_S = 60.0
POLL_S = 0.1


def docker_settings(tmp_path: Path, **server: str) -> Settings:
    argv = ["sh", "-c", f"echo '{ANSWER}'", "sh", "{prompt}"]
    environ = {
        "MCP_SANDBOXES_DATA_DIR": str(tmp_path / "data"),
        "MCP_SANDBOXES_BACKENDS__CUSTOM__ARGV": json.dumps(argv),
        "MCP_SANDBOXES_BACKENDS__CUSTOM__RESUME_ARGV": json.dumps(argv),
        "MCP_SANDBOXES_SUBAGENTS__MAX_DEPTH": "0",
        **{f"MCP_SANDBOXES_SERVER__{key.upper()}": value for key, value in server.items()},
    }
    return load_settings(environ=environ)


def request(name: str, warm_pool: int = 0) -> EnvironmentRequest:
    return EnvironmentRequest(name=name, provider="docker", image=BASE_IMAGE, network="none", warm_pool=warm_pool)


async def docker(*args: str) -> str:
    result = await anyio.run_process(["docker", *args])
    return result.stdout.decode()


async def containers(label: str) -> set[str]:
    """Full ids of the containers (running or not) carrying `label` (KEY or KEY=VALUE)."""
    return set((await docker("ps", "-aq", "--no-trunc", "--filter", f"label={label}")).split())


async def start_foreign(labels: dict[str, str]) -> str:
    """A container made outside this server, with our owner label and `labels`."""
    flags = [f"--label={key}={value}" for key, value in {"io.mcp-sandboxes.managed": "true", **labels}.items()]
    return (await docker("run", "-d", "--network=none", *flags, BASE_IMAGE, "sleep", "600")).strip()


def instance_id(settings: Settings) -> str:
    return (settings.server.data_dir / "instance-id").read_text().strip()


async def test_start_up_removes_our_instances_container_without_a_row_and_leaves_another_instances(
    tmp_path: Path,
) -> None:
    settings = docker_settings(tmp_path)
    async with Orchestrator(settings, environ={}).running() as orchestrator:
        await orchestrator.create_environment(request("reap"))
    ours = await start_foreign({INSTANCE_LABEL: instance_id(settings)})
    theirs = await start_foreign({INSTANCE_LABEL: "another-server-01"})
    try:
        async with Orchestrator(settings, environ={}).running():
            remaining = await containers("io.mcp-sandboxes.managed")
        assert ours not in remaining
        assert theirs in remaining
    finally:
        await docker("rm", "-f", ours, theirs)


async def test_the_idle_sweeper_removes_the_container_and_get_session_keeps_the_history(tmp_path: Path) -> None:
    settings = docker_settings(tmp_path, idle_timeout_s="1", sweep_interval_s="0.2")
    async with Orchestrator(settings, environ={}).running() as orchestrator:
        await orchestrator.create_environment(request("idle"))
        spawned = await orchestrator.spawn_agent(environment="idle", agent=CUSTOM, prompt="hello")
        assert spawned.sandbox_id in await containers(f"{INSTANCE_LABEL}={instance_id(settings)}")
        await events_until_idle(orchestrator, spawned.session_id)
        with anyio.fail_after(BUDGET_S):
            while True:
                session = await orchestrator.get_session(spawned.session_id)
                if session.status == "stopped":
                    break
                await anyio.sleep(POLL_S)
        assert spawned.sandbox_id not in await containers("io.mcp-sandboxes.managed")
        assert session.stop_reason is not None and session.stop_reason.startswith("idle for ")
        assert session.last_turn is not None and session.last_turn.final_message == "done"
        page = await orchestrator.read_events(spawned.session_id)
        assert "agent.message" in [event.type for event in page.events]
        assert page.events[-1].type == "session.status_terminated"


async def test_a_warm_pool_of_two_gives_a_spawn_one_of_its_containers_and_refills(tmp_path: Path) -> None:
    settings = docker_settings(tmp_path)
    async with Orchestrator(settings, environ={}).running() as orchestrator:
        created = await orchestrator.create_environment(request("warm", warm_pool=2))
        try:
            with anyio.fail_after(BUDGET_S):
                while True:
                    pooled = await containers(f"{POOL_LABEL}={created.id}")
                    if len(pooled) >= 2:
                        break
                    await anyio.sleep(POLL_S)
            assert len(pooled) == 2
            spawned = await orchestrator.spawn_agent(environment="warm", agent=CUSTOM, prompt="hello")
            assert spawned.sandbox_id in pooled
            events = await events_until_idle(orchestrator, spawned.session_id)
            assert [event.data for event in events if event.type == "agent.message"]
            with anyio.fail_after(BUDGET_S):
                while True:
                    view = next(v for v in await orchestrator.list_environments() if v.name == "warm")
                    if view.warm_ready == 2:
                        break
                    await anyio.sleep(POLL_S)
            now = await containers(f"{POOL_LABEL}={created.id}")
            assert len(now) == 3 and spawned.sandbox_id in now
        finally:
            await orchestrator.delete_environment("warm", force=True)
        assert await containers(f"{POOL_LABEL}={created.id}") == set()


async def test_max_sandboxes_one_refuses_a_second_spawn_as_busy_and_leaves_no_container(tmp_path: Path) -> None:
    settings = docker_settings(tmp_path, max_sandboxes="1")
    async with Orchestrator(settings, environ={}).running() as orchestrator:
        await orchestrator.create_environment(request("capped"))
        first = await orchestrator.spawn_agent(environment="capped", agent=CUSTOM, prompt="hello")
        ours = f"{INSTANCE_LABEL}={instance_id(settings)}"
        before = await containers(ours)
        assert before == {first.sandbox_id}
        with pytest.raises(ConflictError, match=r"^max_sandboxes: busy, all 1 sandboxes are in use"):
            await orchestrator.spawn_agent(environment="capped", agent=CUSTOM, prompt="again")
        assert await containers(ours) == before
        await orchestrator.stop_session(first.session_id)
        assert await containers(ours) == set()
