"""Factory Droid: `droid exec --output-format stream-json`, one process per turn.

The prompt goes on stdin (droid exec reads it there when no prompt argument is given), so size
and a leading '-' do not matter. Droid keeps its sessions under `$HOME/.factory/sessions`, so
HOME is the session's fixed home.

Resuming: `droid exec -s <id>` first fetches the session from Factory's API and fails when
that host cannot be reached (a 404 is fine, a network error is not); `--fork <id>` copies the
local transcript into a new session without asking anyone. `resume = "auto"` (the default)
uses `-s` when the CLI gets a FACTORY_API_KEY and `--fork` otherwise, which is what lets a
BYOK model (`droid_settings.customModels`) run with no Factory account. A forked turn reports
a new session id; the next turn resumes from that one.

The translator reads stream-json lines (format notes in AGENT-FORMATS.md, checked against
recordings of 0.225.2 in tests/fixtures/factory/): `system/init` (session id, model),
`message` (the user's prompt echoed, then assistant text), `reasoning`, `tool_call`,
`tool_result` (`value`, or `error{type,message}` with isError; some builds omit the id),
`error{source,message}`, and `completion` (final text and the turn's usage). A signal makes
droid 0.225 stop at once and exit 0 without a completion line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from mcp_sandboxes.backends import _kit
from mcp_sandboxes.backends.base import AgentSpec, Command, Turn, TurnResult, argument
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.events import (
    AgentMcpToolResult,
    AgentMcpToolUse,
    AgentMessage,
    AgentRaw,
    AgentThinking,
    AgentToolResult,
    AgentToolUse,
    ErrorInfo,
    Event,
    SessionError,
    SpanModelRequestEnd,
    TextBlock,
    Usage,
)
from mcp_sandboxes.specs import Mount, SandboxSetup, SetupFile, WriteFile

NAME = "factory"
CLI_TARGET = "/usr/local/bin/droid"
# Relative to the agent's HOME. Droid reads MCP servers only from its own directory; the runtime
# settings go elsewhere and are named with --settings, so a settings.json of the image survives.
MCP_CONFIG_PATH = ".factory/mcp.json"
SETTINGS_PATH = ".mcp-sandboxes/factory-settings.json"
API_KEY_VAR = "FACTORY_API_KEY"
ResumeMode = Literal["auto", "session", "fork"]
RESUME_MODES: tuple[ResumeMode, ...] = ("auto", "session", "fork")
# Our permission modes (Claude's names, see server/schemas.py) -> droid exec flags. Droid's
# default is read-only; `plan` maps to its spec mode, `dontAsk` to read-only (nothing unasked).
PERMISSION_FLAGS: dict[str, list[str]] = {
    "default": [],
    "dontAsk": [],
    "plan": ["--use-spec"],
    "acceptEdits": ["--auto", "low"],
    "auto": ["--auto", "medium"],
    "bypassPermissions": ["--skip-permissions-unsafe"],
}
# A stopped droid exits 0 without a completion line; the signal exit codes as for every backend.
INTERRUPT_EXIT_CODES = frozenset({0}) | _kit.SIGNAL_EXIT_CODES
# Droid names MCP tools `<server>___<tool>`; its own tools never contain three underscores.
MCP_SEPARATOR = "___"


class FactoryBackend:
    name = NAME
    executable = "droid"

    def __init__(
        self,
        *,
        cli_path: str = "",
        env: Mapping[str, str] | None = None,
        resume: ResumeMode = "auto",
        droid_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.cli_path = cli_path
        self._env = dict(env or {})
        self.resume = resume
        self.droid_settings = dict(droid_settings or {})

    @classmethod
    def from_settings(cls, settings: BackendSettings, environ: Mapping[str, str]) -> FactoryBackend:
        """`pass_env` names host variables handed over when set; the fixed `env` wins.

        Extra keys: `resume` ("auto" | "session" | "fork") and `droid_settings`, a table (or,
        from an environment variable, a JSON object) given to droid with --settings, e.g.
        `customModels` for a BYOK endpoint."""
        env = _kit.host_env(settings.pass_env, settings.env, environ)
        extra = settings.model_extra or {}
        resume = extra.get("resume", "auto")
        if resume not in RESUME_MODES:
            raise InvalidInputError("backends.factory.resume", f"is {resume!r}; use one of: {', '.join(RESUME_MODES)}")
        return cls(
            cli_path=settings.cli_path,
            env=env,
            resume=resume,
            droid_settings=_table(extra.get("droid_settings"), "backends.factory.droid_settings"),
        )

    def __repr__(self) -> str:
        # Never the values: they hold API keys.
        return f"FactoryBackend(cli_path={self.cli_path!r}, resume={self.resume!r}, env_keys={sorted(self._env)})"

    @property
    def program(self) -> str:
        """argv[0]: the mounted host CLI, else the image's own on its PATH."""
        return CLI_TARGET if self.cli_path else self.executable

    def resume_flag(self) -> str:
        if self.resume == "session" or (self.resume == "auto" and self._env.get(API_KEY_VAR)):
            return "--session-id"
        return "--fork"

    def command(self, turn: Turn) -> Command:
        agent = turn.agent
        argv = [self.program, "exec", "--output-format", "stream-json"]
        if agent.model:
            argv += ["--model", argument("model", agent.model)]
        if agent.system_prompt:
            argv += ["--append-system-prompt", argument("system_prompt", agent.system_prompt)]
        if agent.permission_mode:
            if agent.permission_mode not in PERMISSION_FLAGS:
                raise InvalidInputError(
                    "permission_mode",
                    f"{agent.permission_mode!r} has no droid equivalent; use one of: {', '.join(PERMISSION_FLAGS)}",
                )
            argv += PERMISSION_FLAGS[agent.permission_mode]
        if self.droid_settings:
            argv += ["--settings", settings_path(turn.home)]
        if turn.resume_id:
            argv += [self.resume_flag(), argument("resume_id", turn.resume_id)]
        argv += agent.extra_args
        # max_turns and allowed_tools have no droid exec flag: droid runs until the model stops,
        # and its tool set is chosen by --auto or by --only-tools/--add-tools in extra_args.
        env = {**self._env, "HOME": turn.home}
        return Command(argv=argv, env=env, stdin=turn.prompt.encode("utf-8"), cwd=turn.workdir)

    def translator(self) -> FactoryTranslator:
        return FactoryTranslator()

    def mounts(self) -> list[Mount]:
        return _kit.binary_mount(
            NAME,
            self.cli_path,
            CLI_TARGET,
            points_at="the native droid binary (tools/agent-clis/node_modules/@factory/cli-linux-x64/bin/droid)",
            executable=self.executable,
        )

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        dirs = [str(Path(home) / Path(MCP_CONFIG_PATH).parent), str(Path(home) / Path(SETTINGS_PATH).parent)]
        # 0600 for both: MCP entries may carry tokens in their env, settings may carry API keys.
        files: list[SetupFile] = []
        if agent.mcp_servers:
            data = json.dumps({"mcpServers": droid_mcp_servers(agent.mcp_servers)}, indent=2).encode()
            files.append(WriteFile(path=mcp_config_path(home), data=data, mode=0o600))
        if self.droid_settings:
            data = json.dumps(self.droid_settings, indent=2).encode()
            files.append(WriteFile(path=settings_path(home), data=data, mode=0o600))
        return SandboxSetup(backend=self.name, home=home, directories=dirs, files=files)


def mcp_config_path(home: str) -> str:
    return str(Path(home) / MCP_CONFIG_PATH)


def settings_path(home: str) -> str:
    return str(Path(home) / SETTINGS_PATH)


def droid_mcp_servers(servers: Mapping[str, Any]) -> dict[str, Any]:
    """The `mcpServers` shape Claude uses -> droid's, which names the transport in every entry."""
    converted: dict[str, Any] = {}
    for name, entry in servers.items():
        if not isinstance(entry, dict):
            raise InvalidInputError(f"mcp_servers.{name}", "must be an object with `command` or `url`")
        server = dict(entry)
        server.setdefault("type", "http" if "url" in server else "stdio")
        converted[name] = server
    return converted


def _table(value: Any, field: str) -> dict[str, Any]:
    """A TOML table, or the JSON object an environment variable override carries."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidInputError(field, f"is not a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidInputError(field, f"must be a table (a JSON object), not {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(raw: Any) -> Usage:
    data = raw if isinstance(raw, dict) else {}
    return Usage(
        input_tokens=_int(data.get("input_tokens")),
        output_tokens=_int(data.get("output_tokens")),
        cache_creation_input_tokens=_int(data.get("cache_creation_input_tokens")),
        cache_read_input_tokens=_int(data.get("cache_read_input_tokens")),
        reasoning_tokens=_int(data.get("thinking_tokens")),
    )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value)


_ERROR_TYPES = {"agent_loop": "agent_error", "cli": "cli_error"}


class FactoryTranslator:
    """stream-json lines -> events, one instance per turn; never raises on bad input."""

    def __init__(self) -> None:
        self._result = TurnResult()
        self._completed = False
        self._model: str | None = None
        self._last_text: str | None = None
        self._errors: list[str] = []
        # tool_call ids without a result yet, oldest first; a result without an id closes the newest.
        self._open_calls: list[str] = []
        self._mcp_ids: set[str] = set()

    @property
    def result(self) -> TurnResult:
        return self._result

    def feed(self, line: str) -> list[Event]:
        data = _kit.json_object(line, NAME)
        if not isinstance(data, dict):
            return data
        session_id = data.get("session_id")
        if isinstance(session_id, str) and session_id:
            self._result.native_session_id = session_id
        kind = data.get("type")
        if kind == "system" and data.get("subtype") == "init":
            if isinstance(data.get("model"), str):
                self._model = data["model"]
            return []
        if kind == "message":
            return self._message(data)
        if kind == "reasoning":
            text = _text(data.get("text"))
            return [AgentThinking(thinking=text)] if text else []
        if kind == "tool_call":
            return self._tool_call(data)
        if kind == "tool_result":
            return self._tool_result(data)
        if kind == "error":
            return self._error(data)
        if kind == "completion":
            return self._completion(data)
        return [AgentRaw(source=NAME, data=data)]

    def _message(self, data: dict[str, Any]) -> list[Event]:
        role = data.get("role")
        if role == "user":
            return []  # the prompt echoed back; the server already recorded it as user.message
        if role != "assistant":
            return [AgentRaw(source=NAME, data=data)]
        text = _text(data.get("text"))
        if not text:
            return []
        self._last_text = text
        return [AgentMessage(content=[TextBlock(text=text)])]

    def _tool_call(self, data: dict[str, Any]) -> list[Event]:
        tool_use_id = _text(data.get("id"))
        name = _text(data.get("toolName") or data.get("toolId"))
        parameters = data.get("parameters")
        arguments = parameters if isinstance(parameters, dict) else {"input": parameters}
        self._open_calls.append(tool_use_id)
        server, sep, tool = name.partition(MCP_SEPARATOR)
        if sep and server and tool:
            self._mcp_ids.add(tool_use_id)
            return [AgentMcpToolUse(tool_use_id=tool_use_id, server_name=server, name=tool, input=arguments)]
        return [AgentToolUse(tool_use_id=tool_use_id, name=name, input=arguments)]

    def _tool_result(self, data: dict[str, Any]) -> list[Event]:
        tool_use_id = _text(data.get("id"))
        if tool_use_id in self._open_calls:
            self._open_calls.remove(tool_use_id)
        elif not tool_use_id and self._open_calls:
            tool_use_id = self._open_calls.pop()
        error = data.get("error")
        is_error = bool(data.get("isError")) or error is not None
        if isinstance(error, dict):
            content = _text(error.get("message")) or _text(error)
        elif error is not None:
            content = _text(error)
        else:
            content = _text(data.get("value"))
        if tool_use_id in self._mcp_ids:
            return [AgentMcpToolResult(tool_use_id=tool_use_id, content=content, is_error=is_error)]
        return [AgentToolResult(tool_use_id=tool_use_id, content=content, is_error=is_error)]

    def _error(self, data: dict[str, Any]) -> list[Event]:
        source = _text(data.get("source"))
        message = _text(data.get("message")) or "droid reported an error"
        if message not in self._errors:
            self._errors.append(message)
        return [SessionError(error=ErrorInfo(type=_ERROR_TYPES.get(source, "error"), message=message))]

    def _completion(self, data: dict[str, Any]) -> list[Event]:
        self._completed = True
        result = self._result
        result.usage = _usage(data.get("usage"))
        final = data.get("finalText")
        result.final_text = final if isinstance(final, str) and final else self._last_text
        result.stop_reason = "end_turn"
        return [SpanModelRequestEnd(model=self._model, model_usage=result.usage)]

    def finish(self, exit_code: int, stderr_tail: str) -> list[Event]:
        result = self._result
        if self._completed:
            if exit_code in _kit.SIGNAL_EXIT_CODES:
                result.stop_reason = "interrupted"
            return []
        result.final_text = self._last_text
        if self._errors:
            # droid printed why (an API error, missing permission) and exited 1: already reported.
            result.stop_reason = "error"
            result.error = "; ".join(self._errors)
            return []
        if exit_code in INTERRUPT_EXIT_CODES:
            result.stop_reason = "interrupted"
            return []
        result.stop_reason = "error"
        message = _kit.crash_message(f"droid exited with code {exit_code} before reporting a result", stderr_tail)
        result.error = message
        return [SessionError(error=ErrorInfo(type="cli_crashed", message=message))]
