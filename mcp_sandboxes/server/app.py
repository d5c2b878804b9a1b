"""Builds the MCP server around an orchestrator and runs it over stdio or streamable HTTP."""

from __future__ import annotations

import logging
from typing import Literal

import anyio
from mcp.server.subscriptions import InMemorySubscriptionBus

from mcp_sandboxes import __version__
from mcp_sandboxes.config import Settings
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.server.resources import ResourceNotifier, SandboxesMCPServer, register_resources
from mcp_sandboxes.server.tools import register_tools

logger = logging.getLogger(__name__)

INSTRUCTIONS = """\
Run coding agents as sub-agents, each in its own sandbox.
1. create_environment (once): a provider + image + network/limits/setup commands.
2. spawn_agent(environment, prompt): starts an agent; returns its session_id.
3. read_events(session_id, after=cursor, wait_s=30) to follow it; send_message to continue the
   conversation; interrupt_session to stop the current turn; stop_session when done.
Transcripts: resource sandboxes://sessions/{session_id}/transcript."""


def build_server(orchestrator: Orchestrator) -> tuple[SandboxesMCPServer, ResourceNotifier]:
    bus = InMemorySubscriptionBus()
    server = SandboxesMCPServer(
        "mcp-sandboxes", version=__version__, instructions=INSTRUCTIONS, subscriptions=bus, log_level="WARNING"
    )
    server.orchestrator = orchestrator
    register_tools(server, orchestrator)
    register_resources(server, orchestrator)
    notifier = ResourceNotifier(server, bus)
    return server, notifier


async def serve(
    settings: Settings,
    transport: Literal["stdio", "http"],
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    auth_token: str | None = None,
) -> None:
    async with Orchestrator(settings).running() as orchestrator, anyio.create_task_group() as task_group:
        server, notifier = build_server(orchestrator)
        task_group.start_soon(notifier.run, orchestrator)
        if transport == "stdio":
            await server.run_stdio_async()
        else:
            await _serve_http(server, host=host, port=port, auth_token=auth_token)
        task_group.cancel_scope.cancel()


async def _serve_http(server: SandboxesMCPServer, *, host: str, port: int, auth_token: str | None) -> None:
    import uvicorn
    from starlette.types import ASGIApp

    app: ASGIApp = server.streamable_http_app(host=host)
    if auth_token:
        from mcp_sandboxes.server.auth import BearerTokenMiddleware

        app = BearerTokenMiddleware(app, auth_token)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve()
