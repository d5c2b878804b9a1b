"""The server as a process, the way a client or a person starts it: a clean exit when stdin
closes, a "listening on" line, and a busy port reported as an error, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

INITIALIZE = (
    '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    '"capabilities":{},"clientInfo":{"name":"t","version":"0"}}}\n'
)


def environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_SANDBOXES_")}
    return {**env, "MCP_SANDBOXES_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}


def serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcp_sandboxes", "serve", *args]


def test_closing_stdin_ends_a_stdio_server_cleanly(tmp_path: Path) -> None:
    done = subprocess.run(
        serve("--transport", "stdio"),
        input=INITIALIZE,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(tmp_path),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert '"serverInfo"' in done.stdout and '"mcp-sandboxes"' in done.stdout
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr


def test_a_busy_port_is_an_error_that_names_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            serve("--transport", "http", "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=60,
            env=environment(tmp_path),
            cwd=ROOT,
        )
    assert done.returncode == 1
    assert f"--port: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_http_server_says_where_it_listens(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        serve("--transport", "http", "--port", str(port)),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=environment(tmp_path),
        cwd=ROOT,
    )
    try:
        assert process.stderr is not None
        lines = []
        for _ in range(20):  # bounded: the line comes among the first few
            line = process.stderr.readline()
            lines.append(line)
            if "listening on" in line or not line:
                break
        assert f"mcp-sandboxes: listening on http://127.0.0.1:{port}/mcp\n" in lines, lines
    finally:
        process.terminate()
        process.wait(timeout=30)
