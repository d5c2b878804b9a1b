"""Bubblewrap provider latency (not a test): create-to-first-exec and exec round trip,
against a bare `bwrap` invocation started the same way (anyio.open_process, output read).

Run: .venv/bin/python -m bench.bench_bubblewrap [--runs N] [--rootfs DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from mcp_sandboxes.providers.base import ResourceLimits, SandboxSpec
from mcp_sandboxes.providers.local.bubblewrap import BubblewrapProvider
from tests.conftest import ROOT


async def _bare(argv: list[str]) -> None:
    result = await anyio.run_process(argv, stdin=subprocess.DEVNULL, check=True)
    assert result.returncode == 0


async def _timed(runs: int, action: Callable[[], Awaitable[None]]) -> list[float]:
    samples: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        await action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _row(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    return f"| {name} | {statistics.median(samples):.1f} | {p90:.1f} | {len(samples)} |"


async def _provider_rows(provider: BubblewrapProvider, spec: SandboxSpec, label: str, runs: int) -> list[str]:
    created: list[str] = []

    async def create_and_run() -> None:
        sandbox = await provider.create(spec)
        created.append(sandbox.id)
        assert (await sandbox.exec(["true"])).ok

    first = await _timed(runs, create_and_run)
    sandbox = await provider.attach(created[0])
    assert sandbox is not None

    async def exec_true() -> None:
        assert (await sandbox.exec(["true"])).ok

    round_trip = await _timed(runs, exec_true)

    async def destroy() -> None:
        await provider.destroy(created.pop())

    destroyed = await _timed(len(created), destroy)
    return [
        _row(f"provider create -> first exec done ({label})", first),
        _row(f"provider exec `true` round trip ({label})", round_trip),
        _row(f"provider destroy ({label})", destroyed),
    ]


async def main(runs: int, rootfs: Path) -> None:
    bwrap = shutil.which("bwrap") or "bwrap"
    bare_host = [bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
    for name in ("usr", "bin", "sbin", "lib", "lib64", "etc"):
        path = Path("/") / name
        if path.is_symlink():
            bare_host += ["--symlink", str(path.readlink()), str(path)]
        elif path.exists():
            bare_host += ["--ro-bind", str(path), str(path)]
    bare_host += ["--proc", "/proc", "--dev", "/dev", "--", "true"]
    bare_rootfs = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", str(rootfs), "/"]
    bare_rootfs += ["--proc", "/proc", "--dev", "/dev", "--", "true"]
    rows = [
        _row("bare bwrap, host binds, `true`", await _timed(runs, lambda: _bare(bare_host))),
        _row("bare bwrap, rootfs, `true`", await _timed(runs, lambda: _bare(bare_rootfs))),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-bwrap-") as state:
        async with BubblewrapProvider.from_settings({"state_dir": state}) as provider:
            await provider.check()  # probes the limits once, as a server does at start
            for label, image in (("host", "host"), ("rootfs", str(rootfs))):
                spec = SandboxSpec(image=image, user="agent")
                rows += await _provider_rows(provider, spec, label, runs)
                limited = spec.model_copy(update={"limits": ResourceLimits(memory_mb=512, pids=256, cpus=1)})
                rows += await _provider_rows(provider, limited, f"{label}, cgroup limits", runs)
    print("| what | median ms | p90 ms | runs |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rootfs", type=Path, default=ROOT / ".cache" / "rootfs-bookworm")
    arguments = parser.parse_args()
    anyio.run(main, arguments.runs, arguments.rootfs)
