"""Who may call over HTTP: a bearer-token check (a pure ASGI middleware), and, per tool call,
who the caller is (the operator, or an agent acting as its session)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_sandboxes.errors import McpSandboxesError
from mcp_sandboxes.orchestrator.subagents import OPERATOR, Caller, Lineage, current_caller

BEARER = "Bearer "
# Given the Authorization header's value ("" when absent), whether the request may go on.
Admission = Callable[[str], Awaitable[bool]]


class BearerTokenMiddleware:
    def __init__(self, app: ASGIApp, admit: Admission) -> None:
        self._app = app
        self._admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            supplied = headers.get(b"authorization", b"").decode("latin-1")
            if not await self._admit(supplied):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")],
                    }
                )
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token"})
                return
        await self._app(scope, receive, send)


def bearer_token(authorization: str) -> str | None:
    return authorization[len(BEARER) :] if authorization.startswith(BEARER) else None


class CallerIdentity:
    """Maps an Authorization header to a caller. `operator_token` None: no token is needed to
    act as the operator (a loopback-only server), though a supplied token must be a valid one."""

    def __init__(self, lineage: Lineage, operator_token: str | None) -> None:
        self._lineage = lineage
        self._operator = operator_token

    def _is_operator_token(self, token: str) -> bool:
        return self._operator is not None and hmac.compare_digest(token.encode(), self._operator.encode())

    async def caller(self, authorization: str) -> Caller | None:
        """The caller, or None when the header admits nobody."""
        if not authorization:
            return OPERATOR if self._operator is None else None
        token = bearer_token(authorization)
        if token is None:
            return None
        if self._is_operator_token(token):
            return OPERATOR
        return await self._lineage.caller_for_token(token)

    async def admit_anyone_known(self, authorization: str) -> bool:
        return await self.caller(authorization) is not None

    async def admit_agents_only(self, authorization: str) -> bool:
        """For the listener that exists only for sandboxed agents (serving over stdio)."""
        caller = await self.caller(authorization) if authorization else None
        return caller is not None and caller.is_agent

    @asynccontextmanager
    async def call_scope(self, request: Any) -> AsyncIterator[None]:
        """Around one tool call: `current_caller` is whoever sent it (the operator over stdio)."""
        caller = OPERATOR
        if request is not None:
            found = await self.caller(request.headers.get("authorization", ""))
            if found is None:  # the middleware admitted it, so the token was revoked since
                raise McpSandboxesError("authorization: the bearer token is no longer valid")
            caller = found
        reset = current_caller.set(caller)
        try:
            yield
        finally:
            current_caller.reset(reset)
