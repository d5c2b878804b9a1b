"""Larger output pipes for the processes we start on this host.

Node-based CLIs end with `process.exit()` while writes to a full stdout pipe may still be queued
inside Node, and those bytes are lost. Seen with Gemini CLI 0.61.0: with the default 64 KiB pipe
and a reader a moment late (a loaded machine), its 300 KB prompt echo and every line after it
vanished and it exited 0. A pipe of 1 MiB (Linux's default ceiling for an unprivileged resize)
holds such a burst until we read it. Engines that own the pipe themselves (docker, podman) read
it in their own shim and are out of our reach.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from anyio.abc import Process

logger = logging.getLogger(__name__)

OUTPUT_PIPE_BYTES = 1 << 20
# Linux's fcntl commands; Python names them only from 3.10 on some builds.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


def pipe_ceiling() -> int:
    try:
        return int(PIPE_MAX_SIZE.read_text())
    except (OSError, ValueError):
        return OUTPUT_PIPE_BYTES


def output_pipe_fds(process: Process) -> list[int]:
    """The host ends of `process`'s stdout and stderr pipes. anyio has no public way to reach
    them, so this goes through its asyncio process's transport (pinned anyio; the unit test
    `test_output_pipes_are_enlarged` fails, rather than this silently degrading, if that changes)."""
    transport = getattr(getattr(process, "_process", None), "_transport", None)
    if transport is None:
        return []
    fds: list[int] = []
    for number in (1, 2):
        pipe = transport.get_pipe_transport(number)
        if pipe is None or pipe.is_closing():
            continue
        try:
            fds.append(pipe.get_extra_info("pipe").fileno())
        except ValueError:  # closed already: a process that ended at once has nothing left to lose
            continue
    return fds


def enlarge_output_pipes(process: Process, size: int = OUTPUT_PIPE_BYTES) -> int:
    """Grows `process`'s stdout and stderr pipes to `size` (at most the system ceiling); returns
    how many it grew. Best effort: a pipe that cannot grow keeps working at its old size."""
    wanted = min(size, pipe_ceiling())
    grown = 0
    for fd in output_pipe_fds(process):
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, wanted)
        except OSError as exc:
            logger.debug("could not grow an output pipe to %d bytes: %s", wanted, exc)
            continue
        grown += 1
    return grown
