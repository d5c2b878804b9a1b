"""Builds the MCP server around an orchestrator and runs it over stdio or streamable HTTP."""

from __future__ import annotations

import logging
import socket
import sys
from typing import Literal

import anyio
import anyio.abc
from mcp.server.subscriptions import InMemorySubscriptionBus
from starlette.types import ASGIApp

from mcp_sandboxes import __version__
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import McpSandboxesError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.redaction import RedactingFilter
from mcp_sandboxes.server.auth import (
    Admission,
    BearerTokenMiddleware,
    CallerIdentity,
    load_or_create_operator_token,
)
from mcp_sandboxes.server.prompts import register_prompts
from mcp_sandboxes.server.resources import ResourceNotifier, SandboxesMCPServer, register_resources
from mcp_sandboxes.server.tools import register_tools
from mcp_sandboxes.server.web import SHUTDOWN_GRACE_S, WebBesideMcp, web_app
from mcp_sandboxes.server.workspace_tools import register_workspace_tools

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
    server.identity = identity
    register_tools(server, orchestrator, identity.call_scope if identity is not None else None)
    register_workspace_tools(server, orchestrator, identity.call_scope if identity is not None else None)
    register_resources(server, orchestrator, identity)
    register_prompts(server, orchestrator, identity)
    notifier = ResourceNotifier(server, bus)
    return server, notifier


async def serve(
    settings: Settings,
    transport: Literal["stdio", "http"],
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    auth_token: str | None = None,
    web_port: int | None = None,
) -> None:
    """Two kinds of caller, two doors. The operator: stdin/stdout, or the HTTP endpoint, which
    needs the operator token (the configured one, or one the server makes and keeps in the data
    directory). Agents: a loopback listener of their own that admits live sessions' tokens only,
    so no process in a sandbox, even on the host network, can act as the operator.

    The web view (server/web.py) is served beside /mcp over HTTP; over stdio, on 127.0.0.1:`web_port`
    when one is given (behind the operator token all the same)."""
    # Ports are taken first, so a busy one is reported before anything starts.
    operator_listener = _bind(host, port, field="--port") if transport == "http" else None
    agents_listener = (
        _bind("127.0.0.1", settings.subagents.port, field="subagents.port")
        if settings.subagents.max_depth > 0
        else None
    )
    async with Orchestrator(settings).running() as orchestrator, anyio.create_task_group() as task_group:
        # Logs are the third place a credential could show (events and transcripts are redacted
        # by the journal): the known ones are replaced in every record the handlers write.
        redacting = RedactingFilter(lambda: [*orchestrator.credential_values(), *orchestrator.extra_secrets])
        for handler in logging.getLogger().handlers:
            handler.addFilter(redacting)
        operator_token = auth_token
        wants_token = transport == "http" or web_port is not None
        if wants_token and operator_token is None and settings.server.operator_auth == "token":
            operator_token = load_or_create_operator_token(settings.server.operator_token_path)
            logger.warning(
                "the operator token is in %s (`mcp-sandboxes token` prints it); send it as Authorization: Bearer",
                settings.server.operator_token_path,
            )
        if transport == "http" and operator_token is None:
            orchestrator.environments.host_network_refusal = (
                "this server's HTTP endpoint takes no token (server.operator_auth = 'none'), so a sandbox on the"
                " host network could call it as the operator; use network 'none', or serve with a token"
            )
        if operator_token is not None:
            orchestrator.extra_secrets.append(operator_token)
        identity = CallerIdentity(orchestrator.lineage, operator_token)
        server, notifier = build_server(orchestrator, identity)
        task_group.start_soon(notifier.run, orchestrator)
        # Set when the operator's side ends (stdin closed, or the HTTP server stopped): the other
        # listeners then shut down gracefully instead of being cancelled mid-request.
        stopping = anyio.Event()
        agents_done = anyio.Event()
        if agents_listener is not None:
            url = await task_group.start(
                _serve_agents_listener, server, identity, agents_listener, stopping, agents_done
            )
            await orchestrator.set_subagent_url(settings.subagents.url or url)
        else:
            agents_done.set()
        web = web_app(orchestrator, operator_token)
        if transport == "stdio":
            if web_port is not None:
                task_group.start_soon(_serve_web, web, web_port)
            await server.run_stdio_async()
        elif operator_listener is not None:
            bound = operator_listener.getsockname()[1]
            sys.stderr.write(f"mcp-sandboxes: listening on http://{_url_host(host)}:{bound}/mcp\n")
            with operator_listener:
                await _serve_http(
                    server,
                    host=host,
                    port=port,
                    admit=identity.admit_operator_only,
                    web=web,
                    sockets=[operator_listener],
                )
        stopping.set()
        with anyio.move_on_after(SHUTDOWN_GRACE_S + 1):
            await agents_done.wait()
        task_group.cancel_scope.cancel()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _bind(host: str, port: int, *, field: str) -> socket.socket:
    """A listening socket on host:port, or an error that says what to do (not a traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise McpSandboxesError(
            f"{field}: cannot listen on {host}:{port} ({exc.strerror}); pick a free port, or stop what uses it"
        ) from exc
    listener.listen(AGENT_LISTENER_BACKLOG)
    return listener


async def _serve_http(
    server: SandboxesMCPServer,
    *,
    host: str,
    port: int,
    admit: Admission,
    sockets: list[socket.socket] | None = None,
    web: ASGIApp | None = None,
    stopping: anyio.Event | None = None,
) -> None:
    """`web`: the web view, served beside /mcp (the operator's endpoint only). `stopping`: once
    set, the server shuts down gracefully (rather than being cancelled mid-request)."""
    import uvicorn

    app: ASGIApp = BearerTokenMiddleware(server.streamable_http_app(host=host), admit)
    if web is not None:
        app = WebBesideMcp(app, web)
    # Open event streams of the web view would otherwise hold a shutdown up for good.
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=SHUTDOWN_GRACE_S
    )
    http_server = uvicorn.Server(config)
    if stopping is None:
        await http_server.serve(sockets=sockets)
        return
    async with anyio.create_task_group() as task_group:

        async def stop_when_told() -> None:
            await stopping.wait()
            http_server.should_exit = True

        task_group.start_soon(stop_when_told)
        await http_server.serve(sockets=sockets)
        task_group.cancel_scope.cancel()


async def _serve_web(web: ASGIApp, port: int) -> None:
    """The web view alone, for a stdio server, on loopback."""
    import uvicorn

    config = uvicorn.Config(
        web,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    logger.warning("web view on http://127.0.0.1:%d/ (sign in with the token `mcp-sandboxes token` prints)", port)
    await uvicorn.Server(config).serve()


async def _serve_agents_listener(
    server: SandboxesMCPServer,
    identity: CallerIdentity,
    listener: socket.socket,
    stopping: anyio.Event | None = None,
    done: anyio.Event | None = None,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Sandboxed agents call back on a loopback listener of their own (bound by the caller: a
    fixed port or a free one) that admits sub-agent tokens and nothing else."""
    port = listener.getsockname()[1]
    logger.info("sub-agents call back on http://127.0.0.1:%d/mcp", port)
    task_status.started(f"http://127.0.0.1:{port}/mcp")
    try:
        with listener:
            await _serve_http(
                server,
                host="127.0.0.1",
                port=port,
                admit=identity.admit_agents_only,
                sockets=[listener],
                stopping=stopping,
            )
    finally:
        if done is not None:
            done.set()
