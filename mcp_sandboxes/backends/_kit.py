"""What every CLI backend does the same way, so that a backend module holds only its CLI.

- `host_env`: the variables a backend hands its CLI: `pass_env` names taken from the server's
  environment when set, then the fixed `env` table, which wins (it was written for this backend
  on purpose).
- `cli_file` / `binary_mount`: a host `cli_path` checked and mounted read-only into the sandbox.
- `json_object`: the opening of every JSONL translator's `feed`. A line that is not JSON becomes
  a `session.error` of type parse_error carrying the line verbatim; JSON that is not an object
  becomes `agent.raw`. Nothing a CLI prints is dropped.
- `crash_message`: a failed run's message with the tail of its stderr.
- `SIGNAL_EXIT_CODES`: how a process stopped by SIGINT or SIGTERM exits, wherever it ran.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.events import AgentRaw, ErrorInfo, Event, SessionError
from mcp_sandboxes.specs import Mount

# The end of a failed run's stderr kept in its error message, in characters.
MAX_ERROR_TAIL = 2000
# Stopped by SIGINT or SIGTERM: a container engine (or a shell) reports 128+N, a process that is
# the server's own child -N. A stopped turn reads "interrupted", never "crashed", whether or not
# the CLI printed its result line first.
SIGNAL_EXIT_CODES = frozenset({130, 143, -2, -15})
PARSE_ERROR = "parse_error"


def host_env(pass_env: Iterable[str], env: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """The `pass_env` variables that are set (and not empty) in `environ`, then `env` over them."""
    handed = {key: environ[key] for key in pass_env if environ.get(key)}
    handed.update(env)
    return handed


def cli_file(backend: str, cli_path: str, *, points_at: str, executable: str) -> Path:
    """`cli_path` as an existing file, or an error naming `backends.<backend>.cli_path` and what
    it should point at (e.g. "the claude binary (e.g. tools/...)")."""
    path = Path(cli_path).expanduser()
    if not path.is_file():
        raise InvalidInputError(
            f"backends.{backend}.cli_path",
            f"{cli_path} does not exist or is not a file; point it at {points_at} or leave it empty to use the "
            f"image's own {executable}",
        )
    return path


def binary_mount(backend: str, cli_path: str, target: str, *, points_at: str, executable: str) -> list[Mount]:
    """A single-file CLI from the host, mounted read-only at `target`; nothing when `cli_path` is
    empty (the image provides `executable` on its PATH)."""
    if not cli_path:
        return []
    path = cli_file(backend, cli_path, points_at=points_at, executable=executable)
    return [Mount(source=str(path.resolve()), target=target, read_only=True)]


def parse_error(reason: str, line: str) -> SessionError:
    """A line the translator could not read, kept whole so that nothing the CLI said is lost."""
    return SessionError(error=ErrorInfo(type=PARSE_ERROR, message=f"{reason}: {line}"))


def json_object(line: str, source: str) -> dict[str, Any] | list[Event]:
    """The JSON object on `line`, or the events that stand for a line that is not one: a
    parse_error for text that is not JSON, `agent.raw` for JSON that is not an object."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        return [parse_error(f"not JSON ({exc})", line)]
    if not isinstance(data, dict):
        return [AgentRaw(source=source, data=data)]
    return data


def tail(stderr: str) -> str:
    """The end of a stderr capture, at most MAX_ERROR_TAIL characters, surrounding blanks off."""
    text = stderr.strip()
    return text[-MAX_ERROR_TAIL:] if len(text) > MAX_ERROR_TAIL else text


def crash_message(message: str, stderr: str) -> str:
    """`message`, then "; stderr: " and the stderr's tail when there is one."""
    last = tail(stderr)
    return f"{message}; stderr: {last}" if last else message
