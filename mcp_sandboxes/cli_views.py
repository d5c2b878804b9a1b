"""The terminal view: `sessions` (a tree table), `logs [-f] ID`, `transcript ID`, `stop ID`,
`shell ID` and `envs`, rendered with rich. Each talks to a running server (`--url`, or
MCP_SANDBOXES_URL) as its operator, or reads the data directory read-only when no server is named
(see cli_sources.py)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mcp_sandboxes.cli_sources import FINAL_STATUSES, LocalSource, Source, server_source
from mcp_sandboxes.config import Settings
from mcp_sandboxes.errors import McpSandboxesError

VIEW_COMMANDS = ("sessions", "logs", "transcript", "stop", "shell", "envs")
URL_ENV = "MCP_SANDBOXES_URL"
TOKEN_ENV = "MCP_SANDBOXES_AUTH_TOKEN"
# Each long-poll of `logs -f` (a server answers as soon as an event arrives).
FOLLOW_WAIT_S = 30.0
TERMINATED = "session.status_terminated"
# How long `logs -f` waits for the closing event of a session that is already over.
CLOSING_WAIT_S = 5.0
STATUS_STYLES = {"running": "bold blue", "starting": "blue", "idle": "green", "stopped": "dim", "failed": "bold red"}
TYPE_STYLES = {
    "user.message": "bold cyan",
    "agent.message": "bold green",
    "agent.thinking": "magenta",
    "agent.tool_use": "yellow",
    "agent.mcp_tool_use": "yellow",
    "agent.tool_result": "dim yellow",
    "agent.mcp_tool_result": "dim yellow",
    "session.error": "bold red",
}
MAX_LINE_CHARS = 400


def add_view_commands(commands: Any) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", help="TOML file overriding the embedded defaults")
        parser.add_argument(
            "--url",
            default=os.environ.get(URL_ENV),
            help=f"a running server's MCP endpoint, e.g. http://127.0.0.1:8765/mcp (default ${URL_ENV}); the"
            f" operator token comes from ${TOKEN_ENV} or the data directory's operator-token. Without a URL the"
            " data directory's database is read (read-only)",
        )

    sessions = commands.add_parser("sessions", help="the sessions as a tree (parent and sub-agents)")
    common(sessions)
    sessions.add_argument("--live", action="store_true", help="only starting, running and idle sessions")

    logs = commands.add_parser("logs", help="a session's events, one readable line each")
    common(logs)
    logs.add_argument("session_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following until the session ends")
    logs.add_argument("--after", type=int, default=0, help="start after this event seq")

    transcript = commands.add_parser("transcript", help="a session's transcript (markdown)")
    common(transcript)
    transcript.add_argument("session_id")

    stop = commands.add_parser("stop", help="stop a session (and its sub-agents); needs a running server")
    common(stop)
    stop.add_argument("session_id")

    shell = commands.add_parser("shell", help="an interactive shell in a session's sandbox")
    common(shell)
    shell.add_argument("session_id")
    shell.add_argument("--user", help="user to run the shell as (default: the sandbox user from the config)")

    envs = commands.add_parser("envs", help="the environments")
    common(envs)


def _token(settings: Settings) -> str:
    configured = os.environ.get(TOKEN_ENV) or settings.server.auth_token
    if configured:
        return configured
    path = settings.server.operator_token_path
    try:
        return path.read_text("utf-8").strip()
    except OSError:
        raise McpSandboxesError(
            f"{TOKEN_ENV}: not set and {path} is unreadable; set it to the token `mcp-sandboxes token` prints"
            " on the server's machine"
        ) from None


@asynccontextmanager
async def open_source(url: str | None, settings: Settings) -> AsyncIterator[Source]:
    if url:
        async with server_source(url, _token(settings)) as source:
            yield source
        return
    local = LocalSource(settings.database_path)
    try:
        yield local
    finally:
        local.close()


def run_view_command(args: argparse.Namespace, settings: Settings) -> int:
    # Lines of logs and transcripts are never broken: they are read, grepped and piped.
    console = Console(highlight=False, soft_wrap=args.command in ("logs", "transcript"))
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    commands: dict[str, Callable[[Source], Any]] = {
        "sessions": lambda source: _sessions(source, console, args.live),
        "logs": lambda source: _logs(source, console, args.session_id, args.after, args.follow),
        "transcript": lambda source: _transcript(source, console, args.session_id),
        "stop": lambda source: _stop(source, console, args.session_id),
        "shell": lambda source: _shell_plan(source, args.session_id),
        "envs": lambda source: _envs(source, console),
    }

    async def run() -> Any:
        async with open_source(args.url, settings) as source:
            return await commands[args.command](source)

    try:
        result = anyio.run(run)
    except KeyboardInterrupt:
        return 130
    except McpSandboxesError as exc:
        errors.print(Text(f"mcp-sandboxes: {exc}", style="red"))
        return 1
    if args.command == "shell":
        return _exec_shell(result, settings, args.user, console)
    return int(result or 0)


# -- sessions -----------------------------------------------------------------------------------


def tree_rows(sessions: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Depth first, each session after its parent, with the branch drawing for its first column."""
    ids = {s["session_id"] for s in sessions}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for session in sessions:
        parent = session.get("parent_session_id")
        children.setdefault(parent if parent in ids else None, []).append(session)
    rows: list[tuple[str, dict[str, Any]]] = []

    def walk(session: dict[str, Any], prefix: str, last: bool, depth: int) -> None:
        rows.append(("" if depth == 0 else prefix + ("└─ " if last else "├─ "), session))
        kids = children.get(session["session_id"], [])
        below = "" if depth == 0 else prefix + ("   " if last else "│  ")
        for index, kid in enumerate(kids):
            walk(kid, below, index == len(kids) - 1, depth + 1)

    for root in children.get(None, []):
        walk(root, "", True, 0)
    return rows


def _cost(usage: dict[str, Any]) -> str:
    cost = usage.get("cost_usd")
    return f"${cost:.4f}" if cost is not None else "-"


def _time(stamp: str | None) -> str:
    if not stamp:
        return ""
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return stamp


async def _sessions(source: Source, console: Console, live_only: bool) -> int:
    sessions = await source.sessions()
    if live_only:
        sessions = [s for s in sessions if s["status"] not in FINAL_STATUSES]
    table = Table(title=f"Sessions ({source.where})", title_justify="left")
    for name, justify in [
        ("Session", "left"),
        ("Status", "left"),
        ("Backend", "left"),
        ("Environment", "left"),
        ("Workspace", "left"),
        ("Turns", "right"),
        ("In", "right"),
        ("Out", "right"),
        ("Cost", "right"),
        ("Updated", "left"),
    ]:
        table.add_column(name, justify=justify, no_wrap=name == "Session")  # type: ignore[arg-type]
    for branch, s in tree_rows(sessions):
        usage = s.get("usage") or {}
        backend = s["backend"] + (f" ({s['model']})" if s.get("model") else "")
        table.add_row(
            Text(branch, style="dim") + Text(s["session_id"]),
            Text(s["status"], style=STATUS_STYLES.get(s["status"], "")),
            backend,
            s.get("environment_name") or s["environment_id"],
            workspace_of_session(s),
            str(s.get("turns", "")),
            str(usage.get("input_tokens", 0)),
            str(usage.get("output_tokens", 0)),
            _cost(usage),
            _time(s.get("updated_at")),
        )
    if not sessions:
        console.print("no sessions" + (" live" if live_only else "") + f" ({source.where})")
        return 0
    console.print(table)
    return 0


# -- logs -----------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return "" if content is None else str(content)


def event_summary(event: dict[str, Any]) -> str:
    data: dict[str, Any] = event.get("data") or {}
    kind = event["type"]
    if kind in ("user.message", "agent.message"):
        text = _text(data.get("content"))
    elif kind == "agent.thinking":
        text = str(data.get("thinking", ""))
    elif kind in ("agent.tool_use", "agent.mcp_tool_use"):
        text = f"{data.get('name')} {json.dumps(data.get('input', {}), ensure_ascii=False)}"
    elif kind in ("agent.tool_result", "agent.mcp_tool_result"):
        text = ("error: " if data.get("is_error") else "") + _text(data.get("content"))
    elif kind == "session.error":
        error = data.get("error") or {}
        text = f"{error.get('type')}: {error.get('message')}"
    elif kind == "session.status_idle":
        text = f"stop reason: {(data.get('stop_reason') or {}).get('type')}"
    elif kind == "span.model_request_end":
        usage = data.get("model_usage") or {}
        text = f"in {usage.get('input_tokens', 0)}, out {usage.get('output_tokens', 0)}"
        if usage.get("cost_usd") is not None:
            text += f", ${usage['cost_usd']:.4f}"
    else:
        text = json.dumps(data, ensure_ascii=False) if data else ""
    text = " ".join(text.split())
    return text if len(text) <= MAX_LINE_CHARS else text[: MAX_LINE_CHARS - 1] + "…"


def event_line(event: dict[str, Any]) -> Text:
    line = Text(f"{_time(event.get('created_at'))} ", style="dim")
    line.append(f"#{event['seq']:<4} ", style="dim")
    line.append(f"{event['type']:<24}", style=TYPE_STYLES.get(event["type"], "bold"))
    line.append(" " + event_summary(event))
    return line


async def _logs(source: Source, console: Console, session_id: str, after: int, follow: bool) -> int:
    """Prints the events after `after`; with `follow`, long-polls for more until the session is
    over and its closing event (session.status_terminated, stored just after the status) is out."""
    await source.session(session_id)  # an unknown id fails here, by name
    cursor, last_type, over = after, "", False
    while True:
        # Once the session is over, nothing more can come but its closing event: a short wait.
        wait_s = 0.0 if not follow else CLOSING_WAIT_S if over else FOLLOW_WAIT_S
        events, status = await source.events(session_id, cursor, wait_s)
        for event in events:
            console.print(event_line(event))
            cursor, last_type = event["seq"], event["type"]
        console.file.flush()  # a pipe is block-buffered; a follower wants each line as it comes
        over = status in FINAL_STATUSES
        if not follow:
            if not events:
                return 0
            continue
        if over and (last_type == TERMINATED or not events):
            console.print(Text(f"session {session_id} is {status}", style="dim"))
            return 0


# -- transcript, stop, envs -------------------------------------------------------------------


async def _transcript(source: Source, console: Console, session_id: str) -> int:
    sys.stdout.write(await source.transcript(session_id))
    return 0


async def _stop(source: Source, console: Console, session_id: str) -> int:
    view = await source.stop(session_id)
    console.print(Text(f"session {session_id}: {view['status']}", style=STATUS_STYLES.get(view["status"], "")))
    return 0


def workspace_of_session(session: dict[str, Any]) -> str:
    """ "branch <name> from <commit>" for a session with a workspace branch, else ""."""
    branch, base = session.get("workspace_branch"), session.get("workspace_base")
    if not branch:
        return ""
    return f"{branch} from {base[:12]}" if base else str(branch)


def workspace_of_environment(workspace: dict[str, Any] | None) -> str:
    """ "git <source>@<ref>" or "directory <path> (<mode>)"; "" without a workspace."""
    if not workspace:
        return ""
    if workspace.get("kind") == "git":
        return f"git {workspace.get('source')}" + (f"@{workspace['ref']}" if workspace.get("ref") else "")
    return f"directory {workspace.get('source')} ({workspace.get('mode')})"


async def _envs(source: Source, console: Console) -> int:
    environments = await source.environments()
    if not environments:
        console.print(f"no environments ({source.where})")
        return 0
    table = Table(title=f"Environments ({source.where})", title_justify="left")
    for name in ("Name", "Id", "Provider", "Image", "Network", "Workspace", "State", "Live sessions"):
        table.add_column(name, justify="right" if name == "Live sessions" else "left")
    for env in environments:
        table.add_row(
            env["name"],
            env["id"],
            env["provider"],
            env["image"],
            str(env.get("network", "")),
            workspace_of_environment(env.get("workspace")),
            env.get("state", ""),
            str(env.get("live_sessions", 0)),
        )
    console.print(table)
    return 0


# -- shell ----------------------------------------------------------------------------------


async def _shell_plan(source: Source, session_id: str) -> dict[str, Any]:
    session = await source.session(session_id)
    if session["status"] in FINAL_STATUSES or not session.get("sandbox_id"):
        raise McpSandboxesError(f"session {session_id} is {session['status']} and has no sandbox to open a shell in")
    environments = {env["id"]: env for env in await source.environments()}
    env = environments.get(session["environment_id"])
    if env is None:
        raise McpSandboxesError(f"session {session_id}: its environment {session['environment_id']} was deleted")
    return {"sandbox_id": session["sandbox_id"], "provider": env["provider"], "workdir": env.get("workdir") or "/"}


def shell_command(plan: dict[str, Any], user: str | None, settings: Settings) -> tuple[list[str] | None, str]:
    """The argv that opens a shell (None when this command cannot), and what to tell the user."""
    sandbox_id, provider, workdir = plan["sandbox_id"], plan["provider"], plan["workdir"]
    user = user or settings.server.sandbox_user or "root"
    shell = ["sh", "-c", 'exec "$(command -v bash || command -v sh)" -l']
    if provider in ("docker", "podman"):
        return [provider, "exec", "-it", "-u", user, "-w", workdir, sandbox_id, *shell], ""
    if provider == "containerd":
        namespace = settings.provider("containerd").get("namespace", "mcp-sandboxes")
        argv = ["ctr", "-n", namespace, "task", "exec", "-t", "--exec-id", f"shell-{os.getpid()}", sandbox_id, *shell]
        return argv, ""
    if provider == "process":
        return None, (
            f"the process provider runs on this host: its sandbox {sandbox_id} is a directory under the process"
            " provider's state_dir; `cd` there yourself"
        )
    hints = {
        "bubblewrap": "bubblewrap sandboxes have no shell entry from outside; use the send_message tool",
        "modal": f"run: modal shell {sandbox_id}",
        "fly": f"run: fly ssh console --machine {sandbox_id}",
        "e2b": f"run: e2b sandbox connect {sandbox_id}",
        "daytona": f"run: daytona ssh {sandbox_id}",
        "sprites": f"run: sprite console {sandbox_id}",
        "apple": f"run: container exec -it {sandbox_id} sh",
    }
    return None, hints.get(provider, f"provider {provider} has no shell command here; sandbox id {sandbox_id}")


def _exec_shell(plan: dict[str, Any], settings: Settings, user: str | None, console: Console) -> int:
    argv, hint = shell_command(plan, user, settings)
    if argv is None:
        console.print(hint)
        return 1
    if shutil.which(argv[0]) is None:
        console.print(f"{argv[0]} is not on PATH; on the server's machine run: {shlex.join(argv)}")
        return 1
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 0  # not reached: exec replaced this process
