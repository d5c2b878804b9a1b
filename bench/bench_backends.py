"""Per-backend spawn-to-first-event latency in Docker (not a test).

For every backend with an end-to-end case (tests/e2e/backend_cases/), side by side on the same
scripted model server and image:
  - baseline: the same provider and backend used directly as a library (create the container,
    prepare, run the backend's own argv, read stdout until the first agent event): no MCP, no store;
  - ours: spawn_agent through the MCP server over stdio, read_events long-poll to the first agent
    event and to idle.
The ratio is the cost of the server (MCP round trips, SQLite, the worker) on top of the work itself.

Run: .venv/bin/python -m bench.bench_backends [--runs 3] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from mcp_sandboxes.backends.base import AgentSpec, Turn
from mcp_sandboxes.backends.registry import build_backend
from mcp_sandboxes.config import load_settings
from mcp_sandboxes.orchestrator.setup import apply_setup
from mcp_sandboxes.providers.base import LineSplitter, SandboxSpec
from mcp_sandboxes.providers.registry import build_provider
from tests.conftest import ROOT
from tests.e2e.backend_cases import BackendCase, discover_cases
from tests.e2e.harness import mcp_server, server_environment
from tests.support.model_server import Reply, Script, ScriptedModelServer

SECTION = "backends"
PROMPT = "BENCH say hi"


def _script() -> Script:
    script = Script()
    script.on(user_contains="BENCH", reply=Reply(text="bench reply"), times=None)
    return script


async def baseline(case: BackendCase, model_url: str, runs: int) -> list[float]:
    environ = {**os.environ, **case.server_env(model_url)}
    settings = load_settings(None, environ=environ)
    backend = build_backend(case.backend, settings.backend(case.backend), environ)
    provider = build_provider("docker", settings.provider("docker"))
    samples: list[float] = []
    try:
        for index in range(runs):
            started = time.perf_counter()
            spec = SandboxSpec(image=case.image, network="host", user="agent", mounts=backend.mounts())
            sandbox = await provider.create(spec)
            try:
                agent = AgentSpec(backend=case.backend, permission_mode=case.spawn_args.get("permission_mode"))
                await apply_setup(sandbox, backend.setup(agent, home="/home/agent"), user="agent")
                turn = Turn(session_id=f"bench{index}", index=0, prompt=PROMPT, agent=agent)
                command = backend.command(turn)
                translator = backend.translator()
                splitter = LineSplitter()
                first: float | None = None
                async with sandbox.stream(command.argv, env=command.env, cwd="/workspace", user="agent") as process:
                    if command.stdin is not None:
                        await process.send_stdin(command.stdin)
                    await process.close_stdin()
                    async for chunk in process:
                        if chunk.stream != "stdout":
                            continue
                        for line in splitter.feed(chunk.data):
                            events = translator.feed(line)
                            if first is None and any(e.type.startswith("agent.") for e in events):
                                first = time.perf_counter() - started
                    await process.wait()
                samples.append(first if first is not None else time.perf_counter() - started)
            finally:
                await provider.destroy(sandbox.id)
    finally:
        await provider.aclose()
    return samples


async def ours(case: BackendCase, model_url: str, runs: int, data_dir: Path) -> list[float]:
    env = server_environment(data_dir, model_url, Path("/nonexistent"))
    env.pop("MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH")
    env.update(case.server_env(model_url))
    samples: list[float] = []
    async with mcp_server("stdio", env) as mcp:
        await mcp.call("create_environment", {"name": "bench", "image": case.image, "network": "host"})
        for _ in range(runs):
            started = time.perf_counter()
            spawned = await mcp.call(
                "spawn_agent", {"environment": "bench", "backend": case.backend, "prompt": PROMPT, **case.spawn_args}
            )
            session_id = spawned["session"]["session_id"]
            cursor, first = 0, None
            for _poll in range(200):
                page = await mcp.call("read_events", {"session_id": session_id, "after": cursor, "wait_s": 30})
                cursor = page["next_cursor"]
                kinds = [e["type"] for e in page["events"]]
                if first is None and any(k.startswith("agent.") for k in kinds):
                    first = time.perf_counter() - started
                if "session.status_idle" in kinds:
                    break
            samples.append(first if first is not None else time.perf_counter() - started)
            await mcp.call("stop_session", {"session_id": session_id})
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows = [
        f"| backend | baseline: provider + backend as a library (median of {args.runs}) |"
        " mcp-sandboxes spawn_agent over stdio | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for case in discover_cases():
        with ScriptedModelServer(_script(), vendors=list(case.vendors)) as model, tempfile.TemporaryDirectory() as tmp:
            base = statistics.median(await baseline(case, model.url, args.runs))
            our = statistics.median(await ours(case, model.url, args.runs, Path(tmp)))
        rows.append(f"| {case.backend} | {base * 1000:.0f} ms | {our * 1000:.0f} ms | {our / base:.2f}x |")
        print(rows[-1], flush=True)
    table = "\n".join(rows) + (
        "\n\nBoth include creating the container (one per session) and the CLI's start-up; time to the"
        " first normalized agent event."
    )
    print(table)
    if args.write:
        from bench.report import write_section

        write_section(ROOT / "docs" / "benchmarks.md", SECTION, "Per-backend spawn to first event (Docker)", table)


if __name__ == "__main__":
    anyio.run(main)
