"""Session transcripts and event logs as MCP resources, with change notifications.

Two notification paths, because clients speak two protocol eras: `subscriptions/listen`
(2026-07-28, through the SDK's subscription bus) and `resources/subscribe` (earlier
versions, tracked here per client session)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourcesListChanged, ResourceUpdated

from mcp_sandboxes.errors import NotFoundError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.server.auth import CallerIdentity
from mcp_sandboxes.server.registration import http_request

logger = logging.getLogger(__name__)

# The tool a sandboxed Claude Code asks its permission prompts with (server/tools.py registers it).
AGENT_ONLY_TOOL = "approve_tool_use"
TRANSCRIPT_TEMPLATE = "sandboxes://sessions/{session_id}/transcript"
EVENTS_TEMPLATE = "sandboxes://sessions/{session_id}/events"
NOTIFY_TIMEOUT_S = 5.0


class SandboxesMCPServer(MCPServer[Any]):
    """MCPServer whose resources/list shows the live sessions' transcripts."""

    orchestrator: Orchestrator
    identity: CallerIdentity | None = None

    async def _handle_list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        """Each caller sees the tools it may call: the operator not the one sandboxed agents ask
        their permission prompts with, a permissions-only agent token that one alone."""
        tools = await self.list_tools()
        caller = None
        request = getattr(ctx, "request", None)
        if self.identity is not None and request is not None:
            caller = await self.identity.caller(request.headers.get("authorization", ""))
        if caller is None or not caller.is_agent:
            tools = [tool for tool in tools if tool.name != AGENT_ONLY_TOOL]
        elif caller.scope == "permissions":
            tools = [tool for tool in tools if tool.name == AGENT_ONLY_TOOL]
        return types.ListToolsResult(tools=tools)

    async def _handle_list_resources(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        """An agent calling back sees only its own sub-agents' resources."""
        visible: set[str] | None = None
        request = getattr(ctx, "request", None)
        if self.identity is not None and request is not None:
            caller = await self.identity.caller(request.headers.get("authorization", ""))
            if caller is None:
                visible = set()
            elif caller.session_id is not None:
                visible = set(await self.orchestrator.descendants(caller.session_id))
        return types.ListResourcesResult(resources=await self.list_resources(visible))

    async def list_resources(self, visible: set[str] | None = None) -> list[types.Resource]:
        """Static resources and the live sessions' ones; `visible` limits the sessions shown."""
        resources = await super().list_resources()
        for session in await self.orchestrator.live_sessions():
            if visible is not None and session.id not in visible:
                continue
            resources.append(
                types.Resource(
                    uri=TRANSCRIPT_TEMPLATE.format(session_id=session.id),
                    name=f"transcript-{session.id}",
                    title=f"Transcript of {session.backend} session {session.id} ({session.status})",
                    mime_type="text/markdown",
                )
            )
            resources.append(
                types.Resource(
                    uri=EVENTS_TEMPLATE.format(session_id=session.id),
                    name=f"events-{session.id}",
                    title=f"Events of session {session.id} as JSON",
                    mime_type="application/json",
                )
            )
        return resources


def register_resources(
    server: SandboxesMCPServer, orchestrator: Orchestrator, identity: CallerIdentity | None = None
) -> None:
    """With `identity`, an agent calling back over HTTP reads only its own sub-agents' resources."""

    async def reach(context: Context[Any, Any], session_id: str) -> None:
        request = http_request(context)
        if identity is None or request is None:
            return
        caller = await identity.caller(request.headers.get("authorization", ""))
        if caller is None:
            raise NotFoundError("authorization: the bearer token is no longer valid")
        await orchestrator.check_reach(caller, session_id)

    async def transcript(session_id: str, ctx: Context[Any, Any]) -> str:
        try:
            await reach(ctx, session_id)
            return await orchestrator.transcript(session_id)
        except NotFoundError as exc:
            raise ResourceError(str(exc)) from exc

    async def events(session_id: str, ctx: Context[Any, Any]) -> str:
        try:
            await reach(ctx, session_id)
            return await orchestrator.events_document(session_id)
        except NotFoundError as exc:
            raise ResourceError(str(exc)) from exc

    server.resource(
        TRANSCRIPT_TEMPLATE,
        name="session-transcript",
        title="Session transcript",
        description="A session as readable markdown: messages, tool calls and results, errors, usage.",
        mime_type="text/markdown",
    )(transcript)
    server.resource(
        EVENTS_TEMPLATE,
        name="session-events",
        title="Session events",
        description="A session's normalized events as a JSON array (seq, type, created_at, data).",
        mime_type="application/json",
    )(events)


class ResourceNotifier:
    """Turns event-bus changes into resource notifications for both protocol eras."""

    def __init__(self, server: SandboxesMCPServer, bus: InMemorySubscriptionBus) -> None:
        self._server = server
        self._bus = bus
        # Strong references: the SDK may hand each request a fresh session wrapper, which a weak
        # set would lose at once. A subscriber is dropped when a notice to it fails.
        self._legacy: dict[str, list[ServerSession]] = {}
        lowlevel = server._lowlevel_server
        lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, self._subscribe)
        lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, self._unsubscribe)

    async def _subscribe(
        self, ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        subscribers = self._legacy.setdefault(str(params.uri), [])
        if all(existing is not ctx.session for existing in subscribers):
            subscribers.append(ctx.session)
        return types.EmptyResult()

    async def _unsubscribe(
        self, ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        sessions = self._legacy.get(str(params.uri), [])
        self._legacy[str(params.uri)] = [s for s in sessions if s is not ctx.session]
        return types.EmptyResult()

    async def run(self, orchestrator: Orchestrator) -> None:
        changes = orchestrator.subscribe()
        async with changes:
            async for change in changes:
                for template in (TRANSCRIPT_TEMPLATE, EVENTS_TEMPLATE):
                    await self._updated(template.format(session_id=change.session_id))
                if change.status_changed:
                    await self._bus.publish(ResourcesListChanged())

    async def _updated(self, uri: str) -> None:
        await self._bus.publish(ResourceUpdated(uri=uri))
        for session in list(self._legacy.get(uri, ())):
            try:
                with anyio.fail_after(NOTIFY_TIMEOUT_S):
                    await session.send_resource_updated(uri)
            except Exception:  # a client that went away must not stop notices to the others
                logger.debug("dropping resource subscriber for %s", uri, exc_info=True)
                self._legacy[uri] = [s for s in self._legacy.get(uri, []) if s is not session]
