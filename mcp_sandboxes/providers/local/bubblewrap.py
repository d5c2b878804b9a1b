"""Bubblewrap provider: daemon-less local sandboxes made of Linux namespaces.

A sandbox is a directory on the host (`state_dir/<id>/`): its workspace, private /tmp and
home, generated /etc/passwd and /etc/group, and `sandbox.json` (spec, labels, cgroups), so
a restarted server can `attach` to it and `list_owned` finds it. While the sandbox is in
use, a small holder process (see _bwrap_holder) keeps its user and pid namespaces alive;
every command is its own `bwrap --userns --pidns --unshare-ipc --unshare-uts
[--unshare-net] --die-with-parent --new-session` joining them, so pids are shared between
commands and background processes live on until the sandbox is destroyed, as in a
container. Network "none" gives each command its own network namespace with only `lo`
(loopback is not shared between commands); "host" shares the host's network.

Image: `host` binds the host's /usr, /bin, /sbin, /lib*, /etc read-only (files under /etc
that the host keeps from other users, like /etc/shadow, are masked); an absolute path
is a root directory (e.g. a debootstrap tree) bound read-only; a name found in the `images`
table maps to such a directory (or "host"); any other name uses the `rootfs` setting (the
host when empty). `/` is a tmpfs made read-only after the binds: writable are only the
workspace (at spec.workdir), /tmp, the home of spec.user, and mounts with read_only=false.
The root needs /bin/sh (the holder, and the exec shim that turns a missing program into
exit 127).

Users: a user namespace made without privileges maps exactly one uid, so a sandbox has one
user, spec.user (root when unset), whose uid and gid come from the root's /etc/passwd (a
name it lacks, e.g. `agent` with image `host`, is added to the generated passwd with the
first free uid from `default_uid`). Underneath it is the server's own host uid. A command
asking for root (`user="0"`) runs as that same user: inside a read-only root, root could do
nothing more. Asking for any other user is an error. chown to another uid fails (EINVAL).

Limits: see _bwrap_limits (cgroup v2 or v1 when writable, else RLIMIT_AS via prlimit);
`BubblewrapProvider.enforced_limits` says which hold here. The sandbox's cgroups are bound
read-only at /sys/fs/cgroup/<controller> (v1) or /sys/fs/cgroup (v2), so programs that size
themselves from cgroup limits (Node does) see them.

Settings (`[providers.bubblewrap]`): state_dir, rootfs, images, bwrap_path, limits_method
("auto" | "cgroup" | "rlimit" | "none"), cgroup_parent, default_uid.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field

from mcp_sandboxes.errors import (
    InvalidInputError,
    McpSandboxesError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
)
from mcp_sandboxes.providers._cleanup import removed_on_failure
from mcp_sandboxes.providers._settings import validated
from mcp_sandboxes.providers._spec_support import refuse_unsupported
from mcp_sandboxes.providers.base import (
    DEFAULT_CREATE_TIMEOUT_S,
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_FILE_TIMEOUT_S,
    Availability,
    ExecResult,
    ProviderLifecycle,
    SandboxSpec,
    check_exec_args,
)
from mcp_sandboxes.providers.local import _bwrap_root as rootfs
from mcp_sandboxes.providers.local._bwrap_holder import Holder, start_holder
from mcp_sandboxes.providers.local._bwrap_limits import Limiter, LimitsMethod, probe_limiter, remove_cgroups
from mcp_sandboxes.providers.local._local_process import (
    EXEC_SHIM,
    LiveStreams,
    LocalExecStream,
    exec_collected,
    run_process,
)
from mcp_sandboxes.providers.local._local_state import (
    DESTROY_TIMEOUT_S,
    ResolveInSandbox,
    SandboxDirs,
    ensure_present,
    is_sandbox_id,
    list_labelled,
    list_sandbox_dirs,
    new_metadata,
    new_sandbox_id,
    read_beneath,
    read_metadata,
    remove_tree,
    resolve_state_dir,
    write_beneath,
    write_metadata,
)

logger = logging.getLogger(__name__)

PROVIDER_NAME = "bubblewrap"
ID_PREFIX = "bwrap"
CHECK_TIMEOUT_S = 10.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_FIX_INSTALL = "apt-get install bubblewrap (scripts/setup-system.sh does it)"
_FIX_USERNS = (
    "enable unprivileged user namespaces: sysctl -w user.max_user_namespaces=15000"
    " (and kernel.unprivileged_userns_clone=1 on Debian kernels,"
    " kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04+)"
)


BWRAP_PID_RACE = b"bwrap: Can't send pid"
BWRAP_SETUP_RETRIES = 2


class BubblewrapSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_dir: str = Field(default="", description="Where sandboxes live; empty: <data dir>/sandboxes/bubblewrap.")
    rootfs: str = Field(default="", description="Root directory for images not in `images`; empty: the host.")
    images: dict[str, str] = Field(default_factory=dict, description="Image name -> root directory (or 'host').")
    bwrap_path: str = "bwrap"
    limits_method: LimitsMethod = "auto"
    cgroup_parent: str = Field(default="", description="cgroup path for sandbox cgroups; empty: our own cgroup.")
    default_uid: int = Field(default=1000, ge=1, description="First uid for a user name the root fs lacks.")


@dataclass(frozen=True)
class _Layout:
    """What every command of one sandbox shares: its spec, its one user, binds and cgroups."""

    spec: SandboxSpec
    users: list[rootfs.UserEntry]
    uid: int
    gid: int
    home: str
    cgroups: list[str]
    root_args: list[str]
    bind_args: list[str]

    def mount_args(self, *, dev: bool) -> list[str]:
        """The whole file system: the read-only root, fresh /proc (and /dev), the binds, then
        `/` made read-only. The holder goes without /dev: mounting devpts makes bwrap put
        the command in a nested user namespace, which commands could then not join."""
        devices = ["--dev", "/dev"] if dev else []
        return [*self.root_args, "--proc", "/proc", *devices, *self.bind_args, "--remount-ro", "/"]


class BubblewrapProvider(ProviderLifecycle):
    name = PROVIDER_NAME

    def __init__(self, settings: BubblewrapSettings | None = None) -> None:
        self.settings = settings or BubblewrapSettings()
        self.state_dir = resolve_state_dir(self.settings.state_dir, PROVIDER_NAME)
        self._limiter: Limiter | None = None
        self._holders: dict[str, Holder] = {}
        self._holder_locks: dict[str, anyio.Lock] = {}
        self.live = LiveStreams()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BubblewrapProvider:
        return cls(validated(BubblewrapSettings, settings, PROVIDER_NAME))

    def exposes_host(self, spec: SandboxSpec) -> bool:
        """Whether the sandbox would see the host's own root (read-only, yet with every file the
        server's user may read): no boundary for an agent's reads."""
        try:
            root = rootfs.resolve_image(spec.image, default_rootfs=self.settings.rootfs, images=self.settings.images)
        except McpSandboxesError:
            return False
        return root.path == "/"

    # -- engine --------------------------------------------------------------------------

    def bwrap(self) -> str:
        found = shutil.which(self.settings.bwrap_path)
        if found is None:
            raise ProviderUnavailableError(f"bubblewrap: {self.settings.bwrap_path!r} not found; {_FIX_INSTALL}")
        return found

    async def limiter(self) -> Limiter:
        if self._limiter is None:
            self._limiter = await anyio.to_thread.run_sync(
                probe_limiter, self.settings.limits_method, self.settings.cgroup_parent
            )
            logger.info(
                "bubblewrap limits: %s, enforcing %s%s",
                self._limiter.method,
                sorted(self._limiter.enforces) or "nothing",
                f" ({self._limiter.detail})" if self._limiter.detail else "",
            )
        return self._limiter

    @property
    def enforced_limits(self) -> frozenset[str]:
        """The limits that hold here (known after the first check or create)."""
        return self._limiter.enforces if self._limiter is not None else frozenset()

    async def check(self) -> Availability:
        def unavailable(reason: str, fix: str | None) -> Availability:
            return Availability(provider=PROVIDER_NAME, available=False, reason=reason, fix=fix)

        try:
            bwrap = self.bwrap()
        except ProviderUnavailableError:
            return unavailable(f"{self.settings.bwrap_path!r} is not installed or not on PATH", _FIX_INSTALL)
        max_namespaces = await _read_int("/proc/sys/user/max_user_namespaces")
        if max_namespaces == 0:
            return unavailable("user namespaces are disabled (user.max_user_namespaces = 0)", _FIX_USERNS)
        if await _read_int("/proc/sys/kernel/unprivileged_userns_clone") == 0 and os.geteuid() != 0:
            return unavailable("unprivileged user namespaces are disabled", _FIX_USERNS)
        if self.settings.rootfs:
            try:
                rootfs.resolve_image("", default_rootfs=self.settings.rootfs, images={})
            except McpSandboxesError as exc:
                fix = "set providers.bubblewrap.rootfs to a root directory, or empty for the host"
                return unavailable(str(exc), fix)
        probe = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--", "true"]
        try:
            with anyio.fail_after(CHECK_TIMEOUT_S):
                result = await anyio.run_process(probe, check=False, stdin=subprocess.DEVNULL)
        except TimeoutError:
            return unavailable(f"bwrap did not start a sandbox within {CHECK_TIMEOUT_S:g}s", None)
        except OSError as exc:
            return unavailable(f"cannot run {bwrap}: {exc.strerror or exc}", _FIX_INSTALL)
        if result.returncode != 0:
            detail = result.stderr.decode("utf-8", "replace").strip()
            if "namespace" in detail or "uid map" in detail or "Permission denied" in detail:
                return unavailable(f"bwrap cannot create user namespaces here: {detail}", _FIX_USERNS)
            return unavailable(f"bwrap failed to start a sandbox: {detail}", None)
        limiter = await self.limiter()
        enforced = ", ".join(sorted(limiter.enforces)) or "none"
        return Availability(
            provider=PROVIDER_NAME, available=True, reason=f"limits via {limiter.method}; enforced: {enforced}"
        )

    async def validate_spec(self, spec: SandboxSpec) -> None:
        await anyio.to_thread.run_sync(self._validate_spec, spec)

    def _validate_spec(self, spec: SandboxSpec) -> rootfs.RootFs:
        refuse_unsupported(spec, self.name)
        root = rootfs.resolve_image(spec.image, default_rootfs=self.settings.rootfs, images=self.settings.images)
        _absolute(spec.workdir, "workdir")
        if posixpath.normpath(spec.workdir) in ("/", "/tmp", "/proc", "/dev", "/sys", "/etc"):
            raise InvalidInputError("workdir", f"{spec.workdir!r} cannot be the workspace; use e.g. /workspace")
        for index, mount in enumerate(spec.mounts):
            _absolute(mount.target, f"mounts[{index}].target")
            if not os.path.isabs(mount.source) or not os.path.exists(mount.source):
                raise InvalidInputError(f"mounts[{index}].source", f"{mount.source} does not exist on the host")
        for key, value in spec.env.items():
            if not key or "=" in key or "\x00" in key or "\x00" in value:
                raise InvalidInputError(f"env.{key}", "names must be non-empty without '=' or NUL; values without NUL")
        cpu_count = os.cpu_count()
        if spec.limits.cpus is not None and cpu_count and spec.limits.cpus > cpu_count:
            raise InvalidInputError(
                "cpus", f"{spec.limits.cpus:g} asked, but this host has {cpu_count}; use at most {cpu_count}"
            )
        return root

    # -- lifecycle -----------------------------------------------------------------------

    def _dirs(self, sandbox_id: str) -> SandboxDirs:
        return SandboxDirs(self.state_dir / sandbox_id)

    async def create(self, spec: SandboxSpec) -> BubblewrapSandbox:
        if self._closed:
            raise ProviderError("the bubblewrap provider is closed; build a new one")
        self.bwrap()
        limiter = await self.limiter()
        unenforced = limiter.unenforced(spec.limits)
        if unenforced:
            logger.warning(
                "bubblewrap: limits %s are not enforced here (limits via %s); the sandbox runs without them",
                ", ".join(unenforced),
                limiter.method,
            )
        sandbox_id = new_sandbox_id(ID_PREFIX)
        async with removed_on_failure(partial(self.destroy, sandbox_id), cleanup_timeout_s=DESTROY_TIMEOUT_S):
            with anyio.fail_after(DEFAULT_CREATE_TIMEOUT_S):
                layout = await anyio.to_thread.run_sync(self._make, sandbox_id, spec, limiter)
                sandbox = BubblewrapSandbox(self, sandbox_id, layout)
                # Started now, not at the first command: a bad bind fails create, not a turn.
                await self.holder(sandbox_id, layout)
        return sandbox

    def _make(self, sandbox_id: str, spec: SandboxSpec, limiter: Limiter) -> _Layout:
        root = self._validate_spec(spec)
        dirs = self._dirs(sandbox_id)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        dirs.make()
        passwd = rootfs.read_text(root.etc_file("passwd"))
        group = rootfs.read_text(root.etc_file("group"))
        user = rootfs.lookup_user(rootfs.parse_passwd(passwd), spec.user)
        if user is None:
            assert spec.user is not None  # lookup_user always knows root
            passwd, group, user = rootfs.add_user(passwd, group, spec.user, self.settings.default_uid)
        (dirs.etc / "passwd").write_text(passwd, "utf-8")
        (dirs.etc / "group").write_text(group, "utf-8")
        metadata: dict[str, Any] = {
            **new_metadata(sandbox_id, PROVIDER_NAME, spec),
            "root": {"path": root.path, "entries": list(root.entries) if root.entries is not None else None},
            "user": {"uid": user.uid, "gid": user.gid, "home": _home_of(user)},
            "cgroups": [],
        }
        write_metadata(dirs, metadata)
        # Written before and after: a crash in between leaves nothing destroy cannot find.
        metadata["cgroups"] = limiter.create(sandbox_id, spec.limits)
        write_metadata(dirs, metadata)
        return self._layout(sandbox_id, metadata)

    def _layout(self, sandbox_id: str, metadata: dict[str, Any]) -> _Layout:
        """Blocking: the mount plan lists directories of the root."""
        dirs = self._dirs(sandbox_id)
        spec = SandboxSpec.model_validate(metadata["spec"])
        entries = metadata["root"]["entries"]
        root = rootfs.RootFs(path=metadata["root"]["path"], entries=tuple(entries) if entries is not None else None)
        user = metadata["user"]
        home = str(user["home"])
        cgroups = [(str(controller), str(directory)) for controller, directory in metadata["cgroups"]]
        binds: list[tuple[str, list[str]]] = [
            ("/tmp", ["--bind", str(dirs.tmp), "/tmp"]),
            (spec.workdir, ["--bind", str(dirs.workspace), spec.workdir]),
            ("/etc/passwd", ["--ro-bind", str(dirs.etc / "passwd"), "/etc/passwd"]),
            ("/etc/group", ["--ro-bind", str(dirs.etc / "group"), "/etc/group"]),
        ]
        if posixpath.normpath(home) != posixpath.normpath(spec.workdir):
            binds.append((home, ["--bind", str(dirs.home), home]))
        for controller, directory in cgroups:
            inside = posixpath.join("/sys/fs/cgroup", controller) if controller else "/sys/fs/cgroup"
            binds.append((inside, ["--ro-bind", directory, inside]))
        for mount in spec.mounts:
            binds.append((mount.target, ["--ro-bind" if mount.read_only else "--bind", mount.source, mount.target]))
        # Parents before children: /home/agent must exist before /home/agent/work is bound on it.
        binds.sort(key=lambda bind: posixpath.normpath(bind[0]).count("/"))
        bind_args: list[str] = []
        for _, bind in binds:
            bind_args += bind
        return _Layout(
            spec=spec,
            users=rootfs.parse_passwd(rootfs.read_text(dirs.etc / "passwd")),
            uid=int(user["uid"]),
            gid=int(user["gid"]),
            home=home,
            cgroups=[directory for _, directory in cgroups],
            root_args=rootfs.root_args(root, [target for target, _ in binds]),
            bind_args=bind_args,
        )

    async def holder(self, sandbox_id: str, layout: _Layout) -> Holder:
        """The sandbox's running holder, started if there is none (first use after a restart,
        or after something killed it: the sandbox's processes are gone then, its files stay)."""
        lock = self._holder_locks.setdefault(sandbox_id, anyio.Lock())
        async with lock:
            current = self._holders.get(sandbox_id)
            if current is not None and current.alive:
                return current
            if current is not None:
                await current.stop()
            if self._closed:
                raise ProviderError("the bubblewrap provider is closed; build a new one")
            limiter = await self.limiter()
            bwrap_args = [
                self.bwrap(),
                "--unshare-all",
                "--uid",
                str(layout.uid),
                "--gid",
                str(layout.gid),
                "--die-with-parent",
                *layout.mount_args(dev=False),
            ]
            started = await start_holder(limiter.wrap([], layout.cgroups, layout.spec.limits), bwrap_args, ())
            self._holders[sandbox_id] = started
            return started

    async def attach(self, sandbox_id: str) -> BubblewrapSandbox | None:
        if not is_sandbox_id(sandbox_id):
            return None
        dirs = self._dirs(sandbox_id)
        metadata = await anyio.to_thread.run_sync(read_metadata, dirs)
        if metadata is None or metadata.get("provider") != PROVIDER_NAME:
            return None
        try:
            layout = await anyio.to_thread.run_sync(self._layout, sandbox_id, metadata)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise ProviderError(f"sandbox {sandbox_id}: its metadata {dirs.metadata} is damaged ({exc})") from exc
        return BubblewrapSandbox(self, sandbox_id, layout)

    async def destroy(self, sandbox_id: str) -> None:
        if not is_sandbox_id(sandbox_id):
            return
        with anyio.CancelScope(shield=True), anyio.fail_after(DESTROY_TIMEOUT_S):
            holder = self._holders.pop(sandbox_id, None)
            self._holder_locks.pop(sandbox_id, None)
            if holder is not None:
                await holder.stop()
            await self.live.kill(sandbox_id)
            dirs = self._dirs(sandbox_id)
            metadata = await anyio.to_thread.run_sync(read_metadata, dirs)
            cgroups = [str(directory) for _, directory in metadata.get("cgroups", [])] if metadata else []
            await anyio.to_thread.run_sync(remove_cgroups, cgroups)
            await anyio.to_thread.run_sync(remove_tree, dirs.root)

    async def list_owned(self) -> list[str]:
        return await anyio.to_thread.run_sync(list_sandbox_dirs, self.state_dir, ID_PREFIX)

    async def list_labelled(self, labels: Mapping[str, str]) -> list[str]:
        return await anyio.to_thread.run_sync(list_labelled, self.state_dir, ID_PREFIX, dict(labels))

    async def aclose(self) -> None:
        """Stops every holder (the sandboxes' processes end; their directories stay, so a
        new provider can attach to them)."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            for holder in list(self._holders.values()):
                await holder.stop()
            self._holders.clear()

    async def __aenter__(self) -> BubblewrapProvider:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class BubblewrapSandbox:
    provider = PROVIDER_NAME

    def __init__(self, owner: BubblewrapProvider, sandbox_id: str, layout: _Layout) -> None:
        self.id = sandbox_id
        self._owner = owner
        self._layout = layout
        self._dirs = owner._dirs(sandbox_id)

    def __repr__(self) -> str:
        return f"BubblewrapSandbox({self.id})"

    @property
    def spec(self) -> SandboxSpec:
        return self._layout.spec

    @property
    def host_dir(self) -> Path:
        """The sandbox's directory on the host (workspace/, tmp/, home/, etc/, sandbox.json)."""
        return self._dirs.root

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
        for attempt in range(BWRAP_SETUP_RETRIES + 1):
            result = await exec_collected(
                self.stream(argv, env=env, cwd=cwd, user=user), argv, stdin=stdin, timeout=timeout
            )
            # bwrap now and then fails to hand the joined pid namespace its child's pid under load
            # ("Can't send pid"); that is before the command starts, so running it again is safe.
            if not (result.exit_code == 1 and not result.stdout and result.stderr.startswith(BWRAP_PID_RACE)):
                break
            logger.debug("bwrap pid hand-over failed (attempt %d); retrying", attempt + 1)
        return result

    def _check_user(self, user: str | None) -> None:
        if user is None or user in ("0", "root", "0:0"):
            return
        entry = rootfs.lookup_user(self._layout.users, user)
        if entry is None or entry.uid != self._layout.uid:
            raise InvalidInputError(
                "user",
                f"{user!r}: a bubblewrap sandbox runs every command as its one user"
                f" (uid {self._layout.uid}, spec.user {self._layout.spec.user or 'root'}); omit user or use that one",
            )

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
        self._check_user(user)
        await ensure_present(self._dirs, self.id)
        layout = self._layout
        environment = {"PATH": DEFAULT_PATH, "HOME": layout.home, **layout.spec.env, **(env or {})}
        limiter = await self._owner.limiter()
        holder = await self._owner.holder(self.id, layout)
        with _joined(holder) as (userns_fd, pidns_fd):
            options = [
                "--userns",
                str(userns_fd),
                "--pidns",
                str(pidns_fd),
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-cgroup-try",
                *(["--unshare-net"] if layout.spec.network == "none" else []),
                "--hostname",
                self.id,
                "--die-with-parent",
                "--new-session",
                *layout.mount_args(dev=True),
                "--uid",
                str(layout.uid),
                "--gid",
                str(layout.gid),
                "--chdir",
                posixpath.normpath(cwd or layout.spec.workdir),
                "--clearenv",
            ]
            for key, value in environment.items():
                options += ["--setenv", key, value]
            # Options go through a memfd (`--args`): environment values (API keys) never show
            # up in the host's world-readable /proc/<pid>/cmdline.
            with _args_memfd(options) as args_fd:
                command = [self._owner.bwrap(), "--args", str(args_fd), "--", *EXEC_SHIM, *argv]
                async with run_process(
                    limiter.wrap(command, layout.cgroups, layout.spec.limits),
                    env={"PATH": os.environ.get("PATH", DEFAULT_PATH)},
                    program=argv[0],
                    pass_fds=(args_fd, userns_fd, pidns_fd),
                    signal_groups=_command_group,
                    live=self._owner.live.of(self.id),
                ) as process:
                    yield process

    # -- files ---------------------------------------------------------------------------

    def _host_side(self, path: str) -> tuple[Path, str] | None:
        """The host directory and relative path for a sandbox path in a read-write bind we
        own (workspace, /tmp, home), unless a user mount covers it."""
        layout = self._layout
        for mount in layout.spec.mounts:
            target = posixpath.normpath(mount.target)
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return None
        bases = [(layout.spec.workdir, self._dirs.workspace), ("/tmp", self._dirs.tmp), (layout.home, self._dirs.home)]
        best: tuple[Path, str] | None = None
        best_length = -1
        for inside, host in bases:
            inside = posixpath.normpath(inside)
            if path.startswith(inside.rstrip("/") + "/") and len(inside) > best_length:
                best, best_length = (host, path[len(inside) :].lstrip("/")), len(inside)
        return best

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        """Written straight into the host-side directory when the path is in a writable bind
        (files there belong to the sandbox's one user either way); otherwise by a command."""
        path = _absolute(path, "path")
        if posixpath.basename(path) in ("", ".", ".."):
            raise InvalidInputError("path", f"{path!r} names a directory; give the file's path")
        if not 0 <= mode <= 0o7777:
            raise InvalidInputError("mode", f"{mode:o} is not a file mode; use e.g. 0o644")
        self._check_user(user)
        await ensure_present(self._dirs, self.id)
        target = self._host_side(path)
        if target is not None:
            try:
                with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
                    await anyio.to_thread.run_sync(write_beneath, target[0], target[1], data, mode)
                return
            except ResolveInSandbox:
                pass  # a symlink on the way: only the sandbox can resolve it
            except IsADirectoryError as exc:
                raise InvalidInputError("path", f"{path} is a directory in sandbox {self.id}") from exc
            except OSError as exc:
                raise InvalidInputError("path", f"cannot write {path} in sandbox {self.id}: {exc.strerror}") from exc
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" -- "$1"'
        result = await self.exec(
            ["sh", "-c", script, "sh", path, f"{mode:o}"], stdin=data, timeout=DEFAULT_FILE_TIMEOUT_S
        )
        if not result.ok:
            detail = result.stderr.decode("utf-8", "replace").strip()
            raise InvalidInputError("path", f"cannot write {path} in sandbox {self.id}: {detail}")

    async def get_file(self, path: str) -> bytes:
        path = _absolute(path, "path")
        await ensure_present(self._dirs, self.id)
        source = self._host_side(path)
        if source is not None:
            try:
                with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
                    return await anyio.to_thread.run_sync(read_beneath, source[0], source[1])
            except ResolveInSandbox:
                pass
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise NotFoundError(f"path: {path} does not exist in sandbox {self.id}") from exc
            except IsADirectoryError as exc:
                raise InvalidInputError("path", f"{path} is a directory; give a file's path") from exc
            except OSError as exc:
                raise InvalidInputError("path", f"cannot read {path} in sandbox {self.id}: {exc.strerror}") from exc
        script = 'if [ -d "$1" ]; then echo "is a directory" >&2; exit 3; fi; exec cat -- "$1"'
        result = await self.exec(["sh", "-c", script, "sh", path], timeout=DEFAULT_FILE_TIMEOUT_S)
        if result.ok:
            return result.stdout
        detail = result.stderr.decode("utf-8", "replace").strip()
        if result.exit_code == 3:
            raise InvalidInputError("path", f"{path} is a directory; give a file's path")
        if "No such file" in detail or "not found" in detail:
            raise NotFoundError(f"path: {path} does not exist in sandbox {self.id}")
        raise InvalidInputError("path", f"cannot read {path} in sandbox {self.id}: {detail}")


# -- helpers ---------------------------------------------------------------------------------


def _home_of(user: rootfs.UserEntry) -> str:
    """Where the sandbox's own home is bound: the user's home, unless that is no place for a
    private directory (`/` for an unknown uid). A home equal to the workdir is the workspace."""
    home = posixpath.normpath(user.home)
    if home in ("/", "/tmp", "/proc", "/dev", "/sys", "/etc") or not home.startswith("/"):
        home = "/root" if user.uid == 0 else f"/home/{user.name}"
    return home


def _absolute(path: str, field: str) -> str:
    if not path.startswith("/") or "\x00" in path:
        raise InvalidInputError(field, f"{path!r} must be an absolute path inside the sandbox, e.g. /workspace")
    return posixpath.normpath(path)


@contextmanager
def _joined(holder: Holder) -> Iterator[tuple[int, int]]:
    """Our own copies of the holder's namespace fds for one command: a destroy that closes
    the holder's fds meanwhile cannot hand bwrap a reused fd number."""
    userns_fd = os.dup(holder.userns_fd)
    try:
        pidns_fd = os.dup(holder.pidns_fd)
    except BaseException:
        os.close(userns_fd)
        raise
    try:
        yield userns_fd, pidns_fd
    finally:
        os.close(userns_fd)
        os.close(pidns_fd)


@contextmanager
def _args_memfd(options: list[str]) -> Iterator[int]:
    fd = os.memfd_create("bwrap-args", os.MFD_CLOEXEC)
    try:
        data = b"".join(option.encode() + b"\0" for option in options)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


async def _command_group(bwrap_pid: int) -> list[int]:
    """The command's process group: bwrap's only child is the command, which --new-session
    made a session (and group) leader, so the group holds it and the children it did not
    move elsewhere."""
    try:
        text = await anyio.Path(f"/proc/{bwrap_pid}/task/{bwrap_pid}/children").read_text()
    except OSError:
        return []
    return [int(pid) for pid in text.split()][:1]


async def _read_int(path: str) -> int | None:
    try:
        return int((await anyio.Path(path).read_text()).strip())
    except (OSError, ValueError):
        return None
