"""What the in-process spine tests share: settings for a real Orchestrator on the `process`
provider (real host processes, no Docker), a real SQLite file under the test's tmp dir, and the
`custom` backend running tests/support/scripted_agent.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio

from mcp_sandboxes.config import Settings, load_settings
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.orchestrator.views import EventView

SCRIPTED_AGENT = Path(__file__).resolve().parent.parent / "support" / "scripted_agent.py"
# Each wait below is bounded; a whole turn of the scripted agent takes well under a second.
TURN_BUDGET_S = 20.0
POLL_WAIT_S = 5.0


def spine_settings(tmp_path: Path) -> Settings:
    agent = [sys.executable, str(SCRIPTED_AGENT), "--session", "{session}"]
    environ = {
        "MCP_SANDBOXES_DATA_DIR": str(tmp_path / "data"),
        "MCP_SANDBOXES_DEFAULT_PROVIDER": "process",
        "MCP_SANDBOXES_DEFAULT_IMAGE": "host",
        "MCP_SANDBOXES_BACKENDS__CUSTOM__ARGV": json.dumps([*agent, "{prompt}"]),
        "MCP_SANDBOXES_BACKENDS__CUSTOM__RESUME_ARGV": json.dumps([*agent, "--resume", "{resume_id}", "{prompt}"]),
        "MCP_SANDBOXES_SUBAGENTS__MAX_DEPTH": "0",
    }
    # The defaults otherwise: the process provider keeps its sandboxes (and each one's HOME) under
    # the data directory and runs as the server's own user, whatever sandbox_user says.
    return load_settings(environ=environ)


def orchestrator_of(settings: Settings) -> Orchestrator:
    # An empty environment: nothing of the test runner's own is handed to agents.
    return Orchestrator(settings, environ={})


async def events_until_idle(orchestrator: Orchestrator, session_id: str, after: int = 0) -> list[EventView]:
    """Long-poll read_events until a session.status_idle arrives, bounded in time."""
    collected: list[EventView] = []
    cursor = after
    with anyio.fail_after(TURN_BUDGET_S):
        while True:
            page = await orchestrator.read_events(session_id, after=cursor, wait_s=POLL_WAIT_S)
            collected.extend(page.events)
            cursor = page.next_cursor
            if any(event.type == "session.status_idle" for event in page.events):
                return collected


async def first_event(orchestrator: Orchestrator, session_id: str, type_: str, text: str = "") -> EventView:
    """Long-poll until an event of `type_` (whose data mentions `text`) has been stored."""
    cursor = 0
    with anyio.fail_after(TURN_BUDGET_S):
        while True:
            page = await orchestrator.read_events(session_id, after=cursor, wait_s=POLL_WAIT_S)
            for event in page.events:
                if event.type == type_ and text in json.dumps(event.data):
                    return event
            cursor = page.next_cursor


def texts(events: list[EventView] | list[dict[str, Any]]) -> list[str]:
    """The text of each agent.message, in order."""
    out: list[str] = []
    for event in events:
        raw = event if isinstance(event, dict) else event.model_dump()
        if raw["type"] == "agent.message":
            out.append("".join(block["text"] for block in raw["data"]["content"]))
    return out


def answer_field(text: str, name: str) -> str:
    """A field of the scripted agent's answer, "echo P | resumed R | pid N | home H | cwd C"."""
    for part in text.split(" | "):
        key, _, value = part.partition(" ")
        if key == name:
            return value
    raise AssertionError(f"no {name!r} in {text!r}")


def process_alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) scripted agent; a reused pid does not count."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return SCRIPTED_AGENT.name.encode() in cmdline and state != "Z"


def sandbox_dir(settings: Settings, sandbox_id: str) -> Path:
    return settings.server.data_dir / "sandboxes" / "process" / sandbox_id
