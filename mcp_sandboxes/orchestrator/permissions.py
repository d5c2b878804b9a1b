"""Permission prompts of sub-agents, routed to someone who can answer.

A sub-agent in an asking permission mode (Claude Code with `--permission-prompt-tool`) asks
this server before a risky tool call. The request becomes a `session.requires_action` event
on its session; askers registered here (the server's elicitation to the human operator) are
tried at once, and the agent that spawned it (or the operator) may answer with the
`resolve_permission` tool. The first answer wins; with none within the timeout the call is
denied, so nothing waits forever. Each answer is a `user.tool_confirmation` event.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from mcp_sandboxes.errors import ConflictError, NotFoundError
from mcp_sandboxes.events import Event, SessionRequiresAction, UserToolConfirmation

logger = logging.getLogger(__name__)

Decision = Literal["allow", "deny"]
Emit = Callable[[str, Sequence[Event]], Awaitable[None]]
TIMEOUT_DECIDER = "timeout"


@dataclass
class PermissionRequest:
    request_id: str
    session_id: str
    tool_name: str
    tool_input: dict[str, Any]
    timeout_s: float
    decided: anyio.Event = field(default_factory=anyio.Event)
    result: Decision | None = None
    decided_by: str | None = None
    message: str | None = None


# Tries to get an answer for a request (e.g. by asking the human); returns without one when it cannot.
Asker = Callable[[PermissionRequest], Awaitable[None]]


class PermissionBroker:
    def __init__(self, emit: Emit, timeout_s: float) -> None:
        self._emit = emit
        self.timeout_s = timeout_s
        self._pending: dict[str, PermissionRequest] = {}
        self.askers: list[Asker] = []
        # Set (and replaced) whenever a request is raised, for waiters that carry questions.
        self.raised = anyio.Event()

    def pending(self, session_id: str | None = None) -> list[PermissionRequest]:
        return [r for r in self._pending.values() if session_id is None or r.session_id == session_id]

    async def ask(self, session_id: str, tool_name: str, tool_input: dict[str, Any]) -> PermissionRequest:
        """Raise a request and wait for its answer (a deny when none comes in time)."""
        request = PermissionRequest(
            request_id=f"perm_{uuid.uuid4().hex[:16]}",
            session_id=session_id,
            tool_name=tool_name,
            tool_input=tool_input,
            timeout_s=self.timeout_s,
        )
        self._pending[request.request_id] = request
        self.raised.set()
        self.raised = anyio.Event()
        try:
            await self._emit(
                session_id,
                [
                    SessionRequiresAction(
                        request_id=request.request_id,
                        tool_name=tool_name,
                        tool_input=tool_input,
                        timeout_s=self.timeout_s,
                    )
                ],
            )
            async with anyio.create_task_group() as task_group:
                for asker in self.askers:
                    task_group.start_soon(self._try, asker, request)
                with anyio.move_on_after(self.timeout_s):
                    await request.decided.wait()
                task_group.cancel_scope.cancel()
            if request.result is None:
                await self.resolve(
                    request.request_id,
                    "deny",
                    decided_by=TIMEOUT_DECIDER,
                    message=f"nobody answered within {self.timeout_s:g}s (permissions.timeout_s), so it was denied",
                )
        finally:
            self._pending.pop(request.request_id, None)
        return request

    async def _try(self, asker: Asker, request: PermissionRequest) -> None:
        try:
            await asker(request)
        except Exception:  # one way of asking failing must not lose the request: others may answer
            logger.warning("asking about permission request %s failed", request.request_id, exc_info=True)

    async def resolve(
        self, request_id: str, result: Decision, *, decided_by: str, message: str | None = None
    ) -> PermissionRequest:
        request = self._pending.get(request_id)
        if request is None:
            raise NotFoundError(
                f"request_id: no pending permission request {request_id!r}; it was answered, timed out or"
                " never existed (read_events shows session.requires_action and user.tool_confirmation)"
            )
        if request.result is not None:
            raise ConflictError(f"request_id: {request_id} was already answered ({request.result})")
        request.result, request.decided_by, request.message = result, decided_by, message
        # Recorded before the asker is woken (and shielded): waking it cancels the other ways of
        # asking, this one among them, and the answer must be on record first.
        with anyio.CancelScope(shield=True):
            await self._emit(
                request.session_id,
                [UserToolConfirmation(request_id=request_id, result=result, decided_by=decided_by, message=message)],
            )
        request.decided.set()
        return request
