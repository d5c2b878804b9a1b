"""Modal sandboxes, driven through Modal's own Python SDK (`modal`, pinned in pyproject).

Modal has no REST API for sandboxes: its public interface is the SDK, which speaks gRPC
to the control plane (`modal.client.ModalClient` at `server_url`, default
https://api.modal.com) and, for a sandbox's commands, to the per-task "command router"
(`modal.task_command_router.TaskCommandRouter`) whose URL and JWT the control plane hands
out. The SDK keeps auth (the token pair as `x-modal-token-id` / `x-modal-token-secret`,
then short-lived JWTs), retries and reconnects; we use its async interface (`.aio`):

- `App.lookup(app_name, create_if_missing=True, environment_name=...)` once per provider;
- `Sandbox.create(app=, image=Image.from_registry(spec.image), env=, workdir=, cpu=,
  memory=, block_network=, tags=, timeout=)`: a V2 sandbox (the SDK's default), tagged
  with our labels, plus the workdir and user `attach` restores;
- `Sandbox.exec(..., text=False)` for every command, its stdout/stderr read as bytes while
  it runs, its stdin written through the router; the SDK has no signal call, so each
  command is started by a `/bin/sh` wrapper that records its pid and a signal is a `kill`
  run by a second exec (`_remote_shell`); a per-command `user` is switched to with `su`;
- files move through `cat` in an exec (stdin in, stdout out: binary safe), so they need
  nothing in the sandbox but a shell;
- `Sandbox.from_id` + `get_tags` (attach), `terminate` (destroy), `Sandbox.list(app_id=,
  tags=)` (list_owned).

`modal` is an optional extra (`pip install 'mcp-sandboxes[modal]'`) imported on first use, so a
server that never uses Modal never loads it; without it the provider refuses to start, naming the
extra (MISSING_SDK). Every
SDK call has a named finite timeout; SDK errors become ours in `_modal_errors`. The token
pair comes from providers.modal.token_id / token_secret or MODAL_TOKEN_ID /
MODAL_TOKEN_SECRET, never from tool arguments, and appears in no message or repr.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal as _signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mcp_sandboxes.errors import (
    InvalidInputError,
    McpSandboxesError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
)
from mcp_sandboxes.providers._cleanup import removed_on_failure
from mcp_sandboxes.providers._labels import USER_LABEL, WORKDIR_LABEL, owner_labels
from mcp_sandboxes.providers._settings import validated
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
from mcp_sandboxes.providers.remote._modal_errors import TOKEN_HINT, timed_out, translate
from mcp_sandboxes.providers.remote._remote_shell import q, run_as, scratch_path, signal_name, wait_until, wrap
from mcp_sandboxes.providers.remote._remote_stream import QueuedStream, followed, run_collected, sole_exception
from mcp_sandboxes.providers.remote._remote_support import (
    CLEANUP_TIMEOUT_S,
    CONTROL_TIMEOUT_S,
    ROOT_USERS,
    refuse_mounts,
)

if TYPE_CHECKING:
    import modal

PROVIDER_NAME = "modal"
MISSING_SDK = (
    "modal: the Modal SDK is not installed (it is an optional extra); install it with"
    " pip install 'mcp-sandboxes[modal]'"
)
DEFAULT_SERVER_URL = "https://api.modal.com"
TOKEN_ENV = ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")
# stdin goes to the router in pieces well under gRPC's message limits.
STDIN_CHUNK_BYTES = 1024 * 1024
# The exit code of the get_file script when the path does not exist.
MISSING_FILE_EXIT = 44
LIST_TIMEOUT_S = 120.0
SIGNAL_TIMEOUT_S = 30.0

T = TypeVar("T")


class ModalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_id: SecretStr | None = Field(default=None, description="Modal token id; default: $MODAL_TOKEN_ID.")
    token_secret: SecretStr | None = Field(
        default=None, description="Modal token secret; default: $MODAL_TOKEN_SECRET."
    )
    server_url: str = Field(default=DEFAULT_SERVER_URL, pattern=r"^https?://", description="Modal's API endpoint.")
    app_name: str = Field(default="mcp-sandboxes", min_length=1, max_length=64, description="App sandboxes run in.")
    environment: str | None = Field(default=None, description="Modal environment; default: the workspace's default.")
    connect_timeout_s: float = Field(
        default=15.0, gt=0, le=120, description="How long connecting may take (the SDK alone retries for a minute)."
    )
    timeout_s: int = Field(default=3600, ge=60, le=86_400, description="Sandbox lifetime (Modal's `timeout`).")


def _secret(setting: SecretStr | None, env_name: str) -> str | None:
    if setting is not None and setting.get_secret_value():
        return setting.get_secret_value()
    return os.environ.get(env_name) or None


def require_sdk() -> None:
    """Refuses, naming the extra, when the `modal` package is not installed."""
    if importlib.util.find_spec("modal") is None:
        raise ProviderUnavailableError(MISSING_SDK)


class ModalProvider(ProviderLifecycle):
    name = PROVIDER_NAME

    def __init__(self, settings: ModalSettings | None = None) -> None:
        require_sdk()
        self.settings = settings or ModalSettings()
        self._token_id = _secret(self.settings.token_id, TOKEN_ENV[0])
        self._token_secret = _secret(self.settings.token_secret, TOKEN_ENV[1])
        self._client: modal.Client | None = None
        self._app: modal.App | None = None
        self._lock = anyio.Lock()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ModalProvider:
        return cls(validated(ModalSettings, settings, PROVIDER_NAME))

    def __repr__(self) -> str:
        return f"ModalProvider(server_url={self.settings.server_url!r}, app_name={self.settings.app_name!r})"

    # -- plumbing --------------------------------------------------------------------

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self._token_id, self._token_secret)

    async def call(
        self,
        action: str,
        make: Callable[[], Awaitable[T]],
        *,
        timeout_s: float = CONTROL_TIMEOUT_S,
        sandbox_id: str | None = None,
    ) -> T:
        """`make()` within `timeout_s`, its errors translated (sandbox_id: NOT_FOUND means gone)."""
        try:
            with anyio.fail_after(timeout_s):
                return await make()
        except TimeoutError:
            raise timed_out(action, timeout_s, self.settings.server_url) from None
        except McpSandboxesError:
            raise
        except Exception as exc:
            raise translate(
                exc, action, secrets=self.secrets, server_url=self.settings.server_url, sandbox_id=sandbox_id
            ) from None

    async def client(self) -> modal.Client:
        async with self._lock:
            if self._client is None:
                if not (self._token_id and self._token_secret):
                    raise ProviderError(f"modal: no token is configured; {TOKEN_HINT}")
                import modal
                from modal_proto import api_pb2

                # hpack (under grpclib's HTTP/2) logs every header it encodes, the token pair
                # included, at DEBUG: keep it quiet even when the server logs at DEBUG.
                hpack_logger = logging.getLogger("hpack")
                if hpack_logger.getEffectiveLevel() < logging.INFO:
                    hpack_logger.setLevel(logging.INFO)
                # Client.from_credentials would take the URL from the global Modal config (or
                # ~/.modal.toml); a client of our own honours providers.modal.server_url.
                created = modal.Client(
                    self.settings.server_url, api_pb2.CLIENT_TYPE_CLIENT, (self._token_id, self._token_secret)
                )
                try:
                    await self.call(
                        f"connecting to {self.settings.server_url}",
                        created.__aenter__,
                        timeout_s=self.settings.connect_timeout_s,
                    )
                except BaseException:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                        await created.close.aio()
                    raise
                self._client = created
            return self._client

    async def app(self) -> modal.App:
        client = await self.client()
        if self._app is None:
            import modal

            self._app = await self.call(
                f"looking up app {self.settings.app_name!r}",
                partial(
                    modal.App.lookup.aio,
                    self.settings.app_name,
                    create_if_missing=True,
                    environment_name=self.settings.environment,
                    client=client,
                ),
            )
        return self._app

    # -- Provider ---------------------------------------------------------------------

    async def check(self) -> Availability:
        if not (self._token_id and self._token_secret):
            return Availability(
                provider=self.name,
                available=False,
                reason="MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are not set",
                fix="export MODAL_TOKEN_ID=<id> MODAL_TOKEN_SECRET=<secret> (from `modal token new`) or set "
                "providers.modal.token_id and token_secret in the config file",
            )
        try:
            client = await self.client()
            await self.call("saying hello", client.hello.aio)
        except ProviderError as exc:
            return Availability(provider=self.name, available=False, reason=str(exc), fix=TOKEN_HINT)
        return Availability(provider=self.name, available=True)

    async def create(self, spec: SandboxSpec) -> Sandbox:
        refuse_mounts(spec, PROVIDER_NAME)
        import modal

        app = await self.app()
        client = await self.client()
        tags = {**owner_labels(spec), WORKDIR_LABEL: spec.workdir}
        if spec.user:
            tags[USER_LABEL] = spec.user
        cpus, memory_mb = spec.limits.cpus, spec.limits.memory_mb
        handle = await self.call(
            "creating a sandbox",
            partial(
                modal.Sandbox.create.aio,
                app=app,
                image=modal.Image.from_registry(spec.image),
                env=dict(spec.env) or None,
                workdir=spec.workdir,
                # (request, limit): the limit is what Modal enforces.
                cpu=(cpus, cpus) if cpus else None,
                memory=(memory_mb, memory_mb) if memory_mb else None,
                block_network=spec.network == "none",
                tags=tags,
                timeout=self.settings.timeout_s,
                client=client,
            ),
            timeout_s=DEFAULT_CREATE_TIMEOUT_S,
        )
        sandbox = ModalSandbox(self, handle, workdir=spec.workdir, user=spec.user)
        async with removed_on_failure(partial(self.destroy, sandbox.id), cleanup_timeout_s=CLEANUP_TIMEOUT_S):
            setup = f"mkdir -p {q(spec.workdir)}"
            if spec.user and spec.user not in ROOT_USERS:
                setup += f" && chown {q(spec.user)} {q(spec.workdir)}"
            result = await sandbox.exec(["/bin/sh", "-c", setup], user="", cwd="/", timeout=CONTROL_TIMEOUT_S)
            if not result.ok:
                stderr = result.stderr.decode(errors="replace").strip()
                raise ProviderError(f"modal: could not prepare {spec.workdir} in the new sandbox: {stderr}")
        return sandbox

    async def _lookup(self, sandbox_id: str) -> modal.Sandbox | None:
        """The running sandbox with this id, or None when Modal does not know it or it ended."""
        import modal
        from modal import exception as modal_errors

        client = await self.client()
        try:
            with anyio.fail_after(CONTROL_TIMEOUT_S):
                handle = await modal.Sandbox.from_id.aio(sandbox_id, client=client)
        except (modal_errors.NotFoundError, modal_errors.InvalidError):
            return None
        except TimeoutError:
            raise timed_out("looking up a sandbox", CONTROL_TIMEOUT_S, self.settings.server_url) from None
        except Exception as exc:
            raise translate(
                exc, "looking up a sandbox", secrets=self.secrets, server_url=self.settings.server_url
            ) from None
        return handle if handle.returncode is None else None

    async def attach(self, sandbox_id: str) -> Sandbox | None:
        handle = await self._lookup(sandbox_id)
        if handle is None:
            return None
        tags = await self.call("reading sandbox tags", handle.get_tags.aio, sandbox_id=sandbox_id)
        if tags.get(OWNER_LABEL) != "true":
            return None
        return ModalSandbox(self, handle, workdir=tags.get(WORKDIR_LABEL), user=tags.get(USER_LABEL))

    async def destroy(self, sandbox_id: str) -> None:
        handle = await self._lookup(sandbox_id)
        if handle is None:
            return
        try:
            await self.call("terminating a sandbox", handle.terminate.aio, sandbox_id=sandbox_id)
        except SandboxGoneError:
            pass  # it ended between the lookup and the terminate: what destroy wanted

    async def list_owned(self) -> list[str]:
        import modal

        app = await self.app()
        client = await self.client()

        async def collect() -> list[str]:
            found: list[str] = []
            async for handle in modal.Sandbox.list.aio(app_id=app.app_id, tags={OWNER_LABEL: "true"}, client=client):
                found.append(handle.object_id)
            return found

        return await self.call("listing sandboxes", collect, timeout_s=LIST_TIMEOUT_S)

    async def aclose(self) -> None:
        client, self._client, self._app = self._client, None, None
        if client is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                await client.close.aio()


class ModalSandbox:
    provider = PROVIDER_NAME

    def __init__(self, owner: ModalProvider, handle: modal.Sandbox, *, workdir: str | None, user: str | None) -> None:
        self.id: str = handle.object_id
        self._owner = owner
        self._handle = handle
        self._workdir = workdir
        self._user = user

    def __repr__(self) -> str:
        return f"ModalSandbox(id={self.id!r})"

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
        return await run_collected(process, provider=PROVIDER_NAME, argv=argv, stdin=stdin, timeout=timeout)

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
        if not argv:
            raise InvalidInputError("argv", "the command is empty; pass at least the program name")
        who = run_as(self._user, user)
        pidfile = f"{scratch_path()}.pid"
        # env and cwd go to Modal as the exec's own fields; the wrapper only records the pid
        # (for signals) and switches the user.
        command = wrap(argv, user=who, pidfile=pidfile)
        workdir = cwd or self._workdir
        started = await self._owner.call(
            f"starting {argv[0]}",
            partial(self._handle.exec.aio, *command, workdir=workdir, env=dict(env) if env else None, text=False),
            sandbox_id=self.id,
        )
        process = ModalProcess(self, started, pidfile, who)
        try:
            async with followed(process, process.follow, process.kill, cleanup_timeout_s=CLEANUP_TIMEOUT_S) as running:
                yield running
        except BaseExceptionGroup as group:
            raise sole_exception(group) from None

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        if not path.startswith("/"):
            raise InvalidInputError("path", f"{path!r} is not absolute; give the full path inside the sandbox")
        partial_path = f"{path}.mcp-sandboxes-partial"
        script = (
            f'mkdir -p "$(dirname {q(path)})" && cat > {q(partial_path)} && '
            f"chmod {mode:o} {q(partial_path)} && mv -f {q(partial_path)} {q(path)}"
        )
        result = await self.exec(
            ["/bin/sh", "-c", script], stdin=data, user=user, cwd="/", timeout=DEFAULT_FILE_TIMEOUT_S
        )
        if not result.ok:
            stderr = result.stderr.decode(errors="replace").strip()
            raise ProviderError(
                f"modal: writing {path} in sandbox {self.id} failed (exit {result.exit_code}): {stderr}"
            )

    async def get_file(self, path: str) -> bytes:
        if not path.startswith("/"):
            raise InvalidInputError("path", f"{path!r} is not absolute; give the full path inside the sandbox")
        p = q(path)
        script = (
            f"if [ -d {p} ]; then echo 'is a directory' >&2; exit 21; fi; "
            f"if [ ! -e {p} ]; then exit {MISSING_FILE_EXIT}; fi; exec cat {p}"
        )
        result = await self.exec(["/bin/sh", "-c", script], cwd="/", timeout=DEFAULT_FILE_TIMEOUT_S)
        if result.exit_code == MISSING_FILE_EXIT:
            raise NotFoundError(f"modal: {path} does not exist in sandbox {self.id}")
        if not result.ok:
            stderr = result.stderr.decode(errors="replace").strip()
            raise ProviderError(
                f"modal: reading {path} in sandbox {self.id} failed (exit {result.exit_code}): {stderr}"
            )
        return result.stdout


class ModalProcess(QueuedStream):
    """A command started with `Sandbox.exec`: its output read into the queue while it runs."""

    def __init__(
        self,
        sandbox: ModalSandbox,
        process: modal.container_process.ContainerProcess[Any],
        pidfile: str,
        user: str | None,
    ) -> None:
        super().__init__()
        self._sandbox = sandbox
        self._process = process
        self._pidfile = pidfile
        self._user = user

    async def follow(self) -> None:
        """Copy stdout and stderr until both end, then take the exit code. No time limit of
        its own: the process may run as long as its caller holds the stream."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._copy, self._process.stdout, "stdout")
                tg.start_soon(self._copy, self._process.stderr, "stderr")
            code = await self._process.wait.aio()
        except BaseExceptionGroup as group:
            error = sole_exception(group)
            self.output.finish(None, self._translated(error, "reading command output"))
        except Exception as exc:
            self.output.finish(None, self._translated(exc, "waiting for a command"))
        else:
            self.output.finish(code)

    def _translated(self, exc: BaseException, action: str) -> BaseException:
        if not isinstance(exc, Exception):
            return exc
        owner = self._sandbox._owner
        return translate(
            exc, action, secrets=owner.secrets, server_url=owner.settings.server_url, sandbox_id=self._sandbox.id
        )

    async def _copy(self, reader: Any, stream: str) -> None:
        async for chunk in reader:
            await self.output.put(stream, bytes(chunk))

    # -- ExecStream -----------------------------------------------------------------

    async def send_stdin(self, data: bytes) -> None:
        writer = self._process.stdin
        for start in range(0, len(data), STDIN_CHUNK_BYTES):
            writer.write(data[start : start + STDIN_CHUNK_BYTES])
            await self._sandbox._owner.call("writing stdin", writer.drain.aio, sandbox_id=self._sandbox.id)

    async def close_stdin(self) -> None:
        writer = self._process.stdin
        writer.write_eof()
        try:
            await self._sandbox._owner.call("closing stdin", writer.drain.aio, sandbox_id=self._sandbox.id)
        except ProviderError:
            if not self.output.ended:
                raise

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self.output.ended:
            return
        # The pid file appears a moment after the start; wait for it (bounded), then signal.
        pid = q(self._pidfile)
        script = wait_until(f"-s {pid}", tries=100, step_s=0.05) + (
            f'kill -s {signal_name(signum)} "$(cat {pid})" 2>/dev/null; rm -f {pid}; exit 0'
        )
        result = await self._sandbox.exec(
            ["/bin/sh", "-c", script], user=self._user or "", cwd="/", timeout=SIGNAL_TIMEOUT_S
        )
        if not result.ok and not self.output.ended:
            raise ProviderError(
                f"modal: kill -s {signal_name(signum)} failed: {result.stderr.decode(errors='replace')}"
            )

    async def kill(self) -> None:
        if self.output.ended:
            return
        try:
            await self.signal(_signal.SIGKILL)
        except ProviderError:
            pass  # the process (or the whole sandbox) is already gone


__all__ = ["ModalProvider", "ModalSandbox", "ModalSettings"]
