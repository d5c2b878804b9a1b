"""Bad input through a real MCP client: a tool error that names the field and the fix, and
nothing half-created (containers and rows counted before and after)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import McpSession, ToolCallError, mcp_server, owned_containers, server_environment

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]


def count_rows(data_dir: Path, table: str) -> int:
    with sqlite3.connect(data_dir / "mcp-sandboxes.sqlite3") as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


@pytest.fixture
async def mcp(tmp_path: Path, claude_bin: Path) -> AsyncIterator[McpSession]:
    # No model is reached in these tests; the URL points at a closed loopback port.
    env = server_environment(tmp_path / "data", "http://127.0.0.1:9", claude_bin)
    async with mcp_server("stdio", env) as session:
        yield session


async def expect_error(mcp: McpSession, tool: str, arguments: dict[str, object], *fragments: str) -> str:
    with pytest.raises(ToolCallError) as caught:
        await mcp.call(tool, arguments)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


async def test_unknown_session_ids_name_the_field_and_where_to_look(mcp: McpSession) -> None:
    for tool, extra in [
        ("get_session", {}),
        ("read_events", {}),
        ("send_message", {"text": "hi"}),
        ("stop_session", {}),
        ("interrupt_session", {}),
    ]:
        await expect_error(mcp, tool, {"session_id": "ses_nope", **extra}, "session_id", "ses_nope", "list_sessions")


async def test_invalid_environment_values_are_rejected_by_field(mcp: McpSession, tmp_path: Path) -> None:
    await expect_error(mcp, "create_environment", {"name": "x", "memory_mb": 1}, "memory_mb")
    await expect_error(mcp, "create_environment", {"name": "has space"}, "name")
    await expect_error(mcp, "create_environment", {"name": "rel", "workdir": "relative/dir"}, "workdir", "absolute")
    await expect_error(mcp, "create_environment", {"name": "p", "provider": "nosuch"}, "provider", "docker")
    await expect_error(mcp, "create_environment", {"name": "n", "network": "bridge"}, "network")
    await expect_error(mcp, "create_environment", {"name": "e", "env": {"1BAD": "x"}}, "env.1BAD")
    await expect_error(mcp, "create_environment", {"name": "u", "memory": 512}, "memory", "not an argument")
    await expect_error(mcp, "read_events", {"session_id": "s", "types": ["agent.nope"]}, "types", "agent.message")
    await expect_error(mcp, "read_events", {"session_id": "s", "wait_s": 600}, "wait_s")
    assert count_rows(tmp_path / "data", "environments") == 0


async def test_a_missing_image_is_named_with_the_fix_and_nothing_is_created(mcp: McpSession, tmp_path: Path) -> None:
    containers = owned_containers()
    await expect_error(
        mcp,
        "create_environment",
        {"name": "ghost", "image": "mcp-sandboxes/does-not-exist:1"},
        "mcp-sandboxes/does-not-exist:1",
        "build-images",
    )
    assert count_rows(tmp_path / "data", "environments") == 0
    assert owned_containers() == containers


async def test_duplicate_environment_names_conflict(mcp: McpSession) -> None:
    await mcp.call("create_environment", {"name": "dup", "image": BASE_IMAGE})
    await expect_error(mcp, "create_environment", {"name": "dup", "image": BASE_IMAGE}, "already exists")


async def test_a_failing_setup_command_leaves_no_container_and_no_session(mcp: McpSession, tmp_path: Path) -> None:
    # Docker prepares the image once, in the background: the failure is the environment's state.
    made = await mcp.call(
        "create_environment",
        {"name": "badsetup", "image": BASE_IMAGE, "setup_commands": ["true", "echo broken >&2; exit 3"], "wait": True},
    )
    assert made["state"] == "failed", made
    assert "setup_commands[1]" in made["state_detail"] and "code 3" in made["state_detail"], made
    containers = owned_containers()
    message = await expect_error(
        mcp,
        "spawn_agent",
        {"environment": "badsetup", "prompt": "hi"},
        "failed to prepare",
        "setup_commands[1]",
        "broken",
    )
    assert "ses_" not in message
    assert owned_containers() == containers
    assert count_rows(tmp_path / "data", "sessions") == 0
    assert count_rows(tmp_path / "data", "turns") == 0


async def test_spawn_rejects_unknown_backend_environment_and_empty_prompt_without_side_effects(
    mcp: McpSession, tmp_path: Path
) -> None:
    await mcp.call("create_environment", {"name": "ok", "image": BASE_IMAGE})
    containers = owned_containers()
    await expect_error(
        mcp, "spawn_agent", {"environment": "ok", "prompt": "hi", "backend": "nosuch"}, "backend", "claude"
    )
    await expect_error(mcp, "spawn_agent", {"environment": "nope", "prompt": "hi"}, "environment", "list_environments")
    await expect_error(mcp, "spawn_agent", {"environment": "ok", "prompt": "   "}, "prompt")
    await expect_error(mcp, "spawn_agent", {"environment": "ok", "prompt": "hi", "max_turns": 0}, "max_turns")
    assert owned_containers() == containers
    assert count_rows(tmp_path / "data", "sessions") == 0


async def test_an_unreachable_engine_is_named_with_the_fix(tmp_path: Path, claude_bin: Path) -> None:
    env = server_environment(
        tmp_path / "data",
        "http://127.0.0.1:9",
        claude_bin,
        {"MCP_SANDBOXES_PROVIDERS__DOCKER__URL": f"unix://{tmp_path}/no-such-docker.sock"},
    )
    async with mcp_server("stdio", env) as mcp:
        await expect_error(mcp, "create_environment", {"name": "down", "image": BASE_IMAGE}, "provider", "dockerd")
        listed = await mcp.call("list_environments")
        assert listed["environments"] == []
    assert count_rows(tmp_path / "data", "environments") == 0
