"""Spawn benchmark (not a test): how long from spawn_agent to the agent's first event, by how the
sandbox is obtained, against the floor of `docker exec` of the same CLI in a container already
running.

The real Claude Code (pinned, the host binary mounted read-only at /usr/local/bin/claude) against
the scripted model server (a text-only reply, at once), Docker, image tests.conftest.BASE_IMAGE.
Rows, interleaved run by run (floor, cold, prepared, warm pool, warm pool 'model', floor, ...)
after one unmeasured run of each:
  - floor: `docker exec -i` of the command the server runs (same argv, env, user, workdir, prompt
    on stdin) in a container started once with `docker run -d --network host --user agent
    --init ... sleep infinity`, the binary bind-mounted read-only where the server mounts it;
  - cold: spawn_agent on an environment with network 'host' (so it and the floor differ only in
    how the sandbox is obtained), no preparation, no pool: the server creates the container;
  - prepared: the same with a setup command, so its sandboxes start from the prepared image
    (prepared once, with create_environment wait=true, before the runs);
  - warm pool: the same with warm_pool=2 (the pool is full before each run, outside the timing);
  - warm pool, network 'model' (the default): the same through the egress proxy.
Before every measured run of any row every pool is full again, so no refill runs in the
background of another row's run (the warm rows' own refill, started by their take, does).

"First agent event", the same for every row: the first stdout line of the CLI that the server's
own translator (ClaudeTranslator) turns into an agent.* event. Claude Code's first line,
system/init, makes none; for a text reply the first is the `assistant` line (agent.message).
The floor feeds its lines to a ClaudeTranslator itself and stops the clock at that line; the
server rows stop it when read_events (long-poll) returns that event: spawn_agent call -> event
readable by the caller.

`--profile` times the orchestrator's steps in the warm-pool runs (in this process: the steps are
wrapped, no product code changes) and prints the median timeline. `--what-if` adds two diagnostic
warm-pool rows with parts of today's spawn path taken away in this process (see WhatIf), to show
what each would save.

Run: .venv/bin/python -m bench.bench_spawn [--runs N] [--profile] [--what-if] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from bench.bench_fanout import Tools, in_process
from mcp_sandboxes.backends.claude import CLI_TARGET, ClaudeTranslator
from tests.conftest import BASE_IMAGE, CLAUDE_BIN, ROOT
from tests.support.model_server import Reply, Script, ScriptedModelServer

SECTION = "spawn"
PROMPT = "SPAWN-BENCH: say ready"
RUN_BUDGET_S = 180.0
POOL_FILL_BUDGET_S = 120.0
POOL_SIZE = 2
ROWS = ("floor", "cold", "prepared", "warm", "warm-model")
# `--what-if` rows: the warm pool with parts of today's spawn path taken away in this process.
WHAT_IF_ROWS = ("warm-held", "warm-lean")
LABELS = {
    "floor": "floor: `docker exec` in a running container",
    "cold": "cold: new container",
    "prepared": "prepared image: new container",
    "warm": "warm pool",
    "warm-model": "warm pool, network 'model' (proxy)",
    "warm-held": "what-if: warm pool, refill held until the run ends",
    "warm-lean": "what-if: warm pool, refill held, no probe/setup/OOM execs before the CLI",
}
# The environment (name, create_environment arguments) of each server row.
ENVIRONMENTS: dict[str, dict[str, Any]] = {
    "cold": {"network": "host"},
    "prepared": {"network": "host", "setup_commands": ["echo prepared > /opt/marker"], "wait": True},
    "warm": {"network": "host", "warm_pool": POOL_SIZE},
    "warm-model": {"network": "model", "warm_pool": POOL_SIZE},
    "warm-held": {"network": "host", "warm_pool": POOL_SIZE},
    "warm-lean": {"network": "host", "warm_pool": POOL_SIZE},
}
# What the backend adds to the CLI's environment (configs/default.toml [backends.claude.env]).
CLAUDE_ENV = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
SANDBOX_HOME = "/home/agent"
WORKDIR = "/workspace"


def first_agent_line(translator: ClaudeTranslator, line: str) -> bool:
    return any(event.type.startswith("agent.") for event in translator.feed(line))


class Floor:
    """The container of the floor row, and one `docker exec` of the CLI in it per run."""

    def __init__(self, model_url: str) -> None:
        self.model_url = model_url
        self.name = f"bench-spawn-floor-{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        # As the server makes its sandboxes: host network here, an init, no capabilities to gain.
        options = "-d --rm --network host --user agent --init --cap-drop ALL --security-opt no-new-privileges:true"
        mount = f"type=bind,source={CLAUDE_BIN},target={CLI_TARGET},readonly"
        argv = ["docker", "run", *options.split(), "--name", self.name, "-w", WORKDIR, "--mount", mount]
        argv += [BASE_IMAGE, "sleep", "infinity"]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], check=False, capture_output=True, timeout=60)

    async def run(self) -> float:
        """Seconds from starting `docker exec` to the CLI's first agent line; then lets it finish."""
        env = {**CLAUDE_ENV, "HOME": SANDBOX_HOME, "ANTHROPIC_BASE_URL": self.model_url}
        env["ANTHROPIC_API_KEY"] = "sk-bench-not-a-real-key"
        argv = ["docker", "exec", "-i", "-u", "agent", "-w", WORKDIR]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        argv += [self.name, CLI_TARGET, "-p", "--output-format", "stream-json", "--verbose", "--input-format", "text"]
        translator = ClaudeTranslator()
        started = time.perf_counter()
        first: float | None = None
        process: Process = await anyio.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        async with process:
            assert process.stdin is not None and process.stdout is not None
            await process.stdin.send(PROMPT.encode())
            await process.stdin.aclose()
            buffer = b""
            async for chunk in process.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if first is None and line.strip() and first_agent_line(translator, line.decode()):
                        first = time.perf_counter() - started
            code = await process.wait()
        if first is None or code != 0:
            raise RuntimeError(f"the floor's CLI printed no agent event (exit code {code})")
        return first


def swap(owner: Any, attribute: str, make: Callable[[Any], Any]) -> None:
    """Replaces `owner.attribute` (a module's function or a class's method) in this process with
    make(original)."""
    setattr(owner, attribute, make(getattr(owner, attribute)))


class WhatIf:
    """Diagnostic only (`--what-if`): for the run of one row, the warm pool's refill is held (not
    woken by the take, woken before the next run) and/or the three execs the spawn path runs before
    the CLI (check_cli's probe, apply_setup, the OOM baseline) are skipped. They are not needed for
    this image and a text reply (the CLI is mounted, HOME exists, nothing is killed), so the row
    shows what moving them off the spawn path would save."""

    def __init__(self) -> None:
        self.hold_refill = False
        self.skip_execs = False
        self.held: list[Any] = []

    def set_row(self, row: str) -> None:
        self.hold_refill = row in WHAT_IF_ROWS
        self.skip_execs = row == "warm-lean"

    def release(self) -> None:
        for pool in self.held:
            pool.wake.set()
        self.held.clear()

    def install(self) -> None:
        from mcp_sandboxes.orchestrator import runner, sessions
        from mcp_sandboxes.orchestrator.pool import WarmPool

        what_if = self

        def take(original: Any) -> Any:
            def held_take(warm: WarmPool, environment_id: str, wanted: Any) -> Any:
                pool = warm._pools.get(environment_id)
                if not what_if.hold_refill or pool is None:
                    return original(warm, environment_id, wanted)
                real = pool.wake
                pool.wake = anyio.Event()  # the take wakes this one; the refill keeps waiting on the real
                try:
                    return original(warm, environment_id, wanted)
                finally:
                    pool.wake = real
                    what_if.held.append(pool)

            return held_take

        def unless_lean(original: Any) -> Any:
            async def maybe(*args: Any, **kwargs: Any) -> None:
                if not what_if.skip_execs:
                    await original(*args, **kwargs)

            return maybe

        def baseline(original: Any) -> Any:
            async def maybe(watch: runner.OomWatch, sandbox: Any) -> None:
                if what_if.skip_execs:
                    watch.read = True  # as if read: the count stays unknown (None)
                else:
                    await original(watch, sandbox)

            return maybe

        swap(WarmPool, "take", take)
        swap(sessions, "check_cli", unless_lean)
        swap(sessions, "apply_setup", unless_lean)
        swap(runner.OomWatch, "baseline", baseline)


class Profile:
    """Wraps the orchestrator's steps (in this process) and records when each ran."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self.first_agent_line: float | None = None

    def wrap_async(self, owner: Any, attribute: str, label: str | Callable[..., str]) -> None:
        spans = self.spans

        def make(original: Any) -> Any:
            async def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    name = label(*args, **kwargs) if callable(label) else label
                    spans.append((name, started, time.perf_counter()))

            return timed

        swap(owner, attribute, make)

    def install(self) -> None:
        from mcp_sandboxes.orchestrator import runner, sessions, workspaces
        from mcp_sandboxes.orchestrator.pool import WarmPool
        from mcp_sandboxes.orchestrator.worker import WorkerPool
        from mcp_sandboxes.providers.local.docker import DockerExecStream, DockerProvider
        from mcp_sandboxes.store import Database

        def exec_label(stream: Any, argv: list[str], **_: Any) -> str:
            program = argv[4] if len(argv) > 4 else argv[0]
            return f"exec start: {'the CLI' if program == CLI_TARGET else program} @{stream._sandbox.id}"

        def in_sandbox(what: str) -> Callable[..., str]:
            return lambda stream, *_, **__: f"{what} @{stream._sandbox.id}"

        self.wrap_async(sessions, "check_cli", "check_cli (probe exec)")
        self.wrap_async(workspaces.SandboxWorkspace, "set_up", "workspace set-up")
        self.wrap_async(sessions, "apply_setup", "backend setup (apply_setup)")
        self.wrap_async(Database, "insert_session", "session row")
        self.wrap_async(Database, "start_turn", "turn row started")
        self.wrap_async(runner.OomWatch, "baseline", "OOM baseline (exec)")
        self.wrap_async(DockerProvider, "create", "docker create+start (pool refill or cold)")
        self.wrap_async(DockerExecStream, "start", exec_label)
        self.wrap_async(DockerExecStream, "wait", in_sandbox("exec wait for exit code"))
        self.wrap_async(DockerExecStream, "finish", in_sandbox("exec finish (close)"))
        self.wrap_async(WorkerPool, "_run_one", "worker: turn")
        spans = self.spans
        profile = self

        def take(original: Any) -> Any:
            def timed_take(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spans.append(("pool take", started, time.perf_counter()))

            return timed_take

        def feed(original: Any) -> Any:
            def noting_feed(translator: ClaudeTranslator, line: str) -> Any:
                events = original(translator, line)
                if profile.first_agent_line is None and any(e.type.startswith("agent.") for e in events):
                    profile.first_agent_line = time.perf_counter()
                return events

            return noting_feed

        swap(WarmPool, "take", take)
        swap(ClaudeTranslator, "feed", feed)

    def reset(self) -> None:
        self.spans.clear()
        self.first_agent_line = None

    def timeline(self, started: float, first_event: float) -> list[tuple[str, float, float]]:
        """(step, start, end) in seconds after `started`, of the steps that began before the event.
        Execs in the session's sandbox are named by their step; those in another (the pool's
        refill) say so."""
        session_sandbox = next(
            (name.rpartition("@")[2] for name, _, _ in self.spans if name.startswith("exec start: the CLI @")), None
        )
        shown = []
        for name, begin, end in self.spans:
            if not started <= begin <= started + first_event or name == "worker: turn":
                continue
            what, _, sandbox = name.rpartition(" @")
            if what:
                name = what if sandbox == session_sandbox else f"refill: {what}"
            shown.append((name, begin - started, end - started))
        if self.first_agent_line is not None:
            line = self.first_agent_line - started
            shown.append(("CLI's first agent line (translator)", line, line))
        shown.append(("event readable (read_events)", first_event, first_event))
        return sorted(shown, key=lambda span: span[1])


async def first_agent_event(tools: Tools, session_id: str, started: float) -> float:
    """Seconds from `started` to the first agent.* event readable; then waits for the turn's end."""
    first: float | None = None
    cursor = 0
    for _ in range(400):
        page = await tools.call("read_events", session_id=session_id, after=cursor, wait_s=10)
        cursor = page["next_cursor"]
        if first is None and any(e["type"].startswith("agent.") for e in page["events"]):
            first = time.perf_counter() - started
        if any(e["type"] == "session.status_idle" for e in page["events"]):
            if first is None:
                raise RuntimeError(f"session {session_id} went idle without an agent event: {page['events']}")
            return first
    raise RuntimeError(f"session {session_id} never went idle")


async def pools_full(tools: Tools, what_if: WhatIf | None) -> None:
    if what_if is not None:
        what_if.release()
    with anyio.fail_after(POOL_FILL_BUDGET_S):
        while True:
            listed = await tools.call("list_environments")
            short = [e for e in listed["environments"] if e["warm_ready"] < e["warm_pool"]]
            if not short:
                return
            if errors := [e["warm_pool_error"] for e in short if e["warm_pool_error"]]:
                raise RuntimeError(f"a warm pool does not fill: {errors}")
            await anyio.sleep(0.1)  # a poll of the pool's state, not a synchronisation by guess


async def spawn_run(tools: Tools, environment: str) -> tuple[float, float]:
    """(start, seconds from the spawn_agent call to the first agent event); the session is stopped."""
    started = time.perf_counter()
    spawned = await tools.call("spawn_agent", environment=environment, prompt=PROMPT)
    session_id = spawned["session"]["session_id"]
    first = await first_agent_event(tools, session_id, started)
    await tools.call("stop_session", session_id=session_id)
    return started, first


async def measure(
    runs: int, profile: Profile | None, what_if: WhatIf | None
) -> tuple[dict[str, list[float]], list[list[tuple[str, float, float]]]]:
    rows = ROWS + (WHAT_IF_ROWS if what_if is not None else ())
    data = Path(tempfile.mkdtemp(prefix="bench-spawn-"))
    environ = {
        "MCP_SANDBOXES_DATA_DIR": str(data),
        "MCP_SANDBOXES_SUBAGENTS__MAX_DEPTH": "0",
        "MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH": str(CLAUDE_BIN),
    }
    script = Script()
    script.on(user_contains="SPAWN-BENCH", reply=Reply(text="ready"), times=None)
    samples: dict[str, list[float]] = {row: [] for row in rows}
    timelines: list[list[tuple[str, float, float]]] = []
    async with ScriptedModelServer(script) as model:
        floor = Floor(model.url)
        agent_environ = {"ANTHROPIC_BASE_URL": model.url, "ANTHROPIC_API_KEY": "sk-bench-not-a-real-key"}
        floor.start()
        try:
            async with in_process(environ, agent_environ) as tools:
                for row, arguments in ENVIRONMENTS.items():
                    if row not in rows:
                        continue
                    with anyio.fail_after(RUN_BUDGET_S * 2):
                        await tools.call("create_environment", name=row, image=BASE_IMAGE, **arguments)
                for measured in (False, *([True] * runs)):
                    for row in rows:
                        with anyio.fail_after(RUN_BUDGET_S):
                            await pools_full(tools, what_if)
                            if what_if is not None:
                                what_if.set_row(row)
                            if profile is not None:
                                profile.reset()
                            if row == "floor":
                                elapsed = await floor.run()
                            else:
                                started, elapsed = await spawn_run(tools, row)
                                if measured and profile is not None and row == "warm":
                                    timelines.append(profile.timeline(started, elapsed))
                        if measured:
                            samples[row].append(elapsed)
                        sys.stderr.write(f"{row}: {elapsed:.3f} s{'' if measured else ' (warm-up)'}\n")
                if what_if is not None:
                    what_if.set_row("floor")
                    what_if.release()
                for row in ENVIRONMENTS:
                    if row not in rows:
                        continue
                    await tools.call("delete_environment", environment=row, force=True)
        finally:
            floor.stop()
    return samples, timelines


def table(samples: dict[str, list[float]]) -> str:
    floor = statistics.median(samples["floor"])
    lines = [
        "| how the sandbox is obtained | median (s) | min (s) | max (s) | ratio to the floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in samples:
        values = samples[row]
        median = statistics.median(values)
        ratio = "1.00x (baseline)" if row == "floor" else f"{median / floor:.2f}x"
        lines.append(f"| {LABELS[row]} | {median:.2f} | {min(values):.2f} | {max(values):.2f} | {ratio} |")
    return "\n".join(lines)


def profile_table(timelines: list[list[tuple[str, float, float]]]) -> str:
    """The median start and duration of each step of the warm-pool runs (steps seen in every run;
    a step that runs twice in a run is numbered)."""
    per_run: list[dict[str, tuple[float, float]]] = []
    for timeline in timelines:
        seen: dict[str, int] = {}
        named: dict[str, tuple[float, float]] = {}
        for name, begin, end in timeline:
            seen[name] = seen.get(name, 0) + 1
            key = name if seen[name] == 1 else f"{name} #{seen[name]}"
            named[key] = (begin, end)
        per_run.append(named)
    keys = [key for key in per_run[0] if all(key in run for run in per_run)]
    medians = [
        (key, statistics.median(run[key][0] for run in per_run), statistics.median(run[key][1] for run in per_run))
        for key in keys
    ]
    rows = sorted(medians, key=lambda row: row[1])
    lines = ["| step (warm pool row) | starts at (ms) | ends at (ms) | takes (ms) |", "| --- | --- | --- | --- |"]
    for key, begin, end in rows:
        lines.append(f"| {key} | {begin * 1000:.0f} | {end * 1000:.0f} | {(end - begin) * 1000:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="measured runs per row (medians are shown)")
    parser.add_argument("--profile", action="store_true", help="time the orchestrator's steps in the warm-pool runs")
    parser.add_argument(
        "--what-if", action="store_true", help="add diagnostic warm-pool rows with parts of the spawn path taken away"
    )
    parser.add_argument("--write", action="store_true", help="replace the spawn section of docs/benchmarks.md")
    args = parser.parse_args()
    what_if = WhatIf() if args.what_if else None
    if what_if is not None:
        what_if.install()
    profile = Profile() if args.profile else None
    if profile is not None:
        profile.install()
    samples, timelines = anyio.run(measure, args.runs, profile, what_if)
    body = table(samples) + (
        f"\n\nMedians (min, max) of {args.runs} runs per row, interleaved run by run after one unmeasured run"
        " each, in one process: the real Claude Code (pinned) in Docker against the scripted model server"
        " (a text reply at once), image mcp-sandboxes/base. Measured: from `docker exec` (floor) or the"
        " spawn_agent call (the rest) to the first agent.* event, i.e. the first CLI line the server's"
        " translator turns into one (here the `assistant` line; system/init makes none), as read by the"
        " caller with read_events (long-poll). Floor, cold, prepared and warm pool all use network 'host',"
        " so they differ only in how the sandbox is obtained; the last row adds the egress proxy. Every pool"
        " is full before each run; the warm rows' own refill (started by the take) runs during theirs. The"
        " machine is shared (2 cores, a test suite may be running): the ratios are what counts."
    )
    if what_if is not None:
        body += (
            "\n\nThe what-if rows are diagnostics, not the product: in this process the pool's refill is not woken"
            " by the take (it refills before the next run), and in the last row check_cli's probe, apply_setup"
            " and the OOM baseline (three execs, none needed for this image and a text reply) are skipped."
        )
    if timelines:
        body += (
            "\n\n"
            + profile_table(timelines)
            + (
                "\n\nThe warm-pool row's steps (`--profile`: the orchestrator's steps wrapped in this process),"
                " medians over its runs, from the spawn_agent call."
            )
        )
    sys.stdout.write(body + "\n")
    if args.write:
        from bench.report import write_section

        body += "\n\nRerun: `.venv/bin/python -m bench.bench_spawn --profile --what-if --write` (about 2 minutes)."
        write_section(ROOT / "docs" / "benchmarks.md", SECTION, "Spawn -> first agent event", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
