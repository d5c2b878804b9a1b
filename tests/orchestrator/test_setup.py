"""apply_setup: a backend's SandboxSetup (directories, files, the one JSON merge) made real in a
sandbox of the process provider (real processes and files, no Docker; the Docker case with a
sandbox user is tests/backends/test_setup_in_docker.py), and the merge rule on its own."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_sandboxes.errors import BackendError
from mcp_sandboxes.orchestrator.setup import apply_setup
from mcp_sandboxes.providers.base import Sandbox
from mcp_sandboxes.providers.local.process import ProcessProvider, ProcessSettings
from mcp_sandboxes.specs import DeepMerge, JsonMerge, SandboxSetup, SandboxSpec, WriteFile

STEP_S = 30.0
SERVERS_WHOLE = DeepMerge(whole_entries_under=(("mcpServers",),))


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with ProcessProvider(ProcessSettings(state_dir=str(tmp_path / "state"))) as provider:
        created = await provider.create(SandboxSpec(image="host"))
        try:
            yield created
        finally:
            await provider.destroy(created.id)


def test_the_merge_keeps_the_images_keys_merges_objects_and_replaces_servers_whole() -> None:
    existing: dict[str, Any] = {
        "ui": {"theme": "Dracula"},
        "security": {"auth": {"selectedType": "oauth"}, "other": 1},
        "context": {"fileName": ["A.md", "B.md"]},
        "mcpServers": {"calc": {"command": "old-calc", "env": {"OLD": "1"}}, "mine": {"command": "mine"}},
    }
    ours = {
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "context": {"fileName": ["GEMINI.md"]},
        "mcpServers": {"calc": {"httpUrl": "http://127.0.0.1:9/mcp"}},
    }
    merged = SERVERS_WHOLE.apply(existing, ours)
    assert merged == {
        "ui": {"theme": "Dracula"},
        "security": {"auth": {"selectedType": "gemini-api-key"}, "other": 1},
        "context": {"fileName": ["GEMINI.md"]},  # a list replaces, it is not appended to
        # calc is ours alone: no stdio command of the image's left beside our URL.
        "mcpServers": {"calc": {"httpUrl": "http://127.0.0.1:9/mcp"}, "mine": {"command": "mine"}},
    }
    assert existing["mcpServers"]["calc"] == {"command": "old-calc", "env": {"OLD": "1"}}  # not changed in place
    # Without the rule, objects merge all the way down.
    assert DeepMerge().apply(existing, ours)["mcpServers"]["calc"] == {
        "command": "old-calc",
        "env": {"OLD": "1"},
        "httpUrl": "http://127.0.0.1:9/mcp",
    }


@pytest.mark.parametrize("found", [None, b"", b"{ not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_a_file_that_is_missing_or_not_a_json_object_is_replaced_by_the_document(found: bytes | None) -> None:
    entry = JsonMerge(path="/h/s.json", document={"a": {"b": 1}})
    assert json.loads(entry.merged(found)) == {"a": {"b": 1}}


def test_setup_paths_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="not an absolute path"):
        SandboxSetup(backend="x", home="home")
    with pytest.raises(ValueError, match="not an absolute path"):
        SandboxSetup(backend="x", home="/h", directories=["rel"])
    with pytest.raises(ValueError, match="not an absolute path"):
        WriteFile(path="h/f", data=b"")


def setup_of(home: Path) -> SandboxSetup:
    return SandboxSetup(
        backend="probe",
        home=str(home),
        directories=[str(home / ".conf"), str(home / ".conf" / "deep" / "er")],
        files=[
            WriteFile(path=str(home / ".conf" / "lock.json"), data=b"OURS", mode=0o644, keep_existing=True),
            JsonMerge(path=str(home / ".conf" / "settings.json"), document={"ours": {"x": 1}}, merge=SERVERS_WHOLE),
            WriteFile(path=str(home / ".conf" / "token"), data=b"secret", mode=0o600),
        ],
    )


async def test_directories_and_files_are_made_kept_and_merged_and_a_second_run_changes_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    home = tmp_path / "fresh" / "home"
    with anyio.fail_after(STEP_S):
        await apply_setup(sandbox, setup_of(home), user=None)
    conf = home / ".conf"
    assert (conf / "deep" / "er").is_dir()
    assert (conf / "lock.json").read_bytes() == b"OURS" and stat.S_IMODE((conf / "lock.json").stat().st_mode) == 0o644
    assert json.loads((conf / "settings.json").read_text()) == {"ours": {"x": 1}}
    assert stat.S_IMODE((conf / "settings.json").stat().st_mode) == 0o600
    assert (conf / "token").read_bytes() == b"secret" and stat.S_IMODE((conf / "token").stat().st_mode) == 0o600

    # What the image (or an earlier run) left: a lock of its own and settings with its keys.
    (conf / "lock.json").write_bytes(b"IMAGE")
    (conf / "settings.json").write_text(json.dumps({"ui": 1, "ours": {"y": 2}}))
    before = {path: path.read_bytes() for path in conf.iterdir() if path.is_file()}
    with anyio.fail_after(STEP_S):
        await apply_setup(sandbox, setup_of(home), user=None)
    assert (conf / "lock.json").read_bytes() == b"IMAGE"
    assert json.loads((conf / "settings.json").read_text()) == {"ui": 1, "ours": {"y": 2, "x": 1}}
    with anyio.fail_after(STEP_S):
        await apply_setup(sandbox, setup_of(home), user=None)
    after = {path: path.read_bytes() for path in conf.iterdir() if path.is_file()}
    assert after == {**before, conf / "settings.json": after[conf / "settings.json"]}
    assert json.loads(after[conf / "settings.json"]) == {"ui": 1, "ours": {"y": 2, "x": 1}}


async def test_a_directory_that_cannot_be_made_is_named_with_the_backend(sandbox: Sandbox, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".conf").write_text("a file where a directory goes")
    with pytest.raises(BackendError, match=rf"^probe: could not create directory {home}/\.conf for user \(default\): "):
        with anyio.fail_after(STEP_S):
            await apply_setup(sandbox, setup_of(home), user=None)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(BackendError, match=rf"^probe: could not create HOME {blocker}/home for user \(default\): "):
        with anyio.fail_after(STEP_S):
            await apply_setup(sandbox, setup_of(blocker / "home"), user=None)


async def test_a_file_that_cannot_be_written_is_named_with_the_backend(sandbox: Sandbox, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".conf" / "token").mkdir(parents=True)  # a directory where the file goes
    with pytest.raises(BackendError, match=rf"^probe: could not write {home}/\.conf/token"):
        with anyio.fail_after(STEP_S):
            await apply_setup(sandbox, setup_of(home), user=None)
