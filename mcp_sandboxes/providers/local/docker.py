"""Docker provider: one long-lived container per sandbox, commands run with `docker exec`.

The container's main process is a no-op (`sleep infinity` under docker's init, which reaps
zombies and forwards signals); every command is an exec. The image needs `sh` and `sleep`
(busybox and Debian both have them), because docker exec has no kill API: each command is
wrapped in `sh -c` that records its pid in /tmp/.mcp-sandboxes before `exec`-ing the
command, so a second exec can signal it (and its process group: exec'd processes lead
their own session).

Hardening: every container drops all capabilities and gets back only SETUP_CAPABILITIES,
which root-run setup commands need (apt-get, useradd, chown, killing another user's process);
a non-root user (the agent) holds none of them, and `no-new-privileges` keeps setuid and
file-capability binaries from handing them back. The container's own process runs as root and
the sandbox's user is given to every exec (kept in USER_LABEL for attach): the engine gives a
root exec the container's capabilities only when the container's user is root (otherwise it
starts with none, and no-new-privileges keeps it so), and setup and our signal helper need them.
`read_only_root` makes the root filesystem read-only with anonymous volumes at the workdir,
the user's HOME and /tmp: the engine copies the image's files into each with their owners, and
its archive API (put_file) writes into volumes, which it cannot do into a tmpfs. `runtime`
picks an OCI runtime the engine has registered (`docker info` Runtimes), e.g. runsc (gVisor; scripts/start-dockerd.sh).

Every engine call runs under a named timeout, and aiodocker/aiohttp errors are translated
here into the package's hierarchy (errors.py).
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import re
import signal as _signal
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import anyio
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError
from aiodocker.execs import Exec
from aiodocker.stream import Stream
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mcp_sandboxes.errors import (
    ConflictError,
    ImageNotFoundError,
    InvalidInputError,
    McpSandboxesError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
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
    check_exec_args,
)
from mcp_sandboxes.providers.local._users import ensure_user

PROVIDER_NAME = "docker"

API_TIMEOUT_S = 30.0  # a quick engine call: inspect, exec create/start, remove
CHECK_TIMEOUT_S = 5.0
PULL_TIMEOUT_S = 900.0
COMMIT_TIMEOUT_S = 600.0  # writing a container's changed files as an image layer
STDIN_WRITE_TIMEOUT_S = 60.0
SIGNAL_TIMEOUT_S = 10.0  # how long signal() keeps trying while the pid file is not yet written
KILL_GRACE_S = 5.0  # after SIGKILL, how long to wait for the exec to be reported gone
CLEANUP_TIMEOUT_S = 15.0  # the shielded cleanup when a stream context is left
ID_LOOKUP_TIMEOUT_S = 30.0
LEFTOVER_WAIT_S = 2.0  # after a create cut short in flight, how long to watch for the container

# Labels only we set: the creation token lets a cancelled create find and remove exactly the
# container it may have made, and never another one of the same name.
CREATE_TOKEN_LABEL = "io.mcp-sandboxes.create-token"
USER_LABEL = "io.mcp-sandboxes.user"  # the user execs run as by default; the container runs as root
KEEPALIVE_CMD = ["sleep", "infinity"]
PID_DIR = "/tmp/.mcp-sandboxes"
# $0 is the exec's token; the pid file lets a later exec signal this one.
_WRAPPER = (
    f'd={PID_DIR}; [ -d "$d" ] || mkdir -p -m 1777 "$d" 2>/dev/null; echo $$ > "$d/exec-$0.pid" 2>/dev/null; exec "$@"'
)
# Exit 3: the pid file is not there yet. Signals the process group first (children too).
_SIGNALLER = (
    f'f={PID_DIR}/exec-$0.pid; [ -s "$f" ] || exit 3; read p < "$f"; '
    "kill -$1 -$p 2>/dev/null || kill -$1 $p 2>/dev/null || exit 4"
)
_NO_PID_FILE = 3
_CANNOT_CONNECT = 900  # aiodocker's status for "could not connect to the engine"
_SOCKET_PATHS = ("/run/docker.sock", "/var/run/docker.sock")
_CONTAINER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_ENV_KEY = re.compile(r"^[^=\x00]+$")
_MAX_SYMLINKS = 8

START_DOCKERD_FIX = "start dockerd (scripts/start-dockerd.sh) or set providers.docker.url"

# What root-run setup commands need and nothing more: chown/chmod of others' files, writing
# where only root may, setuid/setgid to drop to a user (apt's _apt, su, runuser), signalling
# another user's process (our own signal helper runs as root). Never NET_RAW, NET_ADMIN,
# SYS_ADMIN, MKNOD, SYS_CHROOT, SETFCAP, SETPCAP, NET_BIND_SERVICE or AUDIT_WRITE.
SETUP_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID", "KILL")
NO_NEW_PRIVILEGES = "no-new-privileges:true"
PASSWD_LOOKUP_TIMEOUT_S = 30.0


class DockerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(default="", description="Engine address, e.g. unix:///var/run/docker.sock; empty = DOCKER_HOST.")
    pull_missing: bool = Field(default=False, description="Pull an image that is not present locally.")


def resolve_docker_url(url: str) -> str:
    """The configured address, else DOCKER_HOST, else the first local socket that exists."""
    if url:
        return url
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    for path in _SOCKET_PATHS:
        if Path(path).is_socket():
            return f"unix://{path}"
    return f"unix://{_SOCKET_PATHS[-1]}"


class DockerProvider(ProviderLifecycle):
    """Creates and removes sandbox containers on one Docker engine."""

    name = PROVIDER_NAME
    # What messages call the engine, and how to bring it back; an engine that speaks the
    # same API (Podman's service) overrides these.
    engine = "Docker engine"
    start_fix = START_DOCKERD_FIX
    stuck_fix = "check `docker info` and the dockerd log, or restart it (scripts/start-dockerd.sh)"

    def __init__(self, settings: DockerSettings | None = None) -> None:
        self.settings = settings or DockerSettings()
        self.url = resolve_docker_url(self.settings.url)
        self._client: aiodocker.Docker | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DockerProvider:
        try:
            return cls(DockerSettings.model_validate(dict(settings)))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise InvalidInputError(f"providers.docker.{field}", f"{first['msg']} (fix the config file)") from exc

    # -- plumbing -------------------------------------------------------------------------

    def client(self) -> aiodocker.Docker:
        if self._closed:
            raise ProviderError("the docker provider is closed; build a new one")
        if self._client is None:
            # Created lazily: aiohttp wants a running event loop.
            self._client = aiodocker.Docker(url=self.url)
        return self._client

    def unreachable(self, exc: BaseException) -> ProviderUnavailableError:
        return ProviderUnavailableError(f"{self._unreachable_reason(exc)}: {self.start_fix}")

    def _unreachable_reason(self, exc: BaseException) -> str:
        return f"{self.engine} not reachable at {self.url} ({_reason(exc)})"

    @asynccontextmanager
    async def call(self, action: str, limit_s: float) -> AsyncIterator[None]:
        """Runs engine calls under a deadline and translates what the layer below raises."""
        try:
            with anyio.fail_after(limit_s):
                yield
        except McpSandboxesError:
            raise
        except TimeoutError as exc:
            raise ProviderError(
                f"{self.engine} at {self.url} did not finish {action} within {limit_s:g}s; {self.stuck_fix}"
            ) from exc
        except DockerError as exc:
            if exc.status == _CANNOT_CONNECT:
                raise self.unreachable(exc) from exc
            raise ProviderError(f"{self.engine} failed {action}: {exc.message}") from exc
        except (aiohttp.ClientConnectionError, ConnectionError, FileNotFoundError) as exc:
            raise self.unreachable(exc) from exc
        except aiohttp.ClientError as exc:
            raise ProviderError(f"{self.engine} at {self.url} failed {action}: {_reason(exc)}") from exc

    # -- Provider -------------------------------------------------------------------------

    async def check(self) -> Availability:
        try:
            async with self.call("answering a version query", CHECK_TIMEOUT_S):
                await self.client().version()
        except ProviderUnavailableError as exc:
            cause = exc.__cause__ or exc
            reason = self._unreachable_reason(cause)
            return Availability(provider=self.name, available=False, reason=reason, fix=self.start_fix)
        except ProviderError as exc:
            return Availability(provider=self.name, available=False, reason=str(exc), fix=self.start_fix)
        return Availability(provider=self.name, available=True)

    async def validate_spec(self, spec: SandboxSpec) -> None:
        """Cheap checks before a create: the values are well formed and the image exists."""
        container_config(spec, name=spec.name)
        await self.check_runtime(spec)
        if spec.limits.cpus is not None:
            # The engine refuses more CPUs than it has only at create time; say so before that.
            async with self.call("reading its CPU count", API_TIMEOUT_S):
                cpu_count = (await self.client().system.info()).get("NCPU")
            if isinstance(cpu_count, int) and 0 < cpu_count < spec.limits.cpus:
                raise InvalidInputError(
                    "cpus",
                    f"{spec.limits.cpus:g} asked, but the {self.engine} has {cpu_count}; use at most {cpu_count}",
                )
        if self.settings.pull_missing:
            return
        async with self.call(f"inspecting image {spec.image}", API_TIMEOUT_S):
            try:
                await self.client().images.inspect(spec.image)
            except DockerError as exc:
                if exc.status == 404:
                    raise self.image_missing(spec.image) from exc
                raise

    async def check_runtime(self, spec: SandboxSpec) -> None:
        """Refuse a runtime the engine has not registered, naming the ones it has."""
        if spec.runtime is None:
            return
        if not spec.runtime.strip() or any(c.isspace() or c == "\x00" for c in spec.runtime):
            raise InvalidInputError("runtime", f"{spec.runtime!r} is not a runtime name; e.g. runsc")
        async with self.call("listing its runtimes", API_TIMEOUT_S):
            info = await self.client().system.info()
        runtimes = sorted((info.get("Runtimes") or {}).keys())
        if spec.runtime not in runtimes:
            raise InvalidInputError(
                "runtime",
                f"the {self.engine} at {self.url} has no runtime {spec.runtime!r} (it has: {', '.join(runtimes)});"
                " use one of those, or install and register it (for runsc: scripts/setup-system.sh installs it,"
                " scripts/start-dockerd.sh registers it)",
            )

    def image_missing(self, image: str) -> ImageNotFoundError:
        return ImageNotFoundError(
            f"image {image!r} does not exist on the Docker engine at {self.url}: build it"
            " (scripts/build-images.sh builds the project's images), or set providers.docker.pull_missing = true"
            " to pull it from a registry"
        )

    async def create(self, spec: SandboxSpec) -> DockerSandbox:
        name = spec.name or f"mcp-sandboxes-{uuid.uuid4().hex[:16]}"
        token = uuid.uuid4().hex
        config = container_config(spec, name=name)
        await self.check_runtime(spec)
        config["Labels"][CREATE_TOKEN_LABEL] = token
        default_user = spec.user or await self._image_user(spec.image)
        if default_user:
            config["User"] = "0"
            config["Labels"][USER_LABEL] = default_user
        container_id: str | None = None
        try:
            if spec.read_only_root:
                home = await self._home_of(spec, default_user or "0")
                if home is not None:
                    config["HostConfig"]["Mounts"].extend(_writable_volumes([home], config["HostConfig"]["Mounts"]))
            container_id = await self._create_container(config, name, spec, pull=self.settings.pull_missing)
            if container_id is None:
                async with self.call(f"pulling image {spec.image}", PULL_TIMEOUT_S):
                    await self.client().images.pull(spec.image)
                container_id = await self._create_container(config, name, spec, pull=False)
            assert container_id is not None  # without pull, a missing image raises
            async with self.call(f"starting container {name}", DEFAULT_CREATE_TIMEOUT_S):
                try:
                    await self.client().containers.container(container_id).start()
                except DockerError as exc:
                    raise _start_error(exc, spec, self) from exc
            sandbox = DockerSandbox(self, container_id, default_user=default_user)
            if spec.user:
                # An image without the sandbox user gets it (any image runs agents unprivileged).
                await ensure_user(sandbox, spec.user, image=spec.image, workdir=spec.workdir)
            if default_user:
                await sandbox._ids_of(default_user)  # a user that still cannot be used fails here, not at first use
        except BaseException as exc:
            # Without an id and without an engine answer (cancelled, timed out), the create may
            # still complete in the engine: the engine finishes a create whose caller left.
            in_doubt = container_id is None and not isinstance(exc.__cause__, DockerError)
            with anyio.CancelScope(shield=True), anyio.move_on_after(API_TIMEOUT_S):
                await self._remove_leftover(container_id, name, token, wait_s=LEFTOVER_WAIT_S if in_doubt else 0.0)
            raise
        return sandbox

    async def _image_user(self, image: str) -> str | None:
        """The image's own USER (None: root, or the image is not here yet)."""
        async with self.call(f"inspecting image {image}", API_TIMEOUT_S):
            try:
                found = await self.client().images.inspect(image)
            except DockerError as exc:
                if exc.status == 404:
                    return None
                raise
        return str((found.get("Config") or {}).get("User") or "") or None

    async def _home_of(self, spec: SandboxSpec, user: str) -> str | None:
        """The HOME of the user the sandbox runs as, from the image's /etc/passwd (read from a
        container that is created, never started, and removed); None when it has none."""
        config: dict[str, Any] = {
            "Image": spec.image,
            "Entrypoint": [],
            "Cmd": ["true"],
            "Labels": {OWNER_LABEL: "true"},  # an orphan of a crash here is found and removed
            "HostConfig": {"NetworkMode": "none"},
        }
        if self.settings.pull_missing:
            async with self.call(f"inspecting image {spec.image}", API_TIMEOUT_S):
                try:
                    await self.client().images.inspect(spec.image)
                    present = True
                except DockerError as exc:
                    if exc.status != 404:
                        raise
                    present = False
            if not present:
                async with self.call(f"pulling image {spec.image}", PULL_TIMEOUT_S):
                    await self.client().images.pull(spec.image)
        async with self.call(f"reading /etc/passwd of {spec.image}", PASSWD_LOOKUP_TIMEOUT_S):
            try:
                probe = await self.client().containers.create(config)
            except DockerError as exc:
                raise _create_error(exc, spec, "", self) from exc
            try:
                try:
                    archive = await probe.get_archive("/etc/passwd")
                except DockerError as exc:
                    if exc.status == 404:
                        return None
                    raise
                with archive:
                    member = archive.next()
                    content = archive.extractfile(member) if member is not None and member.isfile() else None
                    passwd = content.read().decode("utf-8", "replace") if content is not None else ""
            finally:
                with anyio.CancelScope(shield=True):
                    await probe.delete(force=True, v=True)
        return home_from_passwd(passwd, user)

    async def _create_container(
        self, config: dict[str, Any], name: str, spec: SandboxSpec, *, pull: bool
    ) -> str | None:
        """The new container's id, or None when the image is missing and may be pulled."""
        async with self.call(f"creating a container from {spec.image}", DEFAULT_CREATE_TIMEOUT_S):
            try:
                return str((await self.client().containers.create(config, name=name)).id)
            except DockerError as exc:
                if exc.status == 404 and pull:
                    return None
                raise _create_error(exc, spec, name, self) from exc

    async def _remove_leftover(self, container_id: str | None, name: str, token: str, *, wait_s: float) -> None:
        """After a failed or cancelled create: remove the container if it exists and is ours,
        watching up to `wait_s` for one whose create was still in flight."""
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            try:
                container = await self.client().containers.get(container_id or name)
                if (container["Config"].get("Labels") or {}).get(CREATE_TOKEN_LABEL) == token:
                    await container.delete(force=True, v=True)
                return
            except DockerError as exc:
                if exc.status != 404 or time.monotonic() >= deadline:
                    return  # the engine is gone, or nothing appeared in time
            except (aiohttp.ClientError, OSError, ProviderError):
                return  # the engine is gone: nothing we can remove
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def attach(self, sandbox_id: str) -> DockerSandbox | None:
        container = await self._inspect(sandbox_id)
        if container is None or not _owned(container):
            return None
        if not container["State"].get("Running"):
            # A restarted engine leaves our containers stopped; the sandbox's files are still there.
            async with self.call(f"restarting container {sandbox_id}", DEFAULT_CREATE_TIMEOUT_S):
                try:
                    await container.start()
                except DockerError as exc:
                    if exc.status == 404:
                        return None
                    raise
        labels = container["Config"].get("Labels") or {}
        default_user = labels.get(USER_LABEL) or container["Config"].get("User") or None
        return DockerSandbox(self, str(container["Id"]), default_user=default_user)

    async def _inspect(self, sandbox_id: str) -> DockerContainer | None:
        if not sandbox_id or "/" in sandbox_id:
            return None
        async with self.call(f"inspecting container {sandbox_id}", API_TIMEOUT_S):
            try:
                return await self.client().containers.get(sandbox_id)
            except DockerError as exc:
                if exc.status == 404:
                    return None
                raise

    async def destroy(self, sandbox_id: str) -> None:
        container = await self._inspect(sandbox_id)
        if container is None:
            return
        if not _owned(container):
            raise ConflictError(f"sandbox_id: container {sandbox_id} is not managed by mcp-sandboxes; not removing it")
        async with self.call(f"removing container {sandbox_id}", API_TIMEOUT_S):
            try:
                await container.delete(force=True, v=True)
            except DockerError as exc:
                # 404: gone meanwhile; 409: a removal is already in progress.
                if exc.status not in (404, 409):
                    raise

    # -- ImageCommitter ---------------------------------------------------------------------

    async def image_id(self, image: str) -> str | None:
        async with self.call(f"inspecting image {image}", API_TIMEOUT_S):
            try:
                found = await self.client().images.inspect(image)
            except DockerError as exc:
                if exc.status == 404:
                    return None
                raise
        return str(found.get("Id") or "") or None

    async def commit(self, sandbox_id: str, tag: str, labels: dict[str, str]) -> str:
        container = await self._inspect(sandbox_id)
        if container is None or not _owned(container):
            raise SandboxGoneError(f"sandbox {sandbox_id} no longer exists on the {self.engine}; nothing to commit")
        repository, _, version = tag.rpartition(":")
        if not repository or not version:
            raise InvalidInputError("tag", f"{tag!r} is not REPOSITORY:TAG")
        # The container's own labels (its name, create token, default user) would pass to every
        # container made from the image: blank them, and say whose image it is.
        own = {key: "" for key in container["Config"].get("Labels") or {} if key.startswith("io.mcp-sandboxes.")}
        changes = [f"LABEL {key}={json.dumps(value)}" for key, value in {**own, OWNER_LABEL: "true", **labels}.items()]
        # The container runs as root (see the module doc); the image keeps its base image's user.
        base = await self.image_id(str(container["Image"]))
        if base is not None:
            async with self.call(f"inspecting image {base}", API_TIMEOUT_S):
                base_user = ((await self.client().images.inspect(base)).get("Config") or {}).get("User") or ""
            if base_user:
                changes.append(f"USER {base_user}")
        async with self.call(f"committing container {sandbox_id} as {tag}", COMMIT_TIMEOUT_S):
            # Podman's service wants a body (its Decode fails on none); Docker fills an empty one from the container.
            answer = await container.commit(repository=repository, tag=version, changes=changes, config={}, pause=True)
        return str(answer.get("Id") or answer.get("id") or "")

    async def remove_image(self, image: str) -> bool:
        async with self.call(f"inspecting image {image}", API_TIMEOUT_S):
            try:
                found = await self.client().images.inspect(image)
            except DockerError as exc:
                if exc.status == 404:
                    return True
                raise
        labels = (found.get("Config") or {}).get("Labels") or {}
        if labels.get(OWNER_LABEL) != "true":
            raise InvalidInputError("image", f"{image!r} was not made by mcp-sandboxes; it is left alone")
        async with self.call(f"removing image {image}", API_TIMEOUT_S):
            try:
                await self.client().images.delete(image)
            except DockerError as exc:
                if exc.status == 409:  # a container still uses it
                    return False
                if exc.status == 404:
                    return True
                raise
        return True

    async def list_owned(self) -> list[str]:
        async with self.call("listing containers", API_TIMEOUT_S):
            containers = await self.client().containers.list(all=True, filters={"label": [OWNER_LABEL]})
        return [str(container.id) for container in containers]

    async def list_labelled(self, labels: Mapping[str, str]) -> list[str]:
        # The engine ANDs label filters (Docker and Podman's compatible API alike).
        wanted = [OWNER_LABEL, *(f"{key}={value}" for key, value in labels.items())]
        async with self.call("listing containers", API_TIMEOUT_S):
            containers = await self.client().containers.list(all=True, filters={"label": wanted})
        return [str(container.id) for container in containers]

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(API_TIMEOUT_S):
                await client.close()


class DockerSandbox:
    """One running container; every command is a `docker exec` wrapped so it can be signalled."""

    provider = PROVIDER_NAME

    def __init__(self, owner: DockerProvider, container_id: str, *, default_user: str | None) -> None:
        self.id = container_id
        self.provider = owner.name
        self._owner = owner
        self._default_user = default_user
        self._ids: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"DockerSandbox({self.id[:12]})"

    def _container(self) -> DockerContainer:
        return self._owner.client().containers.container(self.id)

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
        exit_code: int | None = None
        async with self.stream(argv, env=env, cwd=cwd, user=user) as process:
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                async with anyio.create_task_group() as tasks:
                    # stdin is fed while output is read: a process that writes before it has
                    # read all its input must not deadlock against us.
                    tasks.start_soon(_feed_stdin, process, stdin)
                    async for chunk in process:
                        (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
                exit_code = await process.wait()
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
    ) -> AsyncIterator[DockerExecStream]:
        check_exec_args(argv, env, cwd, user)
        token = uuid.uuid4().hex
        process = DockerExecStream(self, token, argv[0])
        try:
            await process.start(["sh", "-c", _WRAPPER, token, *argv], env=env, cwd=cwd, user=user or self._default_user)
            yield process
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                await process.finish()

    async def signal_token(self, token: str, signum: int, still_running: Callable[[], Awaitable[bool]]) -> None:
        """Signal the exec whose wrapper wrote exec-<token>.pid; retries briefly while the
        pid file is not written yet and the process has not ended."""
        delay = 0.005
        with anyio.move_on_after(SIGNAL_TIMEOUT_S):
            while True:
                result = await self._raw_exec(["sh", "-c", _SIGNALLER, token, str(int(signum))], user="0")
                if result.exit_code != _NO_PID_FILE or not await still_running():
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.1)

    async def _raw_exec(self, argv: list[str], *, user: str | None = None) -> ExecResult:
        """An unwrapped exec for our own short helper commands (signalling, id lookup)."""
        out = bytearray()
        err = bytearray()
        async with self._owner.call(f"running {argv[0]} in {self.id[:12]}", API_TIMEOUT_S):
            try:
                execution = await self._container().exec(argv, stdin=False, user=user or "")
                async with execution.start(detach=False) as raw:
                    while (message := await raw.read_out()) is not None:
                        (err if message.stream == 2 else out).extend(message.data)
                info = await _exec_inspect_finished(execution)
            except DockerError as exc:
                raise _exec_error(exc, self._owner, self.id) from exc
        return ExecResult(exit_code=int(info["ExitCode"]), stdout=bytes(out), stderr=bytes(err))

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        if path.endswith("/"):
            raise InvalidInputError("path", f"{path!r} names a directory; give the file's path")
        path = _absolute(path, "path")
        directory, filename = posixpath.split(path)
        if not filename:
            raise InvalidInputError("path", f"{path!r} names a directory; give the file's path")
        if not 0 <= mode <= 0o7777:
            raise InvalidInputError("mode", f"{mode:o} is not a file mode; use e.g. 0o644")
        owner = user or self._default_user
        uid, gid = await self._ids_of(owner)
        archive = _tar_one_file(filename, data, mode, uid, gid)
        container = self._container()
        async with self._owner.call(f"writing {path} in {self.id[:12]}", DEFAULT_FILE_TIMEOUT_S):
            try:
                await _put_archive(container, directory, archive)
                return
            except DockerError as exc:
                if exc.status != 404 or "No such container" in exc.message:
                    raise _file_error(exc, path, self._owner, self.id) from exc
            # The parent directory is missing: make it as the file's owner, then write again.
            made = await self.exec(["mkdir", "-p", "--", directory], user=owner, timeout=API_TIMEOUT_S)
            if not made.ok:
                detail = made.stderr.decode("utf-8", "replace").strip()
                raise InvalidInputError("path", f"cannot create directory {directory!r}: {detail}")
            try:
                await _put_archive(container, directory, archive)
            except DockerError as exc:
                raise _file_error(exc, path, self._owner, self.id) from exc

    async def get_file(self, path: str) -> bytes:
        path = _absolute(path, "path")
        requested = path
        for _ in range(_MAX_SYMLINKS):
            async with self._owner.call(f"reading {path} in {self.id[:12]}", DEFAULT_FILE_TIMEOUT_S):
                try:
                    archive = await self._container().get_archive(path)
                except DockerError as exc:
                    raise _file_error(exc, requested, self._owner, self.id) from exc
            with archive:
                member = archive.next()
                if member is None:
                    raise ProviderError(f"{self._owner.engine} returned an empty archive for {requested}")
                if member.isfile():
                    content = archive.extractfile(member)
                    assert content is not None  # a regular file always has content
                    return content.read()
                if member.issym():
                    path = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.linkname))
                    continue
                if member.isdir():
                    raise InvalidInputError("path", f"{requested} is a directory; give a file's path")
                raise InvalidInputError("path", f"{requested} is not a regular file")
        raise InvalidInputError("path", f"{requested}: too many levels of symbolic links")

    async def _ids_of(self, user: str | None) -> tuple[int, int]:
        """Numeric uid and gid for a user name or uid, as the sandbox's own passwd sees them."""
        key = user or ""
        if key in self._ids:
            return self._ids[key]
        numeric = re.fullmatch(r"(\d+):(\d+)", key)
        if numeric:
            ids = (int(numeric.group(1)), int(numeric.group(2)))
        else:
            result = await self.exec(["sh", "-c", "id -u && id -g"], user=user, timeout=ID_LOOKUP_TIMEOUT_S)
            fields = result.stdout.split()
            if not result.ok or len(fields) != 2:
                detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip()
                raise InvalidInputError("user", f"cannot resolve user {user!r} in the sandbox: {detail}")
            ids = (int(fields[0]), int(fields[1]))
        self._ids[key] = ids
        return ids


class DockerExecStream:
    """A running docker exec. Iterate for output; `finish` (run by the stream context) kills
    it if still running and closes the connection."""

    def __init__(self, sandbox: DockerSandbox, token: str, program: str) -> None:
        self._sandbox = sandbox
        self._token = token
        self._program = program
        self._exec: Exec | None = None
        self._raw: Stream | None = None
        self._connection: Stream | None = None  # set before the hijack, so cleanup can close it
        self._eof = anyio.Event()
        self._exit_code: int | None = None
        self._stdin_closed = False

    async def start(self, argv: list[str], *, env: dict[str, str] | None, cwd: str | None, user: str | None) -> None:
        owner = self._sandbox._owner
        async with owner.call(f"starting {self._program!r} in {self._sandbox.id[:12]}", API_TIMEOUT_S):
            try:
                self._exec = await self._sandbox._container().exec(
                    argv, stdin=True, user=user or "", environment=env or None, workdir=cwd
                )
                self._connection = self._exec.start(detach=False)
                self._raw = await self._connection.__aenter__()
            except DockerError as exc:
                raise _exec_error(exc, self._sandbox._owner, self._sandbox.id) from exc

    async def __aiter__(self) -> AsyncIterator[OutputChunk]:
        raw = self._started()
        while True:
            try:
                message = await raw.read_out()
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise ProviderError(f"lost the output of {self._program!r}: {_reason(exc)}") from exc
            if message is None:
                self._eof.set()
                return
            yield OutputChunk(stream="stderr" if message.stream == 2 else "stdout", data=message.data)

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise ConflictError(f"stdin of {self._program!r} is already closed")
        try:
            with anyio.fail_after(STDIN_WRITE_TIMEOUT_S):
                await self._started().write_in(data)
        except TimeoutError as exc:
            raise ProviderError(f"{self._program!r} did not read its stdin within {STDIN_WRITE_TIMEOUT_S:g}s") from exc
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise ProviderError(f"cannot write to the stdin of {self._program!r}: {_reason(exc)}") from exc

    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        # aiodocker's Stream.close() would end the whole connection; the process only needs
        # EOF on stdin, which the engine passes on when we half-close the hijacked socket.
        response = getattr(self._started(), "_resp", None)
        connection = getattr(response, "connection", None)
        transport = getattr(connection, "transport", None)
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self._exit_code is not None:
            return
        await self._sandbox.signal_token(self._token, signum, self._may_be_running)

    async def wait(self) -> int:
        if self._exit_code is not None:
            return self._exit_code
        execution = self._started_exec()
        delay = 0.002
        while True:
            code = await self._poll(execution)
            if code is not None:
                self._exit_code = code
                return code
            # Output EOF usually means the process ended; until then, poll with backoff.
            with anyio.move_on_after(delay):
                await self._eof.wait()
            delay = min(delay * 2, 0.25)

    async def _poll(self, execution: Exec) -> int | None:
        async with self._sandbox._owner.call(f"inspecting {self._program!r}", API_TIMEOUT_S):
            try:
                info = await execution.inspect()
            except DockerError as exc:
                raise _exec_error(exc, self._sandbox._owner, self._sandbox.id) from exc
        return _finished_code(info)

    async def _may_be_running(self) -> bool:
        if self._exit_code is not None:
            return False
        code = await self._poll(self._started_exec())
        if code is not None:
            self._exit_code = code
        return code is None

    async def finish(self) -> None:
        """Kill the process if it still runs, then close the connection. Bounded by the caller."""
        try:
            if self._exec is not None and await self._may_be_running():
                started = self._raw is not None
                # A start that failed or was cancelled may never have run the process: try briefly.
                with anyio.move_on_after(SIGNAL_TIMEOUT_S if started else KILL_GRACE_S):
                    await self.signal(_signal.SIGKILL)
                if started:
                    with anyio.move_on_after(KILL_GRACE_S):
                        await self.wait()
        except McpSandboxesError:
            pass  # the engine or the container is gone: nothing left to kill
        finally:
            if self._connection is not None:
                await self._connection.close()

    def _started(self) -> Stream:
        if self._raw is None:
            raise ConflictError(f"{self._program!r} has not started")
        return self._raw

    def _started_exec(self) -> Exec:
        if self._exec is None:
            raise ConflictError(f"{self._program!r} has not started")
        return self._exec


# -- helpers ------------------------------------------------------------------------------


async def _feed_stdin(process: DockerExecStream, data: bytes | None) -> None:
    if data:
        await process.send_stdin(data)
    await process.close_stdin()


async def _put_archive(container: DockerContainer, directory: str, archive: bytes) -> None:
    # Not aiodocker's put_archive: it cannot pass noOverwriteDirNonDir, without which the
    # engine silently replaces a directory by the file. A file object, not bytes: aiohttp
    # writes a large bytes body in one blocking call.
    async with container.docker._query(
        f"containers/{container.id}/archive",
        method="PUT",
        data=io.BytesIO(archive),
        headers={"Content-Type": "application/x-tar"},
        params={"path": directory, "noOverwriteDirNonDir": "1"},
    ):
        pass


def _owned(container: DockerContainer) -> bool:
    return OWNER_LABEL in (container["Config"].get("Labels") or {})


def _finished_code(info: Mapping[str, Any]) -> int | None:
    # Right after start the engine may not yet mark the exec running; an exit code appears
    # only once it has really ended.
    if info.get("Running") or info.get("ExitCode") is None:
        return None
    return int(info["ExitCode"])


async def _exec_inspect_finished(execution: Exec) -> dict[str, Any]:
    delay = 0.002
    while True:
        info: dict[str, Any] = await execution.inspect()
        if _finished_code(info) is not None:
            return info
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.1)


def container_config(spec: SandboxSpec, *, name: str | None) -> dict[str, Any]:
    """The engine's container config for a spec; rejects values the engine would reject,
    naming the field."""
    if not spec.image.strip() or any(c.isspace() for c in spec.image):
        raise InvalidInputError("image", f"{spec.image!r} is not an image reference; e.g. mcp-sandboxes/base:latest")
    if name is not None and not _CONTAINER_NAME.fullmatch(name):
        raise InvalidInputError("name", f"{name!r} is not a container name; use letters, digits, '_', '.', '-'")
    workdir = _absolute(spec.workdir, "workdir")
    for key, value in spec.env.items():
        if not _ENV_KEY.fullmatch(key) or "\x00" in value:
            raise InvalidInputError(f"env.{key}", "names must be non-empty without '=' or NUL; values without NUL")
    if spec.user is not None and (not spec.user.strip() or any(c.isspace() for c in spec.user)):
        raise InvalidInputError("user", f"{spec.user!r} is not a user; give a name or uid, e.g. agent or 1000")
    mounts = []
    for index, mount in enumerate(spec.mounts):
        mounts.append(
            {
                "Type": "bind",
                "Source": _absolute(mount.source, f"mounts[{index}].source"),
                "Target": _absolute(mount.target, f"mounts[{index}].target"),
                "ReadOnly": mount.read_only,
            }
        )
    for key in spec.labels:
        if not key.strip():
            raise InvalidInputError("labels", "label names must be non-empty")
    host_config: dict[str, Any] = {
        "Init": True,
        "NetworkMode": spec.network,
        "Mounts": mounts,
        "AutoRemove": False,
        "RestartPolicy": {"Name": "no"},
        "CapDrop": ["ALL"],
        "CapAdd": list(SETUP_CAPABILITIES),
        "SecurityOpt": [NO_NEW_PRIVILEGES],
    }
    if spec.runtime is not None:
        host_config["Runtime"] = spec.runtime
    if spec.read_only_root:
        host_config["ReadonlyRootfs"] = True
        # The user's HOME joins these in create(), once the image's passwd has been read.
        mounts.extend(_writable_volumes([workdir, "/tmp"], mounts))
    limits = spec.limits
    if limits.memory_mb is not None:
        host_config["Memory"] = limits.memory_mb * 1024 * 1024
        host_config["MemorySwap"] = host_config["Memory"]  # no swap on top: the limit is the limit
    if limits.cpus is not None:
        host_config["NanoCpus"] = int(limits.cpus * 1_000_000_000)
    if limits.pids is not None:
        host_config["PidsLimit"] = limits.pids
    labels = {**spec.labels, OWNER_LABEL: "true"}
    if spec.name:
        labels[SANDBOX_NAME_LABEL] = spec.name
    if spec.user:
        labels[USER_LABEL] = spec.user
    return {
        "Image": spec.image,
        "Entrypoint": [],  # an image's entrypoint would wrap or replace the keep-alive command
        "Cmd": KEEPALIVE_CMD,
        "Env": [f"{key}={value}" for key, value in spec.env.items()],
        "WorkingDir": workdir,
        "User": "0" if spec.user else "",  # see the module doc: execs run as spec.user
        "Labels": labels,
        "Tty": False,
        "OpenStdin": False,
        "HostConfig": host_config,
    }


def _writable_volumes(targets: list[str], mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anonymous volumes (filled from the image, owners kept; removed with the container) for
    the targets that no mount covers yet."""
    added: list[dict[str, Any]] = []
    for target in targets:
        target = posixpath.normpath(target)
        if target == "/" or any(_covers(m["Target"], target) for m in [*mounts, *added]):
            continue
        added.append({"Type": "volume", "Target": target, "ReadOnly": False})
    return added


def _covers(mount_target: str, path: str) -> bool:
    mount_target = posixpath.normpath(mount_target)
    return path == mount_target or path.startswith(mount_target.rstrip("/") + "/")


def home_from_passwd(passwd: str, user: str) -> str | None:
    """The home directory of `user` (a name or uid, optionally with :group) in passwd text;
    None when it has no entry or its home is /."""
    name = user.partition(":")[0]
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and (fields[2] == name if name.isdigit() else fields[0] == name):
            home = posixpath.normpath(fields[5]) if fields[5].startswith("/") else "/"
            return None if home == "/" else home
    return None


def _absolute(path: str, field: str) -> str:
    if not path.startswith("/") or "\x00" in path:
        raise InvalidInputError(field, f"{path!r} must be an absolute path inside the sandbox, e.g. /workspace")
    return posixpath.normpath(path)


def _tar_one_file(name: str, data: bytes, mode: int, uid: int, gid: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.uid = uid
    info.gid = gid
    info.mtime = int(time.time())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DockerError):
        return str(exc.message)
    return str(exc) or type(exc).__name__


def _create_error(exc: DockerError, spec: SandboxSpec, name: str, owner: DockerProvider) -> McpSandboxesError:
    message = str(exc.message)
    if exc.status == _CANNOT_CONNECT:
        return owner.unreachable(exc)
    if exc.status == 404 and "image" in message.lower():
        return owner.image_missing(spec.image)
    if exc.status == 409:
        return ConflictError(f"name: a container named {name!r} already exists; choose another name or destroy it")
    if exc.status == 400:
        match = re.search(r"bind source path does not exist: (\S+)", message)
        if match:
            index = next((i for i, m in enumerate(spec.mounts) if m.source.rstrip("/") == match.group(1)), 0)
            return InvalidInputError(f"mounts[{index}].source", f"{match.group(1)} does not exist on the Docker host")
        return InvalidInputError("spec", f"the {owner.engine} rejected it: {message}")
    return ProviderError(f"{owner.engine} failed creating a container from {spec.image}: {message}")


def _start_error(exc: DockerError, spec: SandboxSpec, owner: DockerProvider) -> McpSandboxesError:
    message = str(exc.message)
    if exc.status == _CANNOT_CONNECT:
        return owner.unreachable(exc)
    if "unable to find user" in message or "no matching entries in passwd" in message:
        return InvalidInputError("user", f"{spec.user!r} does not exist in image {spec.image}; use a user it defines")
    if "executable file not found" in message or "no such file or directory" in message.lower():
        return InvalidInputError(
            "image", f"{spec.image} cannot run {' '.join(KEEPALIVE_CMD)!r} (it needs sh and sleep): {message}"
        )
    return ProviderError(f"{owner.engine} could not start a container from {spec.image}: {message}")


def _exec_error(exc: DockerError, owner: DockerProvider, container_id: str) -> McpSandboxesError:
    message = str(exc.message)
    if exc.status == _CANNOT_CONNECT:
        return owner.unreachable(exc)
    if "unable to find user" in message or "no matching entries in passwd" in message:
        return InvalidInputError(
            "user", f"the user does not exist in the sandbox's image ({message}); use one it defines"
        )
    if exc.status == 404:  # no such container, or its exec records went with it
        return SandboxGoneError(f"sandbox {container_id[:12]} no longer exists ({message}); create a new one")
    if exc.status == 409:
        return SandboxGoneError(f"sandbox {container_id[:12]} is not running ({message}); create a new one")
    return ProviderError(f"{owner.engine} failed to run a command in {container_id[:12]}: {message}")


def _file_error(exc: DockerError, path: str, owner: DockerProvider, container_id: str) -> McpSandboxesError:
    message = str(exc.message)
    if exc.status == _CANNOT_CONNECT:
        return owner.unreachable(exc)
    if "rootfs is marked read-only" in message:
        return InvalidInputError(
            "path", f"{path} is on the sandbox's read-only root filesystem; write under its workdir, HOME or /tmp"
        )
    if "cannot overwrite directory" in message:
        return InvalidInputError("path", f"{path} is a directory in the sandbox; give a file's path")
    if "extraction point is not a directory" in message:
        return InvalidInputError("path", f"the parent of {path} is not a directory in the sandbox")
    if exc.status == 404 and "No such container" in message:
        return SandboxGoneError(f"sandbox {container_id[:12]} no longer exists; create a new one")
    if exc.status == 404:
        return NotFoundError(f"path: {path} does not exist in sandbox {container_id[:12]}")
    if exc.status == 400:
        return InvalidInputError("path", f"{path}: {message}")
    if exc.status == 403:
        return InvalidInputError("path", f"{path} is on a read-only file system in the sandbox")
    return ProviderError(f"{owner.engine} failed on {path} in {container_id[:12]}: {message}")
