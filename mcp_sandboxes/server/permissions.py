"""The MCP side of routed permission prompts: the tool a sandboxed Claude Code asks
(`--permission-prompt-tool mcp__sandboxes__approve_tool_use`), the human asked through MCP
elicitation on the operator's connection, and `resolve_permission` for whoever spawned it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import mcp_types as types
from pydantic import BaseModel, ConfigDict, Field

from mcp_sandboxes.orchestrator import Decision, Orchestrator, PermissionRequest
from mcp_sandboxes.server.registration import CallInfo

logger = logging.getLogger(__name__)

ELICIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "decision": {
            "type": "string",
            "title": "Decision",
            "enum": ["allow", "deny"],
            "description": "allow: the sub-agent runs the tool call; deny: it is refused.",
        },
        "reason": {"type": "string", "title": "Reason (optional)", "description": "Told to the sub-agent."},
    },
    "required": ["decision"],
}
INPUT_PREVIEW_CHARS = 600


class ApproveToolUseInput(BaseModel):
    """What Claude Code sends its permission prompt tool."""

    model_config = ConfigDict(extra="allow")

    tool_name: str = Field(max_length=200, description="The tool the agent wants to call.")
    input: dict[str, Any] = Field(default_factory=dict, description="The tool call's input.")
    tool_use_id: str | None = Field(default=None, max_length=200)


class ApproveToolUseResult(BaseModel):
    """Claude Code's permission prompt answer: allow with the (unchanged) input, or deny with why."""

    behavior: Literal["allow", "deny"]
    updatedInput: dict[str, Any] | None = None  # Claude Code's own field name
    message: str | None = None


class OperatorChannel:
    """Asks the human, through the operator's MCP client, about a sub-agent's tool call.

    Clients take questions only on a call they are waiting on. Before protocol 2026-07-28 the
    server sends `elicitation/create` on such a call (spawn_agent or send_message with wait,
    wait_for, read_events with wait_s: the usual state of an orchestrator whose sub-agents
    work). From 2026-07-28 servers send no requests: a waiting wait_for or read_events returns
    `input_required` with the question, and the client's retry carries the answer. With no
    such call running, the question waits for one (or for resolve_permission, or the timeout)."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator
        self._calls: dict[int, CallInfo] = {}
        self._changed = anyio.Event()

    @asynccontextmanager
    async def calling(self, call: CallInfo | None) -> AsyncIterator[None]:
        """Around an operator's call of the older protocols: while it runs, questions may ride on it."""
        if call is None or call.modern or not call.can_elicit():
            yield
            return
        key = id(call)
        self._calls[key] = call
        self._changed.set()
        self._changed = anyio.Event()
        try:
            yield
        finally:
            self._calls.pop(key, None)

    async def ask(self, request: PermissionRequest) -> None:
        """Ask the human on a running operator call; resolve the request with the answer."""
        if not self._orchestrator.settings.permissions.elicit:
            return
        tried: set[int] = set()
        while request.result is None:
            target = next(((key, call) for key, call in self._calls.items() if key not in tried), None)
            if target is None:
                await self._changed.wait()
                continue
            key, call = target
            tried.add(key)
            try:
                answer = await call.session.elicit_form(
                    _question(request), ELICIT_SCHEMA, related_request_id=call.request_id
                )
            except Exception:  # that call ended or its client cannot be asked: try the next one
                logger.debug("elicitation on call %s failed", call.request_id, exc_info=True)
                continue
            if request.result is None:  # unless it was answered some other way meanwhile
                await self._resolve(request, answer)
            return

    async def apply_answers(self, call: CallInfo) -> None:
        """A retried call (2026-07-28) carries the answers to the questions its first round asked."""
        for request in self._orchestrator.permissions.pending():
            answer = call.input_responses.get(request.request_id)
            if isinstance(answer, types.ElicitResult) and request.result is None:
                await self._resolve(request, answer)

    async def run_or_ask(self, call: CallInfo, handler: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
        """Run a waiting call (2026-07-28); if a sub-agent asks meanwhile, return the question as
        `input_required` instead (the call is a read, so the client's retry simply waits again)."""
        if not self._orchestrator.settings.permissions.elicit or not call.can_elicit():
            return await handler(request)
        broker = self._orchestrator.permissions
        outcome: list[Any] = []
        async with anyio.create_task_group() as task_group:

            async def run() -> None:
                outcome.append(await handler(request))
                task_group.cancel_scope.cancel()

            async def watch() -> None:
                while True:
                    raised = broker.raised
                    asking = [
                        r for r in broker.pending() if r.result is None and r.request_id not in call.input_responses
                    ]
                    if asking:
                        outcome.append(_input_required(asking))
                        task_group.cancel_scope.cancel()
                        return
                    await raised.wait()

            task_group.start_soon(run)
            task_group.start_soon(watch)
        return outcome[0]

    async def _resolve(self, request: PermissionRequest, answer: types.ElicitResult) -> None:
        content = answer.content or {}
        decision: Decision = "allow" if answer.action == "accept" and content.get("decision") == "allow" else "deny"
        given = content.get("reason")
        reason = given if isinstance(given, str) and given else None
        if answer.action != "accept":
            reason = reason or f"the operator chose {answer.action}"
        permissions = self._orchestrator.permissions
        await permissions.resolve(request.request_id, decision, decided_by="operator", message=reason)


def _input_required(requests: list[PermissionRequest]) -> types.InputRequiredResult:
    return types.InputRequiredResult(
        input_requests={
            request.request_id: types.ElicitRequest(
                params=types.ElicitRequestFormParams(message=_question(request), requested_schema=ELICIT_SCHEMA)
            )
            for request in requests
        }
    )


def _question(request: PermissionRequest) -> str:
    preview = json.dumps(request.tool_input, ensure_ascii=False)
    if len(preview) > INPUT_PREVIEW_CHARS:
        preview = preview[:INPUT_PREVIEW_CHARS] + "..."
    return (
        f"Sub-agent {request.session_id} asks to run {request.tool_name}: {preview}\n"
        f"Allow it? (denied on its own after {request.timeout_s:g}s)"
    )


def answer_for(request: PermissionRequest, tool_input: dict[str, Any]) -> ApproveToolUseResult:
    if request.result == "allow":
        return ApproveToolUseResult(behavior="allow", updatedInput=tool_input)
    why = request.message or "denied"
    message = f"{request.tool_name} was denied ({request.decided_by}): {why}"
    return ApproveToolUseResult(behavior="deny", message=message)
