"""OpenCode: `opencode run --format json`, one process per turn.

The prompt goes on stdin (`opencode run` reads a non-TTY stdin as the message, so size and
a leading '-' do not matter); a follow-up turn adds `--session <ses_...>`, the id every
output line carries. OpenCode keeps its sessions in a SQLite database under
`$XDG_DATA_HOME/opencode` and reads `$XDG_CONFIG_HOME/opencode/opencode.json`; HOME and the
XDG directories are pinned to the session's fixed home so both survive between turns.

`setup` writes that config: the backend's `config` setting (OpenCode's own schema, e.g.
a `provider` for an OpenAI-compatible endpoint) merged with what the agent asked for (MCP
servers, allowed tools, step limit, system prompt as an instruction file) and with no
autoupdate or sharing. It also marks the config directory's npm dependencies as installed:
OpenCode 1.18.33 otherwise runs an npm install of `@opencode-ai/plugin` into every config
directory on each start, a registry call no sandbox should make.

The translator reads JSON lines (format notes in AGENT-FORMATS.md, checked against
recordings of 1.18.33 in tests/fixtures/opencode/): `step_start` (bookkeeping), `text` and
`reasoning` (whole parts), `tool_use` (printed when the tool ends, result in
`part.state.output`, failure in `part.state.error`), `step_finish` (usage of one step: the
turn's usage is their sum) and `error` (`error{name, data{message}}`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
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
from mcp_sandboxes.specs import Mount, SandboxSetup, SetupFile, WriteFile

NAME = "opencode"
CLI_TARGET = "/usr/local/bin/opencode"
# Relative to the agent's HOME (XDG_CONFIG_HOME is pinned to HOME/.config).
CONFIG_DIR = ".config/opencode"
CONFIG_FILE = "opencode.json"
INSTRUCTIONS_FILE = "mcp-sandboxes-system-prompt.md"
# `opencode run` auto-approves permission requests with --auto (older names: --yolo,
# --dangerously-skip-permissions); without it, requests the config leaves at "ask" are rejected.
_AUTO_MODES = frozenset({"auto", "bypassPermissions"})
_DEFAULT_MODES = frozenset({"default"})
# Edit-like tools share OpenCode's "edit" permission.
_EDIT_TOOLS = frozenset({"edit", "write", "patch", "multiedit"})
# How a stopped CLI exits: 1.18.33 has no SIGINT/SIGTERM handler and dies of the signal,
# which a container engine reports as 130/143 and a host process as -2/-15 (and prints
# nothing more). Stopped on purpose, not crashed.
INTERRUPT_EXIT_CODES = _kit.SIGNAL_EXIT_CODES
# The error a run reports when its session is aborted through OpenCode's own API.
_ABORTED_ERRORS = frozenset({"MessageAbortedError"})
# A lock file naming the dependency OpenCode would install makes its install check pass.
_PLUGIN_LOCK = {
    "name": "opencode-config",
    "lockfileVersion": 3,
    "packages": {"": {"dependencies": {"@opencode-ai/plugin": "*"}}},
}


class OpencodeBackend:
    name = NAME
    executable = "opencode"

    def __init__(
        self, *, cli_path: str = "", env: Mapping[str, str] | None = None, config: Mapping[str, Any] | None = None
    ) -> None:
        self.cli_path = cli_path
        self._env = dict(env or {})
        self._config = dict(config or {})
        # MCP server names of every agent this backend set up or ran: OpenCode names an MCP
        # tool `<server>_<tool>` and prints nothing else that tells it from a built-in tool.
        self._mcp_servers: set[str] = set()

    @classmethod
    def from_settings(cls, settings: BackendSettings, environ: Mapping[str, str]) -> OpencodeBackend:
        """`pass_env` names host variables handed over when set; the fixed `env` table wins
        over them. The extra `config` table is OpenCode config (opencode.json) merged into
        what `setup` writes; it may name variables as `{env:NAME}`, which OpenCode fills in."""
        env = _kit.host_env(settings.pass_env, settings.env, environ)
        config = (settings.model_extra or {}).get("config") or {}
        if not isinstance(config, dict):
            raise InvalidInputError("backends.opencode.config", "must be a table of OpenCode config (opencode.json)")
        return cls(cli_path=settings.cli_path, env=env, config=config)

    def __repr__(self) -> str:
        # Never the values: they hold API keys.
        return f"OpencodeBackend(cli_path={self.cli_path!r}, env_keys={sorted(self._env)})"

    @property
    def program(self) -> str:
        """argv[0]: the mounted host CLI, else the image's own on its PATH."""
        return CLI_TARGET if self.cli_path else self.executable

    def command(self, turn: Turn) -> Command:
        agent = turn.agent
        self._mcp_servers.update(agent.mcp_servers)
        argv = [self.program, "run", "--format", "json", "--thinking"]
        if agent.model:
            argv += ["--model", argument("model", agent.model)]
        if turn.resume_id:
            argv += ["--session", argument("resume_id", turn.resume_id)]
        if _auto_approves(agent.permission_mode):
            argv.append("--auto")
        argv += agent.extra_args
        return Command(
            argv=argv, env={**self._env, **home_env(turn.home)}, stdin=turn.prompt.encode(), cwd=turn.workdir
        )

    def translator(self) -> OpencodeTranslator:
        return OpencodeTranslator(mcp_servers=self._mcp_servers)

    def mounts(self) -> list[Mount]:
        return _kit.binary_mount(
            NAME,
            self.cli_path,
            CLI_TARGET,
            points_at="the opencode binary (e.g. tools/agent-clis/node_modules/opencode-ai/bin/opencode.exe)",
            executable=self.executable,
        )

    def config_for(self, agent: AgentSpec, *, home: str) -> dict[str, Any]:
        """The opencode.json `setup` writes for `agent`."""
        _auto_approves(agent.permission_mode)  # rejects unknown modes before anything runs
        config = _merge(self._config, {"autoupdate": False, "share": "disabled"})
        if agent.model:
            config = _with_model(config, agent.model)
        if agent.mcp_servers:
            servers = {name: _mcp_entry(name, server) for name, server in agent.mcp_servers.items()}
            config["mcp"] = {**config.get("mcp", {}), **servers}
        if agent.allowed_tools:
            permission: dict[str, Any] = {"*": "deny"}
            for tool in agent.allowed_tools:
                permission["edit" if tool in _EDIT_TOOLS else tool] = "allow"
            config["permission"] = permission
        if agent.max_turns is not None:
            config = _merge(config, {"agent": {"build": {"steps": agent.max_turns}}})
        if agent.system_prompt:
            config["instructions"] = [*config.get("instructions", []), instructions_path(home)]
        return config

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        self._mcp_servers.update(agent.mcp_servers)
        config = self.config_for(agent, home=home)
        config_dir = Path(home) / CONFIG_DIR
        files: list[SetupFile] = [
            # The image's own lock (its plugins) stays.
            WriteFile(
                path=str(config_dir / "package-lock.json"),
                data=json.dumps(_PLUGIN_LOCK).encode(),
                mode=0o644,
                keep_existing=True,
            ),
            # 0600: MCP server entries may carry tokens in their environment.
            WriteFile(path=config_path(home), data=json.dumps(config, indent=2).encode(), mode=0o600),
        ]
        if agent.system_prompt:
            files.append(WriteFile(path=instructions_path(home), data=agent.system_prompt.encode(), mode=0o600))
        directories = [str(Path(home) / ".config"), str(config_dir), str(config_dir / "node_modules")]
        return SandboxSetup(backend=self.name, home=home, directories=directories, files=files)


def config_path(home: str) -> str:
    return str(Path(home) / CONFIG_DIR / CONFIG_FILE)


def instructions_path(home: str) -> str:
    return str(Path(home) / CONFIG_DIR / INSTRUCTIONS_FILE)


def home_env(home: str) -> dict[str, str]:
    """HOME and the XDG directories OpenCode reads, all under the session's home, so an image
    that sets XDG variables cannot move the config or the session database elsewhere."""
    base = Path(home)
    return {
        "HOME": home,
        "XDG_CONFIG_HOME": str(base / ".config"),
        "XDG_DATA_HOME": str(base / ".local" / "share"),
        "XDG_STATE_HOME": str(base / ".local" / "state"),
        "XDG_CACHE_HOME": str(base / ".cache"),
    }


def _auto_approves(mode: str | None) -> bool:
    if mode is None or mode in _DEFAULT_MODES:
        return False
    if mode in _AUTO_MODES:
        return True
    raise InvalidInputError(
        "permission_mode",
        f"opencode does not know {mode!r}; use 'default' (requests left at 'ask' are rejected) or "
        "'auto' / 'bypassPermissions' (every request not denied by config is approved)",
    )


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_model(config: dict[str, Any], model: str) -> dict[str, Any]:
    """OpenCode only runs models its catalog lists; a provider defined in the config (e.g. an
    OpenAI-compatible endpoint) has no catalog, so the requested model is listed in it."""
    provider_id, sep, model_id = model.partition("/")
    if not sep or not provider_id or not model_id:
        raise InvalidInputError("model", f"{model!r} is not provider/model; e.g. anthropic/claude-sonnet-4-5")
    provider = (config.get("provider") or {}).get(provider_id)
    if not isinstance(provider, Mapping) or model_id in (provider.get("models") or {}):
        return config
    return _merge(config, {"provider": {provider_id: {"models": {model_id: {"name": model_id}}}}})


def _mcp_entry(name: str, server: Any) -> dict[str, Any]:
    """An `mcpServers` entry (Claude's shape) as OpenCode's `mcp` entry."""
    field = f"mcp_servers.{name}"
    if not isinstance(server, Mapping):
        raise InvalidInputError(field, "must be an object with `command` (stdio) or `url` (HTTP)")
    if server.get("command"):
        args = server.get("args") or []
        if not isinstance(args, list):
            raise InvalidInputError(f"{field}.args", "must be a list of strings")
        entry: dict[str, Any] = {"type": "local", "command": [str(server["command"]), *map(str, args)], "enabled": True}
        if server.get("env"):
            entry["environment"] = {str(k): str(v) for k, v in dict(server["env"]).items()}
        return entry
    if server.get("url"):
        entry = {"type": "remote", "url": str(server["url"]), "enabled": True}
        if server.get("headers"):
            entry["headers"] = {str(k): str(v) for k, v in dict(server["headers"]).items()}
        return entry
    raise InvalidInputError(field, "has neither `command` (stdio server) nor `url` (HTTP server)")


# -- translator ------------------------------------------------------------------------------


def _sanitize(name: str) -> str:
    # How OpenCode 1.18.33 makes an MCP server or tool name safe for the model's tool list.
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)


def _snake(name: str) -> str:
    """APIError -> api_error, ProviderAuthError -> provider_auth_error."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower() or "error"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _step_usage(part: Mapping[str, Any]) -> Usage:
    raw_tokens = part.get("tokens")
    tokens: Mapping[str, Any] = raw_tokens if isinstance(raw_tokens, Mapping) else {}
    raw_cache = tokens.get("cache")
    cache: Mapping[str, Any] = raw_cache if isinstance(raw_cache, Mapping) else {}
    cost = part.get("cost")
    return Usage(
        input_tokens=_int(tokens.get("input")),
        output_tokens=_int(tokens.get("output")),
        reasoning_tokens=_int(tokens.get("reasoning")),
        cache_read_input_tokens=_int(cache.get("read")),
        cache_creation_input_tokens=_int(cache.get("write")),
        cost_usd=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
    )


def _output_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value)


class OpencodeTranslator:
    """`--format json` lines -> events, one instance per turn; never raises on bad input.

    `mcp_servers` are the configured MCP server names, to tell `<server>_<tool>` MCP tools
    from built-in ones (the longest matching server prefix wins)."""

    def __init__(self, mcp_servers: Collection[str] = ()) -> None:
        self._result = TurnResult()
        self._usage = Usage()
        self._steps = 0
        self._last_text: str | None = None
        self._errors: list[str] = []
        self._aborted = False
        self._mcp_prefixes = sorted(((_sanitize(name) + "_", name) for name in mcp_servers), key=lambda p: -len(p[0]))

    @property
    def result(self) -> TurnResult:
        return self._result

    def feed(self, line: str) -> list[Event]:
        data = _kit.json_object(line, NAME)
        if not isinstance(data, dict):
            return data
        session_id = data.get("sessionID")
        if self._result.native_session_id is None and isinstance(session_id, str) and session_id:
            self._result.native_session_id = session_id
        kind = data.get("type")
        part = data.get("part")
        if kind == "error":
            return self._error(data)
        if not isinstance(part, dict):
            return [AgentRaw(source=NAME, data=data)]
        if kind == "step_start":
            return []
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                return [AgentRaw(source=NAME, data=data)]
            if not text.strip():
                return []
            self._last_text = text
            return [AgentMessage(content=[TextBlock(text=text)])]
        if kind == "reasoning":
            thinking = part.get("text")
            if not isinstance(thinking, str):
                return [AgentRaw(source=NAME, data=data)]
            return [AgentThinking(thinking=thinking)] if thinking.strip() else []
        if kind == "tool_use":
            return self._tool(data, part)
        if kind == "step_finish":
            usage = _step_usage(part)
            self._steps += 1
            self._usage = self._usage + usage
            return [SpanModelRequestEnd(model_usage=usage)]
        return [AgentRaw(source=NAME, data=data)]

    def _tool(self, data: dict[str, Any], part: dict[str, Any]) -> list[Event]:
        state = part.get("state")
        if not isinstance(state, dict):
            return [AgentRaw(source=NAME, data=data)]
        call_id = str(part.get("callID") or part.get("id") or "")
        name = str(part.get("tool", ""))
        raw_input = state.get("input")
        arguments = raw_input if isinstance(raw_input, dict) else {"input": raw_input}
        status = state.get("status")
        is_error = status == "error"
        content = _output_text(state.get("error") if is_error else state.get("output"))
        mcp = self._split_mcp(name)
        events: list[Event] = []
        if mcp is not None:
            events.append(AgentMcpToolUse(tool_use_id=call_id, server_name=mcp[0], name=mcp[1], input=arguments))
            if status in ("completed", "error"):
                events.append(AgentMcpToolResult(tool_use_id=call_id, content=content, is_error=is_error))
            return events
        events.append(AgentToolUse(tool_use_id=call_id, name=name, input=arguments))
        if status in ("completed", "error"):
            events.append(AgentToolResult(tool_use_id=call_id, content=content, is_error=is_error))
        return events

    def _split_mcp(self, name: str) -> tuple[str, str] | None:
        for prefix, server in self._mcp_prefixes:
            if name.startswith(prefix) and len(name) > len(prefix):
                return server, name[len(prefix) :]
        return None

    def _error(self, data: dict[str, Any]) -> list[Event]:
        error = data.get("error")
        if not isinstance(error, dict):
            return [AgentRaw(source=NAME, data=data)]
        name = str(error.get("name") or "Error")
        details = error.get("data")
        message = details.get("message") if isinstance(details, dict) else None
        text = str(message) if message else name
        if name in _ABORTED_ERRORS:
            # The turn was stopped (SIGINT): not a failure of the agent.
            self._aborted = True
            return []
        self._errors.append(text)
        return [SessionError(error=ErrorInfo(type=_snake(name), message=text))]

    def finish(self, exit_code: int, stderr_tail: str) -> list[Event]:
        result = self._result
        result.usage = self._usage
        result.final_text = self._last_text
        if self._errors:
            result.stop_reason = "error"
            result.error = "; ".join(self._errors)
            return []
        if self._aborted or exit_code in INTERRUPT_EXIT_CODES:
            result.stop_reason = "interrupted"
            return []
        if exit_code == 0:
            result.stop_reason = "end_turn"
            return []
        result.stop_reason = "error"
        message = f"opencode exited with code {exit_code}"
        if not self._steps:
            message += " before finishing a step"
        message = _kit.crash_message(message, stderr_tail)
        result.error = message
        return [SessionError(error=ErrorInfo(type="cli_crashed", message=message))]
