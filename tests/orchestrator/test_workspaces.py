"""Workspaces in-process, on the `process` provider (real host processes, real git, a SQLite file
under tmp_path): a repository the test makes is cloned into each session's workspace on a branch
of its own; files are read, written and listed only inside it; the diff is against the starting
commit; export puts the session's commits on a branch of the host repository."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import pytest

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import ConflictError, InvalidInputError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.store import DirectoryWorkspace, GitWorkspace
from tests.orchestrator.spine import (
    answer_field,
    events_until_idle,
    orchestrator_of,
    sandbox_dir,
    spine_settings,
    texts,
)

CUSTOM = AgentSpec(backend="custom")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
    ).stdout.strip()


def make_repo(path: Path) -> str:
    """A repository with two commits on 'main'; returns the head commit."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.invalid")
    (path / "hello.txt").write_text("hello\n")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "first")
    (path / "src").mkdir()
    (path / "src" / "app.py").write_text("print('app')\n")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "second")
    return git(path, "rev-parse", "HEAD")


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "projects"
    root.mkdir()
    return root


@pytest.fixture
def settings(tmp_path: Path, roots: Path) -> Settings:
    settings = spine_settings(tmp_path)
    settings.workspaces.allowed_roots = [roots]
    settings.workspaces.max_read_bytes = 4096
    return settings


async def git_env(orchestrator: Orchestrator, repo: Path, name: str = "ws", ref: str | None = None) -> None:
    await orchestrator.create_environment(
        EnvironmentRequest(name=name, provider="process", image="host", workspace=GitWorkspace(url=str(repo), ref=ref))
    )


async def test_a_git_workspace_is_cloned_on_a_branch_of_its_own_and_the_agent_starts_in_it(
    settings: Settings, roots: Path
) -> None:
    head = make_repo(roots / "repo")
    async with orchestrator_of(settings).running() as orchestrator:
        await git_env(orchestrator, roots / "repo")
        spawned = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="where am I")
        events = await events_until_idle(orchestrator, spawned.session_id)
        record = await orchestrator.session_record(spawned.session_id)
        assert record.workspace_base == head
        assert record.workspace_branch == f"mcp-sandboxes/{spawned.session_id}"
        assert spawned.sandbox_id is not None
        workspace = sandbox_dir(settings, spawned.sandbox_id) / "workspace"
        assert answer_field(texts(events)[0], "cwd") == str(workspace)
        assert git(workspace, "rev-parse", "--abbrev-ref", "HEAD") == record.workspace_branch
        assert (workspace / "src" / "app.py").read_text() == "print('app')\n"
        # The bundle it came in as is gone; the host path is not its remote.
        assert not list(workspace.glob(".git/*.bundle"))
        assert git(workspace, "remote") == ""


async def test_the_diff_is_the_work_tree_against_the_starting_commit_untracked_files_included(
    settings: Settings, roots: Path
) -> None:
    make_repo(roots / "repo")
    async with orchestrator_of(settings).running() as orchestrator:
        await git_env(orchestrator, roots / "repo")
        spawned = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="go")
        await events_until_idle(orchestrator, spawned.session_id)
        session_id = spawned.session_id
        empty = await orchestrator.session_diff(session_id)
        assert empty.files == [] and empty.diff == ""

        await orchestrator.write_workspace_file(session_id, "hello.txt", "hello world\n", "text")
        await orchestrator.write_workspace_file(session_id, "new/dir/notes.md", "# notes\n", "text")
        diff = await orchestrator.session_diff(session_id)
        assert diff.files == [("M", "hello.txt"), ("A", "new/dir/notes.md")]
        assert "-hello\n+hello world\n" in diff.diff
        assert "+# notes\n" in diff.diff
        # The agent's own index was not touched: nothing is staged.
        workspace = sandbox_dir(settings, spawned.sandbox_id or "") / "workspace"
        assert git(workspace, "diff", "--cached", "--name-only") == ""


async def test_export_puts_each_sessions_commits_on_its_own_branch_of_the_host_repository(
    settings: Settings, roots: Path
) -> None:
    head = make_repo(roots / "repo")
    async with orchestrator_of(settings).running() as orchestrator:
        await git_env(orchestrator, roots / "repo")
        first = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="one")
        second = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="two")
        for session, text in ((first, "from one\n"), (second, "from two\n")):
            await events_until_idle(orchestrator, session.session_id)
            await orchestrator.write_workspace_file(session.session_id, "hello.txt", text, "text")
            exported = await orchestrator.export_changes(session.session_id, format="auto", to_host=True)
            assert exported.host_repository == str(roots / "repo")
            assert exported.committed_now and exported.commits == 1 and exported.base == head
            branch = f"mcp-sandboxes/{session.session_id}"
            assert exported.branch == branch
            assert git(roots / "repo", "rev-parse", branch) == exported.commit
            assert git(roots / "repo", "show", f"{branch}:hello.txt") == text.strip()
            assert git(roots / "repo", "rev-parse", f"{branch}~1") == head
        branches = git(roots / "repo", "branch", "--list", "mcp-sandboxes/*").split()
        assert sorted(branches) == sorted(f"mcp-sandboxes/{s.session_id}" for s in (first, second))
        # The host's own branch and work tree are as they were.
        assert git(roots / "repo", "rev-parse", "main") == head
        assert (roots / "repo" / "hello.txt").read_text() == "hello\n"

        # Exported again with nothing new: the same commit, nothing committed.
        again = await orchestrator.export_changes(first.session_id, format="auto", to_host=True)
        assert not again.committed_now and again.commit == git(
            roots / "repo", "rev-parse", f"mcp-sandboxes/{first.session_id}"
        )
        # A session that changed nothing has nothing to export.
        idle = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="three")
        await events_until_idle(orchestrator, idle.session_id)
        with pytest.raises(ConflictError, match="nothing to export"):
            await orchestrator.export_changes(idle.session_id, format="auto", to_host=True)


async def test_without_the_host_an_export_is_a_bundle_or_a_patch(settings: Settings, roots: Path) -> None:
    make_repo(roots / "repo")
    async with orchestrator_of(settings).running() as orchestrator:
        await git_env(orchestrator, roots / "repo", ref="main~1")
        spawned = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="go")
        await events_until_idle(orchestrator, spawned.session_id)
        await orchestrator.write_workspace_file(spawned.session_id, "hello.txt", "patched\n", "text")
        patch = await orchestrator.export_changes(spawned.session_id, format="patch", to_host=True)
        assert patch.patch is not None and "+patched" in patch.patch and not patch.truncated
        bundled = await orchestrator.export_changes(spawned.session_id, format="auto", to_host=False)
        assert bundled.host_repository is None and bundled.bundle_base64
        bundle = roots.parent / "out.bundle"
        bundle.write_bytes(base64.b64decode(bundled.bundle_base64))
        git(roots / "repo", "fetch", "--quiet", str(bundle), f"{bundled.branch}:refs/heads/from-bundle")
        assert git(roots / "repo", "show", "from-bundle:hello.txt") == "patched"
        # It started at main~1, so src/app.py (added by the second commit) was never there.
        assert "src/app.py" not in git(roots / "repo", "show", "--name-only", "--format=", "from-bundle")


async def test_paths_are_confined_to_the_workspace(settings: Settings, roots: Path, tmp_path: Path) -> None:
    make_repo(roots / "repo")
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    async with orchestrator_of(settings).running() as orchestrator:
        await git_env(orchestrator, roots / "repo")
        spawned = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="go")
        await events_until_idle(orchestrator, spawned.session_id)
        session_id = spawned.session_id
        workspace = sandbox_dir(settings, spawned.sandbox_id or "") / "workspace"
        (workspace / "escape").symlink_to(tmp_path)
        (workspace / "inside").symlink_to("src")

        for path in ("../../etc/passwd", "/etc/passwd", "src/../../x", "escape/secret.txt", "escape"):
            with pytest.raises(InvalidInputError) as refused:
                await orchestrator.read_workspace_file(session_id, path, offset=0, max_bytes=100)
            assert refused.value.field == "path", path
        with pytest.raises(InvalidInputError, match="outside the workspace"):
            await orchestrator.write_workspace_file(session_id, "escape/planted.txt", "x", "text")
        assert not (tmp_path / "planted.txt").exists()
        with pytest.raises(InvalidInputError, match="path"):
            await orchestrator.list_workspace(session_id, "escape", depth=1)

        # Inside is fine, through a symlink that stays inside, and absolute under the workdir.
        read = await orchestrator.read_workspace_file(session_id, "inside/app.py", offset=0, max_bytes=100)
        assert (read.path, read.content, read.encoding, read.truncated) == (
            "src/app.py",
            "print('app')\n",
            "text",
            False,
        )
        absolute = await orchestrator.read_workspace_file(session_id, "/workspace/hello.txt", offset=0, max_bytes=100)
        assert absolute.content == "hello\n"


async def test_reads_are_capped_paged_and_binary_comes_back_as_base64(settings: Settings, roots: Path) -> None:
    make_repo(roots / "repo")
    async with orchestrator_of(settings).running() as orchestrator:
        await git_env(orchestrator, roots / "repo")
        spawned = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="go")
        await events_until_idle(orchestrator, spawned.session_id)
        session_id = spawned.session_id
        with pytest.raises(InvalidInputError) as refused:
            await orchestrator.read_workspace_file(session_id, "hello.txt", offset=0, max_bytes=4097)
        assert refused.value.field == "max_bytes" and "4,096" in str(refused.value)

        blob = bytes(range(256)) * 40  # 10,240 bytes, not UTF-8
        await orchestrator.write_workspace_file(session_id, "blob.bin", base64.b64encode(blob).decode(), "base64")
        head = await orchestrator.read_workspace_file(session_id, "blob.bin", offset=0, max_bytes=4096)
        assert head.encoding == "base64" and head.truncated and head.size == len(blob)
        assert base64.b64decode(head.content) == blob[:4096]
        tail = await orchestrator.read_workspace_file(session_id, "blob.bin", offset=8192, max_bytes=4096)
        assert base64.b64decode(tail.content) == blob[8192:] and not tail.truncated

        with pytest.raises(InvalidInputError) as too_big:
            await orchestrator.write_workspace_file(session_id, "big.txt", "x" * (4 * 1_048_576 + 1), "text")
        assert too_big.value.field == "content"

        listed_path, entries, truncated = await orchestrator.list_workspace(session_id, ".", depth=2)
        assert listed_path == "." and not truncated
        assert [(e.path, e.type) for e in entries] == [
            ("blob.bin", "file"),
            ("hello.txt", "file"),
            ("src", "directory"),
            ("src/app.py", "file"),
        ]


async def test_a_copied_directory_becomes_a_repository_with_a_starting_commit(settings: Settings, roots: Path) -> None:
    plain = roots / "plain"
    (plain / "docs").mkdir(parents=True)
    (plain / "docs" / "a.txt").write_text("a\n")
    async with orchestrator_of(settings).running() as orchestrator:
        await orchestrator.create_environment(
            EnvironmentRequest(
                name="copy", provider="process", image="host", workspace=DirectoryWorkspace(path=str(plain))
            )
        )
        spawned = await orchestrator.spawn_agent(environment="copy", agent=CUSTOM, prompt="go")
        await events_until_idle(orchestrator, spawned.session_id)
        await orchestrator.write_workspace_file(spawned.session_id, "docs/a.txt", "b\n", "text")
        diff = await orchestrator.session_diff(spawned.session_id)
        assert diff.files == [("M", "docs/a.txt")] and "-a\n+b\n" in diff.diff
        # The host's directory is untouched: it was copied, not mounted.
        assert (plain / "docs" / "a.txt").read_text() == "a\n" and not (plain / ".git").exists()


async def test_host_directories_outside_the_allowed_roots_are_refused(
    settings: Settings, roots: Path, tmp_path: Path
) -> None:
    make_repo(tmp_path / "elsewhere")
    async with orchestrator_of(settings).running() as orchestrator:
        for workspace, field in (
            (GitWorkspace(url=str(tmp_path / "elsewhere")), "workspace.url"),
            (DirectoryWorkspace(path=str(tmp_path / "elsewhere"), mode="ro"), "workspace.path"),
            (DirectoryWorkspace(path=str(roots / ".." / "elsewhere")), "workspace.path"),
            (GitWorkspace(url="ext::sh -c touch% /tmp/pwned"), "workspace.url"),
        ):
            with pytest.raises(InvalidInputError) as refused:
                await orchestrator.create_environment(
                    EnvironmentRequest(name="bad", provider="process", image="host", workspace=workspace)
                )
            assert refused.value.field == field
        with pytest.raises(InvalidInputError) as unmountable:
            await orchestrator.create_environment(
                EnvironmentRequest(
                    name="ro",
                    provider="process",
                    image="host",
                    workspace=DirectoryWorkspace(path=str(roots), mode="ro"),
                )
            )
        assert unmountable.value.field == "workspace.mode"
        settings.workspaces.allowed_roots = []
        with pytest.raises(InvalidInputError, match=r"workspaces\.allowed_roots"):
            await orchestrator.create_environment(
                EnvironmentRequest(
                    name="none", provider="process", image="host", workspace=DirectoryWorkspace(path=str(roots))
                )
            )


async def test_an_agent_cannot_widen_its_workspace(settings: Settings, roots: Path) -> None:
    make_repo(roots / "repo")
    make_repo(roots / "other")
    settings.subagents.allow_unsandboxed = True
    async with orchestrator_of(settings).running() as orchestrator:
        await git_env(orchestrator, roots / "repo")
        parent = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="go")
        await events_until_idle(orchestrator, parent.session_id)
        agent = parent.session_id
        refused_cases: list[tuple[DirectoryWorkspace | GitWorkspace, str]] = [
            (DirectoryWorkspace(path=str(roots / "other"), mode="copy"), "workspace.path"),
            (DirectoryWorkspace(path=str(roots), mode="ro"), "workspace.path"),
            (GitWorkspace(url=str(roots / "other")), "workspace.url"),
            (DirectoryWorkspace(path=str(roots / "repo"), mode="rw"), "workspace.mode"),
            (GitWorkspace(url="https://example.invalid/x.git"), "workspace.url"),
        ]
        for index, (workspace, field) in enumerate(refused_cases):
            with pytest.raises(InvalidInputError) as refused:
                await orchestrator.create_environment(
                    EnvironmentRequest(name=f"child{index}", provider="process", image="host", workspace=workspace),
                    caller_session_id=agent,
                )
            assert refused.value.field == field, workspace
        # What it already has, copied or cloned (a subdirectory too), is fine.
        await orchestrator.create_environment(
            EnvironmentRequest(
                name="child-ok",
                provider="process",
                image="host",
                workspace=DirectoryWorkspace(path=str(roots / "repo" / "src"), mode="copy"),
            ),
            caller_session_id=agent,
        )
        await orchestrator.create_environment(
            EnvironmentRequest(
                name="child-git", provider="process", image="host", workspace=GitWorkspace(url=str(roots / "repo"))
            ),
            caller_session_id=agent,
        )
        # Nor may it spawn into an operator's environment whose workspace reaches further.
        await git_env(orchestrator, roots / "other", name="other")
        with pytest.raises(InvalidInputError) as refused_spawn:
            await orchestrator.spawn_agent(environment="other", agent=CUSTOM, prompt="x", parent_session_id=agent)
        assert refused_spawn.value.field == "workspace.url"


async def test_a_stopped_sessions_workspace_cannot_be_reached(settings: Settings, roots: Path) -> None:
    make_repo(roots / "repo")
    async with orchestrator_of(settings).running() as orchestrator:
        await git_env(orchestrator, roots / "repo")
        spawned = await orchestrator.spawn_agent(environment="ws", agent=CUSTOM, prompt="go")
        await events_until_idle(orchestrator, spawned.session_id)
        await orchestrator.stop_session(spawned.session_id)
        with pytest.raises(ConflictError, match="stopped"):
            await orchestrator.session_diff(spawned.session_id)
