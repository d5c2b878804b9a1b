"""Workspaces end to end with real parts: the `mcp` SDK client -> our server (subprocess, stdio)
-> the real Docker engine -> the real Claude Code in the container -> the scripted model server
on loopback. A repository the test makes is each agent's workspace; the agents edit it with
real Bash tool calls; the diff and export tools bring exactly that work back, as branches of the
host repository; paths that lead out of the workspace are refused by field."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import McpSession, ToolCallError, docker_exec, mcp_server, server_environment
from tests.e2e.test_boundary import agent_in_docker
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

EDIT_ONE = "sed -i 's/^hello$/hello from one/' hello.txt && echo edited-one"
EDIT_TWO = "printf 'two was here\\n' > notes.txt && echo edited-two"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
    ).stdout.strip()


def make_repo(path: Path) -> str:
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.invalid")
    (path / "hello.txt").write_text("hello\nworld\n")
    (path / "README.md").write_text("# demo\n")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "start")
    return git(path, "rev-parse", "HEAD")


def edit_script() -> Script:
    script = Script(fallback=Reply(text="ok"))
    script.on(
        user_contains="EDIT-ONE", reply=Reply(tool_calls=[ToolCall(name="Bash", arguments={"command": EDIT_ONE})])
    )
    script.on(tool_result_contains="edited-one", reply=Reply(text="DONE-ONE"))
    script.on(
        user_contains="EDIT-TWO", reply=Reply(tool_calls=[ToolCall(name="Bash", arguments={"command": EDIT_TWO})])
    )
    script.on(tool_result_contains="edited-two", reply=Reply(text="DONE-TWO"))
    return script


def changed_lines(diff: str) -> list[str]:
    return [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]


async def refused(mcp: McpSession, tool: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(ToolCallError) as error:
        await mcp.call(tool, arguments)
    # The SDK puts "Error executing tool NAME: " before the server's own message.
    return str(error.value).removeprefix(f"Error executing tool {tool}: ")


async def test_two_agents_edit_one_repository_and_their_work_comes_back_as_two_branches(
    tmp_path: Path, claude_bin: Path
) -> None:
    projects = tmp_path / "projects"
    repo = projects / "repo"
    start = make_repo(repo)
    with ScriptedModelServer(edit_script()) as model:
        env = server_environment(
            tmp_path / "data", model.url, claude_bin, {"MCP_SANDBOXES_WORKSPACES__ALLOWED_ROOTS": str(projects)}
        )
        async with mcp_server("stdio", env) as mcp:
            await mcp.call(
                "create_environment",
                {
                    "name": "repo",
                    "image": BASE_IMAGE,
                    "network": "host",
                    "memory_mb": 2048,
                    "workspace": {"kind": "git", "url": str(repo), "ref": "main"},
                },
            )
            sessions: dict[str, str] = {}
            for task in ("EDIT-ONE", "EDIT-TWO"):
                done = await mcp.call(
                    "spawn_agent",
                    {
                        "environment": "repo",
                        "prompt": f"{task}: change the repository",
                        "permission_mode": "bypassPermissions",
                        "wait": True,
                        "timeout_s": 90,
                    },
                )
                assert done["completed"] and f"DONE-{task.split('-')[1]}" in done["final_message"], done
                sessions[task] = done["session"]["session_id"]
            one, two = sessions["EDIT-ONE"], sessions["EDIT-TWO"]

            # The agent ran in the clone, on its own branch, as the agent user.
            container = (await mcp.call("get_session", {"session_id": one}))["sandbox_id"]
            assert docker_exec(
                container, "git", "-c", "safe.directory=*", "-C", "/workspace", "branch", "--show-current"
            ).strip() == (f"mcp-sandboxes/{one}")

            diff_one = await mcp.call("session_diff", {"session_id": one})
            assert diff_one["base"] == start
            assert diff_one["files"] == [{"status": "M", "path": "hello.txt"}]
            assert changed_lines(diff_one["diff"]) == ["-hello", "+hello from one"]
            diff_two = await mcp.call("session_diff", {"session_id": two})
            assert diff_two["files"] == [{"status": "A", "path": "notes.txt"}]
            assert changed_lines(diff_two["diff"]) == ["+two was here"]

            read = await mcp.call("read_file", {"session_id": one, "path": "hello.txt"})
            assert (read["content"], read["encoding"], read["truncated"]) == ("hello from one\nworld\n", "text", False)
            listed = await mcp.call("list_files", {"session_id": two, "path": "."})
            assert [e["path"] for e in listed["entries"]] == ["README.md", "hello.txt", "notes.txt"]

            for session_id in (one, two):
                exported = await mcp.call("export_changes", {"session_id": session_id})
                assert exported["host_repository"] == str(repo)
                assert exported["branch"] == f"mcp-sandboxes/{session_id}"
                assert exported["commits"] == 1 and exported["committed_now"] is True
                assert git(repo, "rev-parse", exported["branch"]) == exported["commit"]
                assert git(repo, "rev-parse", f"{exported['branch']}~1") == start

            # Two branches in the host repository, each with exactly its agent's change.
            assert sorted(git(repo, "branch", "--list", "mcp-sandboxes/*").split()) == sorted(
                f"mcp-sandboxes/{s}" for s in (one, two)
            )
            assert git(repo, "show", f"mcp-sandboxes/{one}:hello.txt") == "hello from one\nworld"
            assert git(repo, "diff", "--name-only", start, f"mcp-sandboxes/{one}") == "hello.txt"
            assert git(repo, "show", f"mcp-sandboxes/{two}:notes.txt") == "two was here"
            assert git(repo, "diff", "--name-only", start, f"mcp-sandboxes/{two}") == "notes.txt"
            # The host's own branch and files are untouched.
            assert git(repo, "rev-parse", "main") == start
            assert (repo / "hello.txt").read_text() == "hello\nworld\n"

            # Out of the workspace: refused by field, whichever way it is tried.
            docker_exec(container, "ln", "-s", "/etc", "/workspace/out")
            for path in ("../../etc/passwd", "/etc/passwd", "out/passwd"):
                message = await refused(mcp, "read_file", {"session_id": one, "path": path})
                assert message.startswith("path:"), (path, message)
                assert "outside the workspace" in message or "climbs out" in message, (path, message)
            message = await refused(mcp, "write_file", {"session_id": one, "path": "out/planted", "content": "x"})
            assert message.startswith("path:"), message
            message = await refused(mcp, "read_file", {"session_id": one, "path": "hello.txt", "max_bytes": 2_000_000})
            assert message.startswith("max_bytes:") and "1,048,576" in message, message

            for session_id in (one, two):
                await mcp.call("stop_session", {"session_id": session_id})


async def test_an_agent_cannot_name_host_directories_beyond_its_own_workspace(tmp_path: Path, claude_bin: Path) -> None:
    projects = tmp_path / "projects"
    make_repo(projects / "repo")
    make_repo(projects / "other")
    make_repo(tmp_path / "outside")
    with ScriptedModelServer(Script(fallback=Reply(text="ok"))) as model:
        env = server_environment(
            tmp_path / "data", model.url, claude_bin, {"MCP_SANDBOXES_WORKSPACES__ALLOWED_ROOTS": str(projects)}
        )
        async with mcp_server("http", env) as mcp:
            await mcp.call(
                "create_environment",
                {
                    "name": "repo",
                    "image": BASE_IMAGE,
                    "network": "host",
                    "workspace": {"kind": "git", "url": str(projects / "repo")},
                },
            )
            async with agent_in_docker(mcp, "repo") as agent:
                cases = [
                    ({"kind": "directory", "path": str(tmp_path / "outside"), "mode": "ro"}, "workspace.path:"),
                    ({"kind": "git", "url": str(tmp_path / "outside")}, "workspace.url:"),
                    ({"kind": "directory", "path": str(projects / "other"), "mode": "copy"}, "workspace.path:"),
                    ({"kind": "directory", "path": str(projects / "repo"), "mode": "rw"}, "workspace.mode:"),
                    ({"kind": "directory", "path": "/", "mode": "ro"}, "workspace.path:"),
                ]
                for index, (workspace, field) in enumerate(cases):
                    answer = await agent.call(
                        "create_environment", {"name": f"wider-{index}", "network": "host", "workspace": workspace}
                    )
                    assert answer.tool_error().startswith(field), (workspace, answer.body[:500])
                # What its own environment has stays within reach: a clone of its own repository.
                allowed = await agent.call(
                    "create_environment",
                    {"name": "same", "network": "host", "workspace": {"kind": "git", "url": str(projects / "repo")}},
                )
                assert not allowed.result()["result"].get("isError"), allowed.body[:500]
                await mcp.call("stop_session", {"session_id": agent.session_id})


async def test_a_read_only_directory_is_the_agents_workdir_and_stays_unchanged(
    tmp_path: Path, claude_bin: Path
) -> None:
    projects = tmp_path / "projects"
    shared = projects / "docs"
    shared.mkdir(parents=True)
    (shared / "README.md").write_text("read me\n")
    script = Script(fallback=Reply(text="ok"))
    probe = "cat README.md && (touch new.txt 2>/dev/null && echo wrote || echo read-only-here)"
    script.on(user_contains="RO-TASK", reply=Reply(tool_calls=[ToolCall(name="Bash", arguments={"command": probe})]))
    script.on(tool_result_contains="read-only-here", reply=Reply(text="DONE-RO"))
    with ScriptedModelServer(script) as model:
        env = server_environment(
            tmp_path / "data", model.url, claude_bin, {"MCP_SANDBOXES_WORKSPACES__ALLOWED_ROOTS": str(projects)}
        )
        async with mcp_server("stdio", env) as mcp:
            await mcp.call(
                "create_environment",
                {
                    "name": "docs",
                    "image": BASE_IMAGE,
                    "network": "host",
                    "workspace": {"kind": "directory", "path": str(shared), "mode": "ro"},
                },
            )
            done = await mcp.call(
                "spawn_agent",
                {"environment": "docs", "prompt": "RO-TASK", "permission_mode": "bypassPermissions", "wait": True},
            )
            assert done["completed"] and "DONE-RO" in done["final_message"], done
            session_id = done["session"]["session_id"]
            events = await mcp.call("read_events", {"session_id": session_id, "types": ["agent.tool_result"]})
            assert "read me" in str(events["events"][0]["data"]["content"])
            read = await mcp.call("read_file", {"session_id": session_id, "path": "/workspace/README.md"})
            assert read["content"] == "read me\n"
            message = await refused(mcp, "write_file", {"session_id": session_id, "path": "x.txt", "content": "x"})
            assert message.startswith("workspace:") and "writing the file failed" in message, message
            message = await refused(mcp, "session_diff", {"session_id": session_id})
            assert message.startswith("session_id:") and "no workspace repository" in message, message
            assert sorted(p.name for p in shared.iterdir()) == ["README.md"]
            await mcp.call("stop_session", {"session_id": session_id})
