"""Spine benchmark (not a test): the server's overhead on a Claude Code turn in Docker.

Measures, side by side on the same machine and the same scripted model server:
  - baseline: the same Claude Code CLI run by a plain `docker exec` in an already running container;
  - ours: spawn_agent (over stdio) -> first agent event, and -> idle (read_events long-poll);
  - read_events round-trip latency p50/p99 over stdio and over streamable HTTP.
Prints a markdown table; `--write` replaces the spine section of docs/benchmarks.md.

Run: .venv/bin/python -m bench.bench_spine [--runs N] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import anyio

from tests.conftest import BASE_IMAGE, CLAUDE_BIN, ROOT
from tests.e2e.harness import mcp_server, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer

SECTION = "spine"


def _script() -> Script:
    script = Script()
    script.on(user_contains="BENCH", reply=Reply(text="bench reply"))
    return script


def baseline_docker_exec(model_url: str, runs: int) -> tuple[list[float], list[float]]:
    """`docker exec claude -p` in a running container: time to the first assistant line and to exit."""
    name = f"mcp-sandboxes-bench-{int(time.time())}"
    subprocess.run(
        [
            "docker", "run", "-d", "--name", name, "--network", "host", "--user", "agent",
            "-v", f"{CLAUDE_BIN}:/usr/local/bin/claude:ro",
            "--label", "io.mcp-sandboxes.bench=1", BASE_IMAGE, "sleep", "infinity",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    firsts: list[float] = []
    totals: list[float] = []
    try:
        for _ in range(runs):
            started = time.perf_counter()
            process = subprocess.Popen(
                [
                    "docker", "exec", "-i", "-e", f"ANTHROPIC_BASE_URL={model_url}", "-e", "ANTHROPIC_API_KEY=bench",
                    "-e", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "-e", "HOME=/home/agent", "-w", "/workspace",
                    name, "claude", "-p", "--output-format", "stream-json", "--verbose",
                ],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            assert process.stdin and process.stdout
            process.stdin.write(b"BENCH say hi\n")
            process.stdin.close()
            first = None
            for line in process.stdout:
                if first is None and b'"type":"assistant"' in line:
                    first = time.perf_counter() - started
            process.wait(timeout=120)
            totals.append(time.perf_counter() - started)
            firsts.append(first if first is not None else totals[-1])
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    return firsts, totals


def baseline_docker_run(model_url: str, runs: int) -> tuple[list[float], list[float]]:
    """`docker run --rm ... claude -p`: a fresh container per run, as ours makes one per session."""
    firsts: list[float] = []
    totals: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        process = subprocess.Popen(
            [
                "docker", "run", "--rm", "-i", "--network", "host", "--user", "agent",
                "-v", f"{CLAUDE_BIN}:/usr/local/bin/claude:ro", "-e", f"ANTHROPIC_BASE_URL={model_url}",
                "-e", "ANTHROPIC_API_KEY=bench", "-e", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
                "-e", "HOME=/home/agent", "-w", "/workspace", BASE_IMAGE,
                "claude", "-p", "--output-format", "stream-json", "--verbose",
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert process.stdin and process.stdout
        process.stdin.write(b"BENCH say hi\n")
        process.stdin.close()
        first = None
        for line in process.stdout:
            if first is None and b'"type":"assistant"' in line:
                first = time.perf_counter() - started
        process.wait(timeout=120)
        totals.append(time.perf_counter() - started)
        firsts.append(first if first is not None else totals[-1])
    return firsts, totals


async def ours_spawn(model_url: str, runs: int, data_dir: Path) -> tuple[list[float], list[float]]:
    env = server_environment(data_dir, model_url, CLAUDE_BIN)
    firsts: list[float] = []
    totals: list[float] = []
    async with mcp_server("stdio", env) as mcp:
        await mcp.call("create_environment", {"name": "bench", "image": BASE_IMAGE, "network": "host"})
        for _ in range(runs):
            started = time.perf_counter()
            spawned = await mcp.call("spawn_agent", {"environment": "bench", "prompt": "BENCH say hi"})
            session_id = spawned["session"]["session_id"]
            cursor, first = 0, None
            while True:
                page = await mcp.call("read_events", {"session_id": session_id, "after": cursor, "wait_s": 30})
                cursor = page["next_cursor"]
                kinds = [e["type"] for e in page["events"]]
                if first is None and any(k.startswith("agent.") for k in kinds):
                    first = time.perf_counter() - started
                if "session.status_idle" in kinds:
                    break
            totals.append(time.perf_counter() - started)
            firsts.append(first if first is not None else totals[-1])
            await mcp.call("stop_session", {"session_id": session_id})
    return firsts, totals


async def read_events_latency(model_url: str, transport: str, calls: int, data_dir: Path) -> list[float]:
    env = server_environment(data_dir, model_url, CLAUDE_BIN)
    samples: list[float] = []
    async with mcp_server(transport, env) as mcp:  # type: ignore[arg-type]
        await mcp.call("create_environment", {"name": "lat", "image": BASE_IMAGE, "network": "host"})
        spawned = await mcp.call("spawn_agent", {"environment": "lat", "prompt": "BENCH hi", "wait": True})
        session_id = spawned["session"]["session_id"]
        for _ in range(calls):
            started = time.perf_counter()
            await mcp.call("read_events", {"session_id": session_id, "after": 0, "limit": 50})
            samples.append(time.perf_counter() - started)
        await mcp.call("stop_session", {"session_id": session_id})
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with ScriptedModelServer(_script()) as server, tempfile.TemporaryDirectory() as tmp:
        base_first, base_total = await anyio.to_thread.run_sync(baseline_docker_exec, server.url, args.runs)
        run_first, run_total = await anyio.to_thread.run_sync(baseline_docker_run, server.url, args.runs)
        our_first, our_total = await ours_spawn(server.url, args.runs, Path(tmp) / "spawn")
        stdio = await read_events_latency(server.url, "stdio", args.calls, Path(tmp) / "stdio")
        http = await read_events_latency(server.url, "http", args.calls, Path(tmp) / "http")
    med = statistics.median
    rows = [
        "| measure | A: `docker exec claude` (running container) | B: `docker run --rm claude` |"
        " mcp-sandboxes spawn_agent (stdio) | ours / A | ours / B |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| to first agent event (median of {args.runs}) | {ms(med(base_first))} | {ms(med(run_first))}"
        f" | {ms(med(our_first))} | {med(our_first) / med(base_first):.2f}x | {med(our_first) / med(run_first):.2f}x |",
        f"| to idle / exit (median of {args.runs}) | {ms(med(base_total))} | {ms(med(run_total))}"
        f" | {ms(med(our_total))} | {med(our_total) / med(base_total):.2f}x | {med(our_total) / med(run_total):.2f}x |",
        "",
        "Ours includes creating the container (one per session), setup, and the MCP round trips;"
        " the baseline's container already runs.",
        "",
        f"| read_events round trip ({args.calls} calls, 50 events each) | p50 | p99 |",
        "| --- | --- | --- |",
        f"| stdio | {pct(stdio, 0.5) * 1000:.1f} ms | {pct(stdio, 0.99) * 1000:.1f} ms |",
        f"| streamable HTTP | {pct(http, 0.5) * 1000:.1f} ms | {pct(http, 0.99) * 1000:.1f} ms |",
    ]
    table = "\n".join(rows)
    print(table)
    if args.write:
        from bench.report import write_section

        write_section(ROOT / "docs" / "benchmarks.md", SECTION, "Spine: Claude Code in Docker", table)


if __name__ == "__main__":
    anyio.run(main)
