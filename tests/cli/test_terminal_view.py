"""The terminal commands as a user runs them (`python -m mcp_sandboxes ...`, a subprocess) against
a running server with real sessions (tests/web/live_server.py: the process provider and the
scripted custom agent), and against the data directory read-only with no server."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import anyio
import anyio.abc

from tests.conftest import ROOT
from tests.web.live_server import TURN_BUDGET_S, LiveServer, live_server

CLI_TIMEOUT_S = 60.0


async def cli(server: LiveServer, *args: str, url: bool = True, check: bool = True) -> tuple[int, str, str]:
    env = {**os.environ, **server.environment, "COLUMNS": "250", "NO_COLOR": "1"}
    env.pop("MCP_SANDBOXES_URL", None)
    env.pop("MCP_SANDBOXES_AUTH_TOKEN", None)
    argv = [sys.executable, "-m", "mcp_sandboxes", *args]
    if url:
        argv += ["--url", server.mcp_url]
    with anyio.fail_after(CLI_TIMEOUT_S):
        done = await anyio.run_process(argv, env=env, cwd=str(ROOT), check=False)
    out, err = done.stdout.decode(), done.stderr.decode()
    if check:
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{err}"
    return done.returncode, out, err


async def test_sessions_logs_transcript_envs_and_stop_against_a_running_server(tmp_path: Path) -> None:
    async with live_server(tmp_path) as server:
        first = await server.spawn("first job")
        await server.wait_for_event(first, "echo first job")
        second = await server.spawn("SLEEP second job")
        await server.wait_for_event(second, "echo SLEEP second job")

        _, table, _ = await cli(server, "sessions")
        assert first in table and second in table
        lines = {line for line in table.splitlines() if first in line or second in line}
        assert any(first in line and "idle" in line and "custom" in line and "web" in line for line in lines)
        assert any(second in line and "running" in line for line in lines)

        _, logs, _ = await cli(server, "logs", first)
        kinds = [match[1] for match in re.finditer(r"^\d\d:\d\d:\d\d #\d+ +(\S+)", logs, re.MULTILINE)]
        assert len(kinds) == len(logs.splitlines())
        assert kinds[0] == "sandbox.provisioned" and kinds[-1] == "session.status_idle"
        assert any("agent.message" in line and "echo first job" in line for line in logs.splitlines())

        _, transcript, _ = await cli(server, "transcript", first)
        assert transcript.startswith(f"# Session {first}") and "## User\n\nfirst job" in transcript

        _, envs, _ = await cli(server, "envs")
        assert "web" in envs and "process" in envs and "host" in envs

        # logs -f follows the running session until it is stopped, then ends by itself.
        env = {**os.environ, **server.environment, "COLUMNS": "250", "NO_COLOR": "1"}
        follow = await anyio.open_process(
            [sys.executable, "-m", "mcp_sandboxes", "logs", "-f", second, "--url", server.mcp_url],
            env=env,
            cwd=str(ROOT),
        )
        async with follow:
            assert follow.stdout is not None
            seen = b""
            with anyio.fail_after(TURN_BUDGET_S):
                while b"echo SLEEP second job" not in seen:
                    seen += await follow.stdout.receive()
            _, stopped, _ = await cli(server, "stop", second)
            assert f"session {second}: stopped" in stopped
            with anyio.fail_after(TURN_BUDGET_S):
                async for chunk in follow.stdout:
                    seen += chunk
                await follow.wait()
        followed = seen.decode()
        assert follow.returncode == 0
        assert "session.status_terminated" in followed and f"session {second} is stopped" in followed
        assert (await server.mcp.call("get_session", {"session_id": second}))["status"] == "stopped"

        # The same data straight from the data directory, read-only, while the server runs.
        _, local, _ = await cli(server, "sessions", url=False)
        assert first in local and second in local and str(tmp_path / "data") in local.replace("\n", "")
        _, local_transcript, _ = await cli(server, "transcript", first, url=False)
        assert local_transcript == transcript
        code, _, refused = await cli(server, "stop", first, url=False, check=False)
        assert code == 1 and "--url" in refused

        _, shell, _ = await cli(server, "shell", first, check=False)
        assert "process provider runs on this host" in shell


async def test_a_wrong_token_and_an_unknown_session_are_named(tmp_path: Path) -> None:
    async with live_server(tmp_path) as server:
        server.environment["MCP_SANDBOXES_AUTH_TOKEN"] = "not-the-operator-token"
        env = {**os.environ, **server.environment}
        with anyio.fail_after(CLI_TIMEOUT_S):
            done = await anyio.run_process(
                [sys.executable, "-m", "mcp_sandboxes", "sessions", "--url", server.mcp_url],
                env=env,
                cwd=str(ROOT),
                check=False,
            )
        assert done.returncode == 1 and "refused the operator token" in done.stderr.decode()
        del server.environment["MCP_SANDBOXES_AUTH_TOKEN"]
        code, _, err = await cli(server, "logs", "ses_doesnotexist", check=False)
        assert code == 1 and "ses_doesnotexist" in err
