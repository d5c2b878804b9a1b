"""containerd provider: one long-lived container per sandbox, driven through the `ctr` CLI.

By default it uses the containerd that dockerd starts (`/var/run/docker/containerd/
containerd.sock`), in a namespace of its own (`mcp-sandboxes`; Docker's `moby` is refused),
so Docker never sees our containers nor we its. Images live in that namespace: import them
from Docker (`docker save IMAGE | ctr -n mcp-sandboxes images import -`, done by
scripts/import-images.sh). Short names are normalized as Docker does (busybox ->
docker.io/library/busybox:latest).

A sandbox is `ctr run -d` of a keep-alive command (`sleep infinity`, under the host's static
catatonit or tini bind-mounted as PID 1 so orphans are reaped) with our labels, the spec's
env and workdir, its mounts, a cgroup mount at /sys/fs/cgroup, the default seccomp profile,
and either the host network (`--net-host`) or a new network namespace with only `lo`.
Limits: memory (`--memory-limit`) and cpus (`--cpus`) are set by ctr; ctr has no pids flag,
so pids.max (and the swap limit, where swap is accounted) is written into the container's
cgroup (`/<namespace>/<id>`) on the host: the server must run as root on the containerd host,
as ctr itself needs. The default user is kept in a label (ctr run has no --user; the
keep-alive runs as root) and given to every `ctr task exec --user`, always as numeric
uid:gid that we resolve from the sandbox's /etc/passwd and /etc/group: given a name (or a
bare uid), ctr looks the user up by mounting the container's live overlay snapshot a second
time, which resets the overlay's work directory under the running container, after which
creating files in it fails with ENOENT (seen with containerd 1.6 here).

Every command is `ctr task exec` of the same `sh` wrapper as the Docker provider's (it
records its pid so a second exec can signal its process group); per-command env goes
through `env`, since ctr exec has none; stdin starts with a newline the wrapper reads (see
_STDIN_PREAMBLE). Files move through exec too (`cat` in, `cat` out,
binary safe), so images need sh, cat, mkdir, chmod and mv (busybox and Debian have them).
Destroy is `ctr task delete --force` (kills every process) and `ctr containers delete`
(with its snapshot). The provider runs ctr as a subprocess for every call: no gRPC client.

Hardening, as the Docker provider's: every capability but SETUP_CAPABILITIES is dropped (ctr
has no "ALL": each is named), no-new-privileges is ctr's default (never --allow-new-privs);
an exec as a non-root uid holds no capability. `read_only_root` is `--read-only` with tmpfs at
/tmp (1777), the workdir and the user's HOME (owned by the user; found in the image's
/etc/passwd by a throwaway `ctr run --rm`); unlike Docker's volumes these start empty, which
put_file does not mind (it writes through exec). `runtime: "runsc"` runs gVisor through the
runc shim (`--runc-binary`): Debian ships no containerd-shim-runsc-v1, and its runsc
(2022-12-19) takes every network namespace for the host's on this kernel, so it must run with
--network=host, which the wrapper scripts/setup-system.sh installs at RUNSC_WRAPPER adds.

Settings (`[providers.containerd]`): address, namespace, ctr_path, init_path ("" finds
catatonit or tini-static, "none" runs the keep-alive as PID 1), cgroup_root.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import signal as _signal
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mcp_sandboxes.errors import (
    ConflictError,
    ImageNotFoundError,
    InvalidInputError,
    McpSandboxesError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
)
from mcp_sandboxes.providers.base import (
    DEFAULT_CREATE_TIMEOUT_S,
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_FILE_TIMEOUT_S,
    OWNER_LABEL,
    SANDBOX_NAME_LABEL,
    Availability,
    ExecResult,
    OutputChunk,
    ProviderLifecycle,
    SandboxSpec,
    TailBuffer,
    check_exec_args,
)
from mcp_sandboxes.providers.local._ctr import INSTALL_FIX, START_FIX, Ctr, CtrResult, ctr_failure
from mcp_sandboxes.providers.local._local_process import LocalExecStream, run_process, run_to_end
from mcp_sandboxes.providers.local._users import ensure_user
from mcp_sandboxes.providers.local.docker import (
    _NO_PID_FILE,
    _SIGNALLER,
    _WRAPPER,
    CREATE_TOKEN_LABEL,
    KEEPALIVE_CMD,
    SETUP_CAPABILITIES,
    container_config,
    home_from_passwd,
)
from mcp_sandboxes.providers.remote._remote_stream import sole_exception

PROVIDER_NAME = "containerd"
DEFAULT_ADDRESS = "/var/run/docker/containerd/containerd.sock"
DEFAULT_NAMESPACE = "mcp-sandboxes"
DOCKER_NAMESPACE = "moby"

API_TIMEOUT_S = 30.0  # one quick ctr call: info, list, kill, delete, a helper exec
CHECK_TIMEOUT_S = 10.0
SIGNAL_TIMEOUT_S = 10.0  # how long signal() keeps trying while the pid file is not yet written
KILL_GRACE_S = 5.0  # after SIGKILL, how long ctr gets to report the exit and end
CLEANUP_TIMEOUT_S = 15.0  # the shielded cleanup when a stream context is left
LEFTOVER_WAIT_S = 2.0  # after a create cut short in flight, how long to watch for the container

RUNSC_WRAPPER = "/usr/local/libexec/mcp-sandboxes/runsc-containerd"
PASSWD_PROBE_TIMEOUT_S = 60.0
# Every capability Linux defines, so dropping them all does not depend on ctr's default set.
ALL_CAPABILITIES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
]
USER_LABEL = "io.mcp-sandboxes.user"  # ctr run has no --user: execs take it from here
PIDS_LABEL = "io.mcp-sandboxes.pids-limit"  # reapplied when attach() restarts the task
INIT_TARGET = "/.mcp-sandboxes-init"
INIT_CANDIDATES = ("catatonit", "tini-static", "docker-init")
# containerd's identifier rule (namespaces and container ids).
# ctr drops an end of stdin that comes before the shim has opened the exec's stdin FIFO (the
# process then waits for input forever), so every exec first gets one newline, which the
# wrapper reads (sh's `read` takes a pipe byte by byte, never more): once it has passed, the
# FIFO is open and a later end of input arrives.
_STDIN_PREAMBLE = b"\n"
_EXEC_WRAPPER = f"read -r _ || exit 125; {_WRAPPER}"
_IDENTIFIER = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
# Label keys and values list_labelled passes into a ctr filter unquoted.
_FILTER_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_MAX_ID_LENGTH = 76
# get_file/put_file exit codes for what is not a readable/writable regular file.
_IS_DIRECTORY = 21
_NOT_FOUND = 20
_NOT_REGULAR = 22
_NO_PARENT = 23
_NOT_WRITABLE = 24
_GET_SCRIPT = (
    f'[ -d "$1" ] && exit {_IS_DIRECTORY}; [ -e "$1" ] || exit {_NOT_FOUND}; '
    f'[ -f "$1" ] || exit {_NOT_REGULAR}; exec cat -- "$1"'
)
# $1 path, $2 octal mode, $3 uid:gid to chown to (or ""), $4 "1" to create missing parents.
# Written to a temporary file beside the target and renamed over it, so a reader never sees
# half a file; an existing directory is never replaced.
_PUT_SCRIPT = (
    f'p=$1; d=${{p%/*}}; d=${{d:-/}}; [ -d "$p" ] && exit {_IS_DIRECTORY}; '
    f'if [ "$4" = 1 ]; then mkdir -p -- "$d" 2>/dev/null || exit {_NO_PARENT}; fi; [ -d "$d" ] || exit {_NO_PARENT}; '
    f't="$d/.mcp-sandboxes-put.$$"; touch -- "$t" 2>/dev/null || exit {_NOT_WRITABLE}; '
    'if cat > "$t" && chmod "$2" "$t" && { [ -z "$3" ] || chown "$3" "$t"; } && mv -f -- "$t" "$p"; then exit 0; fi; '
    'rm -f -- "$t"; exit 1'
)


class ContainerdSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = Field(default=DEFAULT_ADDRESS, description="containerd's socket (dockerd's by default).")
    namespace: str = Field(default=DEFAULT_NAMESPACE, description="Our own containerd namespace; never Docker's moby.")
    ctr_path: str = Field(default="ctr", description="The ctr client binary.")
    runsc_path: str = Field(
        default=RUNSC_WRAPPER, description="What runs runsc for `runtime: runsc` (the setup's wrapper)."
    )
    init_path: str = Field(
        default="", description='A static init for PID 1: "" finds catatonit or tini-static, "none" runs without.'
    )
    cgroup_root: str = Field(default="/sys/fs/cgroup", description="Where the host's cgroup hierarchies are mounted.")

    @field_validator("namespace")
    @classmethod
    def _own_namespace(cls, value: str) -> str:
        if value == DOCKER_NAMESPACE:
            raise ValueError("moby is Docker's own namespace; use one of ours, e.g. mcp-sandboxes")
        if len(value) > _MAX_ID_LENGTH or not _IDENTIFIER.fullmatch(value):
            raise ValueError("use letters and digits separated by single '.', '_' or '-', e.g. mcp-sandboxes")
        return value

    @field_validator("address")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        # ctr takes a socket path; accept the unix:// form that Docker settings use.
        return value.removeprefix("unix://")


def image_reference(image: str) -> str:
    """The fully qualified name Docker would use for `image` (what `docker save` records and
    `ctr images import` stores): docker.io/ for names without a registry, library/ for
    single-component names, :latest when neither tag nor digest is given."""
    name, at, digest = image.partition("@")
    first, slash, _ = name.partition("/")
    if not slash:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    if not at and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return f"{name}{at}{digest}"


def find_init(setting: str) -> str | None:
    if setting == "none":
        return None
    if setting:
        return setting
    for candidate in INIT_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class ContainerdProvider(ProviderLifecycle):
    """Creates and removes sandbox containers in one containerd namespace."""

    name = PROVIDER_NAME

    def __init__(self, settings: ContainerdSettings | None = None) -> None:
        self.settings = settings or ContainerdSettings()
        self.ctr = Ctr(self.settings.ctr_path, self.settings.address, self.settings.namespace)
        self.init_path = find_init(self.settings.init_path)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ContainerdProvider:
        try:
            return cls(ContainerdSettings.model_validate(dict(settings)))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            message = str(first["msg"]).removeprefix("Value error, ")
            raise InvalidInputError(f"providers.containerd.{field}", f"{message} (fix the config file)") from exc

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    # -- Provider -------------------------------------------------------------------------

    async def check(self) -> Availability:
        def unavailable(reason: str, fix: str) -> Availability:
            return Availability(provider=self.name, available=False, reason=reason, fix=fix)

        if shutil.which(self.settings.ctr_path) is None:
            return unavailable(f"{self.settings.ctr_path} (containerd's client) is not installed", INSTALL_FIX)
        if not await anyio.Path(self.settings.address).is_socket():
            return unavailable(f"containerd is not running: no socket at {self.settings.address}", START_FIX)
        try:
            await self.ctr.checked(["version"], action="answering a version query", limit_s=CHECK_TIMEOUT_S)
        except ProviderUnavailableError as exc:
            return unavailable(str(exc).removesuffix(f": {START_FIX}"), START_FIX)
        except ProviderError as exc:
            return unavailable(str(exc), START_FIX)
        return Availability(provider=self.name, available=True)

    async def validate_spec(self, spec: SandboxSpec) -> None:
        """Cheap checks before a create: the values are well formed and the image is there."""
        self._run_args(spec, spec.name or "mcp-sandboxes-validate", "", posixpath.normpath(spec.workdir))
        cpu_count = os.cpu_count()  # containerd runs on this host (ctr talks to its local socket)
        if spec.limits.cpus is not None and cpu_count and spec.limits.cpus > cpu_count:
            raise InvalidInputError(
                "cpus", f"{spec.limits.cpus:g} asked, but this host has {cpu_count}; use at most {cpu_count}"
            )
        await self._check_runtime(spec)
        await self._require_image(spec.image)

    async def _check_runtime(self, spec: SandboxSpec) -> None:
        if spec.runtime != "runsc":
            return
        wrapper = anyio.Path(self.settings.runsc_path)
        if not await wrapper.is_file() or shutil.which("runsc") is None:
            raise InvalidInputError(
                "runtime",
                f"runsc for containerd needs gVisor's runsc and the wrapper {self.settings.runsc_path} (it runs"
                " runsc --network=host, the only network mode that starts on this kernel); run"
                " scripts/setup-system.sh, or set providers.containerd.runsc_path",
            )

    async def _writable_tmpfs(self, spec: SandboxSpec, workdir: str) -> list[str]:
        """`--mount` arguments for read_only_root: tmpfs at /tmp, the workdir and the user's HOME,
        the last two owned by the user the sandbox runs as."""
        probe = f"mcp-sandboxes-probe-{uuid.uuid4().hex[:16]}"
        argv = ["run", "--rm", "--read-only", "--label", f"{OWNER_LABEL}=true", image_reference(spec.image), probe]
        script = "id -u; id -g; cat /etc/passwd 2>/dev/null; true"
        result = await self.ctr.run(
            [*argv, "sh", "-c", script], action=f"reading /etc/passwd of {spec.image}", limit_s=PASSWD_PROBE_TIMEOUT_S
        )
        if result.returncode != 0:
            message = result.failure() or result.stderr.decode("utf-8", "replace").strip()
            if message.lower().startswith("image ") and "not found" in message.lower():
                raise self._image_missing(spec.image)
            raise self.ctr.error(message, action=f"reading /etc/passwd of {spec.image}")
        lines = result.stdout.decode("utf-8", "replace").splitlines()
        passwd = "\n".join(lines[2:])
        user = spec.user or (lines[0].strip() if lines else "0")
        uid, gid = (lines[0].strip(), lines[1].strip()) if len(lines) >= 2 and not spec.user else ("0", "0")
        if spec.user:
            name, _, group = spec.user.partition(":")
            rows = [row.split(":") for row in passwd.splitlines()]
            entry = next((r for r in rows if len(r) >= 7 and (r[2] if name.isdigit() else r[0]) == name), None)
            if entry is None and not name.isdigit():
                raise InvalidInputError(
                    "user", f"{name!r} does not exist in the image's /etc/passwd; use a user it defines"
                )
            uid = name if entry is None else entry[2]
            gid = group if group.isdigit() else (entry[3] if entry is not None else "0")
        if not (uid.isdigit() and gid.isdigit()):
            raise ProviderError(f"could not read the user's ids in {spec.image}: {result.stdout[:200]!r}")
        owned = f"nosuid:nodev:mode=0755:uid={uid}:gid={gid}"
        args = ["--mount", "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777"]
        targets = [workdir]
        home = home_from_passwd(passwd, user)
        if home is not None:
            targets.append(home)
        taken = ["/tmp", *(posixpath.normpath(m.target) for m in spec.mounts)]
        for target in targets:
            if target in ("/", *taken) or "," in target:
                continue
            args += ["--mount", f"type=tmpfs,src=tmpfs,dst={target},options={owned}"]
            taken.append(target)
        return args

    async def create(self, spec: SandboxSpec) -> ContainerdSandbox:
        name = spec.name or f"mcp-sandboxes-{uuid.uuid4().hex[:16]}"
        workdir = posixpath.normpath(spec.workdir)
        token = uuid.uuid4().hex
        args = self._run_args(spec, name, token, workdir)
        await self._check_runtime(spec)
        if spec.read_only_root:
            # Inserted before the image reference, which ends the options.
            args[1:1] = await self._writable_tmpfs(spec, workdir)
        try:
            try:
                await self.ctr.checked(
                    args, action=f"creating a container from {spec.image}", limit_s=DEFAULT_CREATE_TIMEOUT_S
                )
            except ImageNotFoundError as exc:
                # ctr looks the image up before it makes anything: nothing to remove.
                raise self._image_missing(spec.image) from exc
            except ProviderError as exc:
                mapped = _mount_error(exc, spec)
                if mapped is exc:
                    raise
                raise mapped from exc
            await self._apply_cgroup_limits(name, pids=spec.limits.pids, memory_mb=spec.limits.memory_mb)
            sandbox = ContainerdSandbox(self, name, workdir=workdir, default_user=spec.user)
            if spec.user:
                # An image without the sandbox user gets it, as on Docker (any image runs agents unprivileged).
                await ensure_user(sandbox, spec.user, image=spec.image, workdir=workdir)
        except BaseException as exc:
            # A ctr cut short may leave a container the engine still makes; a failed task
            # start leaves the container record. Either way only ours (by token) is removed.
            in_doubt = not isinstance(exc, McpSandboxesError)
            with anyio.CancelScope(shield=True), anyio.move_on_after(API_TIMEOUT_S):
                await self._remove_leftover(name, token, wait_s=LEFTOVER_WAIT_S if in_doubt else 0.0)
            raise
        return sandbox

    def _run_args(self, spec: SandboxSpec, name: str, token: str, workdir: str) -> list[str]:
        """`ctr run` arguments for a spec; rejects values ctr or the engine would, naming the field."""
        container_config(spec, name=name)  # the same value checks as Docker's
        if len(name) > _MAX_ID_LENGTH or not _IDENTIFIER.fullmatch(name):
            raise InvalidInputError(
                "name", f"{name!r} is not a containerd id; use letters and digits separated by single '.', '_' or '-'"
            )
        labels = {**spec.labels, OWNER_LABEL: "true", CREATE_TOKEN_LABEL: token}
        if spec.name:
            labels[SANDBOX_NAME_LABEL] = spec.name
        if spec.user:
            labels[USER_LABEL] = spec.user
        if spec.limits.pids is not None:
            labels[PIDS_LABEL] = str(spec.limits.pids)
        args = ["run", "--detach", "--cgroup", self._cgroups_path(name), "--cwd", workdir, "--seccomp"]
        for capability in ALL_CAPABILITIES:
            if capability not in SETUP_CAPABILITIES:
                args += ["--cap-drop", f"CAP_{capability}"]
        if spec.read_only_root:
            args.append("--read-only")
        if spec.runtime == "runsc":
            args += ["--runc-binary", self.settings.runsc_path]
        elif spec.runtime not in (None, "runc"):
            raise InvalidInputError(
                "runtime",
                f"{spec.runtime!r}: the containerd provider offers runc (the default) and runsc (gVisor); Debian ships"
                " no other containerd shim",
            )
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        for key, value in spec.env.items():
            args += ["--env", f"{key}={value}"]
        # Programs that size themselves from cgroup limits (Node does) must see them.
        args += ["--mount", "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec:nodev"]
        for index, mount in enumerate(spec.mounts):
            for field, path in (("source", mount.source), ("target", mount.target)):
                if "," in path:
                    raise InvalidInputError(f"mounts[{index}].{field}", f"{path!r}: ctr cannot mount paths with ','")
            if not Path(mount.source).exists():
                raise InvalidInputError(f"mounts[{index}].source", f"{mount.source} does not exist on the host")
            mode = "ro" if mount.read_only else "rw"
            target = posixpath.normpath(mount.target)
            args += ["--mount", f"type=bind,src={mount.source},dst={target},options=rbind:{mode}"]
        if self.init_path is not None:
            args += ["--mount", f"type=bind,src={self.init_path},dst={INIT_TARGET},options=rbind:ro"]
        if spec.network == "host":
            args.append("--net-host")
        if spec.limits.memory_mb is not None:
            args += ["--memory-limit", str(spec.limits.memory_mb * 1024 * 1024)]
        if spec.limits.cpus is not None:
            args += ["--cpus", f"{spec.limits.cpus:g}"]
        keepalive = [INIT_TARGET, "--", *KEEPALIVE_CMD] if self.init_path is not None else KEEPALIVE_CMD
        return [*args, image_reference(spec.image), name, *keepalive]

    async def _require_image(self, image: str) -> None:
        reference = image_reference(image)
        listed = await self.ctr.checked(
            ["images", "list", "--quiet", f"name=={reference}"],
            action=f"looking up image {image}",
            limit_s=API_TIMEOUT_S,
        )
        if reference not in listed.decode("utf-8", "replace").split():
            raise self._image_missing(image)

    def _image_missing(self, image: str) -> ImageNotFoundError:
        return ImageNotFoundError(
            f"image {image!r} ({image_reference(image)}) is not in containerd namespace {self.namespace!r} at"
            f" {self.settings.address}: import it (scripts/import-images.sh does the project's images;"
            f" else `docker save {image} | ctr -n {self.namespace} images import -`)"
        )

    def _cgroups_path(self, container_id: str) -> str:
        return f"/{self.namespace}/{container_id}"

    async def _apply_cgroup_limits(self, container_id: str, *, pids: int | None, memory_mb: int | None) -> None:
        """What ctr has no flag for, written into the container's cgroup on this host."""
        root = Path(self.settings.cgroup_root)
        relative = self._cgroups_path(container_id).lstrip("/")
        unified = await anyio.Path(root / "cgroup.controllers").exists()
        if pids is not None:
            target = root / relative / "pids.max" if unified else root / "pids" / relative / "pids.max"
            try:
                await anyio.Path(target).write_text(str(pids))
            except OSError as exc:
                raise ProviderError(
                    f"cannot set limits.pids: {target} is not writable ({exc.strerror or exc}); run the server as root"
                    " on the containerd host, or leave limits.pids unset"
                ) from exc
        if memory_mb is not None:
            # The memory limit is the limit: no swap on top, where the kernel accounts swap.
            swap = (
                root / relative / "memory.swap.max"
                if unified
                else root / "memory" / relative / "memory.memsw.limit_in_bytes"
            )
            value = "0" if unified else str(memory_mb * 1024 * 1024)
            if await anyio.Path(swap).exists():
                try:
                    await anyio.Path(swap).write_text(value)
                except OSError as exc:
                    raise ProviderError(
                        f"cannot limit swap for limits.memory_mb at {swap}: {exc.strerror or exc}"
                    ) from exc

    async def _remove_leftover(self, container_id: str, token: str, *, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            try:
                info = await self._info(container_id)
                if info is not None:
                    if (info.get("Labels") or {}).get(CREATE_TOKEN_LABEL) == token:
                        await self._delete(container_id)
                    return
            except McpSandboxesError:
                return  # containerd is gone: nothing we can remove
            if time.monotonic() >= deadline:
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _info(self, container_id: str) -> dict[str, Any] | None:
        if len(container_id) > _MAX_ID_LENGTH or not _IDENTIFIER.fullmatch(container_id):
            return None
        result = await self.ctr.run(
            ["containers", "info", container_id], action=f"inspecting container {container_id}", limit_s=API_TIMEOUT_S
        )
        if result.returncode != 0:
            message = result.failure() or result.stderr.decode("utf-8", "replace").strip()
            if "not found" in message:
                return None
            raise self.ctr.error(message, action=f"inspecting container {container_id}")
        try:
            info: dict[str, Any] = json.loads(result.stdout)
        except ValueError as exc:
            raise ProviderError(f"ctr containers info {container_id} printed no JSON: {exc}") from exc
        return info

    async def _task_status(self, container_id: str) -> str | None:
        """RUNNING, STOPPED, ... or None when the container has no task."""
        listed = await self.ctr.checked(["tasks", "list"], action="listing tasks", limit_s=API_TIMEOUT_S)
        for line in listed.decode("utf-8", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == container_id:
                return fields[2]
        return None

    async def _delete(self, container_id: str) -> None:
        # --force kills every process of the task (execs too) before deleting it.
        task = await self.ctr.run(
            ["tasks", "delete", "--force", container_id], action=f"removing task {container_id}", limit_s=API_TIMEOUT_S
        )
        if task.returncode != 0:
            message = task.failure() or task.stderr.decode("utf-8", "replace").strip()
            if "not found" not in message:
                raise self.ctr.error(message, action=f"removing task {container_id}")
        removed = await self.ctr.run(
            ["containers", "delete", container_id], action=f"removing container {container_id}", limit_s=API_TIMEOUT_S
        )
        if removed.returncode != 0:
            message = removed.failure() or removed.stderr.decode("utf-8", "replace").strip()
            if "not found" not in message:
                raise self.ctr.error(message, action=f"removing container {container_id}")

    async def attach(self, sandbox_id: str) -> ContainerdSandbox | None:
        info = await self._info(sandbox_id)
        if info is None or OWNER_LABEL not in (info.get("Labels") or {}):
            return None
        labels: dict[str, str] = info.get("Labels") or {}
        status = await self._task_status(sandbox_id)
        if status != "RUNNING":
            # containerd restarted, or the keep-alive died: the container and its files remain.
            if status is not None:
                await self.ctr.checked(
                    ["tasks", "delete", "--force", sandbox_id],
                    action=f"clearing the old task of {sandbox_id}",
                    limit_s=API_TIMEOUT_S,
                )
            await self.ctr.checked(
                ["tasks", "start", "--detach", sandbox_id],
                action=f"restarting {sandbox_id}",
                limit_s=DEFAULT_CREATE_TIMEOUT_S,
                subject=sandbox_id,
            )
            pids = labels.get(PIDS_LABEL)
            await self._apply_cgroup_limits(sandbox_id, pids=int(pids) if pids else None, memory_mb=None)
        workdir = str(((info.get("Spec") or {}).get("process") or {}).get("cwd") or "/")
        return ContainerdSandbox(self, sandbox_id, workdir=workdir, default_user=labels.get(USER_LABEL))

    async def destroy(self, sandbox_id: str) -> None:
        info = await self._info(sandbox_id)
        if info is None:
            return
        if OWNER_LABEL not in (info.get("Labels") or {}):
            raise ConflictError(f"sandbox_id: container {sandbox_id} is not managed by mcp-sandboxes; not removing it")
        await self._delete(sandbox_id)

    async def list_owned(self) -> list[str]:
        listed = await self.ctr.checked(
            ["containers", "list", "--quiet", f'labels."{OWNER_LABEL}"'],
            action="listing containers",
            limit_s=API_TIMEOUT_S,
        )
        return listed.decode("utf-8", "replace").split()

    async def list_labelled(self, labels: Mapping[str, str]) -> list[str]:
        for key, value in labels.items():
            if not _FILTER_SAFE.match(key) or not _FILTER_SAFE.match(value):
                raise InvalidInputError(
                    f"labels.{key}", "only letters, digits, '.', '_', '-' and '/' can be filtered on"
                )
        # One filter with comma-separated parts: ctr ANDs those (separate filters would be ORed).
        wanted = ",".join([f'labels."{OWNER_LABEL}"', *(f'labels."{key}"=={value}' for key, value in labels.items())])
        listed = await self.ctr.checked(
            ["containers", "list", "--quiet", wanted], action="listing containers", limit_s=API_TIMEOUT_S
        )
        return listed.decode("utf-8", "replace").split()

    async def aclose(self) -> None:
        return None  # no connection to close: every call is its own ctr process


class ContainerdSandbox:
    """One running container; every command is a `ctr task exec` wrapped so it can be signalled."""

    provider = PROVIDER_NAME

    def __init__(self, owner: ContainerdProvider, container_id: str, *, workdir: str, default_user: str | None) -> None:
        self.id = container_id
        self._owner = owner
        self._workdir = workdir
        self._default_user = default_user
        self._ids: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"ContainerdSandbox({self.id})"

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
        stdout = bytearray()
        stderr = bytearray()
        async with self.stream(argv, env=env, cwd=cwd, user=user) as process:
            exit_code = await run_to_end(process, stdin=stdin, time_limit=timeout, stdout=stdout, stderr=stderr)
        # Leaving the stream context killed the process if the deadline cut it short.
        if exit_code is None:
            raise ProviderError(
                f"command {argv[0]!r} did not finish within {timeout:g}s and was killed;"
                " raise the timeout or make the command finish sooner"
            )
        return ExecResult(exit_code=exit_code, stdout=bytes(stdout), stderr=bytes(stderr))

    @asynccontextmanager
    async def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[ContainerdExecStream]:
        check_exec_args(argv, env, cwd, user)
        if env and "=" in argv[0]:
            raise InvalidInputError("argv", f"{argv[0]!r}: with per-command env, give a program path without '='")
        token = uuid.uuid4().hex
        with_env = ["env", *(f"{key}={value}" for key, value in env.items())] if env else []
        args = self._exec_args(token, cwd=cwd, ids=await self._resolve_user(user or self._default_user))
        ctr = self._owner.ctr
        command = ctr.argv(*args, self.id, "sh", "-c", _EXEC_WRAPPER, token, *with_env, *argv)
        try:
            async with run_process(command, env=ctr.env, program=argv[0]) as local:
                process = ContainerdExecStream(self, local, token, argv[0])
                try:
                    await local.send_stdin(_STDIN_PREAMBLE)
                    yield process
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                        await process.finish()
        except BaseExceptionGroup as group:
            # run_process's task group wraps even a lone error; callers expect the error itself.
            raise sole_exception(group) from None

    def _exec_args(self, exec_id: str, *, cwd: str | None, ids: str | None) -> list[str]:
        args = ["tasks", "exec", "--exec-id", exec_id, "--cwd", posixpath.normpath(cwd or self._workdir)]
        if ids:
            args += ["--user", ids]
        return args

    async def _resolve_user(self, user: str | None) -> str | None:
        """`uid:gid` for a user name, uid or `user:group` (None: the image's own user), looked
        up in the sandbox's /etc/passwd and /etc/group; see the module doc for why."""
        if not user:
            return None
        if user in self._ids:
            return self._ids[user]
        name, _, group = user.partition(":")
        if name.isdigit() and group.isdigit():
            return user
        passwd = await self._table("/etc/passwd")
        entry = next((row for row in passwd if (row[2] if name.isdigit() else row[0]) == name), None)
        if entry is None and not name.isdigit():
            raise InvalidInputError(
                "user", f"{name!r} does not exist in the sandbox's /etc/passwd; use a user it defines"
            )
        uid = name if entry is None else entry[2]
        gid = entry[3] if entry is not None else "0"
        if group:
            gid = group if group.isdigit() else await self._group_id(group)
        self._ids[user] = f"{uid}:{gid}"
        return self._ids[user]

    async def _group_id(self, group: str) -> str:
        found = next((row[2] for row in await self._table("/etc/group") if row[0] == group), None)
        if found is None:
            raise InvalidInputError("user", f"group {group!r} does not exist in the sandbox's /etc/group")
        return found

    async def _table(self, path: str) -> list[list[str]]:
        """The rows of a colon-separated file like /etc/passwd ([] when it is missing)."""
        result = await self.helper(["cat", path], action=f"reading {path} in {self.id}")
        rows = [line.split(":") for line in result.stdout.decode("utf-8", "replace").splitlines()]
        return [row for row in rows if len(row) >= 4 and row[2].isdigit()]

    async def helper(self, argv: list[str], *, action: str, stdin: bytes | None = None) -> CtrResult:
        """An unwrapped exec as root for our own short commands (signalling, user lookup)."""
        args = self._exec_args(uuid.uuid4().hex, cwd="/", ids="0:0")
        result = await self._owner.ctr.run([*args, self.id, *argv], action=action, limit_s=API_TIMEOUT_S, stdin=stdin)
        failure = result.failure()
        if failure is not None and _is_ctr_failure(failure):
            raise self._owner.ctr.error(failure, action=action, subject=self.id)
        return result

    async def signal_token(self, token: str, signum: int, still_running: ContainerdExecStream) -> None:
        """Signal the exec whose wrapper wrote exec-<token>.pid; retries briefly while the
        pid file is not written yet and the process has not ended."""
        delay = 0.005
        with anyio.move_on_after(SIGNAL_TIMEOUT_S):
            while True:
                result = await self.helper(
                    ["sh", "-c", _SIGNALLER, token, str(int(signum))], action=f"signalling a command in {self.id}"
                )
                if result.returncode != _NO_PID_FILE or not still_running.running:
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.1)

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        if not path.startswith("/") or "\x00" in path or path.endswith("/"):
            raise InvalidInputError("path", f"{path!r} must be the absolute path of a file, e.g. /workspace/a.txt")
        if not 0 <= mode <= 0o7777:
            raise InvalidInputError("mode", f"{mode:o} is not a file mode; use e.g. 0o644")
        path = posixpath.normpath(path)
        owner = user or self._default_user
        # As the file's owner, so new parent directories are theirs too.
        result = await self._put(path, data, mode, run_as=owner, chown="", make_parents=True)
        ids = await self._resolve_user(owner)
        if result.exit_code == _NOT_WRITABLE and ids is not None and ids != "0:0":
            # The directory exists but only root may write in it: as an engine's archive API
            # does, write as root and hand the file to its owner.
            result = await self._put(path, data, mode, run_as="0:0", chown=ids, make_parents=False)
        if result.exit_code == _IS_DIRECTORY:
            raise InvalidInputError("path", f"{path} is a directory in the sandbox; give a file's path")
        if result.exit_code == _NO_PARENT:
            raise InvalidInputError(
                "path", f"cannot create the directory of {path} (a parent is a file, or not writable)"
            )
        if result.exit_code == _NOT_WRITABLE:
            raise InvalidInputError("path", f"cannot write in the directory of {path} (read-only or not permitted)")
        if not result.ok:
            detail = result.stderr.decode("utf-8", "replace").strip()
            raise InvalidInputError(
                "path", f"cannot write {path} in the sandbox: {detail or f'exit {result.exit_code}'}"
            )

    async def _put(
        self, path: str, data: bytes, mode: int, *, run_as: str | None, chown: str, make_parents: bool
    ) -> ExecResult:
        argv = ["sh", "-c", _PUT_SCRIPT, "sh", path, f"{mode:o}", chown, "1" if make_parents else "0"]
        return await self.exec(argv, stdin=data, user=run_as, timeout=DEFAULT_FILE_TIMEOUT_S)

    async def get_file(self, path: str) -> bytes:
        if not path.startswith("/") or "\x00" in path:
            raise InvalidInputError("path", f"{path!r} must be an absolute path inside the sandbox, e.g. /workspace")
        path = posixpath.normpath(path)
        # As root, as an engine's archive API reads: the file's owner does not matter.
        result = await self.exec(["sh", "-c", _GET_SCRIPT, "sh", path], user="0", timeout=DEFAULT_FILE_TIMEOUT_S)
        if result.exit_code == _NOT_FOUND:
            raise NotFoundError(f"path: {path} does not exist in sandbox {self.id}")
        if result.exit_code == _IS_DIRECTORY:
            raise InvalidInputError("path", f"{path} is a directory; give a file's path")
        if result.exit_code == _NOT_REGULAR:
            raise InvalidInputError("path", f"{path} is not a regular file")
        if not result.ok:
            detail = result.stderr.decode("utf-8", "replace").strip()
            raise ProviderError(f"cannot read {path} in sandbox {self.id}: {detail or f'exit {result.exit_code}'}")
        return result.stdout


def _mount_error(exc: ProviderError, spec: SandboxSpec) -> McpSandboxesError:
    """runc's failure to mount one of the spec's mounts, named by the mount; else `exc`."""
    match = re.search(r'error mounting "([^"]*)" to rootfs at "([^"]*)"', str(exc))
    if match is None:
        return exc
    for index, mount in enumerate(spec.mounts):
        if mount.source == match.group(1) or posixpath.normpath(mount.target) == match.group(2):
            return InvalidInputError(f"mounts[{index}].target", f"cannot mount {mount.source} at {mount.target}: {exc}")
    return exc


def _is_ctr_failure(message: str) -> bool:
    """Whether a `ctr: ...` line is ctr's own failure to run the command (which a program run
    through it would hardly print): OCI exec errors, a missing container or task, a user
    lookup, the connection."""
    lowered = message.lower()
    markers = (
        "oci runtime exec failed",
        "in namespace",
        "mount callback failed",
        "no running task",
        "cannot exec in a stopped state",
        "failed to dial",
        "connection error",
        "already exists",
        "not found",
    )
    return any(marker in lowered for marker in markers)


class ContainerdExecStream:
    """A running `ctr task exec`. Output and stdin pass straight through ctr; signals go to
    the process group inside the sandbox through the pid file its wrapper wrote."""

    def __init__(self, sandbox: ContainerdSandbox, local: LocalExecStream, token: str, program: str) -> None:
        self._sandbox = sandbox
        self._local = local
        self._token = token
        self._program = program
        self._stderr_tail = TailBuffer(4096)

    @property
    def running(self) -> bool:
        return self._local.returncode is None

    async def __aiter__(self) -> AsyncIterator[OutputChunk]:
        async for chunk in self._local:
            if chunk.stream == "stderr":
                self._stderr_tail.write(chunk.data)
            yield chunk

    async def send_stdin(self, data: bytes) -> None:
        await self._local.send_stdin(data)

    async def close_stdin(self) -> None:
        await self._local.close_stdin()

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if not self.running:
            return
        await self._sandbox.signal_token(self._token, signum, self)

    async def wait(self) -> int:
        code = await self._local.wait()
        if code == 1:
            failure = ctr_failure(self._stderr_tail.text().encode("utf-8"))
            if failure is not None and _is_ctr_failure(failure):
                owner = self._sandbox._owner
                raise owner.ctr.error(failure, action=f"running {self._program!r}", subject=self._sandbox.id)
        return code

    async def finish(self) -> None:
        """Kill the process group inside the sandbox if ctr still runs (ctr then reports the
        exit and ends). Bounded by the caller; what is left of ctr is killed after."""
        if not self.running:
            return
        try:
            with anyio.move_on_after(SIGNAL_TIMEOUT_S):
                await self.signal(_signal.SIGKILL)
            with anyio.move_on_after(KILL_GRACE_S):
                await self._local.wait()
        except McpSandboxesError:
            pass  # containerd or the sandbox is gone: nothing left to kill inside
