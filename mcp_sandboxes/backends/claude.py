"""Claude Code: `claude -p --output-format stream-json --verbose`, one process per turn.

The prompt goes on stdin (so size and a leading '-' do not matter); a follow-up turn adds
`--resume <session_id>`, the id the previous turn's `system/init` line reported. Claude Code
keeps its conversations under `$HOME/.claude`, so HOME is the session's fixed home.

The translator reads stream-json lines (format notes in AGENT-FORMATS.md, checked against
recordings of 2.1.197 in tests/fixtures/claude/): `system` (init carries the session id),
`assistant` (one content block per line, usage repeated per line: never summed), `user`
(tool results), `result` (the turn's usage, cost and outcome).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mcp_sandboxes.backends import _kit
from mcp_sandboxes.backends.base import AgentSpec, Command, RetryIf, Turn, TurnResult, argument
from mcp_sandboxes.config import BackendSettings
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

NAME = "claude"
CLI_TARGET = "/usr/local/bin/claude"
# Relative to the agent's HOME; written by `setup`, named by `command`.
MCP_CONFIG_PATH = ".mcp-sandboxes/claude-mcp.json"
# Claude Code refuses to bypass permissions as root unless told it runs in a sandbox.
_BYPASS_MODES = frozenset({"bypassPermissions"})
_BYPASS_FLAGS = frozenset({"--dangerously-skip-permissions"})
# How a stopped CLI exits: 2.1.197 exits 0 without a result line on SIGINT, and 143 on
# SIGTERM; the other signal codes as for every backend (_kit). Stopped on purpose, not crashed.
INTERRUPT_EXIT_CODES = frozenset({0}) | _kit.SIGNAL_EXIT_CODES
_FAILED_MCP_STATUSES = frozenset({"failed", "error", "needs-auth"})
# The CLI gives piped stdin 3 s to start arriving, then says so and exits 1 with no output and
# no model call; a stalled machine can lose that race with the prompt already in the pipe.
STDIN_RACE_RETRY = RetryIf(exit_code=1, stderr_contains="no stdin data received", attempts=3)


class ClaudeBackend:
    name = NAME
    executable = "claude"

    def __init__(self, *, cli_path: str = "", env: Mapping[str, str] | None = None) -> None:
        self.cli_path = cli_path
        self._env = dict(env or {})

    @classmethod
    def from_settings(cls, settings: BackendSettings, environ: Mapping[str, str]) -> ClaudeBackend:
        """`pass_env` names host variables handed over when set; the fixed `env` table wins
        over them, since it was written for this backend on purpose."""
        return cls(cli_path=settings.cli_path, env=_kit.host_env(settings.pass_env, settings.env, environ))

    def __repr__(self) -> str:
        # Never the values: they hold API keys.
        return f"ClaudeBackend(cli_path={self.cli_path!r}, env_keys={sorted(self._env)})"

    @property
    def program(self) -> str:
        """argv[0]: the mounted host CLI, else the image's own on its PATH."""
        return CLI_TARGET if self.cli_path else self.executable

    def command(self, turn: Turn) -> Command:
        agent = turn.agent
        argv = [self.program, "-p", "--output-format", "stream-json", "--verbose"]
        if agent.model:
            argv += ["--model", argument("model", agent.model)]
        if agent.system_prompt:
            # Appended, so the CLI keeps its own tool-use instructions.
            argv += ["--append-system-prompt", argument("system_prompt", agent.system_prompt)]
        if agent.permission_mode:
            argv += ["--permission-mode", agent.permission_mode]
        if agent.max_turns is not None:
            argv += ["--max-turns", str(agent.max_turns)]
        if agent.mcp_servers:
            argv += ["--mcp-config", mcp_config_path(turn.home)]
        if agent.permission_prompt_tool:
            argv += ["--permission-prompt-tool", argument("permission_prompt_tool", agent.permission_prompt_tool)]
        if turn.resume_id:
            argv += ["--resume", argument("resume_id", turn.resume_id)]
        if agent.allowed_tools:
            # A variadic option: each spec its own argument ("Bash(git *)" has a space); the
            # option that follows ends the list.
            argv += ["--allowedTools", *(argument("allowed_tools", tool) for tool in agent.allowed_tools)]
        argv += ["--input-format", "text", *agent.extra_args]
        env = {**self._env, "HOME": turn.home}
        if agent.permission_mode in _BYPASS_MODES or _BYPASS_FLAGS.intersection(agent.extra_args):
            env["IS_SANDBOX"] = "1"
        return Command(argv=argv, env=env, stdin=turn.prompt.encode("utf-8"), cwd=turn.workdir, retry=STDIN_RACE_RETRY)

    def translator(self) -> ClaudeTranslator:
        return ClaudeTranslator()

    def mounts(self) -> list[Mount]:
        return _kit.binary_mount(
            NAME,
            self.cli_path,
            CLI_TARGET,
            points_at="the claude binary (e.g. tools/agent-clis/node_modules/@anthropic-ai/claude-code/bin/claude.exe)",
            executable=self.executable,
        )

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        files: list[SetupFile] = []
        if agent.mcp_servers:
            data = json.dumps({"mcpServers": agent.mcp_servers}, indent=2).encode()
            # 0600: server entries may carry tokens in their env.
            files.append(WriteFile(path=mcp_config_path(home), data=data, mode=0o600))
        config_dir = str(Path(home) / Path(MCP_CONFIG_PATH).parent)
        return SandboxSetup(backend=self.name, home=home, directories=[config_dir], files=files)


def mcp_config_path(home: str) -> str:
    return str(Path(home) / MCP_CONFIG_PATH)


def _block_text(content: Any) -> str:
    """A tool_result's content: a string, or a list of blocks (text kept, others named)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            elif isinstance(block, dict):
                parts.append(f"[{block.get('type', 'block')}]")
            else:
                parts.append(str(block))
        return "\n".join(parts)
    if content is None:
        return ""
    return json.dumps(content)


def _split_mcp_name(name: str) -> tuple[str, str] | None:
    """`mcp__server__tool` -> (server, tool); None for built-in tools."""
    if not name.startswith("mcp__"):
        return None
    server, sep, tool = name[len("mcp__") :].partition("__")
    if not sep or not server or not tool:
        return None
    return server, tool


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(raw: Any, cost: Any = None) -> Usage:
    data = raw if isinstance(raw, dict) else {}
    return Usage(
        input_tokens=_int(data.get("input_tokens")),
        output_tokens=_int(data.get("output_tokens")),
        cache_creation_input_tokens=_int(data.get("cache_creation_input_tokens")),
        cache_read_input_tokens=_int(data.get("cache_read_input_tokens")),
        cost_usd=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
    )


class ClaudeTranslator:
    """stream-json lines -> events, one instance per turn; never raises on bad input."""

    def __init__(self) -> None:
        self._result = TurnResult()
        self._got_result = False
        self._init_model: str | None = None
        self._api_model: str | None = None
        self._last_text: str | None = None
        self._mcp_tool_ids: set[str] = set()
        # message id -> the usage last seen for it (repeated on every content-block line)
        self._message_usage: dict[str, Usage] = {}

    @property
    def result(self) -> TurnResult:
        return self._result

    def feed(self, line: str) -> list[Event]:
        data = _kit.json_object(line, NAME)
        if not isinstance(data, dict):
            return data
        kind = data.get("type")
        session_id = data.get("session_id")
        # init and result name the session the next turn resumes (a resume may fork it);
        # any other line only until one of them arrives.
        named = kind in ("system", "result") or self._result.native_session_id is None
        if named and isinstance(session_id, str) and session_id:
            self._result.native_session_id = session_id
        if kind == "system" and data.get("subtype") == "init":
            return self._init(data)
        if kind == "assistant":
            return self._assistant(data)
        if kind == "user":
            return self._user(data)
        if kind == "result":
            return self._final(data)
        return [AgentRaw(source=NAME, data=data)]

    def _init(self, data: dict[str, Any]) -> list[Event]:
        # The init line is bookkeeping (session id, model, tool list): no event of its own,
        # except MCP servers that failed to start, which the caller needs to see.
        if isinstance(data.get("model"), str):
            self._init_model = data["model"]
        events: list[Event] = []
        for server in data.get("mcp_servers") or []:
            if isinstance(server, dict) and server.get("status") in _FAILED_MCP_STATUSES:
                message = f"MCP server {server.get('name')!r} did not start (status {server.get('status')})"
                events.append(SessionError(error=ErrorInfo(type="mcp_server_failed", message=message)))
        return events

    def _assistant(self, data: dict[str, Any]) -> list[Event]:
        message = data.get("message")
        if not isinstance(message, dict):
            return [AgentRaw(source=NAME, data=data)]
        model = message.get("model")
        if isinstance(model, str) and model and not model.startswith("<"):  # "<synthetic>" for CLI-made messages
            self._api_model = model
        message_id = message.get("id")
        if isinstance(message_id, str) and "usage" in message:
            self._message_usage[message_id] = _usage(message.get("usage"))
        events: list[Event] = []
        for block in message.get("content") or []:
            events.extend(self._assistant_block(block))
        return events

    def _assistant_block(self, block: Any) -> list[Event]:
        if not isinstance(block, dict):
            return [AgentRaw(source=NAME, data=block)]
        kind = block.get("type")
        if kind == "text":
            text = str(block.get("text", ""))
            if not text:
                return []
            self._last_text = text
            return [AgentMessage(content=[TextBlock(text=text)])]
        if kind == "thinking":
            thinking = str(block.get("thinking", ""))
            return [AgentThinking(thinking=thinking)] if thinking else []
        if kind in ("tool_use", "server_tool_use"):
            tool_use_id = str(block.get("id", ""))
            name = str(block.get("name", ""))
            tool_input = block.get("input")
            arguments = tool_input if isinstance(tool_input, dict) else {"input": tool_input}
            mcp = _split_mcp_name(name)
            if mcp is not None:
                self._mcp_tool_ids.add(tool_use_id)
                return [AgentMcpToolUse(tool_use_id=tool_use_id, server_name=mcp[0], name=mcp[1], input=arguments)]
            return [AgentToolUse(tool_use_id=tool_use_id, name=name, input=arguments)]
        return [AgentRaw(source=NAME, data=block)]

    def _user(self, data: dict[str, Any]) -> list[Event]:
        message = data.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            # A plain user line (e.g. a replayed prompt): nothing the caller did not send.
            return [AgentRaw(source=NAME, data=data)]
        events: list[Event] = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                tool_use_id = str(block.get("tool_use_id", ""))
                text = _block_text(block.get("content"))
                is_error = bool(block.get("is_error"))
                if tool_use_id in self._mcp_tool_ids:
                    events.append(AgentMcpToolResult(tool_use_id=tool_use_id, content=text, is_error=is_error))
                else:
                    events.append(AgentToolResult(tool_use_id=tool_use_id, content=text, is_error=is_error))
            else:
                events.append(AgentRaw(source=NAME, data=block))
        return events

    def _denials(self, denials: Any) -> list[Event]:
        """Tool calls the permission mode refused: the agent says little of them itself, and a
        turn that ends with end_turn would otherwise hide them from whoever spawned it."""
        events: list[Event] = []
        for denial in denials if isinstance(denials, list) else []:
            if not isinstance(denial, dict):
                continue
            tool = str(denial.get("tool_name") or "a tool")
            tool_input = denial.get("tool_input")
            detail = ""
            if isinstance(tool_input, dict):
                first = next((v for k, v in tool_input.items() if k in ("command", "file_path", "path", "url")), None)
                detail = f": {str(first)[:200]}" if first is not None else ""
            self._result.denials.append(f"{tool}{detail}")
            message = (
                f"{tool}{detail} was refused by the permission mode; spawn with permission_mode"
                " 'bypassPermissions' or allowed_tools naming it to let the agent run it"
            )
            events.append(SessionError(error=ErrorInfo(type="permission_denied", message=message)))
        return events

    def _final(self, data: dict[str, Any]) -> list[Event]:
        self._got_result = True
        usage = _usage(data.get("usage"), data.get("total_cost_usd"))
        result = self._result
        result.usage = usage
        text = data.get("result")
        if isinstance(text, str) and text:
            result.final_text = text
        elif self._last_text is not None:
            result.final_text = self._last_text
        events: list[Event] = [SpanModelRequestEnd(model=self._api_model or self._init_model, model_usage=usage)]
        events.extend(self._denials(data.get("permission_denials")))
        subtype = data.get("subtype")
        is_error = bool(data.get("is_error"))
        if subtype == "success" and not is_error:
            result.stop_reason = "end_turn"
            return events
        if subtype == "error_max_turns":
            result.stop_reason = "max_turns"
            result.error = self._error_message(data, "the agent reached its turn limit")
            return events
        result.stop_reason = "error"
        error_type = "api_error" if subtype == "success" else str(subtype or "error")
        result.error = self._error_message(data, f"claude reported {subtype or 'an error'}")
        events.append(SessionError(error=ErrorInfo(type=error_type, message=result.error)))
        return events

    @staticmethod
    def _error_message(data: dict[str, Any], default: str) -> str:
        errors = [str(e) for e in data.get("errors") or [] if e]
        if errors:
            return "; ".join(errors)
        if isinstance(data.get("error"), str) and data["error"]:
            return str(data["error"])
        text = data.get("result")
        return text if isinstance(text, str) and text else default

    def finish(self, exit_code: int, stderr_tail: str) -> list[Event]:
        result = self._result
        if self._got_result:
            if exit_code in _kit.SIGNAL_EXIT_CODES:
                result.stop_reason = "interrupted"
            return []
        if exit_code in INTERRUPT_EXIT_CODES:
            result.stop_reason = "interrupted"
            result.usage = sum(self._message_usage.values(), Usage())
            result.final_text = self._last_text
            return []
        result.usage = sum(self._message_usage.values(), Usage())
        result.final_text = self._last_text
        result.stop_reason = "error"
        message = _kit.crash_message(f"claude exited with code {exit_code} before reporting a result", stderr_tail)
        result.error = message
        return [SessionError(error=ErrorInfo(type="cli_crashed", message=message))]
