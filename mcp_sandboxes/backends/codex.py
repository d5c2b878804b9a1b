"""OpenAI Codex CLI: `codex exec --json`, one process per turn.

The prompt goes on stdin (`-`); a follow-up turn runs `codex exec [flags] resume <thread_id> -`
with the id the previous turn's `thread.started` line reported. Codex's own sandbox is
bypassed on purpose (`--dangerously-bypass-approvals-and-sandbox`): the container is the
sandbox, and exec never asks for approval anyway. Codex keeps its threads under
`$HOME/.codex/sessions`, so HOME is the session's fixed home.

Settings the session fixes live in a Codex profile file, `$HOME/.codex/mcp-sandboxes.config.toml`
(written by `setup`, layered on the user's config by `-p mcp-sandboxes`): the model provider
when OPENAI_BASE_URL is set (Codex 0.169 ignores that variable for its built-in provider), the
system prompt as `developer_instructions` (added to Codex's own instructions, not replacing
them), and MCP servers as `[mcp_servers.NAME]` tables. A file rather than `-c` flags, because
MCP server entries may carry tokens and argv is visible to every process in the sandbox.

The translator reads JSONL events (AGENT-FORMATS.md; checked against recordings of 0.169.0 in
tests/fixtures/codex/): `thread.started` (the thread id), `item.started|updated|completed`
(agent_message, reasoning, command_execution, file_change, mcp_tool_call, web_search,
todo_list, error), `turn.completed` (usage), `turn.failed` and `error` lines.

Usage: Codex reports the thread's running total in every `turn.completed`, and a resumed thread
starts from the total it had, so the usage of a turn is that total minus the one the thread's
previous turn reported. The backend remembers the last total per thread (`UsageLedger`); after
a server restart the first resumed turn has no baseline and reports the thread's total.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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
from mcp_sandboxes.specs import Mount, SandboxSetup, WriteFile

NAME = "codex"
# Where a host codex (cli_path) is mounted: its platform directory, so the binary keeps its
# siblings (codex-code-mode-host, codex-path/rg) next to it.
CLI_MOUNT = "/opt/mcp-sandboxes/codex"
CLI_TARGET = f"{CLI_MOUNT}/bin/codex"
PROFILE = "mcp-sandboxes"
PROFILE_PATH = f".codex/{PROFILE}.config.toml"  # relative to HOME, read as $CODEX_HOME/<profile>.config.toml
PROVIDER_ID = "mcp_sandboxes"
# Codex names MCP servers in config keys and tool names; it accepts only these characters.
_SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Codex 0.169 exits 1 without a turn.completed/turn.failed line when stopped by SIGINT (mid-turn);
# the signal exit codes every backend knows are _kit.SIGNAL_EXIT_CODES.
SIGINT_EXIT_CODE = 1
RECONNECTING_PREFIX = "Reconnecting..."


class UsageLedger:
    """The last usage total Codex reported per thread, to turn its running totals into
    per-turn usage. Bounded: the oldest threads are forgotten first."""

    def __init__(self, max_threads: int = 4096) -> None:
        self._totals: OrderedDict[str, Usage] = OrderedDict()
        self._max_threads = max_threads

    def last_total(self, thread_id: str) -> Usage | None:
        return self._totals.get(thread_id)

    def record(self, thread_id: str, total: Usage) -> None:
        self._totals[thread_id] = total
        self._totals.move_to_end(thread_id)
        while len(self._totals) > self._max_threads:
            self._totals.popitem(last=False)


class CodexBackend:
    name = NAME
    executable = "codex"

    def __init__(self, *, cli_path: str = "", env: Mapping[str, str] | None = None) -> None:
        self.cli_path = cli_path
        self._env = dict(env or {})
        self._ledger = UsageLedger()

    @classmethod
    def from_settings(cls, settings: BackendSettings, environ: Mapping[str, str]) -> CodexBackend:
        """`pass_env` names host variables handed over when set; the fixed `env` table wins."""
        return cls(cli_path=settings.cli_path, env=_kit.host_env(settings.pass_env, settings.env, environ))

    def __repr__(self) -> str:
        # Never the values: they hold API keys.
        return f"CodexBackend(cli_path={self.cli_path!r}, env_keys={sorted(self._env)})"

    @property
    def program(self) -> str:
        """argv[0]: the mounted host CLI, else the image's own on its PATH."""
        return CLI_TARGET if self.cli_path else self.executable

    def command(self, turn: Turn) -> Command:
        agent = turn.agent
        argv = [
            self.program,
            "exec",
            "--json",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
            "-p",
            PROFILE,
        ]
        if agent.model:
            argv += ["-m", argument("model", agent.model)]
        argv += agent.extra_args
        if turn.resume_id:
            # Flags before `resume` belong to exec and apply to the resumed run too.
            argv += ["resume", argument("resume_id", turn.resume_id)]
        argv.append("-")
        env = {**self._env, "HOME": turn.home}
        # `codex exec` reads an API key from CODEX_API_KEY; the provider we configure names
        # OPENAI_API_KEY. Either one set makes both work.
        key = env.get("CODEX_API_KEY") or env.get("OPENAI_API_KEY")
        if key:
            env.setdefault("CODEX_API_KEY", key)
            env.setdefault("OPENAI_API_KEY", key)
        return Command(argv=argv, env=env, stdin=turn.prompt.encode("utf-8"), cwd=turn.workdir)

    def translator(self) -> CodexTranslator:
        return CodexTranslator(ledger=self._ledger)

    def mounts(self) -> list[Mount]:
        if not self.cli_path:
            return []
        path = _kit.cli_file(
            NAME,
            self.cli_path,
            points_at="the native codex binary (e.g. tools/agent-clis/node_modules/@openai/codex-linux-x64/vendor/"
            "x86_64-unknown-linux-musl/bin/codex)",
            executable=self.executable,
        )
        with path.open("rb") as handle:
            if handle.read(4) != b"\x7fELF":
                raise InvalidInputError(
                    "backends.codex.cli_path",
                    f"{self.cli_path} is not a native executable (the npm package's bin/codex.js needs node); "
                    "point it at @openai/codex-linux-x64/vendor/<target>/bin/codex",
                )
        binary = path.resolve()
        if binary.parent.name != "bin":
            raise InvalidInputError(
                "backends.codex.cli_path",
                f"{self.cli_path} is not inside a bin/ directory; point it at .../vendor/<target>/bin/codex so its "
                "helper files come along",
            )
        return [Mount(source=str(binary.parent.parent), target=CLI_MOUNT, read_only=True)]

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        profile = profile_toml(agent, base_url=self._env.get("OPENAI_BASE_URL"))
        # 0600: MCP server entries may carry tokens in their env.
        file = WriteFile(path=profile_path(home), data=profile.encode("utf-8"), mode=0o600)
        return SandboxSetup(backend=self.name, home=home, directories=[str(Path(home) / ".codex")], files=[file])


def profile_path(home: str) -> str:
    return str(Path(home) / PROFILE_PATH)


# -- the profile file (TOML) ---------------------------------------------------------------

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any, field: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item, field) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{toml_string(str(k))} = {toml_value(v, field)}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(items) + " }" if value else "{}"
    raise InvalidInputError(field, f"{type(value).__name__} values cannot be written to Codex's TOML config")


def codex_mcp_server(name: str, entry: Any) -> dict[str, Any]:
    """One `mcpServers` entry in Codex's `[mcp_servers.NAME]` shape: stdio servers keep
    command/args/env/cwd, remote ones `url` and `headers` (as http_headers); `type` is implied
    by the keys. Codex's own keys (startup_timeout_sec, enabled_tools, ...) pass through."""
    field = f"mcp_servers.{name}"
    if not _SERVER_NAME.match(name):
        raise InvalidInputError("mcp_servers", f"server name {name!r} may only use letters, digits, '_' and '-'")
    if not isinstance(entry, dict):
        raise InvalidInputError(field, "must be an object with `command` (stdio) or `url` (HTTP)")
    if not isinstance(entry.get("command"), str) and not isinstance(entry.get("url"), str):
        raise InvalidInputError(field, "needs `command` (a stdio server) or `url` (a streamable HTTP server)")
    server: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "type" or value is None:
            continue
        server["http_headers" if key == "headers" else key] = value
    return server


def profile_toml(agent: AgentSpec, *, base_url: str | None) -> str:
    lines = ["# Written by mcp-sandboxes for this session; used with `codex exec -p mcp-sandboxes`.", ""]
    if agent.system_prompt:
        lines.append(f"developer_instructions = {toml_string(agent.system_prompt)}")
    if base_url:
        lines.append(f'model_provider = "{PROVIDER_ID}"')
        provider = {"name": "mcp-sandboxes", "base_url": base_url, "env_key": "OPENAI_API_KEY", "wire_api": "responses"}
        lines += ["", f"[model_providers.{PROVIDER_ID}]"]
        lines += [f"{key} = {toml_value(value, 'OPENAI_BASE_URL')}" for key, value in provider.items()]
    for name, entry in agent.mcp_servers.items():
        server = codex_mcp_server(name, entry)
        lines += ["", f"[mcp_servers.{name}]"]
        lines += [
            f"{toml_string(key)} = {toml_value(value, f'mcp_servers.{name}.{key}')}" for key, value in server.items()
        ]
    return "\n".join(lines) + "\n"


# -- the translator -------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def thread_total(raw: Any) -> Usage:
    """`turn.completed.usage` in our terms: OpenAI counts cached (and cache-write) input inside
    `input_tokens`, Anthropic-style `input_tokens` does not, so they are taken out."""
    data = raw if isinstance(raw, dict) else {}
    cached = _int(data.get("cached_input_tokens"))
    written = _int(data.get("cache_write_input_tokens"))
    return Usage(
        input_tokens=max(0, _int(data.get("input_tokens")) - cached - written),
        output_tokens=_int(data.get("output_tokens")),
        cache_read_input_tokens=cached,
        cache_creation_input_tokens=written,
        reasoning_tokens=_int(data.get("reasoning_output_tokens")),
    )


def usage_since(total: Usage, before: Usage | None) -> Usage:
    if before is None:
        return total
    return Usage(
        input_tokens=max(0, total.input_tokens - before.input_tokens),
        output_tokens=max(0, total.output_tokens - before.output_tokens),
        cache_read_input_tokens=max(0, total.cache_read_input_tokens - before.cache_read_input_tokens),
        cache_creation_input_tokens=max(0, total.cache_creation_input_tokens - before.cache_creation_input_tokens),
        reasoning_tokens=max(0, total.reasoning_tokens - before.reasoning_tokens),
    )


def _mcp_result_text(result: Any) -> str:
    """An MCP CallToolResult: its text blocks, else its structured content, as text."""
    if not isinstance(result, dict):
        return "" if result is None else json.dumps(result)
    parts = []
    for block in result.get("content") or []:
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict):
            parts.append(f"[{block.get('type', 'block')}]")
    if parts:
        return "\n".join(parts)
    structured = result.get("structured_content", result.get("structuredContent"))
    return json.dumps(structured) if structured is not None else ""


def _todo_text(items: Any) -> str:
    lines = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            lines.append(f"[{'x' if item.get('completed') else ' '}] {item.get('text', '')}")
    return "\n".join(lines)


class CodexTranslator:
    """`codex exec --json` lines -> events, one instance per turn; never raises on bad input."""

    def __init__(self, ledger: UsageLedger | None = None) -> None:
        self._ledger = ledger
        self._result = TurnResult()
        self._turn_started = False
        self._turn_ended = False
        self._last_error: str | None = None
        self._last_text: str | None = None
        self._started: set[str] = set()

    @property
    def result(self) -> TurnResult:
        return self._result

    def feed(self, line: str) -> list[Event]:
        data = _kit.json_object(line, NAME)
        if not isinstance(data, dict):
            return data
        kind = data.get("type")
        if kind == "thread.started" and isinstance(data.get("thread_id"), str) and data["thread_id"]:
            self._result.native_session_id = data["thread_id"]
            return []
        if kind == "turn.started":
            self._turn_started = True
            return []
        if kind in ("item.started", "item.updated", "item.completed") and isinstance(data.get("item"), dict):
            return self._item(str(kind).removeprefix("item."), data["item"], data)
        if kind == "turn.completed":
            return self._completed(data)
        if kind == "turn.failed":
            return self._failed(data)
        if kind == "error":
            return self._error(data)
        return [AgentRaw(source=NAME, data=data)]

    # -- items --

    def _item(self, phase: str, item: dict[str, Any], line: dict[str, Any]) -> list[Event]:
        kind = item.get("type")
        if kind == "agent_message":
            return self._message(phase, item)
        if kind == "reasoning":
            text = str(item.get("text") or "")
            return [AgentThinking(thinking=text)] if phase == "completed" and text else []
        if kind == "command_execution":
            return self._tool(phase, item, "command_execution", {"command": item.get("command")}, self._command_result)
        if kind == "file_change":
            return self._tool(phase, item, "file_change", {"changes": item.get("changes") or []}, self._change_result)
        if kind == "web_search":
            return self._tool(phase, item, "web_search", {"query": item.get("query")}, lambda _: ("", False))
        if kind == "mcp_tool_call":
            return self._mcp(phase, item)
        if kind == "todo_list":
            return self._todo(phase, item)
        if kind == "error":
            # A notice inside the turn (a fallback, a truncated output): the turn goes on.
            message = str(item.get("message") or "codex reported an error item")
            return (
                [SessionError(error=ErrorInfo(type="codex_warning", message=message))] if phase == "completed" else []
            )
        return [AgentRaw(source=NAME, data=line)]

    def _message(self, phase: str, item: dict[str, Any]) -> list[Event]:
        text = str(item.get("text") or "")
        if phase != "completed" or not text:
            return []
        self._last_text = text
        return [AgentMessage(content=[TextBlock(text=text)])]

    def _tool(
        self,
        phase: str,
        item: dict[str, Any],
        name: str,
        tool_input: dict[str, Any],
        result_of: Callable[[dict[str, Any]], tuple[str, bool]],
    ) -> list[Event]:
        item_id = str(item.get("id", ""))
        events: list[Event] = []
        if item_id not in self._started:
            self._started.add(item_id)
            events.append(AgentToolUse(tool_use_id=item_id, name=name, input=tool_input))
        if phase == "completed":
            content, is_error = result_of(item)
            events.append(AgentToolResult(tool_use_id=item_id, content=content, is_error=is_error))
        return events

    @staticmethod
    def _command_result(item: dict[str, Any]) -> tuple[str, bool]:
        output = str(item.get("aggregated_output") or "")
        exit_code = item.get("exit_code")
        failed = item.get("status") in ("failed", "declined") or (isinstance(exit_code, int) and exit_code != 0)
        if not output and failed:
            output = f"exit code {exit_code}" if isinstance(exit_code, int) else f"command {item.get('status')}"
        return output, failed

    @staticmethod
    def _change_result(item: dict[str, Any]) -> tuple[str, bool]:
        raw = item.get("changes")
        changes = raw if isinstance(raw, list) else []
        lines = [
            f"{change.get('kind', '?')} {change.get('path', '?')}" for change in changes if isinstance(change, dict)
        ]
        failed = item.get("status") in ("failed", "declined")
        return "\n".join(lines) or str(item.get("status") or ""), failed

    def _mcp(self, phase: str, item: dict[str, Any]) -> list[Event]:
        item_id = str(item.get("id", ""))
        events: list[Event] = []
        if item_id not in self._started:
            self._started.add(item_id)
            arguments = item.get("arguments")
            events.append(
                AgentMcpToolUse(
                    tool_use_id=item_id,
                    server_name=str(item.get("server", "")),
                    name=str(item.get("tool", "")),
                    input=arguments
                    if isinstance(arguments, dict)
                    else ({} if arguments is None else {"input": arguments}),
                )
            )
        if phase == "completed":
            error = item.get("error")
            if isinstance(error, dict) and error:
                content, is_error = str(error.get("message") or json.dumps(error)), True
            else:
                result = item.get("result")
                content = _mcp_result_text(result)
                is_error = item.get("status") == "failed" or (isinstance(result, dict) and bool(result.get("is_error")))
            events.append(AgentMcpToolResult(tool_use_id=item_id, content=content, is_error=is_error))
        return events

    def _todo(self, phase: str, item: dict[str, Any]) -> list[Event]:
        # The agent's plan: the first sight is the "call", every update its current state.
        item_id = str(item.get("id", ""))
        events: list[Event] = []
        if item_id not in self._started:
            self._started.add(item_id)
            events.append(AgentToolUse(tool_use_id=item_id, name="todo_list", input={"items": item.get("items") or []}))
            if phase == "started":
                return events
        events.append(AgentToolResult(tool_use_id=item_id, content=_todo_text(item.get("items"))))
        return events

    # -- turn ends and errors --

    def _completed(self, data: dict[str, Any]) -> list[Event]:
        self._turn_ended = True
        total = thread_total(data.get("usage"))
        thread_id = self._result.native_session_id
        before = self._ledger.last_total(thread_id) if self._ledger is not None and thread_id else None
        usage = usage_since(total, before)
        if self._ledger is not None and thread_id:
            self._ledger.record(thread_id, total)
        result = self._result
        result.usage = usage
        result.final_text = self._last_text
        result.stop_reason = "end_turn"
        return [SpanModelRequestEnd(model=None, model_usage=usage)]

    def _failed(self, data: dict[str, Any]) -> list[Event]:
        self._turn_ended = True
        error = data.get("error")
        message = str(error.get("message")) if isinstance(error, dict) and error.get("message") else None
        message = message or self._last_error or "codex reported a failed turn"
        result = self._result
        result.stop_reason = "error"
        result.error = message
        result.final_text = self._last_text
        if message == self._last_error:
            return []  # already reported by the `error` line just before
        return [SessionError(error=ErrorInfo(type="turn_failed", message=message))]

    def _error(self, data: dict[str, Any]) -> list[Event]:
        message = str(data.get("message") or "codex reported an error")
        if message.startswith(RECONNECTING_PREFIX):
            # Codex retries the model request by itself; the turn may still succeed.
            return [SessionError(error=ErrorInfo(type="retrying", message=message))]
        self._last_error = message
        return [SessionError(error=ErrorInfo(type="api_error", message=message))]

    def finish(self, exit_code: int, stderr_tail: str) -> list[Event]:
        result = self._result
        result.final_text = result.final_text or self._last_text
        if self._turn_ended:
            if exit_code in _kit.SIGNAL_EXIT_CODES:
                result.stop_reason = "interrupted"
            return []
        tail = _kit.tail(stderr_tail)
        stopped = exit_code in _kit.SIGNAL_EXIT_CODES or (
            exit_code == SIGINT_EXIT_CODE and self._turn_started and self._last_error is None and "panicked" not in tail
        )
        if stopped:
            result.stop_reason = "interrupted"
            return []
        result.stop_reason = "error"
        if self._last_error is not None:
            result.error = self._last_error
            return []  # the `error` line already said why
        message = _kit.crash_message(f"codex exited with code {exit_code} before the turn ended", stderr_tail)
        result.error = message
        return [SessionError(error=ErrorInfo(type="cli_crashed", message=message))]
