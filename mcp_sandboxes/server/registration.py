"""Registers a tool from a pydantic input model, so the tool's JSON schema is the model's
(flat fields with descriptions) and every call is validated by the model itself."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata
from mcp.server.session import ServerSession
from mcp_types import (
    CallToolResult,
    ClientCapabilities,
    ElicitationCapability,
    InputRequiredResult,
    RequestId,
    TextContent,
    ToolAnnotations,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field, ValidationError

from mcp_sandboxes.errors import McpSandboxesError

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class CallInfo:
    """The MCP call being served: its connection and request id (to ask that client things while
    the call lasts), the protocol version, and the answers a retried call carries (2026-07-28)."""

    session: ServerSession
    request_id: RequestId
    protocol_version: str | None
    input_responses: Mapping[str, Any]

    @property
    def modern(self) -> bool:
        """On 2026-07-28 and later the server may not send requests: it returns input_required."""
        return self.protocol_version in MODERN_PROTOCOL_VERSIONS

    def can_elicit(self) -> bool:
        wanted = ClientCapabilities(elicitation=ElicitationCapability())
        try:
            return self.session.check_client_capability(wanted)
        except Exception:  # a connection that went away cannot be asked
            return False


# The key of the short text summary that leads each structured result.
SUMMARY_KEY = "summary"
# Around each call: the call being served, or None outside one (or without a context).
current_call: ContextVar[CallInfo | None] = ContextVar("current_call", default=None)
# The parameter the SDK fills with the call's Context (found by its annotation).
CONTEXT_PARAMETER = "mcp_call_context"


# What each kind of pydantic error means to a caller, and what to do about it. The caller's
# value is never echoed (it may be huge or hostile), nor pydantic's documentation URL.
_TYPE_NAMES = {
    "string": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list": "a list",
    "dict": "an object",
    "model": "an object",
}


MAX_SHOWN_NAME = 64


def _field_name(loc: tuple[int | str, ...]) -> tuple[str, bool]:
    """`setup_commands[1]`, `env.PATH`; the flag says the error is about a dict key. A name
    the caller made up (an unknown argument, an env key) is cut short, never echoed whole."""
    name, is_key = "", False
    for part in loc:
        if part == "[key]":
            is_key = True
        elif isinstance(part, int):
            name += f"[{part}]"
        else:
            shown = part if 0 < len(part) <= MAX_SHOWN_NAME else f"{part[:MAX_SHOWN_NAME]}..." if part else '""'
            name += f".{shown}" if name else shown
    return name or "arguments", is_key


def _problem(error: Mapping[str, Any], fields: list[str]) -> str:
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    if kind == "missing":
        return "is required; give it a value"
    if kind == "extra_forbidden":
        return "is not an argument of this tool; remove it" + (
            f" (it takes: {', '.join(fields)})" if fields else " (it takes none)"
        )
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "string_too_long":
        return f"is too long: at most {ctx['max_length']:,} characters; shorten it"
    if kind == "string_too_short":
        return (
            "is empty; give a value" if ctx.get("min_length") == 1 else f"needs at least {ctx['min_length']} characters"
        )
    if kind == "too_long":
        return f"has too many items: at most {ctx['max_length']:,}; send fewer"
    if kind == "too_short":
        return f"needs at least {ctx['min_length']} item(s); add one"
    if kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        bound = next(iter(ctx.values()))
        words = {
            "less_than_equal": "at most",
            "less_than": "less than",
            "greater_than_equal": "at least",
            "greater_than": "greater than",
        }[kind]
        return (
            f"must be {words} {bound:g}; use a value in range"
            if isinstance(bound, float)
            else (f"must be {words} {bound}; use a value in range")
        )
    if kind == "finite_number":
        return "must be a finite number (not NaN or infinity)"
    if kind == "int_from_float":
        return "must be a whole number"
    if kind == "literal_error" or kind == "enum":
        return f"must be one of {ctx.get('expected', 'the listed values')}"
    for prefix, name in _TYPE_NAMES.items():
        if kind.startswith(prefix + "_"):
            return f"must be {name}"
    return f"is not valid ({error.get('msg', kind)})"


def describe_validation_error(exc: ValidationError, fields: list[str] | None = None) -> str:
    """Every problem as "field: what is wrong; what to do", joined; `fields` are the tool's
    argument names (listed when an unknown one was sent)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field, is_key = _field_name(error["loc"])
        problem = _problem(error, fields or [])
        problems.append(f"{field}: {'the name ' if is_key else ''}{problem}")
    return "invalid arguments: " + "; ".join(problems)


def register_tool(
    server: MCPServer[Any],
    *,
    name: str,
    description: str,
    input_model: type[InputT],
    output_model: type[OutputT] | None,
    handler: Callable[[InputT], Awaitable[Any]],
    annotations: ToolAnnotations,
    call_scope: CallScope | None = None,
    summarize: Callable[[BaseModel], str] | None = None,
    title: str | None = None,
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
            raise ToolError(describe_validation_error(exc, list(input_model.model_fields))) from None
        reset = current_progress.set(context.report_progress if isinstance(context, Context) else None)
        call_reset = current_call.set(_call_of(context))
        try:
            if call_scope is None:
                result = await handler(request)
            else:
                async with call_scope(http_request(context)):
                    result = await handler(request)
            if summarize is None or isinstance(result, InputRequiredResult):
                return result
            # A short summary first, then the details compactly (no nulls, no indentation). Clients
            # such as Claude Code hand the model only the structured content when there is one, so
            # the summary also leads it.
            summary = summarize(result)
            return CallToolResult(
                content=[
                    TextContent(type="text", text=summary),
                    TextContent(type="text", text=result.model_dump_json(exclude_none=True)),
                ],
                structured_content={SUMMARY_KEY: summary, **result.model_dump(mode="json")},
            )
        except (McpSandboxesError, ToolError) as exc:
            raise ToolError(str(exc)) from exc
        except Exception as exc:
            # A bug, not the caller's mistake: the traceback goes to the server's log and the caller
            # learns what happened and what to do, instead of the SDK's bare "Error executing tool".
            logger.exception("tool %s failed unexpectedly", name)
            raise ToolError(
                f"{name}: the server failed unexpectedly ({type(exc).__name__}); this is a bug in mcp-sandboxes,"
                " not in your arguments. The server's log has the details; retry, or report it with that log"
            ) from exc
        finally:
            current_progress.reset(reset)
            current_call.reset(call_reset)

    # No output model: the tool's answer is its text alone (a CLI reads it), with no structured output.
    returns: Any = output_model if output_model is not None else CallToolResult
    tool.__signature__ = inspect.Signature(parameters, return_annotation=returns)  # type: ignore[attr-defined]
    tool.__annotations__ = {CONTEXT_PARAMETER: Context, "return": returns}
    tool.__name__ = name
    tool.__doc__ = description
    server.add_tool(
        tool,
        name=name,
        title=title,
        description=description,
        annotations=annotations,
        structured_output=output_model is not None,
    )
    if summarize is not None:
        _publish_summary(server, name)
    if input_model.model_config.get("extra") != "allow":
        _forbid_unknown_arguments(server, name)
    else:
        _check_arguments_in_the_tool(server, name)


def _call_of(context: Any) -> CallInfo | None:
    if not isinstance(context, Context):
        return None
    try:
        session: ServerSession = context.request_context.session
        request_id: RequestId | None = context.request_context.request_id
        version = context.protocol_version
        responses = context.input_responses or {}
    except (ValueError, AttributeError):
        return None
    if request_id is None:
        return None
    return CallInfo(session, request_id, version, dict(responses))


def http_request(context: Any) -> Any:
    """The HTTP request behind a call, or None (stdio, or no context)."""
    if not isinstance(context, Context):
        return None
    try:
        return context.request_context.request
    except ValueError:
        return None


class _ArgumentsCheckedByTheTool(FuncMetadata):
    """The SDK validates arguments against its own model before the tool runs and answers a
    mistake with pydantic's raw text (a docs URL, the input echoed). Here it only unpacks
    JSON-in-a-string arguments (as some clients send lists) and passes everything, unknown
    keys included, to the tool, whose input model checks it and says what to fix."""

    def validate_arguments(self, arguments_to_validate: dict[str, Any]) -> dict[str, Any]:
        arguments = self.pre_parse_json(arguments_to_validate)
        arguments.pop(CONTEXT_PARAMETER, None)  # only the SDK fills it
        return arguments


def _publish_summary(server: MCPServer[Any], name: str) -> None:
    """The output schema names the summary that leads each structured result."""
    registered = server._tool_manager.get_tool(name)
    schema = registered.fn_metadata.output_schema if registered is not None else None
    if schema is None:  # pragma: no cover - tools with a summary have an output model
        return
    schema["properties"] = {
        SUMMARY_KEY: {"type": "string", "description": "What happened and what to do next, in a few lines."},
        **schema.get("properties", {}),
    }


def _check_arguments_in_the_tool(server: MCPServer[Any], name: str) -> None:
    """For a tool whose input model takes extra keys (a CLI's own call shape): the tool's model
    still checks the arguments, and the schema lets unknown keys through."""
    registered = server._tool_manager.get_tool(name)
    if registered is None:  # pragma: no cover - registered just above
        raise RuntimeError(f"tool {name} was not registered")
    metadata = registered.fn_metadata
    registered.fn_metadata = _ArgumentsCheckedByTheTool(
        arg_model=metadata.arg_model,
        output_schema=metadata.output_schema,
        output_model=metadata.output_model,
        wrap_output=metadata.wrap_output,
    )


def _forbid_unknown_arguments(server: MCPServer[Any], name: str) -> None:
    """The SDK ignores arguments a tool does not declare; a typo such as `memory` for `memory_mb`
    would then silently do nothing. Reject them instead: in the published schema, and at
    validation (the tool's input model forbids extra keys)."""
    _check_arguments_in_the_tool(server, name)
    registered = server._tool_manager.get_tool(name)
    if registered is not None:
        registered.parameters["additionalProperties"] = False
