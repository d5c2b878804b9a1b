"""Process provider: NO ISOLATION. Commands run directly on the host, as the server's own user,
with the host's file system, network and processes. For developing the server on a machine
without bubblewrap or Docker; never for agents you do not trust.

What a "sandbox" is here: a directory (`state_dir/<id>/`) with a private home and tmp
(HOME and TMPDIR point there) and metadata for `attach`/`list_owned`. Its working directory:
- spec.workdir names an existing host directory: commands run in it (shared, like a bind
  mount; destroy leaves it alone);
- otherwise (the usual `/workspace`): a private `state_dir/<id>/workspace` stands in for it,
  and paths under spec.workdir given as `cwd` or to put_file/get_file are translated there.
  Commands see the real host path (`pwd` prints it); nothing else is translated.
`user` is ignored (commands run as the server's user) and no limits are enforced.
The environment is the spec's and the call's over a minimal base (PATH, HOME, TMPDIR):
the server's own environment, with its secrets, is not passed on.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field

from mcp_sandboxes.errors import InvalidInputError, NotFoundError, ProviderError
from mcp_sandboxes.providers._cleanup import removed_on_failure
from mcp_sandboxes.providers._settings import validated
from mcp_sandboxes.providers._spec_support import refuse_unsupported
from mcp_sandboxes.providers.base import (
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_FILE_TIMEOUT_S,
    Availability,
    ExecResult,
    ProviderLifecycle,
    SandboxSpec,
    check_exec_args,
)
from mcp_sandboxes.providers.local._local_process import (
    EXEC_SHIM,
    LiveStreams,
    LocalExecStream,
    exec_collected,
    run_process,
)
from mcp_sandboxes.providers.local._local_state import (
    DESTROY_TIMEOUT_S,
    SandboxDirs,
    ensure_present,
    is_sandbox_id,
    list_labelled,
    list_sandbox_dirs,
    new_metadata,
    new_sandbox_id,
    read_metadata,
    remove_tree,
    resolve_state_dir,
    write_metadata,
)

logger = logging.getLogger(__name__)

PROVIDER_NAME = "process"
ID_PREFIX = "proc"
NO_ISOLATION = (
    "the process provider isolates nothing: commands run directly on this host as the server's user,"
    " with its files, network and processes; use it for development only"
)


class ProcessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_dir: str = Field(default="", description="Where sandboxes live; empty: <data dir>/sandboxes/process.")


@dataclass(frozen=True)
class _Places:
    spec: SandboxSpec
    dirs: SandboxDirs
    workdir: Path  # the host directory commands start in
    private: bool  # workdir is our own stand-in for spec.workdir


class ProcessProvider(ProviderLifecycle):
    name = PROVIDER_NAME

    def __init__(self, settings: ProcessSettings | None = None) -> None:
        self.settings = settings or ProcessSettings()
        self.state_dir = resolve_state_dir(self.settings.state_dir, PROVIDER_NAME)
        self.live = LiveStreams()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ProcessProvider:
        return cls(validated(ProcessSettings, settings, PROVIDER_NAME))

    # Commands run as the server's own user: a sandbox user name means nothing here.
    ignores_user = True

    def exposes_host(self, spec: SandboxSpec) -> bool:
        """Always: a process sandbox is the host, as the server's own user."""
        return True

    async def check(self) -> Availability:
        logger.warning("%s", NO_ISOLATION)
        return Availability(provider=PROVIDER_NAME, available=True, reason=NO_ISOLATION)

    def _dirs(self, sandbox_id: str) -> SandboxDirs:
        return SandboxDirs(self.state_dir / sandbox_id)

    async def create(self, spec: SandboxSpec) -> ProcessSandbox:
        refuse_unsupported(spec, self.name)
        logger.warning("creating a process sandbox: %s", NO_ISOLATION)
        if not spec.workdir.startswith("/"):
            raise InvalidInputError("workdir", f"{spec.workdir!r} is not an absolute path; use e.g. /workspace")
        if any(value is not None for value in spec.limits.model_dump().values()):
            logger.warning("process provider: limits %s are not enforced", spec.limits.model_dump(exclude_none=True))
        sandbox_id = new_sandbox_id(ID_PREFIX)
        async with removed_on_failure(partial(self.destroy, sandbox_id), cleanup_timeout_s=DESTROY_TIMEOUT_S):
            metadata = await anyio.to_thread.run_sync(self._make, sandbox_id, spec)
        return ProcessSandbox(self, sandbox_id, self._places(sandbox_id, metadata))

    def _make(self, sandbox_id: str, spec: SandboxSpec) -> dict[str, Any]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        dirs = self._dirs(sandbox_id)
        dirs.make()
        metadata = {**new_metadata(sandbox_id, PROVIDER_NAME, spec), "shared_workdir": os.path.isdir(spec.workdir)}
        write_metadata(dirs, metadata)
        return metadata

    def _places(self, sandbox_id: str, metadata: dict[str, Any]) -> _Places:
        dirs = self._dirs(sandbox_id)
        spec = SandboxSpec.model_validate(metadata["spec"])
        if metadata.get("shared_workdir"):
            return _Places(spec=spec, dirs=dirs, workdir=Path(spec.workdir), private=False)
        return _Places(spec=spec, dirs=dirs, workdir=dirs.workspace, private=True)

    async def attach(self, sandbox_id: str) -> ProcessSandbox | None:
        if not is_sandbox_id(sandbox_id):
            return None
        metadata = await anyio.to_thread.run_sync(read_metadata, self._dirs(sandbox_id))
        if metadata is None or metadata.get("provider") != PROVIDER_NAME:
            return None
        try:
            places = self._places(sandbox_id, metadata)
        except (KeyError, ValueError) as exc:
            raise ProviderError(f"sandbox {sandbox_id}: its metadata is damaged ({exc})") from exc
        return ProcessSandbox(self, sandbox_id, places)

    async def destroy(self, sandbox_id: str) -> None:
        if not is_sandbox_id(sandbox_id):
            return
        with anyio.CancelScope(shield=True), anyio.fail_after(DESTROY_TIMEOUT_S):
            await self.live.kill(sandbox_id)
            await anyio.to_thread.run_sync(remove_tree, self._dirs(sandbox_id).root)

    async def list_owned(self) -> list[str]:
        return await anyio.to_thread.run_sync(list_sandbox_dirs, self.state_dir, ID_PREFIX)

    async def list_labelled(self, labels: Mapping[str, str]) -> list[str]:
        return await anyio.to_thread.run_sync(list_labelled, self.state_dir, ID_PREFIX, dict(labels))

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.live.kill_all()


class ProcessSandbox:
    provider = PROVIDER_NAME

    def __init__(self, owner: ProcessProvider, sandbox_id: str, places: _Places) -> None:
        self.id = sandbox_id
        self._owner = owner
        self._places = places

    def __repr__(self) -> str:
        return f"ProcessSandbox({self.id})"

    @property
    def host_home(self) -> str:
        """The sandbox's private HOME on the host (agents get it instead of /home/agent)."""
        return str(self._places.dirs.home)

    @property
    def workdir(self) -> Path:
        """The host directory commands start in."""
        return self._places.workdir

    def host_path(self, path: str) -> Path:
        """The host path for a sandbox path: under spec.workdir, the private stand-in."""
        path = posixpath.normpath(path)
        places = self._places
        workdir = posixpath.normpath(places.spec.workdir)
        if places.private and (path == workdir or path.startswith(workdir.rstrip("/") + "/")):
            return places.workdir / path[len(workdir) :].lstrip("/")
        return Path(path)

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
        return await exec_collected(self.stream(argv, env=env, cwd=cwd, user=user), argv, stdin=stdin, timeout=timeout)

    @asynccontextmanager
    async def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[LocalExecStream]:
        check_exec_args(argv, env, cwd, user)
        await ensure_present(self._places.dirs, self.id)
        places = self._places
        directory = self.host_path(cwd) if cwd is not None else places.workdir
        if not await anyio.Path(directory).is_dir():
            raise InvalidInputError("cwd", f"{cwd} is not a directory on this host; create it first")
        environment = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(places.dirs.home),
            "TMPDIR": str(places.dirs.tmp),
            **places.spec.env,
            **(env or {}),
        }
        async with run_process(
            [*EXEC_SHIM, *argv],
            env=environment,
            cwd=str(directory),
            program=argv[0],
            live=self._owner.live.of(self.id),
        ) as process:
            yield process

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        if not path.startswith("/") or posixpath.basename(posixpath.normpath(path)) in ("", ".", ".."):
            raise InvalidInputError("path", f"{path!r} must be an absolute path of a file, e.g. /workspace/notes.txt")
        if not 0 <= mode <= 0o7777:
            raise InvalidInputError("mode", f"{mode:o} is not a file mode; use e.g. 0o644")
        await ensure_present(self._places.dirs, self.id)
        target = self.host_path(path)
        try:
            with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
                await anyio.to_thread.run_sync(_write, target, data, mode)
        except IsADirectoryError as exc:
            raise InvalidInputError("path", f"{path} is a directory; give the file's path") from exc
        except OSError as exc:
            raise InvalidInputError("path", f"cannot write {path} ({target}): {exc.strerror or exc}") from exc

    async def get_file(self, path: str) -> bytes:
        if not path.startswith("/"):
            raise InvalidInputError("path", f"{path!r} must be an absolute path, e.g. /workspace/notes.txt")
        await ensure_present(self._places.dirs, self.id)
        source = self.host_path(path)
        try:
            with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
                return await anyio.Path(source).read_bytes()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFoundError(f"path: {path} does not exist in sandbox {self.id}") from exc
        except IsADirectoryError as exc:
            raise InvalidInputError("path", f"{path} is a directory; give a file's path") from exc
        except OSError as exc:
            raise InvalidInputError("path", f"cannot read {path} ({source}): {exc.strerror or exc}") from exc


def _write(target: Path, data: bytes, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
