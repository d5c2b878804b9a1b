"""What the E2B, Daytona and Modal stand-ins "run": a sandbox made of real local processes.

Each `LocalMachine` is a per-sandbox temporary directory whose `workspace`, `tmp`, `home`
and `root` folders are bind-mounted at /workspace, /tmp, /home and /root inside a
bubblewrap namespace; the host's system folders (/usr, /etc, ...) are mounted read-only.
So absolute sandbox paths behave as in a real sandbox: a file written through a files
API at /workspace/x is what `cat /workspace/x` reads, and nothing touches the host.
Network "none" gets its own network namespace (only `lo`).

`LoopbackServer` runs an ASGI app with uvicorn on 127.0.0.1 in a background thread, so
a stand-in has its own event loop and a client in any test can reach it.

Limits, by design of a test stand-in: every process runs as the test's own uid (user
names are validated by each stand-in but not switched to), and resource limits are not
enforced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import uvicorn

BWRAP = shutil.which("bwrap") or "/usr/bin/bwrap"
WRITABLE = ("workspace", "tmp", "home", "root")
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt", "var", "sys")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def bwrap_available() -> str | None:
    """None when sandboxes can run here, else the reason."""
    if not os.path.exists(BWRAP):
        return "bubblewrap (bwrap) is not installed: run scripts/setup-system.sh"
    return None


class LocalProcess:
    """One running command: its anyio Process, the pid of the command itself (not bwrap's),
    and the signals delivered to it, so a stand-in can report "killed by signal N" the way
    its vendor does (bwrap reports a signalled child as 128+N, indistinguishable from exit)."""

    def __init__(self, process: anyio.abc.Process, pid: int) -> None:
        self.process = process
        self.pid = pid
        self.signals_sent: list[int] = []

    def send_signal(self, signum: int) -> None:
        self.signals_sent.append(signum)
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    async def wait(self) -> int:
        return await self.process.wait()

    def kill_group(self) -> None:
        """SIGKILL the process group (for processes spawned with new_session=True)."""
        self.signals_sent.append(signal.SIGKILL)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def killed_by(self, returncode: int) -> int | None:
        """The signal that ended the process, if one we sent explains its status."""
        if returncode > 128 and (returncode - 128) in self.signals_sent:
            return returncode - 128
        return None


class LocalMachine:
    def __init__(self, *, network: bool = False, home_user: str = "user", root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="mcp-sbx-standin-"))
        self.network = network
        self.root.mkdir(parents=True, exist_ok=True)
        for name in WRITABLE:
            (self.root / name).mkdir(exist_ok=True)
        (self.root / "home" / home_user).mkdir(exist_ok=True)
        self.processes: list[LocalProcess] = []

    def resolve(self, path: str) -> Path:
        """The host path behind a sandbox path; system folders resolve to the (read-only) host."""
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} is not absolute")
        parts = [p for p in path.split("/") if p and p != "."]
        if ".." in parts:
            raise ValueError(f"path {path!r} must not contain '..'")
        if parts and parts[0] in WRITABLE:
            return self.root.joinpath(*parts)
        return Path("/", *parts)

    def writable(self, path: str) -> bool:
        parts = [p for p in path.split("/") if p]
        return bool(parts) and parts[0] in WRITABLE

    def bwrap_args(self, cwd: str, env: Mapping[str, str], info_fd: int | None, new_session: bool) -> list[str]:
        """The bwrap command line (up to, not including, "--" and the command)."""
        args = [BWRAP, "--die-with-parent", "--unshare-ipc", "--unshare-uts"]
        if info_fd is not None:
            args += ["--info-fd", str(info_fd)]
        if new_session:
            args.append("--new-session")
        if not self.network:
            args.append("--unshare-net")
        for name in SYSTEM_DIRS:
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run"]
        for name in WRITABLE:
            args += ["--bind", str(self.root / name), f"/{name}"]
        args += ["--chdir", cwd, "--clearenv"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        return args

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        new_session: bool = False,
    ) -> LocalProcess:
        """Start argv inside the sandbox. Raises FileNotFoundError for a missing cwd.
        new_session puts the command in its own session and process group (setsid)."""
        if not self.resolve(cwd).is_dir():
            raise FileNotFoundError(f"working directory {cwd} does not exist")
        full_env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        full_env.update(env or {})
        read_fd, write_fd = os.pipe()
        try:
            process = await anyio.open_process(
                [*self.bwrap_args(cwd, full_env, write_fd, new_session), "--", *argv],
                stdin=-1,
                stdout=-1,
                stderr=-1,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        info = await anyio.to_thread.run_sync(_read_all, read_fd)
        try:
            pid = int(json.loads(info)["child-pid"])
        except (ValueError, KeyError):
            # bwrap failed before the child started (its error is on stderr); keep its own pid.
            pid = process.pid
        local = LocalProcess(process, pid)
        self.processes.append(local)
        return local

    async def destroy(self) -> None:
        for local in self.processes:
            if local.process.returncode is None:
                local.send_signal(signal.SIGKILL)
                with anyio.move_on_after(5):
                    await local.process.wait()
        self.processes.clear()
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.root, ignore_errors=True))


def _read_all(fd: int) -> bytes:
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    finally:
        os.close(fd)
    return data


class LoopbackServer:
    """uvicorn on 127.0.0.1:<ephemeral> in a thread; `url` is its base URL."""

    def __init__(self, app: Any, name: str) -> None:
        self._app = app
        self._name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        if self._socket is None:
            raise RuntimeError(f"the {self._name} stand-in is not running")
        port: int = self._socket.getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._socket = sock
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=self._name)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            self.stop()
            raise RuntimeError(f"the {self._name} stand-in did not start within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = None
        self._socket = None

    async def __aenter__(self) -> LoopbackServer:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)


def require_bwrap() -> None:
    """The stand-ins run commands under bwrap: without it their tests fail (CI installs it),
    unless MCP_SANDBOXES_ALLOW_UNAVAILABLE=1 asks to skip what cannot run."""
    from tests.conftest import unavailable

    reason = bwrap_available()
    if reason is None:
        return
    unavailable(reason)
