"""The per-sandbox holder: one long-lived bwrap whose user and pid namespaces every command of
the sandbox joins (`bwrap --userns FD --pidns FD`).

Sharing them is what makes a sandbox behave like one machine across commands: pids are
unique and visible between commands (`kill` of a pid another command printed works), and a
background process outlives the command that started it, reparented to the holder's init.
The holder runs `sh -c 'read _'` on a pipe we never write, in the sandbox's own root (so
its /proc/1/root shows a sandboxed process nothing more than it already sees). When the
holder ends (destroy, server exit via --die-with-parent), its pid namespace ends and the
kernel kills every process left in it.

We keep the holder's namespace files open while it lives: an fd pins exactly that
namespace, where a path like /proc/PID/ns/user could name another process after a reuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field

import anyio
from anyio.abc import Process

from mcp_sandboxes.errors import ProviderError

HOLDER_START_TIMEOUT_S = 20.0
HOLDER_STOP_TIMEOUT_S = 5.0
HOLDER_COMMAND = ["/bin/sh", "-c", "read _"]


@dataclass
class Holder:
    process: Process
    init_pid: int
    init_pidfd: int
    userns_fd: int
    pidns_fd: int
    closed: bool = field(default=False)

    @property
    def alive(self) -> bool:
        return not self.closed and self.process.returncode is None

    async def stop(self) -> None:
        """Kill the holder (and with it every process of the sandbox); bounded, shielded.
        The sandbox's init goes first, so that bwrap reaps it: killed together, the init
        would be reparented to the host's init and could linger there as a zombie."""
        with anyio.CancelScope(shield=True):
            if not self.closed:
                self.closed = True
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
                for fd in (self.init_pidfd, self.userns_fd, self.pidns_fd):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                with anyio.move_on_after(HOLDER_STOP_TIMEOUT_S):
                    await self.process.wait()
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                with anyio.move_on_after(HOLDER_STOP_TIMEOUT_S):
                    await self.process.wait()
            with anyio.move_on_after(HOLDER_STOP_TIMEOUT_S):
                await self.process.aclose()


async def start_holder(command_prefix: list[str], bwrap_args: list[str], pass_fds: tuple[int, ...]) -> Holder:
    """Start `command_prefix + [bwrap, ...bwrap_args, --info-fd N, --, sh -c 'read _']` and
    wait for bwrap to report its child's pid; a bwrap that fails (a bad bind, no user
    namespaces) raises ProviderError with bwrap's own message."""
    info_read, info_write = os.pipe()
    os.set_blocking(info_read, False)
    process: Process | None = None
    try:
        try:
            process = await anyio.open_process(
                [*command_prefix, *bwrap_args, "--info-fd", str(info_write), "--", *HOLDER_COMMAND],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                start_new_session=True,
                pass_fds=(info_write, *pass_fds),
            )
        finally:
            os.close(info_write)
        with anyio.fail_after(HOLDER_START_TIMEOUT_S):
            info = await _read_to_end(info_read)
        init_pid = _child_pid(info)
        if init_pid is None:
            detail = await _stderr_of(process)
            raise ProviderError(f"bwrap could not start the sandbox: {detail or 'no reason given'}")
        try:
            # A pidfd names exactly this process for as long as we hold it; namespace fds pin
            # exactly these namespaces (a /proc/PID path could name a reused pid later).
            init_pidfd = os.pidfd_open(init_pid)
            opened = [init_pidfd]
            try:
                opened.append(os.open(f"/proc/{init_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
                opened.append(os.open(f"/proc/{init_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
            except BaseException:
                for fd in opened:
                    os.close(fd)
                raise
        except OSError as exc:
            detail = await _stderr_of(process)
            raise ProviderError(f"the sandbox's holder ended while starting: {detail or exc}") from exc
        userns_fd, pidns_fd = opened[1], opened[2]
        holder = Holder(
            process=process, init_pid=init_pid, init_pidfd=init_pidfd, userns_fd=userns_fd, pidns_fd=pidns_fd
        )
        process = None  # owned by the holder now
        return holder
    except TimeoutError as exc:
        raise ProviderError(f"bwrap did not start the sandbox within {HOLDER_START_TIMEOUT_S:g}s") from exc
    finally:
        os.close(info_read)
        if process is not None:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with anyio.move_on_after(HOLDER_STOP_TIMEOUT_S):
                    await process.aclose()


async def _read_to_end(fd: int) -> bytes:
    """bwrap writes its info JSON and closes the fd once the child runs (or exits on error)."""
    data = bytearray()
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            return bytes(data)
        data.extend(chunk)


def _child_pid(info: bytes) -> int | None:
    try:
        value = json.loads(info)["child-pid"]
    except (ValueError, KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) else None


async def _stderr_of(process: Process) -> str:
    if process.stderr is None:
        return ""
    data = bytearray()
    with anyio.move_on_after(HOLDER_STOP_TIMEOUT_S):
        await process.wait()
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            while len(data) < 8192:
                data.extend(await process.stderr.receive())
    return data.decode("utf-8", "replace").strip()
