"""The HTTP service as a user runs it: the runnable example against it, and the bearer token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.harness import free_port, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]


async def _wait_for_port(port: int, process: anyio.abc.Process) -> None:
    with anyio.fail_after(30):
        while True:
            assert process.returncode is None, "server exited early"
            try:
                async with httpx.AsyncClient() as probe:
                    await probe.get(f"http://127.0.0.1:{port}/", timeout=1.0)
                return
            except httpx.TransportError:
                await anyio.sleep(0.1)


async def _run_example(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """The example against a real HTTP server started with `env`."""
    port = free_port()
    async with await anyio.open_process(
        [sys.executable, "-m", "mcp_sandboxes", "serve", "--transport", "http", "--port", str(port)],
        env=env,
        cwd=str(ROOT),
    ) as server:
        try:
            await _wait_for_port(port, server)
            return await anyio.run_process(
                [sys.executable, "examples/orchestrate.py", f"http://127.0.0.1:{port}/mcp"],
                cwd=str(ROOT),
                env={**os.environ, "PYTHONPATH": str(ROOT), "MCP_SANDBOXES_DATA_DIR": str(tmp_path / "data")},
                check=False,
            )
        finally:
            if server.returncode is None:
                server.terminate()
            await server.wait()


async def test_the_example_orchestrates_a_sub_agent_over_http_with_the_defaults(tmp_path: Path) -> None:
    script = Script(fallback=Reply(text="EXAMPLE-REPLY"))
    with ScriptedModelServer(script) as model:
        env = server_environment(tmp_path / "data", model.url, Path("/nonexistent"))
        # The defaults: no CLI configured; the example's image has none either (the server brings its own).
        env.pop("MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH")
        example = await _run_example(tmp_path, env)
    output = example.stdout.decode()
    assert example.returncode == 0, example.stderr.decode()[-2000:]
    assert "session.status_idle" in output
    assert "EXAMPLE-REPLY" in output and "Now run it" in output  # the transcript of both turns


async def test_the_example_exits_non_zero_saying_why_when_its_agent_cannot_run(tmp_path: Path) -> None:
    with ScriptedModelServer(Script(fallback=Reply(text="never"))) as model:
        env = server_environment(tmp_path / "data", model.url, Path("/nonexistent"))
        env.pop("MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH")
        env.pop("ANTHROPIC_API_KEY")
        example = await _run_example(tmp_path, env)
    assert example.returncode == 1, example.stdout.decode()[-2000:]
    assert "no API key: set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN" in example.stderr.decode()


async def test_the_http_transport_requires_the_bearer_token_when_one_is_set(tmp_path: Path, claude_bin: Path) -> None:
    port = free_port()
    env = server_environment(
        tmp_path / "data", "http://127.0.0.1:9", claude_bin, {"MCP_SANDBOXES_AUTH_TOKEN": "s3cret"}
    )
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    async with await anyio.open_process(
        [sys.executable, "-m", "mcp_sandboxes", "serve", "--transport", "http", "--port", str(port)],
        env=env,
        cwd=str(ROOT),
    ) as server:
        try:
            await _wait_for_port(port, server)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                missing = await http.post("/mcp", json=body)
                wrong = await http.post("/mcp", json=body, headers={"Authorization": "Bearer nope"})
                right = await http.post(
                    "/mcp",
                    json=body,
                    headers={"Authorization": "Bearer s3cret", "Accept": "application/json, text/event-stream"},
                )
        finally:
            if server.returncode is None:
                server.terminate()
            await server.wait()
    assert missing.status_code == 401 and wrong.status_code == 401
    assert right.status_code != 401


def test_serving_on_a_public_address_without_a_token_is_refused() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "mcp_sandboxes", "serve", "--transport", "http", "--host", "0.0.0.0"],
        env={k: v for k, v in os.environ.items() if k != "MCP_SANDBOXES_AUTH_TOKEN"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert completed.returncode == 2
    assert "MCP_SANDBOXES_AUTH_TOKEN" in completed.stderr
