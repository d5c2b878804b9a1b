"""Registers a tool from a pydantic input model, so the tool's JSON schema is the model's
(flat fields with descriptions) and every call is validated by the model itself."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import Annotated, Any, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from mcp_sandboxes.errors import McpSandboxesError

InputT = TypeVar("InputT", bound=BaseModel)
OutputT = TypeVar("OutputT", bound=BaseModel)
# Runs before each call with the HTTP request that carried it (None over stdio); it sets up
# whatever the handler needs to know about the caller, and is left when the call ends.
CallScope = Callable[[Any], AbstractAsyncContextManager[None]]
# Around each call: how the handler reports progress to the client (a no-op for a client that
# sent no progress token), or None outside a call.
current_progress: ContextVar[Callable[[float, float | None, str | None], Awaitable[None]] | None] = ContextVar(
    "current_progress", default=None
)
# The parameter the SDK fills with the call's Context (found by its annotation).
CONTEXT_PARAMETER = "mcp_call_context"


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "arguments"
        problems.append(f"{field}: {error['msg']}")
    return "invalid arguments: " + "; ".join(problems)


def register_tool(
    server: MCPServer[Any],
    *,
    name: str,
    description: str,
    input_model: type[InputT],
    output_model: type[OutputT],
    handler: Callable[[InputT], Awaitable[OutputT]],
    annotations: ToolAnnotations,
    call_scope: CallScope | None = None,
) -> None:
    parameters = []
    for field_name, info in input_model.model_fields.items():
        annotation: Any = Annotated[info.annotation, *info.metadata, Field(description=info.description)]
        default = inspect.Parameter.empty if info.is_required() else info.get_default(call_default_factory=True)
        parameters.append(
            inspect.Parameter(field_name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )

    parameters.append(
        inspect.Parameter(CONTEXT_PARAMETER, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Context)
    )

    async def tool(**arguments: Any) -> Any:
        context = arguments.pop(CONTEXT_PARAMETER, None)
        try:
            request = input_model.model_validate(arguments)
        except ValidationError as exc:
            raise ToolError(describe_validation_error(exc)) from None
        reset = current_progress.set(context.report_progress if isinstance(context, Context) else None)
        try:
            if call_scope is None:
                return await handler(request)
            async with call_scope(http_request(context)):
                return await handler(request)
        except McpSandboxesError as exc:
            raise ToolError(str(exc)) from exc
        finally:
            current_progress.reset(reset)

    tool.__signature__ = inspect.Signature(parameters, return_annotation=output_model)  # type: ignore[attr-defined]
    tool.__annotations__ = {CONTEXT_PARAMETER: Context, "return": output_model}
    tool.__name__ = name
    tool.__doc__ = description
    server.add_tool(tool, name=name, description=description, annotations=annotations, structured_output=True)
    _forbid_unknown_arguments(server, name)


def http_request(context: Any) -> Any:
    """The HTTP request behind a call, or None (stdio, or no context)."""
    if not isinstance(context, Context):
        return None
    try:
        return context.request_context.request
    except ValueError:
        return None


def _forbid_unknown_arguments(server: MCPServer[Any], name: str) -> None:
    """The SDK ignores arguments a tool does not declare; a typo such as `memory` for `memory_mb`
    would then silently do nothing. Reject them instead, in the schema and at validation."""
    registered = server._tool_manager.get_tool(name)
    if registered is None:  # pragma: no cover - registered just above
        raise RuntimeError(f"tool {name} was not registered")
    base = registered.fn_metadata.arg_model
    strict = type(base.__name__, (base,), {"model_config": {**base.model_config, "extra": "forbid"}})
    registered.fn_metadata.arg_model = strict
    registered.parameters["additionalProperties"] = False
