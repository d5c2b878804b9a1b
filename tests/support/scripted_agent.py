"""A tiny agent CLI for in-process tests, run by the `custom` backend with output "jsonl": each
stdout line is one normalized event (mcp_sandboxes/events.py).

    scripted_agent.py --session SESSION [--resume RESUME_ID] PROMPT

Every turn reports a native session id (`session.native_id`, "sa-<session>-<turn>") so the next
turn is run with `--resume`, and answers with one agent.message:
"echo <prompt> | resumed <id or -> | pid <pid> | home <HOME> | cwd <cwd>". What the prompt starts
with changes the turn:

    SLEEP          print the answer, then wait (up to WAIT_LIMIT_S); SIGINT exits 130
    GATE <fifo>    print the answer, then wait for a line on the named pipe (up to WAIT_LIMIT_S)
    CRASH <text>   print FILLER_CHARS of filler then <text> to stderr, exit 3 (no stdout)
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from types import FrameType
from typing import Any

# No wait here outlives a broken test for long; the test's own fail_after ends it first.
WAIT_LIMIT_S = 60.0
FILLER_CHARS = 5000
CRASH_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130


def emit(event: dict[str, Any]) -> None:
    # Straight to the pipe, no buffered stdout: the SIGINT handler emits too, and may run while
    # a buffered flush is under way (a reentrant call there raises).
    data = (json.dumps(event) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def on_sigint(signum: int, frame: FrameType | None) -> None:
    emit({"type": "agent.message", "content": [{"type": "text", "text": "interrupted, leaving"}]})
    os._exit(INTERRUPTED_EXIT_CODE)


def wait_at_gate(fd: int) -> str:
    readable, _, _ = select.select([fd], [], [], WAIT_LIMIT_S)
    return os.read(fd, 1024).decode().strip() if readable else "gate timed out"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--session", required=True)
    parser.add_argument("--resume", default="")
    parser.add_argument("prompt")
    args = parser.parse_args()
    prompt: str = args.prompt
    signal.signal(signal.SIGINT, on_sigint)

    if prompt.startswith("CRASH"):
        sys.stderr.write("x" * FILLER_CHARS + "\n" + prompt.removeprefix("CRASH").strip() + "\n")
        return CRASH_EXIT_CODE

    # Opened before the answer is printed, so a test that has read the answer finds a reader there.
    # O_RDWR: the open never blocks and a read waits for the writer's line instead of seeing EOF.
    gate = os.open(prompt.split(maxsplit=1)[1], os.O_RDWR) if prompt.startswith("GATE") else None
    turn = os.environ.get("MCP_SANDBOXES_TURN_INDEX", "?")
    emit({"type": "session.native_id", "id": f"sa-{args.session}-{turn}"})
    emit({"type": "agent.tool_use", "tool_use_id": "t1", "name": "echo", "input": {"prompt": prompt}})
    emit({"type": "agent.tool_result", "tool_use_id": "t1", "content": f"{len(prompt)} chars"})
    usage = {"input_tokens": 3, "output_tokens": 4}
    emit({"type": "span.model_request_end", "model": "scripted", "model_usage": usage})
    answer = (
        f"echo {prompt} | resumed {args.resume or '-'} | pid {os.getpid()}"
        f" | home {os.environ.get('HOME', '')} | cwd {os.getcwd()}"
    )
    emit({"type": "agent.message", "content": [{"type": "text", "text": answer}]})

    if prompt.startswith("PRINTENV"):
        # An agent printing a variable of its environment (e.g. its API key).
        name = prompt.split()[1]
        emit({"type": "agent.message", "content": [{"type": "text", "text": f"{name}={os.environ.get(name, '')}"}]})
    if prompt.startswith("SLEEP"):
        time.sleep(WAIT_LIMIT_S)
        emit({"type": "agent.message", "content": [{"type": "text", "text": "slept to the end"}]})
    elif gate is not None:
        line = wait_at_gate(gate)
        emit({"type": "agent.message", "content": [{"type": "text", "text": f"gate said {line}"}]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
