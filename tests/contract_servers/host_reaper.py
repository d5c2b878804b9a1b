"""Ends every process still running inside a `LocalMachine`, including detached ones.

`LocalMachine.destroy` ends the processes it started; a command that detached itself
(the fly provider's streamed commands run in the background, Vercel's stdin holders too)
has been reparented and is no longer among them. Every process of a machine still has the
machine's private folders mounted, so they are found through /proc/<pid>/mountinfo.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from tests.contract_servers.sandbox_host import LocalMachine


def processes_of(local: LocalMachine) -> list[int]:
    marker = str(local.root)
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "mountinfo").read_text():
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def reap(local: LocalMachine) -> int:
    """SIGKILL every process of `local`; returns how many were signalled."""
    pids = processes_of(local)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def force_cleanup(local: LocalMachine) -> None:
    """End every process of `local` and remove its folders, without an event loop: for a
    stand-in whose server (and the loop its processes belong to) has already stopped."""
    for process in local.processes:
        if process.process.returncode is None:
            process.send_signal(signal.SIGKILL)
    reap(local)
    shutil.rmtree(local.root, ignore_errors=True)
