"""MCP prompts (ready-made instructions for the calling agent: delegate one task, fan out and
merge) and argument completions (environment names, session ids the caller may reach)."""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext

from mcp_sandboxes.orchestrator import OPERATOR, Orchestrator
from mcp_sandboxes.server.auth import CallerIdentity
from mcp_sandboxes.server.resources import SandboxesMCPServer

MAX_COMPLETIONS = 100

DELEGATE = """\
Delegate this task to a coding sub-agent in a sandbox, then report what it did:

{task}

1. list_environments; if none fits, create_environment (image with the tools the task needs;
   network "host" if the agent must reach its model API or spawn sub-agents).
2. spawn_agent(environment="{environment}", prompt=<the task, self-contained>, backend="{backend}").
3. wait_for(session_ids=[<its session_id>]); call again while timed_out is true. If it shows
   pending_permissions, decide with resolve_permission.
4. Read its final message (and session_diff / read_file if it changed files), then stop_session.
"""

FAN_OUT = """\
Split this work across {count} coding sub-agents working in parallel, then merge their results:

{task}

1. Divide the work into {count} independent parts, each a self-contained prompt.
2. spawn_agent once per part (same environment "{environment}", without wait), keeping the ids.
3. wait_for(session_ids=[...all ids...], mode="all"); call again while timed_out is true; answer
   any pending_permissions with resolve_permission.
4. Read each final message (get_session), merge them into one answer, note disagreements.
5. stop_session each sub-agent.
"""


def register_prompts(server: SandboxesMCPServer, orchestrator: Orchestrator, identity: CallerIdentity | None) -> None:
    @server.prompt(
        name="delegate",
        title="Delegate a task to a sandboxed sub-agent",
        description="Instructions to run one coding sub-agent on a task and report its result.",
    )
    def delegate(task: str, environment: str = "default", backend: str = "claude") -> str:
        return DELEGATE.format(task=task, environment=environment, backend=backend)

    @server.prompt(
        name="fan_out",
        title="Fan a task out to several sub-agents and merge",
        description="Instructions to split a task across N parallel sub-agents, wait for all, merge.",
    )
    def fan_out(task: str, count: str = "3", environment: str = "default") -> str:
        return FAN_OUT.format(task=task, count=count, environment=environment)

    async def complete(ctx: ServerRequestContext[Any], params: types.CompleteRequestParams) -> types.CompleteResult:
        caller = OPERATOR
        request = getattr(ctx, "request", None)
        if identity is not None and request is not None:
            found = await identity.caller(request.headers.get("authorization", ""))
            if found is None:
                return types.CompleteResult(completion=types.Completion(values=[]))
            caller = found
        prefix = params.argument.value
        values: list[str] = []
        if params.argument.name == "session_id":
            sessions = [view.session_id for view in await orchestrator.list_sessions()]
            if caller.session_id is not None:
                mine = set(await orchestrator.descendants(caller.session_id))
                sessions = [s for s in sessions if s in mine]
            values = sessions
        elif params.argument.name == "environment":
            values = [env.name for env in await orchestrator.list_environments()]
        elif params.argument.name == "backend":
            values = orchestrator.backend_names()
        matching = [value for value in values if value.startswith(prefix)]
        return types.CompleteResult(
            completion=types.Completion(
                values=matching[:MAX_COMPLETIONS], total=len(matching), has_more=len(matching) > MAX_COMPLETIONS
            )
        )

    server._lowlevel_server.add_request_handler("completion/complete", types.CompleteRequestParams, complete)
