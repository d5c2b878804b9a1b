"""The MCP tools: thin adapters from validated inputs to the orchestrator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations

from mcp_sandboxes.errors import ConflictError, NotFoundError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.orchestrator.core import PROGRESS_INTERVAL_S, settled, turn_view
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.orchestrator.views import EnvironmentView, EventsPage, SessionView
from mcp_sandboxes.server.auth import current_caller
from mcp_sandboxes.server.permissions import (
    ApproveToolUseInput,
    OperatorChannel,
    answer_for,
)
from mcp_sandboxes.server.registration import CallScope, current_call, current_progress, register_tool
from mcp_sandboxes.server.schemas import (
    CreateEnvironmentInput,
    DeleteEnvironmentInput,
    EnvironmentList,
    ListSessionsInput,
    NoInput,
    ReadEventsInput,
    ResolvePermissionInput,
    SendMessageInput,
    SessionList,
    SessionRefInput,
    SpawnAgentInput,
    TurnOutcome,
    WaitForInput,
    WaitForResult,
)
from mcp_sandboxes.server.summaries import summarize
from mcp_sandboxes.specs import AgentSpec, ResourceLimits

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
CREATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
# Starts or drives an agent that may reach its model API and, on the host network, beyond.
RUNS_AGENT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True)
DESTROYS = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)


APPROVE_TOOL = "approve_tool_use"
# Waiting reads that may return a sub-agent's permission question as input_required (2026-07-28).
QUESTION_CARRIERS = frozenset({"wait_for", "read_events"})
# Shown by clients in place of the name; they say what each tool is for in a few words.
TITLES = {
    "create_environment": "Create a sandbox environment for sub-agents",
    "list_environments": "List sandbox environments",
    "delete_environment": "Delete a sandbox environment",
    "spawn_agent": "Spawn a coding sub-agent in a sandbox",
    "send_message": "Send a message to a sub-agent",
    "wait_for": "Wait for sub-agents to finish",
    "resolve_permission": "Answer a sub-agent's permission prompt",
    "approve_tool_use": "Permission prompt of a sandboxed agent",
    "read_events": "Read a sub-agent's events",
    "get_session": "Get a sub-agent session's status",
    "list_sessions": "List sub-agent sessions",
    "interrupt_session": "Interrupt a sub-agent's turn",
    "stop_session": "Stop a sub-agent for good",
}


async def report(done: float, total: float | None, message: str | None) -> None:
    """Progress to the client of the current call (nothing when it sent no progress token)."""
    progress = current_progress.get()
    if progress is not None:
        await progress(done, total, message)


@asynccontextmanager
async def heartbeat(message: str) -> AsyncIterator[None]:
    """While the body waits, tell the client every few seconds that the call is alive."""
    async with anyio.create_task_group() as task_group:

        async def beat() -> None:
            started = anyio.current_time()
            while True:
                await anyio.sleep(PROGRESS_INTERVAL_S)
                await report(anyio.current_time() - started, None, f"{message} ({anyio.current_time() - started:.0f}s)")

        task_group.start_soon(beat)
        try:
            yield
        finally:
            task_group.cancel_scope.cancel()


def register_tools(server: MCPServer[Any], orchestrator: Orchestrator, call_scope: CallScope | None = None) -> None:
    """`call_scope` sets `current_caller` around each call; an agent calling back (a sub-agent
    token) acts as its session: what it spawns is its child, and it reaches only its descendants."""
    settings = orchestrator.settings.server

    async def reachable(session_id: str) -> str:
        await orchestrator.check_reach(current_caller.get(), session_id)
        return session_id

    def capped(timeout_s: float) -> float:
        return min(timeout_s, settings.max_call_s)

    async def outcome(session_id: str, turn_index: int, wait: bool, timeout_s: float) -> TurnOutcome:
        if not wait:
            return TurnOutcome(
                session=await orchestrator.get_session(session_id), turn_index=turn_index, completed=False
            )
        async with heartbeat(f"turn {turn_index} of {session_id} running"):
            turn = await orchestrator.wait_for_turn(session_id, turn_index, capped(timeout_s))
        session = await orchestrator.get_session(session_id)
        if turn is None:
            return TurnOutcome(
                session=session,
                turn_index=turn_index,
                completed=False,
                note=f"still running after {capped(timeout_s):g}s (calls return before clients give up on them);"
                f" call wait_for with session_ids=[{session_id!r}] to keep waiting, or read_events to follow it",
            )
        view = turn_view(turn)
        return TurnOutcome(
            session=session,
            turn_index=turn_index,
            completed=True,
            final_message=view.final_message,
            stop_reason=view.stop_reason,
            usage=view.usage,
            error=view.error,
            denied_tools=view.denied_tools,
        )

    async def create_environment(request: CreateEnvironmentInput) -> EnvironmentView:
        caller = current_caller.get()
        provider = request.provider
        image = request.image
        if caller.session_id is not None:
            # An agent's defaults are its own environment's, not the server's.
            own = await orchestrator.access.own_environment(caller.session_id)
            provider, image = provider or own.provider, image or own.spec.image
        view = await orchestrator.create_environment(
            EnvironmentRequest(
                name=request.name,
                provider=provider or settings.default_provider,
                image=image or settings.default_image,
                env=request.env,
                workdir=request.workdir,
                network=request.network,
                allowed_hosts=request.allowed_hosts,
                limits=ResourceLimits(cpus=request.cpus, memory_mb=request.memory_mb, pids=request.pids_limit),
                setup_commands=request.setup_commands,
                packages=request.packages,
                read_only_root=request.read_only_root,
                runtime=request.runtime,
                workspace=request.workspace,
                warm_pool=request.warm_pool,
            ),
            caller_session_id=caller.session_id,
        )
        if not request.wait or view.state != "preparing":
            return view
        await report(0, None, f"preparing the image of {view.name}")
        return await orchestrator.wait_for_environment(view.id, capped(request.timeout_s), progress=report)

    async def list_environments(request: NoInput) -> EnvironmentList:
        return EnvironmentList(environments=await orchestrator.list_environments())

    async def delete_environment(request: DeleteEnvironmentInput) -> EnvironmentView:
        if current_caller.get().is_agent:
            raise ConflictError("environment: sub-agents may not delete environments; the operator can")
        return await orchestrator.delete_environment(request.environment, force=request.force, purge=request.purge)

    async def spawn_agent(request: SpawnAgentInput) -> TurnOutcome:
        await report(0, None, f"provisioning a sandbox in {request.environment}")
        session = await orchestrator.spawn_agent(
            environment=request.environment,
            prompt=request.prompt,
            agent=AgentSpec(
                backend=request.backend,
                model=request.model,
                system_prompt=request.system_prompt,
                allowed_tools=request.allowed_tools,
                permission_mode=request.permission_mode,
                max_turns=request.max_turns,
            ),
            parent_session_id=current_caller.get().session_id,
            subagents=request.subagents,
            ask_permissions=request.ask_permissions,
        )
        return await outcome(session.session_id, 0, request.wait, request.timeout_s)

    async def send_message(request: SendMessageInput) -> TurnOutcome:
        _, index = await orchestrator.send_message(await reachable(request.session_id), request.text)
        return await outcome(request.session_id, index, request.wait, request.timeout_s)

    async def approve_tool_use(request: ApproveToolUseInput) -> CallToolResult:
        caller = current_caller.get()
        if caller.session_id is None:
            raise ConflictError(
                "approve_tool_use: only a sandboxed agent asks this (its permission prompt); to answer one,"
                " use resolve_permission"
            )
        decided = await orchestrator.permissions.ask(caller.session_id, request.tool_name, request.input)
        answer = answer_for(decided, request.input).model_dump(exclude_none=True)
        # Claude Code reads the answer from a single text block, exactly its JSON shape, and refuses
        # a result that carries anything else (structured content included).
        return CallToolResult(content=[TextContent(type="text", text=json.dumps(answer))])

    async def resolve_permission(request: ResolvePermissionInput) -> SessionView:
        caller = current_caller.get()
        session_id = await reachable(request.session_id)
        if all(r.request_id != request.request_id for r in orchestrator.permissions.pending(session_id)):
            raise NotFoundError(
                f"request_id: session {session_id} has no pending request {request.request_id!r};"
                " get_session lists its pending_permissions"
            )
        await orchestrator.permissions.resolve(
            request.request_id,
            request.decision,
            decided_by=caller.session_id or "operator",
            message=request.message,
        )
        return await orchestrator.get_session(session_id)

    async def wait_for(request: WaitForInput) -> WaitForResult:
        for session_id in request.session_ids:
            await reachable(session_id)
        views, timed_out = await orchestrator.wait_for_sessions(
            request.session_ids, mode=request.mode, max_wait_s=capped(request.timeout_s), progress=report
        )
        done = [view.session_id for view in views if settled(view)]
        return WaitForResult(sessions=views, settled=done, timed_out=timed_out)

    async def read_events(request: ReadEventsInput) -> EventsPage:
        return await orchestrator.read_events(
            await reachable(request.session_id),
            after=request.after,
            limit=request.limit,
            wait_s=request.wait_s,
            types=request.types,
        )

    async def get_session(request: SessionRefInput) -> SessionView:
        return await orchestrator.get_session(await reachable(request.session_id))

    async def list_sessions(request: ListSessionsInput) -> SessionList:
        sessions = await orchestrator.list_sessions(request.status)
        caller = current_caller.get()
        if caller.session_id is not None:
            mine = set(await orchestrator.descendants(caller.session_id))
            sessions = [session for session in sessions if session.session_id in mine]
        return SessionList(sessions=sessions)

    async def interrupt_session(request: SessionRefInput) -> SessionView:
        return await orchestrator.interrupt(await reachable(request.session_id))

    async def stop_session(request: SessionRefInput) -> SessionView:
        return await orchestrator.stop_session(await reachable(request.session_id))

    tools: list[tuple[str, str, type[Any], type[Any] | None, Any, ToolAnnotations]] = [
        (
            "create_environment",
            "Create a named sandbox environment (provider, image, env vars, network, limits, setup commands)."
            " Each agent session gets its own sandbox made from it. A sub-agent may only use the providers,"
            " images, network and limits its own environment allows (defaults: its own).",
            CreateEnvironmentInput,
            EnvironmentView,
            create_environment,
            CREATES,
        ),
        (
            "list_environments",
            "List environments with their state.",
            NoInput,
            EnvironmentList,
            list_environments,
            READ_ONLY,
        ),
        (
            "delete_environment",
            "Delete an environment. Refuses while live sessions use it unless force=true (which stops them)."
            " Its sessions' history (events, transcripts, get_session) stays readable unless purge=true."
            " Operator only: sub-agents may not delete environments.",
            DeleteEnvironmentInput,
            EnvironmentView,
            delete_environment,
            DESTROYS,
        ),
        (
            "spawn_agent",
            "Start a coding-agent sub-agent in a new sandbox of an environment, with a first prompt."
            " Returns the session id at once, or with wait=true the first turn's final message.",
            SpawnAgentInput,
            TurnOutcome,
            spawn_agent,
            RUNS_AGENT,
        ),
        (
            "send_message",
            "Send a follow-up message to a session; it continues the same conversation. Queued if a turn is running.",
            SendMessageInput,
            TurnOutcome,
            send_message,
            RUNS_AGENT,
        ),
        (
            "resolve_permission",
            "Answer a sub-agent's permission prompt (session.requires_action): allow or deny the tool call it"
            " waits on. Its pending requests are in get_session's pending_permissions.",
            ResolvePermissionInput,
            SessionView,
            resolve_permission,
            ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False),
        ),
        (
            APPROVE_TOOL,
            "Permission prompt of a sandboxed Claude Code (its --permission-prompt-tool): asks whoever"
            " spawned it whether a tool call may run. Called by sub-agents, not by you.",
            ApproveToolUseInput,
            None,
            approve_tool_use,
            ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False),
        ),
        (
            "wait_for",
            "Wait for sub-agent sessions to finish their turns (all, or the first of them): fan out with"
            " spawn_agent, then wait_for their ids. Returns each session's status and last turn; bounded"
            " below the client's patience, so call again while timed_out is true.",
            WaitForInput,
            WaitForResult,
            wait_for,
            READ_ONLY,
        ),
        (
            "read_events",
            "Read a session's normalized events after a cursor; wait_s long-polls for new ones.",
            ReadEventsInput,
            EventsPage,
            read_events,
            READ_ONLY,
        ),
        (
            "get_session",
            "Get a session's status, usage and last turn.",
            SessionRefInput,
            SessionView,
            get_session,
            READ_ONLY,
        ),
        (
            "list_sessions",
            "List sessions, optionally by status.",
            ListSessionsInput,
            SessionList,
            list_sessions,
            READ_ONLY,
        ),
        (
            "interrupt_session",
            "Interrupt the running turn; the sandbox stays and the session goes idle, ready for the next message.",
            SessionRefInput,
            SessionView,
            interrupt_session,
            ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False),
        ),
        (
            "stop_session",
            "Stop a session for good: interrupts a running turn and removes its sandbox. Its events stay readable.",
            SessionRefInput,
            SessionView,
            stop_session,
            DESTROYS,
        ),
    ]
    channel = OperatorChannel(orchestrator)
    orchestrator.permissions.askers.append(channel.ask)

    def guarded(name: str, handler: Any) -> Any:
        """Who may call what: a permissions-only token reaches approve_tool_use and nothing else;
        the operator's connection is remembered, to ask the human about sub-agents' tool calls."""

        async def call(request: Any) -> Any:
            caller = current_caller.get()
            if caller.scope == "permissions" and name != APPROVE_TOOL:
                raise ConflictError(
                    f"{name}: this agent's token only asks about its own permission prompts"
                    " (spawned with ask_permissions, not subagents)"
                )
            if caller.is_agent:
                return await handler(request)
            call = current_call.get()
            if call is not None:
                await channel.apply_answers(call)
                if call.modern and name in QUESTION_CARRIERS:
                    return await channel.run_or_ask(call, handler, request)
            async with channel.calling(call):
                return await handler(request)

        return call

    for name, description, input_model, output_model, handler, hints in tools:
        register_tool(
            server,
            name=name,
            title=TITLES[name],
            description=description,
            input_model=input_model,
            output_model=output_model,
            handler=guarded(name, handler),
            annotations=hints,
            call_scope=call_scope,
            summarize=None if name == APPROVE_TOOL else summarize,
        )
