"""Network mode benchmark (not a test): what the egress proxy costs a real agent.

The real Claude Code (pinned) in Docker against the scripted model server, through the real
MCP server in-process, once per network mode, the two interleaved run by run on the same machine:
  - "host": the CLI calls the model server on the host network (the baseline);
  - "model": no route out; the CLI calls 127.0.0.1:18080 in its sandbox, the forwarder relays to
    the proxy's unix socket, the proxy swaps the key in and forwards to the model server.
Per run: first event (spawn_agent called -> the first agent.* event readable), turn 1 (spawn ->
idle, one Bash tool call: two model requests), turn 2 (send_message -> idle, one model request).
The medians, and model/host ratios.

Run: .venv/bin/python -m bench.bench_model_network [--runs N] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

from bench.bench_fanout import Tools, in_process
from tests.conftest import BASE_IMAGE, CLAUDE_BIN, ROOT
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

SECTION = "model-network"
MODES = ("host", "model")
RUN_BUDGET_S = 180.0


def script() -> Script:
    made = Script()
    made.on(
        user_contains="TOOL-TURN", reply=Reply(tool_calls=[ToolCall("Bash", {"command": "echo bench-ok"})]), times=None
    )
    made.on(tool_result_contains="bench-ok", reply=Reply(text="tool turn done"), times=None)
    made.on(user_contains="TEXT-TURN", reply=Reply(text="text turn done"), times=None)
    return made


async def first_event_and_idle(tools: Tools, session_id: str, started: float) -> tuple[float, float]:
    """Seconds from `started` to the first agent.* event, and to the turn's end."""
    first: float | None = None
    cursor = 0
    for _ in range(400):
        page = await tools.call("read_events", session_id=session_id, after=cursor, wait_s=10)
        cursor = page["next_cursor"]
        now = time.perf_counter()
        if first is None and any(e["type"].startswith("agent.") for e in page["events"]):
            first = now - started
        if any(e["type"] == "session.status_idle" for e in page["events"]):
            return (first if first is not None else now - started), now - started
    raise RuntimeError(f"session {session_id} never went idle")


async def one_run(tools: Tools, environment: str) -> dict[str, float]:
    started = time.perf_counter()
    spawned = await tools.call(
        "spawn_agent", environment=environment, prompt="TOOL-TURN: run it", permission_mode="bypassPermissions"
    )
    session_id = spawned["session"]["session_id"]
    first, turn_1 = await first_event_and_idle(tools, session_id, started)
    resumed = time.perf_counter()
    answer = await tools.call("send_message", session_id=session_id, text="TEXT-TURN: again", wait=True, timeout_s=90)
    turn_2 = time.perf_counter() - resumed
    assert answer["completed"] and answer["final_message"] == "text turn done", answer
    await tools.call("stop_session", session_id=session_id)
    return {"first_event": first, "turn_1": turn_1, "turn_2": turn_2}


async def measure(runs: int) -> dict[str, list[dict[str, float]]]:
    data = Path(tempfile.mkdtemp(prefix="bench-network-"))
    environ = {
        "MCP_SANDBOXES_DATA_DIR": str(data),
        "MCP_SANDBOXES_SUBAGENTS__MAX_DEPTH": "0",
        "MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH": str(CLAUDE_BIN),
    }
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with ScriptedModelServer(script()) as model:
        agent_environ = {"ANTHROPIC_BASE_URL": model.url, "ANTHROPIC_API_KEY": "sk-bench-not-a-real-key"}
        async with in_process(environ, agent_environ) as tools:
            for mode in MODES:
                await tools.call("create_environment", name=mode, image=BASE_IMAGE, network=mode)
            # One unmeasured run per mode: the first container start pays for cold caches.
            for mode in MODES:
                with anyio.fail_after(RUN_BUDGET_S):
                    await one_run(tools, mode)
            for _ in range(runs):
                for mode in MODES:
                    with anyio.fail_after(RUN_BUDGET_S):
                        samples[mode].append(await one_run(tools, mode))
    return samples


def table(samples: dict[str, list[dict[str, float]]]) -> str:
    def median(mode: str, key: str) -> float:
        return statistics.median(sample[key] for sample in samples[mode])

    lines = [
        "| measure | host network (s) | mode model, via the proxy (s) | ratio model/host |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (
        ("first_event", "spawn -> first agent event"),
        ("turn_1", "turn 1: spawn -> idle (Bash tool, 2 model calls)"),
        ("turn_2", "turn 2: send_message -> idle (1 model call)"),
    ):
        host, model = median("host", key), median("model", key)
        lines.append(f"| {label} | {host:.2f} | {model:.2f} | {model / host:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per mode (medians are shown)")
    parser.add_argument("--write", action="store_true", help="replace the model-network section of docs/benchmarks.md")
    args = parser.parse_args()
    samples = anyio.run(measure, args.runs)
    body = table(samples) + (
        f"\n\nMedians of {args.runs} runs per mode, interleaved (host, model, host, ...) after one unmeasured run"
        " each; the real Claude Code in Docker against the scripted model server (replies at once), so the"
        " difference is the path: forwarder + unix socket + proxy + key swap against a direct loopback call."
    )
    sys.stdout.write(body + "\n")
    if args.write:
        from bench.report import write_section

        body += "\n\nRerun: `.venv/bin/python -m bench.bench_model_network --write` (about 2 minutes)."
        write_section(ROOT / "docs" / "benchmarks.md", SECTION, "Network mode 'model': the egress proxy's cost", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
