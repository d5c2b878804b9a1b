"""Apple `container` (macOS 26+, Apple silicon): each sandbox is a lightweight Linux VM
driven through the `container` CLI.

Followed: apple/container docs/command-reference.md and its Sources/ContainerCommands:
`container run -d --name ID --label k=v -e K=V --cpus N --memory NM --network none
--mount type=bind,source=..,target=..,readonly IMAGE CMD...` (prints the ID),
`container exec [-i] [-e K=V] [--workdir D] [--user U] ID ARGS...` (the CLI's stdio is the
process's; it exits with the process's status), `container delete --force ID`,
`container list --all --format json` (ManagedContainer: id, configuration.labels,
status.state; older releases rendered `status` as a bare string, both are read), and
`container system status`. Files travel through `exec -i ... cat`, which every release has
(`container cp` is recent). Signals are sent with `kill` inside the container, using the pid
a small `sh` wrapper records, because `exec` forwards only some signals and never SIGKILL.
Set `cli_path` in the provider settings to use another binary (tests use a stand-in).
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import signal as _signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc

from mcp_sandboxes.errors import (
    InvalidInputError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
)
from mcp_sandboxes.providers._cleanup import removed_on_failure
from mcp_sandboxes.providers._labels import owner_labels
from mcp_sandboxes.providers._spec_support import refuse_unsupported
from mcp_sandboxes.providers.base import (
    DEFAULT_CREATE_TIMEOUT_S,
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_FILE_TIMEOUT_S,
    OWNER_LABEL,
    Availability,
    ExecResult,
    ExecStream,
    ProviderLifecycle,
    Sandbox,
    SandboxSpec,
    check_exec_args,
)
from mcp_sandboxes.providers.remote._remote_shell import quote, wait_until
from mcp_sandboxes.providers.remote._remote_stream import QueuedStream, followed, run_collected, sole_exception
from mcp_sandboxes.providers.remote._remote_support import (
    CLEANUP_TIMEOUT_S,
    STATE_DIR,
)

CLI_TIMEOUT_S = 60.0
READ_CHUNK = 65536


def _gone(stderr: bytes) -> bool:
    text = stderr.decode(errors="replace").lower()
    return "not found" in text or "notfound" in text


class AppleContainerProvider(ProviderLifecycle):
    name = "apple"

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._cli = str(settings.get("cli_path") or "container")
        # Tests drive a stand-in CLI on Linux; a real run needs macOS.
        self._require_macos = not settings.get("cli_path")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> AppleContainerProvider:
        return cls(settings)

    async def cli(
        self, args: Sequence[str], *, stdin: bytes | None = None, limit_s: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            with anyio.fail_after(limit_s):
                return await anyio.run_process([self._cli, *args], input=stdin or b"", check=False)
        except FileNotFoundError:
            raise ProviderUnavailableError(
                f"apple: the container CLI ({self._cli}) is not installed: install it from "
                "https://github.com/apple/container/releases or set providers.apple.cli_path"
            ) from None

    async def check(self) -> Availability:
        if self._require_macos and sys.platform != "darwin":
            return Availability(
                provider=self.name,
                available=False,
                reason=f"Apple container runs only on macOS 26+ with Apple silicon; this machine is {sys.platform}",
                fix="use the docker or podman provider on this machine",
            )
        if shutil.which(self._cli) is None:
            return Availability(
                provider=self.name,
                available=False,
                reason=f"the container CLI ({self._cli}) is not on PATH",
                fix="install it from https://github.com/apple/container/releases, or set providers.apple.cli_path",
            )
        try:
            status = await self.cli(["system", "status"])
        except (ProviderError, TimeoutError) as exc:
            return Availability(provider=self.name, available=False, reason=str(exc))
        if status.returncode != 0:
            return Availability(
                provider=self.name,
                available=False,
                reason=f"container system status failed: {status.stderr.decode(errors='replace').strip()}",
                fix="start the service with `container system start`",
            )
        return Availability(provider=self.name, available=True)

    async def create(self, spec: SandboxSpec) -> Sandbox:
        refuse_unsupported(spec, self.name)
        container_id = "mcp-" + secrets.token_hex(8)
        labels = owner_labels(spec)
        args = ["run", "-d", "--name", container_id]
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        for key, value in spec.env.items():
            args += ["-e", f"{key}={value}"]
        if spec.network == "none":
            args += ["--network", "none"]
        if spec.limits.cpus:
            args += ["--cpus", str(math.ceil(spec.limits.cpus))]
        if spec.limits.memory_mb:
            args += ["--memory", f"{spec.limits.memory_mb}M"]
        for mount in spec.mounts:
            option = f"type=bind,source={mount.source},target={mount.target}"
            args += ["--mount", option + (",readonly" if mount.read_only else "")]
        # A long sleep as the init process keeps the VM up for exec; images without sleep do not fit.
        args += [spec.image, "sleep", "2147483647"]
        async with removed_on_failure(partial(self.destroy, container_id), cleanup_timeout_s=CLEANUP_TIMEOUT_S):
            result = await self.cli(args, limit_s=DEFAULT_CREATE_TIMEOUT_S)
            if result.returncode != 0:
                message = result.stderr.decode(errors="replace").strip()
                if "notfound" in message.lower() and spec.image in message:
                    raise InvalidInputError("image", f"apple: image {spec.image!r} could not be found ({message})")
                raise ProviderError(f"apple: container run failed: {message}")
            sandbox = AppleSandbox(self, container_id, spec.workdir, spec.user)
            made = await sandbox.exec(["mkdir", "-p", spec.workdir], cwd="/", user="0", timeout=CLI_TIMEOUT_S)
            if not made.ok:
                raise ProviderError(f"apple: could not create {spec.workdir}: {made.stderr.decode(errors='replace')}")
        return sandbox

    async def _containers(self) -> list[dict[str, Any]]:
        result = await self.cli(["list", "--all", "--format", "json"])
        if result.returncode != 0:
            raise ProviderError(f"apple: container list failed: {result.stderr.decode(errors='replace').strip()}")
        items = json.loads(result.stdout or b"[]")
        return [item for item in items if isinstance(item, dict)]

    @staticmethod
    def _owned(item: Mapping[str, Any]) -> bool:
        return bool(item.get("configuration", {}).get("labels", {}).get(OWNER_LABEL) == "true")

    @staticmethod
    def _id(item: Mapping[str, Any]) -> str:
        return str(item.get("id") or item.get("configuration", {}).get("id", ""))

    async def attach(self, sandbox_id: str) -> Sandbox | None:
        for item in await self._containers():
            if self._id(item) == sandbox_id and self._owned(item):
                status = item.get("status")
                state = status.get("state") if isinstance(status, dict) else status
                return AppleSandbox(self, sandbox_id, None, None) if state == "running" else None
        return None

    async def destroy(self, sandbox_id: str) -> None:
        result = await self.cli(["delete", "--force", sandbox_id])
        if result.returncode != 0 and not _gone(result.stderr):
            raise ProviderError(f"apple: container delete failed: {result.stderr.decode(errors='replace').strip()}")

    async def list_owned(self) -> list[str]:
        return [self._id(item) for item in await self._containers() if self._owned(item)]

    async def aclose(self) -> None:
        return None


class AppleSandbox:
    provider = "apple"

    def __init__(self, owner: AppleContainerProvider, container_id: str, workdir: str | None, user: str | None) -> None:
        self.id = container_id
        self._owner = owner
        self._workdir = workdir
        self._user = user

    def exec_args(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None, cwd: str | None, user: str | None, stdin: bool
    ) -> list[str]:
        if not argv:
            raise InvalidInputError("argv", "the command is empty")
        args = ["exec"]
        if stdin:
            args.append("-i")
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        if cwd or self._workdir:
            args += ["--workdir", str(cwd or self._workdir)]
        name = user if user is not None else self._user
        if name:
            args += ["--user", name]
        return [*args, self.id, *argv]

    def _check_gone(self, returncode: int, stderr: bytes) -> None:
        if returncode != 0 and _gone(stderr) and self.id in stderr.decode(errors="replace"):
            raise SandboxGoneError(f"apple: container {self.id} is gone")

    async def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT_S,  # noqa: ASYNC109 - the Sandbox protocol's parameter
    ) -> ExecResult:
        check_exec_args(argv, env, cwd, user)
        process = self.stream(argv, env=env, cwd=cwd, user=user)
        result = await run_collected(process, provider="apple", argv=argv, stdin=stdin, timeout=timeout)
        self._check_gone(result.exit_code, result.stderr)
        return result

    @asynccontextmanager
    async def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[ExecStream]:
        check_exec_args(argv, env, cwd, user)
        tag = secrets.token_hex(8)
        pid_file = f"{STATE_DIR}/{tag}.pid"
        # Record the pid before exec, so signals (SIGKILL included) can reach the process itself.
        wrapped = ["sh", "-c", 'mkdir -p "${0%/*}" && echo $$ >"$0" && exec "$@"', pid_file, *argv]
        args = self.exec_args(wrapped, env=env, cwd=cwd, user=user, stdin=True)
        process = await anyio.open_process([self._owner._cli, *args])
        stream = AppleProcess(self, process, pid_file)
        try:
            async with followed(stream, stream.pump, stream.stop, cleanup_timeout_s=CLEANUP_TIMEOUT_S) as started:
                yield started
        except BaseExceptionGroup as group:
            raise sole_exception(group) from None
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                await process.aclose()

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        script = 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$0" "$1"'
        args = self.exec_args(["sh", "-c", script, format(mode, "o"), path], env=None, cwd="/", user=user, stdin=True)
        result = await self._owner.cli(args, stdin=data, limit_s=DEFAULT_FILE_TIMEOUT_S)
        self._check_gone(result.returncode, result.stderr)
        if result.returncode != 0:
            raise ProviderError(f"apple: writing {path} failed: {result.stderr.decode(errors='replace').strip()}")

    async def get_file(self, path: str) -> bytes:
        args = self.exec_args(["cat", "--", path], env=None, cwd="/", user="0", stdin=False)
        result = await self._owner.cli(args, limit_s=DEFAULT_FILE_TIMEOUT_S)
        self._check_gone(result.returncode, result.stderr)
        if result.returncode != 0:
            raise NotFoundError(f"apple: {path} cannot be read: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout


class AppleProcess(QueuedStream):
    def __init__(self, sandbox: AppleSandbox, process: anyio.abc.Process, pid_file: str) -> None:
        super().__init__()
        self._sandbox = sandbox
        self._process = process
        self._pid_file = pid_file

    async def pump(self) -> None:
        async def read(stream: anyio.abc.ByteReceiveStream | None, name: str) -> None:
            if stream is None:
                return
            async for chunk in stream:
                await self.output.put(name, chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read, self._process.stdout, "stdout")
            tg.start_soon(read, self._process.stderr, "stderr")
        self.output.finish(await self._process.wait())

    async def send_stdin(self, data: bytes) -> None:
        if self._process.stdin is not None:
            try:
                await self._process.stdin.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the process already ended

    async def close_stdin(self) -> None:
        if self._process.stdin is not None:
            await self._process.stdin.aclose()

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self.output.ended:
            return
        pid = quote([self._pid_file])
        script = wait_until(f"-s {pid}") + f'kill -{int(signum)} "$(cat {pid})"'
        args = self._sandbox.exec_args(["sh", "-c", script], env=None, cwd="/", user="0", stdin=False)
        result = await self._sandbox._owner.cli(args)
        if result.returncode != 0 and not self.output.ended:
            raise ProviderError(f"apple: signal {signum} failed: {result.stderr.decode(errors='replace').strip()}")

    async def stop(self) -> None:
        """Kill the command unless it ended, and remove its pid file."""
        if not self.output.ended:
            await self.signal(_signal.SIGKILL)
            # The reader task may be cancelled with the caller; wait on the CLI itself.
            await self._process.wait()
        await self._sandbox._owner.cli(["exec", self._sandbox.id, "rm", "-f", self._pid_file])


__all__ = ["AppleContainerProvider", "AppleSandbox"]
