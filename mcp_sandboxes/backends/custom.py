"""A user-defined agent command from the config: `[backends.custom]`.

The command is an argv template, never a shell line: each element is expanded on its own and the
prompt is always exactly one argument (or stdin), so nothing in it can become another argument or
reach a shell. Placeholders are lowercase names in braces; `{{name}}` is a literal `{name}`, and
`${...}` is left alone (shell syntax in an `sh -c` script), as is every other brace:

    {prompt}          the turn's prompt (only with prompt_via = "arg")
    {session}         our session id (ses_...), stable across turns: a command can key its own state on it
    {turn}            the turn index, 0 for the first
    {workdir} {home}  the sandbox working directory and the agent's HOME
    {resume_id}       the id the previous turn reported (only in resume_argv)
    {model}           the caller's model (only in model_argv)
    {system_prompt}   the caller's system prompt (only in system_prompt_argv)

`argv` runs the first turn, and every turn when the command never reports a resume id;
`resume_argv` runs a turn when the previous one reported an id. `model_argv` and
`system_prompt_argv` are inserted after the program name when the caller gives a model or a
system prompt. The same values are also in the environment (MCP_SANDBOXES_SESSION_ID, ...TURN_INDEX,
...RESUME_ID, ...MODEL, ...SYSTEM_PROMPT, ...PERMISSION_MODE, ...MAX_TURNS, ...MCP_CONFIG) for
wrapper scripts; `extra_args` go last.

Named profiles, `[backends.custom.profiles.NAME]`, take the same keys and override the base table
(their `env` is merged into it), except `output`, which all share. A profile with its own `argv` is
another program and does not inherit the base's resume, model or system-prompt templates. A caller picks one with model
"NAME" or "NAME:MODEL" (MODEL then fills {model}); any other model runs the base command.

Output, `output = "jsonl"`: each stdout line is one of our normalized events (events.py), validated;
a line that is not JSON, or an event of a known type that does not validate, becomes a session.error
(type parse_error, the line kept whole) and the turn goes on; JSON that is not an object, or an
object whose type is no event of ours, is kept as agent.raw, as every backend keeps what it does
not know. Two lines are
read, not passed on: `{"type": "session.native_id", "id": "..."}` sets the id the next turn resumes,
and `session.status_idle` sets the turn's stop reason. Events the server itself emits (user.*,
session.status_*, sandbox.*, session.thread_created) are refused. `output = "text"`: stdout lines
are joined into agent.message events of up to TEXT_CHUNK_LINES lines (so a long run still shows
progress), and the turn's final text is the whole output. Blank lines do not reach the translator.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mcp_sandboxes.backends import _kit
from mcp_sandboxes.backends.base import AgentSpec, Command, Turn, TurnResult, argument
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.events import (
    EVENT_TYPES,
    AgentMessage,
    AgentRaw,
    ErrorInfo,
    Event,
    SessionError,
    SessionStatusIdle,
    SpanModelRequestEnd,
    TextBlock,
    Usage,
    parse_event,
)
from mcp_sandboxes.specs import Mount, SandboxSetup, SetupFile, WriteFile

NAME = "custom"
MCP_CONFIG_PATH = ".mcp-sandboxes/custom-mcp.json"
# Linux refuses one argv element of 128 KiB or more (MAX_ARG_STRLEN, its NUL included).
MAX_ARGUMENT_BYTES = 128 * 1024
NATIVE_ID_TYPE = "session.native_id"
# Emitted by the orchestrator around every turn; a command claiming them would confuse callers.
SERVER_EVENT_PREFIXES = ("user.", "session.status_", "sandbox.", "session.thread_created")
TEXT_CHUNK_LINES = 64
TEXT_CHUNK_CHARS = 8192
MAX_FINAL_TEXT = 65536
INTERRUPT_EXIT_CODES = _kit.SIGNAL_EXIT_CODES
# Group 1: an escaped {{name}}; group 2: a placeholder. `${name}` is shell syntax, not ours.
PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}|(?<!\$)\{([a-z_]+)\}")
COMMON_PLACEHOLDERS = frozenset({"prompt", "session", "turn", "workdir", "home"})
# Where each template may use its special placeholder.
TEMPLATE_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "argv": COMMON_PLACEHOLDERS,
    "resume_argv": COMMON_PLACEHOLDERS | {"resume_id"},
    "model_argv": COMMON_PLACEHOLDERS | {"model"},
    "system_prompt_argv": COMMON_PLACEHOLDERS | {"system_prompt"},
}
ENV_PREFIX = "MCP_SANDBOXES_"

PromptVia = Literal["arg", "stdin"]
OutputKind = Literal["jsonl", "text"]


class CommandProfile(BaseModel):
    """One command definition: the base `[backends.custom]` table or a named profile."""

    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(default_factory=list)
    resume_argv: list[str] = Field(default_factory=list)
    model_argv: list[str] = Field(default_factory=list)
    system_prompt_argv: list[str] = Field(default_factory=list)
    prompt_via: PromptVia = "arg"
    output: OutputKind = "jsonl"
    env: dict[str, str] = Field(default_factory=dict)
    pass_env: list[str] = Field(default_factory=list)

    @field_validator("argv", "resume_argv", "model_argv", "system_prompt_argv", "pass_env", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        # An environment-variable override arrives as text: accept a JSON array there.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"is not a JSON array of strings: {exc}") from exc
        return value

    def check(self, where: str) -> None:
        """Template rules, checked at start-up so a mistake names its field before any turn runs."""
        if not self.argv:
            raise InvalidInputError(
                f"{where}.argv",
                'is empty; set the command to run, e.g. argv = ["my-agent", "--json", "{prompt}"]',
            )
        for field, allowed in TEMPLATE_PLACEHOLDERS.items():
            for element in getattr(self, field):
                for name in _placeholders(element):
                    if name not in allowed:
                        raise InvalidInputError(
                            f"{where}.{field}",
                            f"{{{name}}} is not allowed here; use {', '.join(sorted('{' + a + '}' for a in allowed))}"
                            " (write {{name}} for a literal {name})",
                        )
        for field in ("argv", "resume_argv"):
            template = getattr(self, field)
            if not template:
                continue
            has_prompt = any("prompt" in _placeholders(element) for element in template)
            if self.prompt_via == "arg" and not has_prompt:
                raise InvalidInputError(f"{where}.{field}", 'has no {prompt}; add it, or set prompt_via = "stdin"')
            if self.prompt_via == "stdin" and has_prompt:
                raise InvalidInputError(
                    f"{where}.{field}", 'uses {prompt} but prompt_via = "stdin"; remove one of them'
                )


def _placeholders(element: str) -> list[str]:
    return [match.group(2) for match in PLACEHOLDER.finditer(element) if match.group(2)]


def expand(element: str, values: Mapping[str, str]) -> str:
    """One argv element with its placeholders filled in, in a single pass: a value is never
    scanned again, so a prompt containing "{session}" stays as typed."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "{" + match.group(1) + "}"
        return values[match.group(2)]

    return PLACEHOLDER.sub(replace, element)


class CustomBackend:
    name = NAME

    def __init__(
        self,
        base: CommandProfile | None,
        profiles: Mapping[str, CommandProfile] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.base = base
        self.profiles = dict(profiles or {})
        self._environ = dict(environ or {})
        first = base or next(iter(self.profiles.values()), None)
        if first is None:
            raise InvalidInputError("backends.custom.argv", "is empty and no profiles are defined; set the command")
        # translator() is not told which profile a turn runs, so all share one output kind.
        self.output: OutputKind = first.output
        # What must be on the sandbox's PATH: the program of the base command (else the first profile's).
        self.executable = first.argv[0] if first.argv else ""

    @classmethod
    def from_settings(cls, settings: BackendSettings, environ: Mapping[str, str]) -> CustomBackend:
        extra = dict(settings.model_extra or {})
        raw_profiles = extra.pop("profiles", {}) or {}
        base_data: dict[str, Any] = {**extra, "env": settings.env, "pass_env": settings.pass_env}
        base = _profile(base_data, "backends.custom")
        if not isinstance(raw_profiles, dict):
            raise InvalidInputError("backends.custom.profiles", "must be a table of named command tables")
        profiles: dict[str, CommandProfile] = {}
        for name, data in raw_profiles.items():
            if not isinstance(data, dict):
                raise InvalidInputError(f"backends.custom.profiles.{name}", "must be a table")
            if data.get("output", base.output) != base.output:
                raise InvalidInputError(
                    f"backends.custom.profiles.{name}.output",
                    f"is {data['output']!r} but backends.custom.output is {base.output!r}; every profile of"
                    " the custom backend prints the same kind of output (set it once, in [backends.custom])",
                )
            inherited = base.model_dump()
            if "argv" in data:
                # Another program: the base's resume/model/system-prompt templates would call the wrong one.
                for key in ("resume_argv", "model_argv", "system_prompt_argv"):
                    inherited.pop(key)
            merged = {**inherited, **data, "env": {**base.env, **data.get("env", {})}}
            profile = _profile(merged, f"backends.custom.profiles.{name}")
            profile.check(f"backends.custom.profiles.{name}")
            profiles[name] = profile
        if base.argv:
            base.check("backends.custom")
        elif not profiles:
            base.check("backends.custom")  # raises: nothing is configured
        return cls(base if base.argv else None, profiles, environ=environ)

    def __repr__(self) -> str:
        # Never env values: they may hold API keys.
        return f"CustomBackend(argv={self.base.argv if self.base else None!r}, profiles={sorted(self.profiles)})"

    def select(self, model: str | None) -> tuple[CommandProfile, str | None]:
        """The profile a model names ("NAME" or "NAME:MODEL"), else the base command."""
        if model:
            name, _, rest = model.partition(":")
            if name in self.profiles:
                return self.profiles[name], rest or None
        if self.base is None:
            raise InvalidInputError(
                "model",
                f"{model!r} names no custom profile and [backends.custom] has no argv of its own;"
                f" use one of: {', '.join(sorted(self.profiles))}",
            )
        return self.base, model

    def command(self, turn: Turn) -> Command:
        agent = turn.agent
        profile, model = self.select(agent.model)
        resuming = bool(turn.resume_id and profile.resume_argv)
        template = list(profile.resume_argv if resuming else profile.argv)
        options: list[str] = []
        if model and profile.model_argv:
            options += profile.model_argv
        if agent.system_prompt and profile.system_prompt_argv:
            options += profile.system_prompt_argv
        template[1:1] = options
        if profile.prompt_via == "arg" and len(turn.prompt.encode("utf-8")) >= MAX_ARGUMENT_BYTES:
            raise InvalidInputError(
                "prompt",
                f"longer than one command-line argument may be ({MAX_ARGUMENT_BYTES // 1024} KiB on Linux) and this"
                ' custom command takes it as one; send a shorter prompt, or set prompt_via = "stdin"',
            )
        values = {
            "prompt": turn.prompt if profile.prompt_via == "arg" else "",
            "session": turn.session_id,
            "turn": str(turn.index),
            "workdir": turn.workdir,
            "home": turn.home,
            "resume_id": turn.resume_id or "",
            "model": argument("model", model) if model and profile.model_argv else "",
            "system_prompt": (
                argument("system_prompt", agent.system_prompt)
                if agent.system_prompt and profile.system_prompt_argv
                else ""
            ),
        }
        argv = [expand(element, values) for element in template] + agent.extra_args
        env = _kit.host_env(profile.pass_env, profile.env, self._environ)
        env.update(self._context_env(turn, model))
        stdin = turn.prompt.encode("utf-8") if profile.prompt_via == "stdin" else None
        return Command(argv=argv, env=env, stdin=stdin, cwd=turn.workdir)

    @staticmethod
    def _context_env(turn: Turn, model: str | None) -> dict[str, str]:
        agent = turn.agent
        env = {
            "HOME": turn.home,
            f"{ENV_PREFIX}SESSION_ID": turn.session_id,
            f"{ENV_PREFIX}TURN_INDEX": str(turn.index),
        }
        optional = {
            "RESUME_ID": turn.resume_id,
            "MODEL": model,
            "SYSTEM_PROMPT": agent.system_prompt,
            "PERMISSION_MODE": agent.permission_mode,
            "MAX_TURNS": None if agent.max_turns is None else str(agent.max_turns),
            "MCP_CONFIG": mcp_config_path(turn.home) if agent.mcp_servers else None,
        }
        env.update({f"{ENV_PREFIX}{key}": value for key, value in optional.items() if value})
        return env

    def translator(self) -> CustomTranslator:
        return CustomTranslator(self.output)

    def mounts(self) -> list[Mount]:
        return []

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        self.select(agent.model)  # a model naming nothing fails the spawn, before any turn runs
        files: list[SetupFile] = []
        if agent.mcp_servers:
            data = json.dumps({"mcpServers": agent.mcp_servers}, indent=2).encode()
            # 0600: server entries may carry tokens in their env.
            files.append(WriteFile(path=mcp_config_path(home), data=data, mode=0o600))
        config_dir = str(Path(home) / Path(MCP_CONFIG_PATH).parent)
        return SandboxSetup(backend=self.name, home=home, directories=[config_dir], files=files)


def _profile(data: dict[str, Any], where: str) -> CommandProfile:
    try:
        return CommandProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidInputError(f"{where}.{field}" if field else where, first["msg"]) from exc


def mcp_config_path(home: str) -> str:
    return str(Path(home) / MCP_CONFIG_PATH)


class CustomTranslator:
    """A custom command's stdout -> events, one instance per turn; never raises on bad input."""

    def __init__(self, output: OutputKind = "jsonl") -> None:
        self.output = output
        self._result = TurnResult()
        self._stop_reason: Any = None
        self._last_text: str | None = None
        self._errors: list[str] = []
        self._usage = Usage()
        self._usage_seen = False
        # text mode
        self._pending: list[str] = []
        self._pending_chars = 0
        self._all_text: list[str] = []
        self._all_chars = 0

    @property
    def result(self) -> TurnResult:
        return self._result

    def feed(self, line: str) -> list[Event]:
        if self.output == "text":
            return self._feed_text(line)
        return self._feed_jsonl(line)

    # -- jsonl -------------------------------------------------------------------------------

    def _feed_jsonl(self, line: str) -> list[Event]:
        data = _kit.json_object(line, NAME)
        if not isinstance(data, dict):
            return data
        kind = data.get("type")
        if kind == NATIVE_ID_TYPE:
            native_id = data.get("id")
            if not isinstance(native_id, str) or not native_id:
                return [_kit.parse_error(f'{NATIVE_ID_TYPE} needs a non-empty string "id"', line)]
            self._result.native_session_id = native_id
            return []
        if isinstance(kind, str) and kind.startswith(SERVER_EVENT_PREFIXES) and kind != "session.status_idle":
            message = f"{kind} is emitted by the server, not by a command"
            return [SessionError(error=ErrorInfo(type="invalid_event", message=message))]
        if kind not in EVENT_TYPES:
            return [AgentRaw(source=NAME, data=data)]
        try:
            event = parse_event(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            detail = f"{where}: {first['msg']}" if where else first["msg"]
            return [_kit.parse_error(f"not a valid event ({detail})", line)]
        if isinstance(event, SessionStatusIdle):
            self._stop_reason = event.stop_reason.type
            return []
        if isinstance(event, AgentMessage):
            self._last_text = event.text
        elif isinstance(event, SpanModelRequestEnd):
            # Spans may be per step or one per turn; either way their sum is the turn's usage.
            self._usage = self._usage + event.model_usage
            self._usage_seen = True
        elif isinstance(event, SessionError) and event.error.message not in self._errors:
            self._errors.append(event.error.message)
        return [event]

    # -- text --------------------------------------------------------------------------------

    def _feed_text(self, line: str) -> list[Event]:
        text = line.rstrip("\r\n")
        self._pending.append(text)
        self._pending_chars += len(text) + 1
        if self._all_chars <= MAX_FINAL_TEXT:
            self._all_text.append(text)
            self._all_chars += len(text) + 1
        if len(self._pending) >= TEXT_CHUNK_LINES or self._pending_chars >= TEXT_CHUNK_CHARS:
            return self._flush_text()
        return []

    def _flush_text(self) -> list[Event]:
        if not self._pending:
            return []
        text = "\n".join(self._pending)
        self._pending = []
        self._pending_chars = 0
        return [AgentMessage(content=[TextBlock(text=text)])]

    # -- end of turn -------------------------------------------------------------------------

    def finish(self, exit_code: int, stderr_tail: str) -> list[Event]:
        result = self._result
        events = self._flush_text() if self.output == "text" else []
        if self.output == "text" and self._all_text:
            whole = "\n".join(self._all_text)
            result.final_text = whole[-MAX_FINAL_TEXT:]
        else:
            result.final_text = self._last_text
        if self._usage_seen:
            result.usage = self._usage
        if self._errors:
            result.error = "; ".join(self._errors)
        if exit_code in INTERRUPT_EXIT_CODES:
            result.stop_reason = "interrupted"
            return events
        if exit_code != 0:
            result.stop_reason = "error"
            message = _kit.crash_message(f"the custom command exited with code {exit_code}", stderr_tail)
            result.error = message if result.error is None else f"{result.error}; {message}"
            events.append(SessionError(error=ErrorInfo(type="command_failed", message=message)))
            return events
        result.stop_reason = self._stop_reason or ("error" if self._errors else "end_turn")
        return events
