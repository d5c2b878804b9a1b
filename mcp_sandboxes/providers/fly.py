"""Fly Machines: one Fly Machine per sandbox, driven through the Machines REST API.

Vendor documentation followed (public Machines API reference and its OpenAPI spec):
- https://fly.io/docs/machines/api/working-with-machines-api/ : base URL
  https://api.machines.dev, `Authorization: Bearer <token>`, status codes (401 bad or
  missing token, 404, 408 request timed out), rate limit 1 req/s per action per Machine
  with bursts of 3 (answered with 429).
- https://fly.io/docs/machines/api/machines-resource/ : POST /v1/apps/{app}/machines
  (body `{name, region, config: {image, env, guest, metadata, init, restart}}`),
  GET .../machines?metadata.{key}={value} (list by metadata), GET .../{id},
  GET .../{id}/wait?state=started&timeout=N, POST .../{id}/stop,
  DELETE .../{id}?force=true.
- https://docs.machines.dev (OpenAPI `Machines_exec`): POST .../{id}/exec with
  `MachineExecRequest {command: [argv], stdin: string, timeout: seconds}` answering
  `flydv1.ExecResponse {stdout, stderr, exit_code, exit_signal}`.
- https://fly.io/docs/machines/api/apps-resource/ : GET /v1/apps/{app} (used by check()).

What the API does not offer, and what this module does instead:
- Exec is not streamed: the call returns when the command ends. `stream()` therefore
  yields all stdout, then all stderr, when the command has finished; the relative
  order of stdout and stderr lines is lost. Stdin is a single string sent with the
  call, so `send_stdin` data is held until `close_stdin()` (or the first read, wait or
  signal), and then the command starts with it. Stdin sent after that is refused.
- Exec has no cwd, env or user and no signal endpoint for an exec'd process: the
  command is wrapped in `/bin/sh -c` (see `_remote_shell`) which does the cd, env and
  `su`, and which records its pid in a file; `signal()` runs `kill` through a second
  exec. Children of the command are not signalled.
- stdout/stderr come back as JSON strings, so output that is not UTF-8 is not
  byte-exact. Files do not go through that: put_file/get_file move base64 text
  (`base64 -d` / `base64`) and are binary safe.
- There is no filesystem API and no network switch: `network='none'` and host mounts
  are refused with an error that says so.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import signal as _signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx

from mcp_sandboxes.errors import ConflictError, NotFoundError, ProviderError
from mcp_sandboxes.providers._remote_http import (
    RemoteApiError,
    RemoteNotFoundError,
    VendorClient,
    setting_or_env,
)
from mcp_sandboxes.providers._remote_shell import (
    OutputChannel,
    q,
    reject_unsupported,
    signal_name,
    wrap,
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
    SandboxSpec,
)

NAME = "fly"
DEFAULT_API_URL = "https://api.machines.dev"
# A streamed command has no caller timeout; Fly's exec still needs one.
DEFAULT_STREAM_TIMEOUT_S = 3600
# Slack on top of the exec timeout for the HTTP round trip.
HTTP_SLACK_S = 30.0
SIGNAL_TIMEOUT_S = 30.0
CLEANUP_TIMEOUT_S = 30.0
# The machine's main process: it only has to keep the machine running; commands come through exec.
KEEPALIVE = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]
NOT_FOUND_EXIT = 44


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return response.text[:300]


def _exit_code(body: Mapping[str, Any]) -> int:
    signal_number = body.get("exit_signal") or 0
    if isinstance(signal_number, int) and signal_number > 0:
        return 128 + signal_number
    code = body.get("exit_code")
    return int(code) if isinstance(code, int) else -1


class FlyProvider:
    name = NAME

    def __init__(
        self,
        *,
        app: str | None,
        token: str | None,
        api_url: str = DEFAULT_API_URL,
        region: str | None = None,
        request_timeout_s: float = 60.0,
        create_timeout_s: float = DEFAULT_CREATE_TIMEOUT_S,
        stream_timeout_s: int = DEFAULT_STREAM_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.app = app
        self._token = token
        self.region = region
        self.create_timeout_s = create_timeout_s
        self.stream_timeout_s = stream_timeout_s
        self._api = VendorClient(
            vendor="Fly Machines",
            base_url=api_url,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            secrets=[token or ""],
            credential_fix="set FLY_API_TOKEN (or providers.fly.api_token) to a token from `fly tokens create deploy`",
            error_text=_error_text,
            request_timeout_s=request_timeout_s,
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> FlyProvider:
        return cls(
            app=setting_or_env(settings, "app", ["FLY_APP_NAME"]),
            token=setting_or_env(settings, "api_token", ["FLY_API_TOKEN"]),
            api_url=setting_or_env(settings, "api_url", ["FLY_API_HOSTNAME"]) or DEFAULT_API_URL,
            region=setting_or_env(settings, "region", []),
            request_timeout_s=float(settings.get("request_timeout_s", 60.0)),
            create_timeout_s=float(settings.get("create_timeout_s", DEFAULT_CREATE_TIMEOUT_S)),
            stream_timeout_s=int(settings.get("stream_timeout_s", DEFAULT_STREAM_TIMEOUT_S)),
        )

    @property
    def api(self) -> VendorClient:
        return self._api

    def _missing(self) -> Availability | None:
        if not self._token:
            return Availability(
                provider=NAME,
                available=False,
                reason="no Fly API token: FLY_API_TOKEN is not set and providers.fly.api_token is empty",
                fix="run `fly tokens create deploy -a <app>` and export FLY_API_TOKEN with the result",
            )
        if not self.app:
            return Availability(
                provider=NAME,
                available=False,
                reason="no Fly app: FLY_APP_NAME is not set and providers.fly.app is empty",
                fix="create an app for sandboxes (`fly apps create <name>`) and set providers.fly.app to its name",
            )
        return None

    def _require(self) -> str:
        missing = self._missing()
        if missing is not None:
            raise ProviderError(f"{missing.reason}; fix: {missing.fix}")
        assert self.app is not None
        return self.app

    def machines_path(self, suffix: str = "") -> str:
        return f"/v1/apps/{self._require()}/machines{suffix}"

    async def check(self) -> Availability:
        missing = self._missing()
        if missing is not None:
            return missing
        try:
            await self._api.request("GET", f"/v1/apps/{self.app}")
        except RemoteNotFoundError:
            return Availability(
                provider=NAME,
                available=False,
                reason=f"the Fly app {self.app!r} does not exist for this token",
                fix=f"create it with `fly apps create {self.app}` or set providers.fly.app to an existing app",
            )
        except ProviderError as exc:
            return Availability(
                provider=NAME,
                available=False,
                reason=str(exc),
                fix="check FLY_API_TOKEN and providers.fly.api_url",
            )
        return Availability(provider=NAME, available=True)

    def _config(self, spec: SandboxSpec, name: str) -> dict[str, Any]:
        metadata = {**spec.labels, OWNER_LABEL: "true", SANDBOX_NAME_LABEL: spec.name or name}
        config: dict[str, Any] = {
            "image": spec.image,
            "env": dict(spec.env),
            "metadata": metadata,
            "init": {"exec": KEEPALIVE},
            "restart": {"policy": "no"},
            "auto_destroy": False,
        }
        guest: dict[str, Any] = {}
        if spec.limits.cpus is not None:
            guest["cpus"] = max(1, round(spec.limits.cpus))
            guest["cpu_kind"] = "shared"
        if spec.limits.memory_mb is not None:
            guest["memory_mb"] = spec.limits.memory_mb
        if guest:
            config["guest"] = guest
        return config

    async def create(self, spec: SandboxSpec) -> FlySandbox:
        reject_unsupported(spec, "Fly", network_none=False)
        name = f"mcp-{secrets.token_hex(6)}"
        body: dict[str, Any] = {"name": name, "config": self._config(spec, name)}
        if self.region:
            body["region"] = self.region
        response = await self._api.request("POST", self.machines_path(), json=body, timeout_s=self.create_timeout_s)
        machine = response.json()
        machine_id = str(machine["id"])
        try:
            with anyio.fail_after(self.create_timeout_s):
                await self._wait_started(machine_id, str(machine.get("instance_id") or ""))
                sandbox = FlySandbox(self, machine_id, spec)
                result = await sandbox.exec(["mkdir", "-p", spec.workdir], cwd="/", user="", timeout=60.0)
                if not result.ok:
                    raise ProviderError(
                        f"Fly: could not create workdir {spec.workdir!r} in machine {machine_id}: "
                        f"{result.stderr.decode(errors='replace').strip()}"
                    )
        except BaseException:
            # A machine that never became usable is removed, so a failed create leaves nothing.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                await self.destroy(machine_id)
            raise
        return sandbox

    async def _wait_started(self, machine_id: str, instance_id: str) -> None:
        wait_s = max(1, min(60, int(self.create_timeout_s)))
        params = {"state": "started", "timeout": str(wait_s)}
        if instance_id:
            params["instance_id"] = instance_id
        await self._api.request(
            "GET", self.machines_path(f"/{machine_id}/wait"), params=params, timeout_s=wait_s + HTTP_SLACK_S
        )

    async def attach(self, sandbox_id: str) -> FlySandbox | None:
        try:
            response = await self._api.request("GET", self.machines_path(f"/{sandbox_id}"))
        except RemoteNotFoundError:
            return None
        machine = response.json()
        if machine.get("state") in ("destroyed", "destroying"):
            return None
        config = machine.get("config") or {}
        spec = SandboxSpec(
            image=str(config.get("image") or "unknown"),
            env={str(k): str(v) for k, v in (config.get("env") or {}).items()},
            network="host",
            labels={str(k): str(v) for k, v in (config.get("metadata") or {}).items()},
        )
        return FlySandbox(self, sandbox_id, spec)

    async def destroy(self, sandbox_id: str) -> None:
        try:
            await self._api.request(
                "DELETE", self.machines_path(f"/{sandbox_id}"), params={"force": "true"}, ok=(200, 202, 204)
            )
        except RemoteNotFoundError:
            return

    async def list_owned(self) -> list[str]:
        response = await self._api.request("GET", self.machines_path(), params={f"metadata.{OWNER_LABEL}": "true"})
        ids: list[str] = []
        for machine in response.json():
            metadata = (machine.get("config") or {}).get("metadata") or {}
            if metadata.get(OWNER_LABEL) == "true" and machine.get("state") not in ("destroyed", "destroying"):
                ids.append(str(machine["id"]))
        return ids

    async def aclose(self) -> None:
        await self._api.aclose()


class FlySandbox:
    provider = NAME

    def __init__(self, owner: FlyProvider, machine_id: str, spec: SandboxSpec) -> None:
        self._owner = owner
        self.id = machine_id
        self.spec = spec

    async def _exec_call(self, command: list[str], stdin: str | None, timeout_s: float) -> dict[str, Any]:
        body: dict[str, Any] = {"command": command, "timeout": max(1, int(timeout_s + 0.999))}
        if stdin is not None:
            body["stdin"] = stdin
        try:
            response = await self._owner.api.request(
                "POST", self._owner.machines_path(f"/{self.id}/exec"), json=body, timeout_s=timeout_s + HTTP_SLACK_S
            )
        except RemoteApiError as exc:
            if exc.status == 408:
                raise TimeoutError(f"Fly: the command in machine {self.id} ran longer than {timeout_s:g}s") from None
            raise
        result: dict[str, Any] = response.json()
        return result

    def _command(
        self,
        argv: list[str],
        *,
        stdin: bytes | None,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
        pidfile: str | None = None,
    ) -> tuple[list[str], str | None]:
        merged_env = {**self.spec.env, **(env or {})}
        run_as = self.spec.user if user is None else (user or None)
        stdin_text: str | None = None
        if stdin is not None:
            try:
                stdin_text = stdin.decode("utf-8")
            except UnicodeDecodeError:
                # The API's stdin is a JSON string: binary stdin travels as base64 and is decoded in the machine.
                argv = ["/bin/sh", "-c", "base64 -d | " + " ".join(q(a) for a in argv)]
                stdin_text = base64.b64encode(stdin).decode("ascii")
        command = wrap(argv, cwd=cwd or self.spec.workdir, env=merged_env, user=run_as, pidfile=pidfile)
        return command, stdin_text

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
        command, stdin_text = self._command(argv, stdin=stdin, env=env, cwd=cwd, user=user)
        limit = timeout if timeout is not None else float(self._owner.stream_timeout_s)
        body = await self._exec_call(command, stdin_text, limit)
        return ExecResult(
            exit_code=_exit_code(body),
            stdout=str(body.get("stdout") or "").encode("utf-8"),
            stderr=str(body.get("stderr") or "").encode("utf-8"),
        )

    @asynccontextmanager
    async def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[FlyProcess]:
        process = FlyProcess(self, argv, env=env, cwd=cwd, user=user)
        async with anyio.create_task_group() as tg:
            process.task_group = tg
            try:
                yield process
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                    await process.terminate()
                tg.cancel_scope.cancel()

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        script = f'mkdir -p "$(dirname {q(path)})" && base64 -d > {q(path)} && chmod {mode:o} {q(path)}'
        owner = self.spec.user if user is None else (user or None)
        if owner:
            script += f" && chown {q(owner)} {q(path)}"
        result = await self._exec_root(script, stdin=base64.b64encode(data).decode("ascii"))
        if not result.ok:
            raise ProviderError(
                f"Fly: writing {path} in machine {self.id} failed: {result.stderr.decode(errors='replace').strip()}"
            )

    async def get_file(self, path: str) -> bytes:
        script = f"[ -f {q(path)} ] || exit {NOT_FOUND_EXIT}; base64 < {q(path)}"
        result = await self._exec_root(script)
        if result.exit_code == NOT_FOUND_EXIT:
            raise NotFoundError(f"{path}: no such file in Fly machine {self.id}")
        if not result.ok:
            raise ProviderError(
                f"Fly: reading {path} in machine {self.id} failed: {result.stderr.decode(errors='replace').strip()}"
            )
        try:
            return base64.b64decode(result.stdout, validate=False)
        except binascii.Error as exc:
            raise ProviderError(f"Fly: {path} in machine {self.id} came back garbled: {exc}") from None

    async def _exec_root(self, script: str, stdin: str | None = None) -> ExecResult:
        body = await self._exec_call(["/bin/sh", "-c", script], stdin, DEFAULT_FILE_TIMEOUT_S)
        return ExecResult(
            _exit_code(body),
            str(body.get("stdout") or "").encode("utf-8"),
            str(body.get("stderr") or "").encode("utf-8"),
        )


class FlyProcess:
    """A command run through Fly's exec. Output arrives when the command has ended (see module docs)."""

    def __init__(
        self,
        sandbox: FlySandbox,
        argv: list[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
    ) -> None:
        self._sandbox = sandbox
        self._argv = argv
        self._env = env
        self._cwd = cwd
        self._user = user
        self._stdin = bytearray()
        self._stdin_closed = False
        self._started = False
        self._pidfile = f"/tmp/.mcp-sandboxes-{secrets.token_hex(8)}.pid"
        self._channel = OutputChannel()
        self.task_group: anyio.abc.TaskGroup | None = None

    def _start(self) -> None:
        if self._started or self._channel.finished.is_set():
            return
        self._started = True
        self._stdin_closed = True
        assert self.task_group is not None, "use FlyProcess through FlySandbox.stream()"
        self.task_group.start_soon(self._run)

    async def _run(self) -> None:
        stdin = bytes(self._stdin) if self._stdin else None
        try:
            command, stdin_text = self._sandbox._command(
                self._argv, stdin=stdin, env=self._env, cwd=self._cwd, user=self._user, pidfile=self._pidfile
            )
            body = await self._sandbox._exec_call(command, stdin_text, float(self._sandbox._owner.stream_timeout_s))
        except Exception as exc:
            self._channel.finish(-1, exc)
            return
        self._channel.put("stdout", str(body.get("stdout") or "").encode("utf-8"))
        self._channel.put("stderr", str(body.get("stderr") or "").encode("utf-8"))
        self._channel.finish(_exit_code(body))

    async def __aiter__(self) -> AsyncIterator[OutputChunk]:
        self._start()
        async for chunk in self._channel.chunks():
            yield chunk

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise ConflictError(
                "Fly exec takes stdin only before the command starts (it is one string in the exec call); "
                "send all stdin before close_stdin() or reading output"
            )
        self._stdin.extend(data)

    async def close_stdin(self) -> None:
        self._start()

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self._channel.finished.is_set():
            return
        if not self._started:
            # Signalled before it ran: it never runs, and ends as if killed by that signal.
            self._stdin_closed = True
            self._channel.finish(128 + signum)
            return
        pidfile = q(self._pidfile)
        # The pid file is written first thing by the wrapper; wait for it a bounded while.
        script = (
            f"i=0; while [ ! -s {pidfile} ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; "
            f'kill -s {signal_name(signum)} "$(cat {pidfile})" 2>/dev/null; exit 0'
        )
        with anyio.fail_after(SIGNAL_TIMEOUT_S):
            await self._sandbox._exec_call(["/bin/sh", "-c", script], None, SIGNAL_TIMEOUT_S)

    async def wait(self) -> int:
        self._start()
        return await self._channel.wait()

    async def terminate(self) -> None:
        """Kill the command if it still runs and remove its pid file."""
        if self._started and not self._channel.finished.is_set():
            try:
                await self.signal(_signal.SIGKILL)
            except (ProviderError, TimeoutError):
                pass
        if self._started:
            try:
                await self._sandbox._exec_call(["/bin/sh", "-c", f"rm -f {q(self._pidfile)}"], None, 30.0)
            except (ProviderError, TimeoutError):
                pass


