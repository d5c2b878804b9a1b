"""Views show where the work is: a session's workspace branch and starting commit in get_session,
list_sessions and the terminal CLI (server-less, read from the data directory), an environment's
workspace (kind, source, mode or ref) in its views; a URL's credentials are never shown back.
In process, on the `process` provider, with a real repository made by the test."""

from __future__ import annotations

from pathlib import Path

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.cli_sources import LocalSource
from mcp_sandboxes.cli_views import workspace_of_environment, workspace_of_session
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.orchestrator.views import WorkspaceView
from mcp_sandboxes.store import DirectoryWorkspace, GitWorkspace
from tests.orchestrator.spine import events_until_idle, orchestrator_of, spine_settings
from tests.orchestrator.test_workspaces import make_repo


async def test_sessions_and_environments_show_their_workspace(tmp_path: Path) -> None:
    roots = tmp_path / "projects"
    head = make_repo(roots / "repo")
    settings = spine_settings(tmp_path)
    settings.workspaces.allowed_roots = [roots]
    async with orchestrator_of(settings).running() as orchestrator:
        await orchestrator.create_environment(
            EnvironmentRequest(
                name="ws", provider="process", image="host", workspace=GitWorkspace(url=str(roots / "repo"), ref="main")
            )
        )
        spawned = await orchestrator.spawn_agent(environment="ws", agent=AgentSpec(backend="custom"), prompt="hi")
        await events_until_idle(orchestrator, spawned.session_id)
        view = await orchestrator.get_session(spawned.session_id)
        assert view.workspace_branch == f"mcp-sandboxes/{spawned.session_id}"
        assert view.workspace_base == head
        listed = await orchestrator.list_sessions()
        assert [(s.workspace_branch, s.workspace_base) for s in listed] == [(view.workspace_branch, head)]
        environment = (await orchestrator.list_environments())[0]
        assert environment.workspace == WorkspaceView(kind="git", source=str(roots / "repo"), ref="main")

    # The terminal CLI, from the data directory with no server running.
    source = LocalSource(settings.database_path)
    session = await source.session(spawned.session_id)
    assert workspace_of_session(session) == f"mcp-sandboxes/{spawned.session_id} from {head[:12]}"
    (env,) = await source.environments()
    assert workspace_of_environment(env["workspace"]) == f"git {roots / 'repo'}@main"


def test_a_workspace_view_names_the_source_without_credentials() -> None:
    git = WorkspaceView.of(GitWorkspace(url="https://user:ghp_secret@example.com/org/app.git"))
    assert git == WorkspaceView(kind="git", source="https://example.com/org/app.git")
    directory = WorkspaceView.of(DirectoryWorkspace(path="/home/me/src/app", mode="ro"))
    assert (
        directory is not None and workspace_of_environment(directory.model_dump()) == "directory /home/me/src/app (ro)"
    )
    assert WorkspaceView.of(None) is None and workspace_of_session({"workspace_branch": None}) == ""
