"""Local providers side by side (not a test): create-to-first-exec, exec round trip and destroy
for docker, podman, containerd and bubblewrap, each next to its engine's own CLI doing the
same thing (raw `docker run`/`docker exec`, `podman --remote run`/`exec`, `ctr run`/`ctr task
exec`, bare `bwrap`), all started the same way (anyio.run_process, output read), in one run.

Run: .venv/bin/python -m bench.bench_providers [--runs N] [--write]
(--write replaces the "providers" section of docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from bench.report import write_section
from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.local.containerd import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, image_reference
from mcp_sandboxes.providers.local.podman import DEFAULT_SOCKET
from mcp_sandboxes.providers.registry import build_provider
from tests.conftest import BUSYBOX_IMAGE, ROOT

CALL_TIMEOUT_S = 60.0
DOCS = ROOT / "docs" / "benchmarks.md"
PODMAN = ["podman", "--remote", "--url", f"unix://{DEFAULT_SOCKET}"]
CTR = ["ctr", "--address", DEFAULT_ADDRESS, "--namespace", DEFAULT_NAMESPACE]


async def run(argv: list[str]) -> str:
    with anyio.fail_after(CALL_TIMEOUT_S):
        result = await anyio.run_process(argv, stdin=subprocess.DEVNULL, check=True)
    return result.stdout.decode()


async def timed(runs: int, action: Callable[[], Awaitable[object]]) -> list[float]:
    samples: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        await action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def cell(samples: list[float]) -> str:
    if not samples:
        return "n/a"
    ordered = sorted(samples)
    p90 = ordered[max(0, int(len(ordered) * 0.9) - 1)]
    return f"{statistics.median(samples):.0f} ({p90:.0f})"


def ratio(ours: list[float], floor: list[float]) -> str:
    if not ours or not floor:
        return "n/a"
    return f"{statistics.median(ours) / statistics.median(floor):.2f}x"


@dataclass
class Measured:
    engine: str
    first_exec: list[float]
    exec_round_trip: list[float]
    destroy: list[float]
    raw_first_exec: list[float]
    raw_exec: list[float]
    raw_label: str


async def measure_provider(
    provider: Provider, spec: SandboxSpec, runs: int
) -> tuple[list[float], list[float], list[float]]:
    created: list[str] = []

    async def create_and_run() -> None:
        sandbox = await provider.create(spec)
        created.append(sandbox.id)
        assert (await sandbox.exec(["true"])).ok

    try:
        first = await timed(runs, create_and_run)
        sandbox = await provider.attach(created[0])
        assert sandbox is not None

        async def exec_true() -> None:
            assert (await sandbox.exec(["true"])).ok

        round_trip = await timed(runs, exec_true)

        async def destroy() -> None:
            await provider.destroy(created.pop())

        destroyed = await timed(len(created), destroy)
    finally:
        for leftover in created:
            await provider.destroy(leftover)
    return first, round_trip, destroyed


@asynccontextmanager
async def opened(name: str, settings: dict[str, object]) -> AsyncIterator[Provider]:
    provider = build_provider(name, settings)
    try:
        availability = await provider.check()
        if not availability.available:
            raise SystemExit(f"{name} is not available: {availability.reason} ({availability.fix})")
        yield provider
    finally:
        await provider.aclose()


# -- the engines' own CLIs ---------------------------------------------------------------------


async def raw_docker(runs: int) -> tuple[list[float], list[float]]:
    first = await timed(runs, lambda: run(["docker", "run", "--rm", "--network", "none", BUSYBOX_IMAGE, "true"]))
    container = (await run(["docker", "run", "-d", "--network", "none", BUSYBOX_IMAGE, "sleep", "infinity"])).strip()
    try:
        round_trip = await timed(runs, lambda: run(["docker", "exec", container, "true"]))
    finally:
        await run(["docker", "rm", "-f", container])
    return first, round_trip


async def raw_podman(runs: int) -> tuple[list[float], list[float]]:
    first = await timed(runs, lambda: run([*PODMAN, "run", "--rm", "--network", "none", BUSYBOX_IMAGE, "true"]))
    container = (await run([*PODMAN, "run", "-d", "--network", "none", BUSYBOX_IMAGE, "sleep", "infinity"])).strip()
    try:
        round_trip = await timed(runs, lambda: run([*PODMAN, "exec", container, "true"]))
    finally:
        await run([*PODMAN, "rm", "-f", "-t", "0", container])
    return first, round_trip


async def raw_ctr(runs: int) -> tuple[list[float], list[float]]:
    image = image_reference(BUSYBOX_IMAGE)

    async def run_once() -> None:
        await run([*CTR, "run", "--rm", image, f"bench-{uuid.uuid4().hex[:12]}", "true"])

    first = await timed(runs, run_once)
    container = f"bench-{uuid.uuid4().hex[:12]}"
    await run([*CTR, "run", "-d", image, container, "sleep", "infinity"])
    try:
        round_trip = await timed(
            runs, lambda: run([*CTR, "tasks", "exec", "--exec-id", uuid.uuid4().hex, container, "true"])
        )
    finally:
        await run([*CTR, "tasks", "delete", "--force", container])
        await run([*CTR, "containers", "delete", container])
    return first, round_trip


def bare_bwrap_argv() -> list[str]:
    """The bubblewrap provider's "host" image without the provider: the host's system
    directories read-only, every namespace new."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    for name in ("usr", "bin", "sbin", "lib", "lib64", "etc"):
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", str(path.readlink()), str(path)]
        elif path.exists():
            argv += ["--ro-bind", str(path), str(path)]
    return [*argv, "--proc", "/proc", "--dev", "/dev", "--", "true"]


# -- the run --------------------------------------------------------------------------------------


async def measure_all(runs: int) -> list[Measured]:
    busybox = SandboxSpec(image=BUSYBOX_IMAGE)
    results: list[Measured] = []
    for engine, raw, label in (
        ("docker", raw_docker, "`docker run --rm` / `docker exec`"),
        ("podman", raw_podman, "`podman --remote run --rm` / `exec`"),
        ("containerd", raw_ctr, "`ctr run --rm` / `ctr tasks exec`"),
    ):
        raw_first, raw_exec = await raw(runs)
        async with opened(engine, {}) as provider:
            first, round_trip, destroyed = await measure_provider(provider, busybox, runs)
        results.append(Measured(engine, first, round_trip, destroyed, raw_first, raw_exec, label))
    bare = bare_bwrap_argv()
    bare_samples = await timed(runs, lambda: run(bare))
    with tempfile.TemporaryDirectory(prefix="bench-providers-bwrap-") as state:
        async with opened("bubblewrap", {"state_dir": state}) as provider:
            first, round_trip, destroyed = await measure_provider(provider, SandboxSpec(image="host"), runs)
    results.append(
        Measured("bubblewrap", first, round_trip, destroyed, bare_samples, bare_samples, "bare `bwrap ... true`")
    )
    return results


def table(results: list[Measured], runs: int) -> str:
    lines = [
        "| engine | create -> first exec | its CLI: run `true` | ratio | exec `true` round trip "
        "| its CLI: exec `true` | ratio | destroy | CLI floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in results:
        lines.append(
            f"| {m.engine} | {cell(m.first_exec)} | {cell(m.raw_first_exec)} | {ratio(m.first_exec, m.raw_first_exec)} "
            f"| {cell(m.exec_round_trip)} | {cell(m.raw_exec)} | {ratio(m.exec_round_trip, m.raw_exec)} "
            f"| {cell(m.destroy)} | {m.raw_label} |"
        )
    docker = next(m for m in results if m.engine == "docker")
    lines += [
        "",
        f"Milliseconds, median (p90) of {runs} runs; busybox image (bubblewrap: the host's system directories),"
        " network none, no limits. The CLI floor does the same work with the engine's own client, one process per"
        " call; its `run --rm` also removes the container (the provider's destroy is its own column)."
        " bubblewrap has no exec into a running sandbox, so its one floor is a bare `bwrap` running `true`.",
        f"Against raw `docker run --rm` ({statistics.median(docker.raw_first_exec):.0f} ms) and `docker exec`"
        f" ({statistics.median(docker.raw_exec):.0f} ms): "
        + ", ".join(
            f"{m.engine} {ratio(m.first_exec, docker.raw_first_exec)} / {ratio(m.exec_round_trip, docker.raw_exec)}"
            for m in results
        )
        + " (create -> first exec / exec round trip).",
    ]
    return "\n".join(lines)


async def main(runs: int, write: bool) -> None:
    body = table(await measure_all(runs), runs)
    print(body)
    if write:
        write_section(DOCS, "providers", "Local providers: docker, podman, containerd, bubblewrap", body)
        print(f"\nwrote the providers section of {DOCS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    arguments = parser.parse_args()
    anyio.run(main, arguments.runs, arguments.write)
