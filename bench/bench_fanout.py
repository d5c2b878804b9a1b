"""Fan-out benchmark (not a test): does the server run N children side by side?

Through the real MCP server in-process (the SDK's in-memory client on `build_server`), one
fan-out spawns N children without waiting, then calls wait_for(mode="all") until every one is
idle. Its time, from the first spawn_agent call to the wait_for that settles them all, is set
against the slowest child alone, run the same way (one spawn, one wait_for): the ideal ratio is
1 (the fan-out costs its slowest child, "max, not sum"); the spawns' own time and contention
show as the excess.

Rows:
  - process provider + custom backend running tests/support/scripted_agent.py, so it measures
    the server and not Docker. "model wait" children sleep before the agent runs (child i of N
    waits SLOWEST_S * (i+1)/N, like a model call); "no wait" children run at once (pure overhead:
    process start-up and the server's bookkeeping, which 2 cores serialise);
  - docker provider + the real Claude Code (pinned) against the scripted model, whose replies
    take the same spread of delays.
Each case runs in its own Python process, so its RSS (VmRSS before the fan-out, after all are
idle, and the peak VmHWM) is the server's (+ the in-memory client's) alone.

Run: .venv/bin/python -m bench.bench_fanout [--runs N] [--no-docker] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp_types import CallToolResult, TextContent

from mcp_sandboxes.config import load_settings
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.server.app import build_server
from tests.conftest import BASE_IMAGE, CLAUDE_BIN, ROOT
from tests.orchestrator.spine import SCRIPTED_AGENT
from tests.support.model_server import Reply, Script, ScriptedModelServer

SECTION = "fanout"
SLOWEST_S = 2.0
CASE_BUDGET_S = 300.0
# The child's delay is the prompt's first word; the scripted agent then runs as usual.
DELAYED_AGENT = [
    "/bin/sh",
    "-c",
    f'/bin/sleep "${{2%% *}}"; exec "$0" {SCRIPTED_AGENT} --session "$1" "$2"',
    sys.executable,
    "{session}",
    "{prompt}",
]


def memory_kib() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process, in KiB."""
    fields: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def delays(children: int, model_wait: bool) -> list[float]:
    return [SLOWEST_S * (index + 1) / children if model_wait else 0.0 for index in range(children)]


class Tools:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result: CallToolResult = await self.client.call_tool(tool, arguments)
        if result.is_error:
            raise RuntimeError(" ".join(b.text for b in result.content if isinstance(b, TextContent)))
        assert isinstance(result.structured_content, dict)
        return result.structured_content


@asynccontextmanager
async def in_process(environ: dict[str, str], agent_environ: dict[str, str]) -> AsyncIterator[Tools]:
    async with Orchestrator(load_settings(environ=environ), environ=agent_environ).running() as orchestrator:
        server, _ = build_server(orchestrator)
        async with Client(server) as client:
            yield Tools(client)


async def fan_out(tools: Tools, environment: str, backend: str, prompts: list[str]) -> tuple[float, float]:
    """Spawn every prompt, wait_for all: (seconds to all idle, seconds spent spawning). Stops them."""
    started = time.perf_counter()
    ids = []
    for prompt in prompts:
        spawned = await tools.call("spawn_agent", environment=environment, backend=backend, prompt=prompt)
        ids.append(spawned["session"]["session_id"])
    spawning = time.perf_counter() - started
    while True:
        waited = await tools.call("wait_for", session_ids=ids, mode="all", timeout_s=90)
        if not waited["timed_out"]:
            break
    elapsed = time.perf_counter() - started
    idle = [s for s in waited["sessions"] if s["status"] == "idle" and s["last_turn"]["stop_reason"] == "end_turn"]
    assert len(idle) == len(ids), f"not every child ended its turn: {waited['sessions']}"
    for session_id in ids:
        await tools.call("stop_session", session_id=session_id)
    return elapsed, spawning


async def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this process: `children` children (or 1 for the baseline), `runs` times."""
    data = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    waits = delays(case["of"], case["model_wait"])
    # The baseline is the fan-out's slowest child alone.
    chosen = waits if case["children"] > 1 else [max(waits)]
    environ = {"MCP_SANDBOXES_DATA_DIR": str(data), "MCP_SANDBOXES_SUBAGENTS__MAX_DEPTH": "0"}
    samples: list[tuple[float, float]] = []
    memory: dict[str, int] = {}
    with anyio.fail_after(CASE_BUDGET_S):
        if case["provider"] == "process":
            environ |= {
                "MCP_SANDBOXES_BACKENDS__CUSTOM__ARGV": json.dumps(DELAYED_AGENT),
                "MCP_SANDBOXES_BACKENDS__CUSTOM__RESUME_ARGV": json.dumps(DELAYED_AGENT),
            }
            prompts = [f"{wait:g} child {index}" for index, wait in enumerate(chosen)]
            async with in_process(environ, {}) as tools:
                await tools.call("create_environment", name="fan", provider="process", image="host")
                memory["before"] = memory_kib()["VmRSS"]
                for _ in range(case["runs"]):
                    samples.append(await fan_out(tools, "fan", "custom", prompts))
                memory["after"] = memory_kib()["VmRSS"]
        else:
            script = Script()
            for index, wait in enumerate(chosen):
                # times=None: each run asks the same prompts again.
                reply = Reply(text=f"child {index} done", delay_s=wait)
                script.on(user_contains=f"CHILD-{index} ", reply=reply, times=None)
            prompts = [f"CHILD-{index} answer" for index in range(len(chosen))]
            environ["MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH"] = str(CLAUDE_BIN)
            async with ScriptedModelServer(script) as model:
                agent_environ = {"ANTHROPIC_BASE_URL": model.url, "ANTHROPIC_API_KEY": "sk-bench-not-a-key"}
                async with in_process(environ, agent_environ) as tools:
                    await tools.call("create_environment", name="fan", image=BASE_IMAGE, network="host")
                    memory["before"] = memory_kib()["VmRSS"]
                    for _ in range(case["runs"]):
                        samples.append(await fan_out(tools, "fan", "claude", prompts))
                    memory["after"] = memory_kib()["VmRSS"]
    memory["peak"] = max(memory_kib()["VmHWM"], memory["after"])
    return {
        "elapsed": statistics.median(s[0] for s in samples),
        "elapsed_all": [round(s[0], 3) for s in samples],
        "spawning": statistics.median(s[1] for s in samples),
        "memory": memory,
    }


def in_subprocess(case: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_fanout", "--case", json.dumps(case)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=CASE_BUDGET_S + 60,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def table(rows: list[tuple[str, int, dict[str, Any], dict[str, Any]]]) -> str:
    lines = [
        "| children | N | fan-out to all idle (s) | of which spawning (s) | slowest child alone (s) | ratio"
        " | RSS before -> after (MiB) | peak RSS (MiB) | baseline peak (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, n, fan, alone in rows:
        lines.append(
            f"| {label} | {n} | {fan['elapsed']:.2f} | {fan['spawning']:.2f} | {alone['elapsed']:.2f}"
            f" | {fan['elapsed'] / alone['elapsed']:.2f}x | {mib(fan['memory']['before'])} ->"
            f" {mib(fan['memory']['after'])} | {mib(fan['memory']['peak'])} | {mib(alone['memory']['peak'])} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="fan-outs per case (the median is shown)")
    parser.add_argument("--no-docker", action="store_true", help="skip the Docker + Claude Code row")
    parser.add_argument("--write", action="store_true", help="replace the fan-out section of docs/benchmarks.md")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        sys.stdout.write(json.dumps(anyio.run(run_case, json.loads(args.case))) + "\n")
        return 0

    plan: list[tuple[str, str, bool, int, int]] = [
        ("process, model wait", "process", True, 10, args.runs),
        ("process, model wait", "process", True, 30, args.runs),
        ("process, no wait", "process", False, 10, args.runs),
        ("process, no wait", "process", False, 30, args.runs),
    ]
    if not args.no_docker:
        plan.append(("docker + Claude Code, model wait", "docker", True, 10, 1))
    rows = []
    for label, provider, model_wait, n, runs in plan:
        base = {"provider": provider, "model_wait": model_wait, "of": n, "runs": runs}
        fan = in_subprocess({**base, "children": n})
        alone = in_subprocess({**base, "children": 1})
        rows.append((label, n, fan, alone))
        sys.stdout.write(
            f"{label} N={n}: fan-out {fan['elapsed_all']} s, alone {alone['elapsed_all']} s, memory {fan['memory']}\n"
        )
    body = table(rows)
    cores = os.cpu_count()
    notes = (
        f"Median of {args.runs} fan-outs per process row (the Docker row: 1). {cores} cores. Child i of N waits"
        f" {SLOWEST_S:g} s x (i+1)/N before answering (model wait) or answers at once (no wait); the baseline is"
        " the slowest child alone, spawned and awaited the same way. RSS is the benchmark process: the server,"
        " its in-memory MCP client and, for Docker, the scripted model server; child processes are not in it."
    )
    sys.stdout.write(body + "\n\n" + notes + "\n")
    if args.write:
        from bench.report import write_section

        command = "\n\nRerun: `.venv/bin/python -m bench.bench_fanout --write` (about 3 minutes)."
        write_section(
            ROOT / "docs" / "benchmarks.md",
            SECTION,
            "Fan-out: N children vs the slowest alone",
            body + "\n\n" + notes + command,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
