"""Crash and removal recovery with real parts: the server as an HTTP subprocess killed with
SIGKILL mid-turn and restarted on the same data directory (real Claude Code in Docker against the
scripted model server), containers removed with `docker rm -f` behind the server's back, and a
command killed by its container's memory limit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from anyio.abc import Process
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_sandboxes.orchestrator.runner import TURN_MARKER_ENV, kill_marked
from mcp_sandboxes.providers.base import SandboxSpec
from mcp_sandboxes.providers.local.docker import DockerProvider
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, ROOT
from tests.e2e.harness import (
    CALL_TIMEOUT_S,
    SERVER_START_TIMEOUT_S,
    McpSession,
    ToolCallError,
    container_exists,
    docker_exec,
    free_port,
    operator_token,
    server_environment,
)
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

# A command nothing else in a container runs, so `ps` can tell whether it is still there.
LONG_COMMAND = "sleep 317"
REMOVED = "was removed outside mcp-sandboxes"


@dataclass
class Served:
    process: Process
    url: str
    environment: dict[str, str]

    @asynccontextmanager
    async def client(self) -> AsyncIterator[McpSession]:
        token = operator_token(self.environment)
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=CALL_TIMEOUT_S) as http,
            Client(streamable_http_client(self.url, http_client=http)) as client,
        ):
            yield McpSession(client, "http", self.url)

    async def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            assert await self.process.wait() == -signal.SIGKILL


@asynccontextmanager
async def http_server(environment: dict[str, str]) -> AsyncIterator[Served]:
    """The real server over streamable HTTP, as a subprocess this test may kill."""
    port = free_port()
    command = [sys.executable, "-m", "mcp_sandboxes", "serve", "--transport", "http", "--host", "127.0.0.1"]
    process = await anyio.open_process(
        [*command, "--port", str(port)],
        env=environment,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=None,
    )
    try:
        with anyio.fail_after(SERVER_START_TIMEOUT_S):
            while True:
                if process.returncode is not None:
                    raise AssertionError(f"HTTP server exited early with {process.returncode}")
                try:
                    async with httpx.AsyncClient() as probe:
                        await probe.get(f"http://127.0.0.1:{port}/", timeout=1.0)
                    break
                except httpx.TransportError:
                    await anyio.sleep(0.1)
        yield Served(process, f"http://127.0.0.1:{port}/mcp", environment)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(15):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


def processes(container_id: str) -> list[str]:
    """`STAT ARGS` of every live (not zombie) process in the container."""
    lines = docker_exec(container_id, "ps", "-eo", "stat=,args=").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("Z")]


def marked_pids(container_id: str, users: tuple[str, ...] = ("0", "agent")) -> set[str]:
    """Processes (not zombies: they have no environment left) carrying any turn marker. Asked as
    root and as the agent user: each can read only its own processes' environments."""
    script = (
        'for d in /proc/[0-9]*; do tr "\\000" "\\n" < $d/environ 2>/dev/null'
        f' | grep -q "^{TURN_MARKER_ENV}=" && echo ${{d#/proc/}}; done; true'
    )
    found: set[str] = set()
    for user in users:
        found.update(
            subprocess.run(
                ["docker", "exec", "-u", user, container_id, "sh", "-c", script],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split()
        )
    return found


async def wait_for_event(mcp: McpSession, session_id: str, kind: str, budget_s: float) -> dict[str, Any]:
    cursor = 0
    with anyio.fail_after(budget_s):
        while True:
            page = await mcp.call("read_events", {"session_id": session_id, "after": cursor, "wait_s": 10})
            for event in page["events"]:
                if event["type"] == kind:
                    found: dict[str, Any] = event
                    return found
            cursor = page["next_cursor"]


async def all_events(mcp: McpSession, session_id: str) -> list[dict[str, Any]]:
    page = await mcp.call("read_events", {"session_id": session_id, "after": 0, "limit": 1000})
    events: list[dict[str, Any]] = page["events"]
    return events


# -- a server killed mid-turn ------------------------------------------------------------------


def crash_script() -> Script:
    script = Script()
    script.on(
        user_contains="LONG-TASK",
        reply=Reply(tool_calls=[ToolCall(name="Bash", arguments={"command": LONG_COMMAND, "timeout": 600000})]),
    )
    # The resumed conversation may carry the cut-off tool call's result next to the new prompt.
    script.on(user_contains="NEXT-TASK", reply=Reply(text="RESUMED-OK"))
    script.on(user_contains="NEXT-TASK", after_tool_result=True, reply=Reply(text="RESUMED-OK"))
    return script


async def test_a_server_killed_mid_turn_leaves_nothing_running_and_the_next_turn_resumes_the_conversation(
    tmp_path: Path, claude_bin: Path
) -> None:
    with ScriptedModelServer(crash_script()) as model:
        env = server_environment(tmp_path / "data", model.url, claude_bin)
        async with http_server(env) as served:
            async with served.client() as mcp:
                await mcp.call(
                    "create_environment",
                    {"name": "crash", "image": BASE_IMAGE, "network": "host", "memory_mb": 2048},
                )
                spawned = await mcp.call(
                    "spawn_agent",
                    {"environment": "crash", "prompt": "LONG-TASK", "permission_mode": "bypassPermissions"},
                )
                session_id = spawned["session"]["session_id"]
                sandbox_id = spawned["session"]["sandbox_id"]
                await wait_for_event(mcp, session_id, "agent.tool_use", 90)
                # The tool starts just after its tool_use event; no event tells when, so poll.
                with anyio.fail_after(30):
                    while True:
                        if any(LONG_COMMAND in p for p in processes(sandbox_id)):
                            break
                        await anyio.sleep(0.2)
                running = await mcp.call("get_session", {"session_id": session_id})
                assert running["status"] == "running"
                # Saved while the turn still runs, not at its end.
                stored_id = running["agent_session_id"]
                assert stored_id
            await served.kill9()

        # The premise: the CLI and its tool outlive the server.
        assert any(LONG_COMMAND in p for p in processes(sandbox_id))
        assert marked_pids(sandbox_id)

        async with http_server(env) as served, served.client() as mcp:
            session = await mcp.call("get_session", {"session_id": session_id})
            assert session["status"] == "idle"
            assert session["agent_session_id"] == stored_id
            assert session["last_turn"]["status"] == "failed"
            assert "the server restarted during this turn" in session["last_turn"]["error"]
            error = session["last_turn"]["error"]
            # The CLI, its Bash tool's shell and the command at least; Claude Code may have another
            # helper shell alive at that moment (seen: a shell-snapshot bash), so the count varies.
            killed = re.search(r"killed (\d+) process\(es\)", error)
            assert killed is not None and int(killed.group(1)) >= 3, error
            assert "claude" in error and LONG_COMMAND in error, error
            restarted = [
                e
                for e in await all_events(mcp, session_id)
                if e["type"] == "session.error" and e["data"]["error"]["type"] == "server_restarted"
            ]
            assert len(restarted) == 1 and restarted[0]["data"]["error"]["message"] == session["last_turn"]["error"]
            # Nothing the cut-off turn started runs any more.
            assert marked_pids(sandbox_id) == set()
            left = processes(sandbox_id)
            assert not any(LONG_COMMAND in p or "claude" in p for p in left), left

            reply = await mcp.call("send_message", {"session_id": session_id, "text": "NEXT-TASK", "wait": True})
            assert reply["completed"] and "RESUMED-OK" in (reply["final_message"] or ""), reply
            # The next turn resumed the cut-off conversation: the model saw the first prompt again.
            history = json.dumps(model.requests_containing("NEXT-TASK")[-1].body["messages"])
            assert "LONG-TASK" in history
            await mcp.call("stop_session", {"session_id": session_id})
            assert not container_exists(sandbox_id)


async def test_kill_marked_works_in_busybox_and_debian_containers() -> None:
    async with DockerProvider() as provider:
        for image in (BUSYBOX_IMAGE, BASE_IMAGE):
            sandbox = await provider.create(SandboxSpec(image=image))
            try:
                marker = {TURN_MARKER_ENV: "ses_probe:0"}
                script = "sleep 311 & sleep 312 & echo forked; wait"
                async with sandbox.stream(["sh", "-c", script], env=marker) as process:
                    with anyio.fail_after(30):
                        async for chunk in process:
                            if b"forked" in chunk.data:
                                break
                        assert await kill_marked(sandbox, "ses_probe", 1) == []
                        assert await kill_marked(sandbox, "ses_prob", 0) == []
                        killed = await kill_marked(sandbox, "ses_probe", 0)
                        assert len(killed) == 3, (image, killed)
                        assert marked_pids(sandbox.id, ("0",)) == set()
                        assert await process.wait() == 137
                    assert await kill_marked(sandbox, "ses_probe", 0) == []
            finally:
                await provider.destroy(sandbox.id)


# -- a container removed behind the server's back, and a memory limit hit ---------------------

# $1 is the prompt. jsonl output: one agent.message per line.
CUSTOM_SCRIPT = r"""
say() { echo "{\"type\":\"agent.message\",\"content\":[{\"type\":\"text\",\"text\":\"$1\"}]}"; }
case "$1" in
  SLEEP*) say sleeping; exec sleep 300;;
  HOG*) x=$(head -c 134217728 /dev/zero | tr '\000' a); say "held ${#x} bytes";;
  KILLSELF*) kill -9 $$;;
  *) say hello;;
esac
"""


def custom_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    config = tmp_path / "config.toml"
    argv = ["sh", "-c", CUSTOM_SCRIPT, "sh", "{prompt}"]
    config.write_text(f'[backends.custom]\nargv = {json.dumps(argv)}\noutput = "jsonl"\n')
    env = server_environment(tmp_path / "data", "http://127.0.0.1:9", Path("/nonexistent"))
    env["MCP_SANDBOXES_CONFIG"] = str(config)
    env.update(extra)
    return env


async def spawn_custom(mcp: McpSession, prompt: str, *, memory_mb: int = 256) -> tuple[str, str]:
    name = f"env-{prompt.lower()[:5]}-{memory_mb}"
    await mcp.call("create_environment", {"name": name, "image": BASE_IMAGE, "memory_mb": memory_mb})
    spawned = await mcp.call("spawn_agent", {"environment": name, "backend": "custom", "prompt": prompt})
    return spawned["session"]["session_id"], spawned["session"]["sandbox_id"]


def docker_rm(container_id: str) -> None:
    subprocess.run(["docker", "rm", "-f", container_id], check=True, capture_output=True, timeout=60)


async def live_sessions(mcp: McpSession) -> int:
    listed = await mcp.call("list_environments")
    return sum(int(e["live_sessions"]) for e in listed["environments"])


async def test_an_idle_sessions_container_removed_behind_the_servers_back_fails_it_within_the_interval(
    tmp_path: Path,
) -> None:
    env = custom_environment(tmp_path, MCP_SANDBOXES_LIVENESS_INTERVAL_S="0.5")
    async with http_server(env) as served, served.client() as mcp:
        session_id, sandbox_id = await spawn_custom(mcp, "HELLO")
        await mcp.events_until_idle(session_id, budget_s=60)
        assert await live_sessions(mcp) == 1
        docker_rm(sandbox_id)
        terminated = await wait_for_event(mcp, session_id, "session.status_terminated", 10)
        assert REMOVED in terminated["data"]["reason"] and sandbox_id in terminated["data"]["reason"]
        session = await mcp.call("get_session", {"session_id": session_id})
        assert session["status"] == "failed"
        assert session["last_error"] == f"its sandbox {sandbox_id} was removed outside mcp-sandboxes"
        assert await live_sessions(mcp) == 0
        with pytest.raises(ToolCallError, match=REMOVED):
            await mcp.call("send_message", {"session_id": session_id, "text": "again"})


async def test_a_message_to_a_session_whose_container_was_removed_fails_it_with_the_cause(tmp_path: Path) -> None:
    # The watcher would take an hour here: send_message itself finds out.
    env = custom_environment(tmp_path, MCP_SANDBOXES_LIVENESS_INTERVAL_S="3600")
    async with http_server(env) as served, served.client() as mcp:
        session_id, sandbox_id = await spawn_custom(mcp, "HELLO")
        await mcp.events_until_idle(session_id, budget_s=60)
        docker_rm(sandbox_id)
        with pytest.raises(ToolCallError, match=REMOVED):
            await mcp.call("send_message", {"session_id": session_id, "text": "again"})
        session = await mcp.call("get_session", {"session_id": session_id})
        assert session["status"] == "failed" and REMOVED in session["last_error"]
        assert session["turns"] == 1, "the refused message is not queued"


async def test_a_container_removed_mid_turn_is_reported_as_removed_not_as_exit_137(tmp_path: Path) -> None:
    env = custom_environment(tmp_path, MCP_SANDBOXES_LIVENESS_INTERVAL_S="3600")
    async with http_server(env) as served, served.client() as mcp:
        session_id, sandbox_id = await spawn_custom(mcp, "SLEEP")
        await wait_for_event(mcp, session_id, "agent.message", 60)
        docker_rm(sandbox_id)
        await wait_for_event(mcp, session_id, "session.status_terminated", 30)
        session = await mcp.call("get_session", {"session_id": session_id})
        assert session["status"] == "failed"
        assert session["last_error"] == f"its sandbox {sandbox_id} was removed outside mcp-sandboxes"
        assert session["last_turn"]["status"] == "failed" and REMOVED in session["last_turn"]["error"]
        errors = [e["data"]["error"] for e in await all_events(mcp, session_id) if e["type"] == "session.error"]
        assert [e["type"] for e in errors] == ["sandbox_removed", "session_failed"], errors
        assert not any("137" in e["message"] for e in errors), errors
        assert await live_sessions(mcp) == 0


async def test_a_command_killed_by_the_memory_limit_is_named_out_of_memory(tmp_path: Path) -> None:
    env = custom_environment(tmp_path, MCP_SANDBOXES_LIVENESS_INTERVAL_S="3600")
    async with http_server(env) as served, served.client() as mcp:
        session_id, sandbox_id = await spawn_custom(mcp, "HOG", memory_mb=32)
        events = await mcp.events_until_idle(session_id, budget_s=60)
        expected = "killed for running out of memory: the environment's memory limit is 32 MiB (memory_mb); raise it"
        oom = [e["data"]["error"] for e in events if e["type"] == "session.error"]
        assert {"type": "out_of_memory", "message": expected} in [
            {"type": e["type"], "message": e["message"]} for e in oom
        ], oom
        session = await mcp.call("get_session", {"session_id": session_id})
        assert session["last_turn"]["error"] == expected
        # The sandbox lives on and a turn that fits takes the next message; a later SIGKILL that
        # the memory limit did not do is not blamed on memory.
        assert session["status"] == "idle" and container_exists(sandbox_id)
        reply = await mcp.call("send_message", {"session_id": session_id, "text": "HELLO", "wait": True})
        assert reply["completed"] and reply["stop_reason"] == "end_turn"
        killed = await mcp.call("send_message", {"session_id": session_id, "text": "KILLSELF", "wait": True})
        assert killed["stop_reason"] == "error" and "memory" not in (killed["session"]["last_error"] or "")
        assert "137" in (killed["session"]["last_error"] or ""), killed["session"]
        await mcp.call("stop_session", {"session_id": session_id})
