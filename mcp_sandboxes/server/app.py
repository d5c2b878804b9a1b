"""Builds the MCP server around an orchestrator and runs it over stdio or streamable HTTP."""

from __future__ import annotations

import logging
import socket
from typing import Literal

import anyio
import anyio.abc
from mcp.server.subscriptions import InMemorySubscriptionBus

from mcp_sandboxes import __version__
from mcp_sandboxes.config import Settings
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.server.auth import Admission, BearerTokenMiddleware, CallerIdentity
from mcp_sandboxes.server.resources import ResourceNotifier, SandboxesMCPServer, register_resources
from mcp_sandboxes.server.tools import register_tools

logger = logging.getLogger(__name__)

AGENT_LISTENER_BACKLOG = 64

INSTRUCTIONS = """\
Run coding agents as sub-agents, each in its own sandbox.
1. create_environment (once): a provider + image + network/limits/setup commands.
2. spawn_agent(environment, prompt): starts an agent; returns its session_id.
3. read_events(session_id, after=cursor, wait_s=30) to follow it; send_message to continue the
   conversation; interrupt_session to stop the current turn; stop_session when done.
Transcripts: resource sandboxes://sessions/{session_id}/transcript."""


def build_server(
    orchestrator: Orchestrator, identity: CallerIdentity | None = None
) -> tuple[SandboxesMCPServer, ResourceNotifier]:
    bus = InMemorySubscriptionBus()
    server = SandboxesMCPServer(
        "mcp-sandboxes", version=__version__, instructions=INSTRUCTIONS, subscriptions=bus, log_level="WARNING"
    )
    server.orchestrator = orchestrator
    register_tools(server, orchestrator, identity.call_scope if identity is not None else None)
    register_resources(server, orchestrator, identity)
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
        identity = CallerIdentity(orchestrator.lineage, auth_token)
        server, notifier = build_server(orchestrator, identity)
        task_group.start_soon(notifier.run, orchestrator)
        if transport == "stdio":
            if settings.subagents.max_depth > 0:
                url = await task_group.start(_serve_agents_listener, server, identity)
                orchestrator.subagent_url = settings.subagents.url or url
            await server.run_stdio_async()
        else:
            orchestrator.subagent_url = settings.subagents.url or f"http://{_loopback_for(host)}:{port}/mcp"
            await _serve_http(server, host=host, port=port, admit=identity.admit_anyone_known)
        task_group.cancel_scope.cancel()


def _loopback_for(host: str) -> str:
    """The address a host-network sandbox uses to reach a server bound to `host`."""
    if host in ("0.0.0.0", "localhost", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _serve_http(
    server: SandboxesMCPServer,
    *,
    host: str,
    port: int,
    admit: Admission,
    sockets: list[socket.socket] | None = None,
) -> None:
    import uvicorn
    from starlette.types import ASGIApp

    app: ASGIApp = BearerTokenMiddleware(server.streamable_http_app(host=host), admit)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve(sockets=sockets)


async def _serve_agents_listener(
    server: SandboxesMCPServer,
    identity: CallerIdentity,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Over stdio, sandboxed agents still need an HTTP endpoint to call back: a loopback
    listener on a free port that admits sub-agent tokens and nothing else."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(AGENT_LISTENER_BACKLOG)
    port = listener.getsockname()[1]
    logger.info("sub-agents call back on http://127.0.0.1:%d/mcp", port)
    task_status.started(f"http://127.0.0.1:{port}/mcp")
    with listener:
        await _serve_http(server, host="127.0.0.1", port=port, admit=identity.admit_agents_only, sockets=[listener])
