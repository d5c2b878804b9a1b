"""Who may call over HTTP: a bearer-token check (a pure ASGI middleware), and, per tool call,
who the caller is (the operator, or an agent acting as its session)."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_sandboxes.errors import McpSandboxesError
from mcp_sandboxes.files import make_private_dir
from mcp_sandboxes.orchestrator import OPERATOR, Caller, Lineage

BEARER = "Bearer "
# Who is calling, set around each tool call by CallerIdentity.call_scope (the operator when unset).
current_caller: ContextVar[Caller] = ContextVar("current_caller", default=OPERATOR)
OPERATOR_TOKEN_BYTES = 32
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

    async def admit_operator_only(self, authorization: str) -> bool:
        """For the operator's HTTP endpoint: agents never call it, they have a listener of their own."""
        caller = await self.caller(authorization)
        return caller is not None and not caller.is_agent

    async def admit_agents_only(self, authorization: str) -> bool:
        """For the listener that exists only for sandboxed agents (a live session's token)."""
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


def load_or_create_operator_token(path: Path) -> str:
    """The operator token kept at `path` (mode 0600, in a 0700 directory), made on first use.
    A sandbox on the host network shares the host's loopback, so "loopback only" is no
    credential: the operator's endpoint always needs a token the sandboxes do not have."""
    make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        token = path.read_text("utf-8").strip()
        if len(token) >= 16:
            return token
        raise McpSandboxesError(
            f"{path}: the operator token file is empty or too short; delete it and restart to make a new one"
        ) from None
    token = secrets.token_urlsafe(OPERATOR_TOKEN_BYTES)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(token + "\n")
    return token
