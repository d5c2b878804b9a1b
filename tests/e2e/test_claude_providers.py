"""The spine's Claude Code flow on the other local providers: the `mcp` SDK client -> our
server (stdio subprocess) -> Podman / containerd / bubblewrap -> the real Claude Code CLI
(the host binary, mounted read-only) -> the scripted model server on loopback.

The file the agent's Bash tool wrote is read back through the provider's own get_file: the
test opens the provider itself (registry.build_provider, the server's settings) and attaches
to the session's sandbox."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_sandboxes.providers.base import Provider
from mcp_sandboxes.providers.registry import build_provider
from tests.conftest import BASE_IMAGE
from tests.e2e.harness import mcp_server, server_environment
from tests.providers.targets.bubblewrap import ROOTFS, _rootfs_missing
from tests.providers.targets.containerd import probe_containerd
from tests.providers.targets.podman import probe_podman
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e]

STEP_S = 60.0


@dataclass(frozen=True)
class ProviderCase:
    name: str
    # Why the provider cannot run here (None when it can).
    unavailable: Callable[[], str | None]
    # The provider's server settings, given a per-test directory.
    settings: Callable[[Path], dict[str, Any]] = field(default=lambda _: {})


CASES = [
    ProviderCase("podman", lambda: probe_podman(BASE_IMAGE)),
    ProviderCase("containerd", lambda: probe_containerd(BASE_IMAGE)),
    # bubblewrap has no image store: the environment's image name maps to the debootstrap tree.
    ProviderCase(
        "bubblewrap",
        _rootfs_missing,
        lambda tmp: {"state_dir": str(tmp / "bwrap-state"), "images": {BASE_IMAGE: str(ROOTFS)}},
    ),
]


def two_turn_script() -> Script:
    script = Script()
    script.on(
        user_contains="FIRST-TASK",
        reply=Reply(
            tool_calls=[ToolCall(name="Bash", arguments={"command": "echo spine-proof > proof.txt && cat proof.txt"})]
        ),
    )
    script.on(tool_result_contains="spine-proof", reply=Reply(text="DONE-1: wrote proof.txt"))
    script.on(user_contains="SECOND-TASK", reply=Reply(text="DONE-2: still here"))
    return script


@pytest.fixture
def model_server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(two_turn_script()) as server:
        yield server


def write_config(path: Path, provider: str, settings: dict[str, Any]) -> Path:
    """A --config TOML with the provider's table (JSON strings are valid TOML strings)."""
    lines = [f"[providers.{provider}]"]
    tables = {key: value for key, value in settings.items() if isinstance(value, dict)}
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items() if key not in tables]
    for key, table in tables.items():
        lines.append(f"[providers.{provider}.{key}]")
        lines += [f"{json.dumps(name)} = {json.dumps(value)}" for name, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@asynccontextmanager
async def opened(name: str, settings: dict[str, Any]) -> AsyncIterator[Provider]:
    provider = build_provider(name, settings)
    try:
        yield provider
    finally:
        await provider.aclose()


def _texts(events: list[dict[str, Any]], kind: str) -> list[str]:
    return ["".join(block["text"] for block in e["data"]["content"]) for e in events if e["type"] == kind]


@pytest.mark.parametrize("network", ["host", "model"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_spawn_write_a_file_resume_and_stop(
    case: ProviderCase, network: str, tmp_path: Path, model_server: ScriptedModelServer, claude_bin: Path
) -> None:
    """network "host": the CLI calls the scripted model server on 127.0.0.1 directly; "model": it
    has no route out and reaches it through the egress proxy's socket mounted into the sandbox."""
    reason = case.unavailable()
    assert reason is None, f"{case.name} cannot run here: {reason}"
    settings = case.settings(tmp_path)
    config = write_config(tmp_path / "config.toml", case.name, settings)
    env = server_environment(tmp_path / "data", model_server.url, claude_bin, {"MCP_SANDBOXES_CONFIG": str(config)})
    async with mcp_server("stdio", env) as mcp, opened(case.name, settings) as provider:
        environment = await mcp.call(
            "create_environment",
            {
                "name": f"spine-{case.name}",
                "provider": case.name,
                "image": BASE_IMAGE,
                "network": network,
                "memory_mb": 2048,
            },
        )
        assert environment["state"] == "ready" and environment["network"] == network

        spawned = await mcp.call(
            "spawn_agent",
            {
                "environment": environment["name"],
                "prompt": "FIRST-TASK: write proof.txt",
                "permission_mode": "bypassPermissions",
            },
        )
        session_id = spawned["session"]["session_id"]
        sandbox_id = spawned["session"]["sandbox_id"]

        events = await mcp.events_until_idle(session_id)
        kinds = [e["type"] for e in events]
        assert kinds[0] == "sandbox.provisioned"
        tool_uses = [e for e in events if e["type"] == "agent.tool_use"]
        assert tool_uses and tool_uses[0]["data"]["name"] == "Bash"
        results = [e for e in events if e["type"] == "agent.tool_result"]
        assert results and "spine-proof" in results[0]["data"]["content"]
        assert any("DONE-1" in text for text in _texts(events, "agent.message"))
        assert events[-1]["data"]["stop_reason"]["type"] == "end_turn"

        # The real tool ran in the real sandbox: read its file through the provider itself.
        with anyio.fail_after(STEP_S):
            sandbox = await provider.attach(sandbox_id)
            assert sandbox is not None, f"{case.name} has no sandbox {sandbox_id}"
            assert sandbox.provider == case.name
            assert await sandbox.get_file("/workspace/proof.txt") == b"spine-proof\n"

        second = await mcp.call(
            "send_message", {"session_id": session_id, "text": "SECOND-TASK: are you there?", "wait": True}
        )
        assert second["completed"] is True
        assert "DONE-2" in (second["final_message"] or "")
        assert second["session"]["status"] == "idle"
        # The second turn resumed the conversation: its model request carried the first turn.
        second_requests = model_server.requests_containing("SECOND-TASK")
        assert second_requests, "the scripted server never saw the second turn"
        history = str(second_requests[-1].body["messages"])
        assert "FIRST-TASK" in history and "spine-proof" in history

        stopped = await mcp.call("stop_session", {"session_id": session_id})
        assert stopped["status"] == "stopped"
        with anyio.fail_after(STEP_S):
            assert await provider.attach(sandbox_id) is None
            assert sandbox_id not in await provider.list_owned()
