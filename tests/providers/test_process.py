"""The process provider: what little it promises (a private working directory, a clean
environment, a loud warning) beyond the conformance suite."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers.base import SandboxSpec
from mcp_sandboxes.providers.local.process import ProcessProvider
from mcp_sandboxes.providers.registry import build_provider

STEP_S = 30.0


async def test_check_says_loudly_that_nothing_is_isolated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    provider = build_provider("process", {"state_dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING), anyio.fail_after(STEP_S):
        availability = await provider.check()
        sandbox = await provider.create(SandboxSpec(image="host"))
        await provider.destroy(sandbox.id)
    assert availability.available
    assert "isolates nothing" in (availability.reason or "")
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) >= 2 and all("isolates nothing" in record.getMessage() for record in warnings)


async def test_a_workdir_that_is_not_a_host_directory_gets_a_private_one(tmp_path: Path) -> None:
    provider = ProcessProvider.from_settings({"state_dir": str(tmp_path / "state")})
    with anyio.fail_after(STEP_S):
        first = await provider.create(SandboxSpec(image="host", workdir="/workspace-that-does-not-exist"))
        second = await provider.create(SandboxSpec(image="host", workdir="/workspace-that-does-not-exist"))
        await first.put_file("/workspace-that-does-not-exist/sub/note.txt", b"first's")
        where = await first.exec(["sh", "-c", "pwd; cat sub/note.txt"])
        in_sub = await first.exec(["pwd"], cwd="/workspace-that-does-not-exist/sub")
        others = await second.exec(["ls", "-A"])
        await provider.destroy(first.id)
        await provider.destroy(second.id)
    private = first.workdir
    assert where.stdout.decode().splitlines() == [str(private), "first's"]
    assert in_sub.stdout.decode().strip() == str(private / "sub")
    assert others.stdout == b""
    assert private.is_relative_to(tmp_path / "state")
    assert not await anyio.Path(private).exists()
    assert not await anyio.Path("/workspace-that-does-not-exist").exists()


async def test_the_servers_environment_is_not_passed_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_SECRET", "do-not-leak")
    provider = ProcessProvider.from_settings({"state_dir": str(tmp_path)})
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(SandboxSpec(image="host", env={"FROM_SPEC": "yes"}))
        result = await sandbox.exec(["env"], env={"FROM_CALL": "yes"})
        await provider.destroy(sandbox.id)
    seen = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert "SERVER_SECRET" not in seen
    assert seen["FROM_SPEC"] == seen["FROM_CALL"] == "yes"
    assert seen["HOME"].startswith(str(tmp_path)) and seen["TMPDIR"].startswith(str(tmp_path))
    assert os.environ["SERVER_SECRET"] == "do-not-leak"


async def test_a_missing_cwd_is_named(tmp_path: Path) -> None:
    provider = ProcessProvider.from_settings({"state_dir": str(tmp_path)})
    sandbox = await provider.create(SandboxSpec(image="host"))
    try:
        with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match="cwd"):
            await sandbox.exec(["pwd"], cwd="/workspace/not/there")
    finally:
        await provider.destroy(sandbox.id)
