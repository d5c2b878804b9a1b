"""Gemini CLI: `gemini -p "" -o stream-json --approval-mode yolo`, one process per turn.

The prompt goes on stdin (`-p ""` makes the run headless; the CLI joins stdin and `-p`), so
size and a leading '-' do not matter. A follow-up turn adds `--resume <session id>`, the id
the previous turn's `init` line reported (0.61.0 resumes by UUID in headless mode, not only
`latest` or an index). Conversations live under `$HOME/.gemini/tmp/<project hash>/chats`,
keyed by the working directory, so HOME and the workdir stay fixed for a session.

Configuration goes into the user settings file `$HOME/.gemini/settings.json`, which `setup`
merges into (what the image put there stays unless a key is ours). Its system settings file
would override without merging, but the CLI skips one that is not root-owned in root-owned,
not world-writable directories, which a per-session home is not. The settings select
API-key auth (the CLI reads a set `GOOGLE_GEMINI_BASE_URL` as the "gateway" auth type, which
headless 0.61.0 rejects, so the type must be named), turn off folder trust (the sandbox is
the trust boundary; an untrusted folder would downgrade yolo to default), telemetry, usage
statistics and update checks (no network calls but the model's), and carry the MCP servers
and the turn limit (`model.maxSessionTurns`: the CLI has no flag for it).
The system prompt is appended, as for Claude: a global context file the CLI adds at the end
of its own system instruction (`GEMINI_SYSTEM_MD` would replace the CLI's instructions).

`GEMINI_CLI_NO_RELAUNCH` keeps the CLI in one process: by default it relaunches itself as a
child with a larger heap and the parent ignores SIGINT/SIGTERM, so a signal to the pid alone
(not its process group) would not stop the turn.

The translator reads stream-json lines (AGENT-FORMATS.md, checked against recordings of
0.61.0 in tests/fixtures/gemini/): `init` (session id, model), `message` (the user's prompt
echoed; assistant text in `delta: true` pieces, joined into one agent.message), `tool_use`,
`tool_result` (`status: "error"` with `error{type, message}`), `error` (a non-fatal warning;
the turn goes on), `result` (status, error, token stats for the whole turn). Thoughts have
no line of their own (no agent.thinking from Gemini) and usage comes only with `result`, so a
stopped turn reports none. After an API error the CLI exits with the HTTP status modulo 256.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mcp_sandboxes.backends import _kit
from mcp_sandboxes.backends.base import AgentSpec, Command, RetryIf, Turn, TurnResult, argument
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.events import (
    AgentMcpToolResult,
    AgentMcpToolUse,
    AgentMessage,
    AgentRaw,
    AgentToolResult,
    AgentToolUse,
    ErrorInfo,
    Event,
    SessionError,
    SpanModelRequestEnd,
    TextBlock,
    Usage,
)
from mcp_sandboxes.specs import DeepMerge, JsonMerge, Mount, SandboxSetup, SetupFile, WriteFile

NAME = "gemini"
# With `cli_path` set, the CLI's npm package directory (its bundle imports sibling files and
# reads its package.json) is mounted here read-only; the image must provide node.
CLI_MOUNT_DIR = "/opt/mcp-sandboxes/gemini-cli"
# Relative to the agent's HOME; merged into by `setup`.
SETTINGS_PATH = ".gemini/settings.json"
# A global context file: the CLI appends it to its system instruction.
SYSTEM_PROMPT_PATH = ".gemini/MCP-SANDBOXES.md"
# Ours over the settings already there, key by key; an MCP server of ours replaces one of the
# same name whole (a stdio entry from the image mixed with our URL would be neither).
SETTINGS_MERGE = DeepMerge(whole_entries_under=(("mcpServers",),))

# spawn_agent's (Claude-named) permission modes -> Gemini CLI approval modes. Headless Gemini
# cannot ask, so a tool that needs approval is refused; no mode means yolo, as the sandbox
# is the boundary.
APPROVAL_MODES: dict[str | None, str] = {
    None: "yolo",
    "bypassPermissions": "yolo",
    "acceptEdits": "auto_edit",
    "auto": "auto_edit",
    "plan": "plan",
    "default": "default",
    "dontAsk": "default",
}
_APPROVAL_FLAGS = frozenset({"--approval-mode", "-y", "--yolo"})

# Exit codes of 0.61.0 (FatalError subclasses) that end a turn without a result line.
EXIT_AUTH = 41
EXIT_INPUT = 42
EXIT_SANDBOX = 44
EXIT_CONFIG = 52
EXIT_TURN_LIMIT = 53
EXIT_TOOL = 54
EXIT_CANCELLED = 130
_EXIT_ERRORS: dict[int, tuple[str, str]] = {
    EXIT_AUTH: ("auth_error", "gemini could not authenticate; set GEMINI_API_KEY (or the Vertex AI variables)"),
    EXIT_INPUT: ("input_error", "gemini rejected its input (prompt, arguments or session to resume)"),
    EXIT_SANDBOX: ("sandbox_error", "gemini could not start its own sandbox"),
    EXIT_CONFIG: ("config_error", "gemini found its configuration invalid"),
    EXIT_TOOL: ("tool_error", "a tool failed fatally"),
}
# 0.61.0 waits only 500 ms from calling its stdin reader for a first chunk, and a timer that
# expires while the event loop is busy (a loaded machine) fires before the already-piped data
# is read: the CLI then says it got no input and exits 42 before any model call. Running it
# again is safe and, on such a machine, needed.
STDIN_RACE_RETRY = RetryIf(exit_code=EXIT_INPUT, stderr_contains="No input provided via stdin", attempts=3)
# Stopped on purpose: 0.61.0 exits 0 without a result line on SIGINT or SIGTERM; 130 is its
# own cancellation code and the shell's for SIGINT, and with it come the other signal codes (_kit).
INTERRUPT_EXIT_CODES = frozenset({0, EXIT_CANCELLED}) | _kit.SIGNAL_EXIT_CODES
# result.error.type values that are not failures of the model call.
_TURN_LIMIT_ERRORS = frozenset({"FatalTurnLimitedError"})
_CANCEL_ERRORS = frozenset({"FatalCancellationError"})


class GeminiBackend:
    name = NAME
    executable = "gemini"

    def __init__(
        self, *, cli_path: str = "", env: Mapping[str, str] | None = None, settings: Mapping[str, Any] | None = None
    ) -> None:
        self.cli_path = cli_path
        self._env = dict(env or {})
        self._extra_settings = dict(settings or {})

    @classmethod
    def from_settings(cls, settings: BackendSettings, environ: Mapping[str, str]) -> GeminiBackend:
        """`pass_env` names host variables handed over when set; the fixed `env` table wins
        over them. An optional `settings` table is merged into the CLI's settings file."""
        env = _kit.host_env(settings.pass_env, settings.env, environ)
        extra = (settings.model_extra or {}).get("settings") or {}
        if not isinstance(extra, dict):
            raise InvalidInputError(
                "backends.gemini.settings",
                "must be a table of Gemini CLI settings, e.g. [backends.gemini.settings.general]",
            )
        return cls(cli_path=settings.cli_path, env=env, settings=extra)

    def __repr__(self) -> str:
        # Never the values: they hold API keys.
        return f"GeminiBackend(cli_path={self.cli_path!r}, env_keys={sorted(self._env)})"

    @property
    def program(self) -> str:
        """argv[0]: the mounted host CLI's entry script, else the image's own on its PATH."""
        if not self.cli_path:
            return self.executable
        _, entry = package_layout(self.cli_path)
        return f"{CLI_MOUNT_DIR}/{entry}"

    def command(self, turn: Turn) -> Command:
        agent = turn.agent
        argv = [self.program, "-p", "", "--output-format", "stream-json"]
        if not _APPROVAL_FLAGS.intersection(agent.extra_args):
            argv += ["--approval-mode", approval_mode(agent.permission_mode)]
        if agent.model:
            argv += ["--model", argument("model", agent.model)]
        if turn.resume_id:
            argv += ["--resume", argument("resume_id", turn.resume_id)]
        for tool in agent.allowed_tools or []:
            # Deprecated in favour of policy files, still honoured by 0.61.0: these run
            # without approval in the default and auto_edit modes.
            argv.append(f"--allowed-tools={argument('allowed_tools', tool)}")
        argv += agent.extra_args
        env = {
            **self._env,
            "HOME": turn.home,
            "GEMINI_CLI_NO_RELAUNCH": "true",
        }
        return Command(argv=argv, env=env, stdin=turn.prompt.encode("utf-8"), cwd=turn.workdir, retry=STDIN_RACE_RETRY)

    def translator(self) -> GeminiTranslator:
        return GeminiTranslator()

    def mounts(self) -> list[Mount]:
        if not self.cli_path:
            return []
        root, _ = package_layout(self.cli_path)
        return [Mount(source=str(root), target=CLI_MOUNT_DIR, read_only=True)]

    def settings_document(self, agent: AgentSpec, existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The settings file for `agent` over `existing` settings: what `setup`'s merge writes."""
        return SETTINGS_MERGE.apply(existing or {}, self.own_settings(agent))

    def own_settings(self, agent: AgentSpec) -> dict[str, Any]:
        """Our settings for `agent`: what a headless, sandboxed CLI needs, then the configured
        extra settings, then the agent's MCP servers and limits."""
        auth = "vertex-ai" if self._env.get("GOOGLE_GENAI_USE_VERTEXAI", "").lower() == "true" else "gemini-api-key"
        required: dict[str, Any] = {
            "security": {"auth": {"selectedType": auth}, "folderTrust": {"enabled": False}},
            "privacy": {"usageStatisticsEnabled": False},
            "telemetry": {"enabled": False},
            "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
            "ide": {"enabled": False},
        }
        document = _deep_merge(required, self._extra_settings)
        if agent.mcp_servers:
            servers = {name: gemini_mcp_server(name, spec) for name, spec in agent.mcp_servers.items()}
            document["mcpServers"] = {**(document.get("mcpServers") or {}), **servers}
        if agent.max_turns is not None:
            document = _deep_merge(document, {"model": {"maxSessionTurns": agent.max_turns}})
        if agent.system_prompt:
            document = _deep_merge(document, {"context": {"fileName": ["GEMINI.md", Path(SYSTEM_PROMPT_PATH).name]}})
        return document

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        # Merged into the settings the image may have put there (a file the CLI also reads with
        # comments, or a broken one, is replaced rather than guessed at). 0600: MCP server
        # entries may carry tokens in their env or headers.
        settings = JsonMerge(path=settings_path(home), document=self.own_settings(agent), merge=SETTINGS_MERGE)
        files: list[SetupFile] = [settings]
        if agent.system_prompt:
            prompt = agent.system_prompt.encode("utf-8")
            files.append(WriteFile(path=str(Path(home) / SYSTEM_PROMPT_PATH), data=prompt, mode=0o600))
        config_dir = str(Path(home) / Path(SETTINGS_PATH).parent)
        return SandboxSetup(backend=self.name, home=home, directories=[config_dir], files=files)


def package_layout(cli_path: str) -> tuple[Path, str]:
    """The npm package directory holding `cli_path` (e.g. node_modules/.bin/gemini, a link
    to @google/gemini-cli/bundle/gemini.js) and the entry script's path inside it."""
    entry = Path(cli_path).expanduser().resolve()
    if entry.is_file():
        for root in entry.parents:
            if (root / "package.json").is_file():
                return root, entry.relative_to(root).as_posix()
    raise InvalidInputError(
        "backends.gemini.cli_path",
        f"{cli_path} is not a script inside an npm package; point it at the gemini entry script "
        "(e.g. tools/agent-clis/node_modules/.bin/gemini) or leave it empty to use the image's own gemini",
    )


def approval_mode(permission_mode: str | None) -> str:
    if permission_mode not in APPROVAL_MODES:
        known = ", ".join(sorted(str(mode) for mode in APPROVAL_MODES if mode))
        raise InvalidInputError("permission_mode", f"{permission_mode!r} has no Gemini CLI equivalent; use {known}")
    return APPROVAL_MODES[permission_mode]


def settings_path(home: str) -> str:
    return str(Path(home) / SETTINGS_PATH)


def gemini_mcp_server(name: str, spec: Any) -> dict[str, Any]:
    """One `mcpServers` entry in Claude's shape -> Gemini CLI's. Stdio servers keep
    command/args/env/cwd; remote ones say `type` ("http" or "sse") and `url` there, while
    Gemini names streamable HTTP `httpUrl` and SSE `url`. Gemini-only keys pass through."""
    if not isinstance(spec, dict):
        raise InvalidInputError(f"mcp_servers.{name}", "must be an object with `command` or `url`")
    entry = {key: value for key, value in spec.items() if key != "type"}
    kind = str(spec.get("type") or ("stdio" if "command" in spec else "http")).lower()
    if kind == "stdio" or "httpUrl" in spec:
        return entry
    if "url" not in spec:
        raise InvalidInputError(f"mcp_servers.{name}", f"a {kind!r} server needs a `url`")
    if kind in ("http", "streamable-http", "streamable_http"):
        entry["httpUrl"] = entry.pop("url")
    elif kind != "sse":
        raise InvalidInputError(f"mcp_servers.{name}", f"unknown type {kind!r}; use stdio, http or sse")
    return entry


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _split_mcp_name(name: str) -> tuple[str, str] | None:
    """`mcp_server_tool` -> (server, tool), split at the first underscore after the prefix
    as the CLI's own policy engine does (its docs warn against underscores in server names)."""
    if not name.startswith("mcp_"):
        return None
    server, sep, tool = name[len("mcp_") :].partition("_")
    if not sep or not server or not tool:
        return None
    return server, tool


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def stats_usage(stats: Any) -> Usage:
    """result.stats -> Usage. Gemini's `input_tokens` counts the whole prompt, cached part
    included; `input` is the uncached rest (what Anthropic calls input_tokens). Thought
    tokens are not reported on their own: they are what the total has beyond prompt and
    output (the CLI sums the API's totalTokenCount)."""
    data = stats if isinstance(stats, dict) else {}
    prompt = _int(data.get("input_tokens"))
    cached = _int(data.get("cached"))
    output = _int(data.get("output_tokens"))
    uncached = _int(data["input"]) if "input" in data else max(0, prompt - cached)
    return Usage(
        input_tokens=uncached,
        output_tokens=output,
        cache_read_input_tokens=cached,
        reasoning_tokens=max(0, _int(data.get("total_tokens")) - prompt - output),
    )


def _main_model(stats: Any) -> str | None:
    """The model that did the turn's work: the one with the biggest prompt (helper queries
    such as the router's classifier send small ones)."""
    models = stats.get("models") if isinstance(stats, dict) else None
    if not isinstance(models, dict) or not models:
        return None
    ranked = sorted(models.items(), key=lambda item: _int((item[1] or {}).get("input_tokens")), reverse=True)
    return str(ranked[0][0])


class GeminiTranslator:
    """stream-json lines -> events, one instance per turn; never raises on bad input."""

    def __init__(self) -> None:
        self._result = TurnResult()
        self._got_result = False
        self._init_model: str | None = None
        self._pending: list[str] = []  # assistant text pieces not yet emitted
        self._last_text: str | None = None
        self._last_error: str | None = None
        self._mcp_tool_ids: set[str] = set()

    @property
    def result(self) -> TurnResult:
        return self._result

    def feed(self, line: str) -> list[Event]:
        data = _kit.json_object(line, NAME)
        if not isinstance(data, dict):
            return data
        kind = data.get("type")
        if kind == "message":
            return self._message(data)
        # Every other line ends a run of assistant text.
        events = self._flush()
        if kind == "init":
            self._init(data)
        elif kind == "tool_use":
            events.append(self._tool_use(data))
        elif kind == "tool_result":
            events.append(self._tool_result(data))
        elif kind == "error":
            events.append(self._error(data))
        elif kind == "result":
            events.extend(self._final(data))
        else:
            events.append(AgentRaw(source=NAME, data=data))
        return events

    def _flush(self) -> list[Event]:
        if not self._pending:
            return []
        text = "".join(self._pending)
        self._pending.clear()
        if not text:
            return []
        self._last_text = text
        return [AgentMessage(content=[TextBlock(text=text)])]

    def _init(self, data: dict[str, Any]) -> None:
        # Bookkeeping only: the session id the next turn resumes, and the model asked for.
        session_id = data.get("session_id")
        if isinstance(session_id, str) and session_id:
            self._result.native_session_id = session_id
        if isinstance(data.get("model"), str) and data["model"]:
            self._init_model = data["model"]

    def _message(self, data: dict[str, Any]) -> list[Event]:
        role = data.get("role")
        content = data.get("content")
        if role == "user":
            # The prompt echoed back: the caller sent it and has it already.
            return self._flush()
        if role != "assistant" or not isinstance(content, str):
            return [*self._flush(), AgentRaw(source=NAME, data=data)]
        if data.get("delta"):
            self._pending.append(content)
            return []
        # A whole message (not emitted by 0.61.0 in stream-json, but valid in the format).
        self._pending.append(content)
        return self._flush()

    def _tool_use(self, data: dict[str, Any]) -> Event:
        tool_id = str(data.get("tool_id", ""))
        name = str(data.get("tool_name", ""))
        parameters = data.get("parameters")
        arguments = parameters if isinstance(parameters, dict) else {"input": parameters}
        mcp = _split_mcp_name(name)
        if mcp is not None:
            self._mcp_tool_ids.add(tool_id)
            return AgentMcpToolUse(tool_use_id=tool_id, server_name=mcp[0], name=mcp[1], input=arguments)
        return AgentToolUse(tool_use_id=tool_id, name=name, input=arguments)

    def _tool_result(self, data: dict[str, Any]) -> Event:
        tool_id = str(data.get("tool_id", ""))
        output = data.get("output")
        error = data.get("error")
        is_error = data.get("status") == "error" or isinstance(error, dict)
        if is_error:
            message = error.get("message") if isinstance(error, dict) else None
            content = str(message or output or "the tool failed")
        else:
            content = output if isinstance(output, str) else ("" if output is None else json.dumps(output))
        if tool_id in self._mcp_tool_ids:
            return AgentMcpToolResult(tool_use_id=tool_id, content=content, is_error=is_error)
        return AgentToolResult(tool_use_id=tool_id, content=content, is_error=is_error)

    def _error(self, data: dict[str, Any]) -> Event:
        severity = str(data.get("severity") or "error")
        message = str(data.get("message") or "gemini reported an error")
        self._last_error = message
        return SessionError(error=ErrorInfo(type=f"cli_{severity}", message=message))

    def _final(self, data: dict[str, Any]) -> list[Event]:
        self._got_result = True
        result = self._result
        stats = data.get("stats")
        result.usage = stats_usage(stats)
        result.final_text = self._last_text
        events: list[Event] = [
            SpanModelRequestEnd(model=_main_model(stats) or self._init_model, model_usage=result.usage)
        ]
        if data.get("status") == "success":
            result.stop_reason = "end_turn"
            return events
        raw_error = data.get("error")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        error_type = str(error.get("type") or "error")
        message = str(error.get("message") or self._last_error or f"gemini reported status {data.get('status')!r}")
        result.error = message
        if error_type in _TURN_LIMIT_ERRORS:
            result.stop_reason = "max_turns"
            return events
        if error_type in _CANCEL_ERRORS:
            result.stop_reason = "interrupted"
            return events
        result.stop_reason = "error"
        if "API Error" in message or error_type == "unknown":
            error_type = "api_error"
        events.append(SessionError(error=ErrorInfo(type=error_type, message=message)))
        return events

    def finish(self, exit_code: int, stderr_tail: str) -> list[Event]:
        events = self._flush()
        result = self._result
        if self._got_result:
            if exit_code in _kit.SIGNAL_EXIT_CODES:
                result.stop_reason = "interrupted"
            elif exit_code == EXIT_TURN_LIMIT:
                result.stop_reason = "max_turns"
            return events
        result.final_text = self._last_text
        if exit_code in INTERRUPT_EXIT_CODES:
            result.stop_reason = "interrupted"
            return events
        if exit_code == EXIT_TURN_LIMIT:
            result.stop_reason = "max_turns"
            result.error = "the agent reached its turn limit"
            return events
        result.stop_reason = "error"
        error_type, message = _EXIT_ERRORS.get(
            exit_code, ("cli_crashed", f"gemini exited with code {exit_code} before reporting a result")
        )
        if exit_code in _EXIT_ERRORS:
            message += f" (exit code {exit_code})"
        message = _kit.crash_message(message, stderr_tail)
        result.error = message
        events.append(SessionError(error=ErrorInfo(type=error_type, message=message)))
        return events
