"""On-host state of a local sandbox: a directory per sandbox (workspace, private /tmp, home,
generated /etc files) plus a JSON metadata file, so a new server process can `attach` to
and `list_owned` the sandboxes an earlier one made.

Files are read and written beneath those directories without ever following a symbolic
link: the sandbox controls their contents, and a link it planted (`ln -s /etc/shadow x`)
must not make the server, which may run as root, touch a host file outside the sandbox.
Everything here but `ensure_present` is blocking file-system work; callers run it in a
worker thread.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from mcp_sandboxes.errors import SandboxGoneError
from mcp_sandboxes.providers._labels import owner_labels
from mcp_sandboxes.providers.base import SandboxSpec

METADATA_FILE = "sandbox.json"
# Destroying a local sandbox (end its processes, remove its directory) takes at most this long.
DESTROY_TIMEOUT_S = 30.0
METADATA_VERSION = 1
_ID_PATTERN = re.compile(r"^[a-z]+-[0-9a-f]{16}$")


def new_sandbox_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def is_sandbox_id(value: str) -> bool:
    """Ids name directories: anything else (`..`, slashes) never reaches the file system."""
    return bool(_ID_PATTERN.match(value))


def resolve_state_dir(configured: str, provider: str) -> Path:
    """Where a provider keeps its sandboxes: the configured directory, else one under the data dir."""
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("MCP_SANDBOXES_DATA_DIR") or "~/.local/share/mcp-sandboxes"
    return Path(base).expanduser() / "sandboxes" / provider


def new_metadata(sandbox_id: str, provider: str, spec: SandboxSpec) -> dict[str, Any]:
    """What every local sandbox's metadata holds; providers add their own keys."""
    return {
        "id": sandbox_id,
        "provider": provider,
        "created_at": datetime.now(UTC).isoformat(),
        "spec": spec.model_dump(mode="json"),
        "labels": owner_labels(spec, sandbox_id),
    }


@dataclass(frozen=True, slots=True)
class SandboxDirs:
    root: Path

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def metadata(self) -> Path:
        return self.root / METADATA_FILE

    def make(self) -> None:
        self.root.mkdir(mode=0o700)
        for directory in (self.workspace, self.home, self.etc):
            directory.mkdir(mode=0o755)
        self.tmp.mkdir()
        # Sticky and world-writable like any /tmp (mkdir's mode is cut by the umask).
        self.tmp.chmod(0o1777)


async def ensure_present(dirs: SandboxDirs, sandbox_id: str) -> None:
    """SandboxGoneError unless the sandbox's metadata is still there (destroy removes it)."""
    if not await anyio.Path(dirs.metadata).exists():
        raise SandboxGoneError(f"sandbox {sandbox_id} no longer exists; create a new one")


def write_metadata(dirs: SandboxDirs, data: dict[str, Any]) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    temporary = dirs.root / f".{METADATA_FILE}.{uuid.uuid4().hex[:8]}"
    temporary.write_text(json.dumps({"version": METADATA_VERSION, **data}, indent=2), "utf-8")
    temporary.replace(dirs.metadata)


def read_metadata(dirs: SandboxDirs) -> dict[str, Any] | None:
    try:
        data = json.loads(dirs.metadata.read_text("utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or data.get("version") != METADATA_VERSION:
        return None
    return data


def list_sandbox_dirs(state_dir: Path, prefix: str) -> list[str]:
    """Every sandbox directory, with or without metadata: a crash between making the
    directory and writing its metadata leaves an orphan that `destroy` must still find."""
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if is_sandbox_id(name) and name.startswith(prefix + "-"))


def list_labelled(state_dir: Path, prefix: str, labels: Mapping[str, str]) -> list[str]:
    """The sandboxes whose metadata carries every one of `labels` (a directory without
    metadata carries none)."""
    found: list[str] = []
    for name in list_sandbox_dirs(state_dir, prefix):
        metadata = read_metadata(SandboxDirs(state_dir / name))
        own = (metadata or {}).get("labels")
        if isinstance(own, dict) and all(own.get(key) == value for key, value in labels.items()):
            found.append(name)
    return found


def remove_tree(path: Path) -> None:
    """rm -rf that also removes what the sandbox made unwritable (chmod 000 directories)."""

    def fix_and_retry(function: Callable[..., Any], failed: str, _exc: BaseException) -> None:
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
                shutil.rmtree(failed, ignore_errors=True)
            else:
                function(failed)
        except FileNotFoundError:
            pass

    if not (path.exists() or path.is_symlink()):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix_and_retry)
    else:
        shutil.rmtree(path, onerror=lambda function, failed, info: fix_and_retry(function, failed, info[1]))


class ResolveInSandbox(Exception):
    """A path component is a symbolic link (or the file is not a regular one): only the
    sandbox can resolve it, so the caller goes through a command run inside it."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_parent(base: Path, parts: list[str], *, create: bool) -> int:
    """An fd of the directory holding the last part; no component may be a symlink."""
    fd = os.open(base, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(fd, part):
                    raise ResolveInSandbox(part) from exc
                raise
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def write_beneath(base: Path, relative: str, data: bytes, mode: int) -> None:
    parts = [part for part in relative.split("/") if part]
    parent = _open_parent(base, parts, create=True)
    try:
        try:
            fd = os.open(
                parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ResolveInSandbox(parts[-1]) from exc
            raise
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def read_beneath(base: Path, relative: str) -> bytes:
    parts = [part for part in relative.split("/") if part]
    parent = _open_parent(base, parts, create=False)
    try:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ResolveInSandbox(parts[-1]) from exc
            raise
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            if not stat.S_ISREG(info.st_mode):
                raise ResolveInSandbox(parts[-1])  # a FIFO or device: let the sandbox read it
            chunks: list[bytes] = []
            while chunk := os.read(fd, 1024 * 1024):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        os.close(parent)
