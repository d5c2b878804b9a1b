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
- Exec has no cwd, env or user and no signal endpoint for an exec'd process: the
  command is wrapped in `/bin/sh -c` (see `_remote_shell`) which does the cd, env and
  `su`. Children of a command are not signalled.
- stdout/stderr come back as JSON strings, which cannot carry bytes that are not UTF-8.
  `exec()` therefore sends the command's output to files in the machine and reads them
  back as base64 with a second exec (byte-exact); binary stdin travels as base64 too.
- Exec is not streamed: it returns when the command ends. `stream()` starts the command
  detached (stdin from a FIFO, output, pid and exit code to files) and follows it with
  one exec per poll interval (`poll_interval_s`, default 1 s, within Fly's documented
  1 request/s per action per Machine; 429 answers are retried). Output therefore
  arrives up to one interval late. `send_stdin` writes into the FIFO, `close_stdin`
  ends the process holding it open, `signal` runs `kill` on the recorded pid.
- There is no filesystem API: put_file/get_file move base64 through exec. There is no
  network switch: `network='none'` and host mounts are refused with an error saying so.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
import signal as _signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc
import httpx

from mcp_sandboxes.errors import NotFoundError, ProviderError, SandboxGoneError
from mcp_sandboxes.providers._cleanup import removed_unless_ready
from mcp_sandboxes.providers._labels import USER_LABEL, WORKDIR_LABEL, restorable_labels
from mcp_sandboxes.providers.base import (
    DEFAULT_CREATE_TIMEOUT_S,
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_FILE_TIMEOUT_S,
    OWNER_LABEL,
    Availability,
    ExecResult,
    ProviderLifecycle,
    SandboxSpec,
    check_exec_args,
)
from mcp_sandboxes.providers.remote._remote_http import (
    CLEANUP_TIMEOUT_S,
    RemoteApiError,
    RemoteNotFoundError,
    VendorClient,
    setting_or_env,
)
from mcp_sandboxes.providers.remote._remote_shell import (
    SHELL,
    captured,
    end_holder,
    q,
    quote,
    reject_unsupported,
    run_as,
    scratch_path,
    signal_name,
    stdin_holder,
    wait_until,
    wrap,
)
from mcp_sandboxes.providers.remote._remote_stream import QueuedStream, followed

NAME = "fly"
DEFAULT_API_URL = "https://api.machines.dev"
# A streamed command has no caller timeout; Fly's exec still needs one.
DEFAULT_STREAM_TIMEOUT_S = 3600
# How often a streamed command's output is fetched: Fly allows 1 exec/s per Machine (bursts of 3).
DEFAULT_POLL_INTERVAL_S = 1.0
# Slack on top of the exec timeout for the HTTP round trip.
HTTP_SLACK_S = 30.0
SIGNAL_TIMEOUT_S = 30.0
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


class FlyProvider(ProviderLifecycle):
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
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.app = app
        self._token = token
        self.region = region
        self.create_timeout_s = create_timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.poll_interval_s = poll_interval_s
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
            poll_interval_s=float(settings.get("poll_interval_s", DEFAULT_POLL_INTERVAL_S)),
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
        config: dict[str, Any] = {
            "image": spec.image,
            "env": dict(spec.env),
            "metadata": restorable_labels(spec, name),
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
        async with removed_unless_ready(
            partial(self.destroy, machine_id),
            what="Fly: the new machine",
            within_s=self.create_timeout_s,
            cleanup_timeout_s=CLEANUP_TIMEOUT_S,
        ):
            await self._wait_started(machine_id, str(machine.get("instance_id") or ""))
            sandbox = FlySandbox(self, machine_id, spec)
            result = await sandbox.run_root(f"mkdir -p {q(spec.workdir)}")
            if not result.ok:
                raise ProviderError(
                    f"Fly: could not create workdir {spec.workdir!r} in machine {machine_id}: "
                    f"{result.stderr.decode(errors='replace').strip()}"
                )
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
        metadata = {str(k): str(v) for k, v in (config.get("metadata") or {}).items()}
        spec = SandboxSpec(
            image=str(config.get("image") or "unknown"),
            env={str(k): str(v) for k, v in (config.get("env") or {}).items()},
            network="host",
            workdir=metadata.get(WORKDIR_LABEL, "/"),
            user=metadata.get(USER_LABEL),
            labels=metadata,
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

    async def exec_call(self, command: list[str], stdin: str | None, timeout_s: float) -> dict[str, Any]:
        """One call of Fly's exec: the command's whole output, when it has ended."""
        body: dict[str, Any] = {"command": command, "timeout": max(1, int(timeout_s + 0.999))}
        if stdin is not None:
            body["stdin"] = stdin
        try:
            response = await self._owner.api.request(
                "POST", self._owner.machines_path(f"/{self.id}/exec"), json=body, timeout_s=timeout_s + HTTP_SLACK_S
            )
        except RemoteNotFoundError:
            raise SandboxGoneError(f"Fly machine {self.id} no longer exists") from None
        except RemoteApiError as exc:
            if exc.status == 408:
                raise ProviderError(
                    f"Fly: the command in machine {self.id} did not finish within {timeout_s:g}s (timed out); "
                    "Fly ended it"
                ) from None
            raise
        result: dict[str, Any] = response.json()
        return result

    def command_script(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
        pidfile: str | None = None,
    ) -> str:
        merged_env = {**self.spec.env, **(env or {})}
        user = run_as(self.spec.user, user)
        return wrap(argv, cwd=cwd or self.spec.workdir, env=merged_env, user=user, pidfile=pidfile)[2]

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
        stdin_text: str | None = None
        if stdin is not None:
            # The API's stdin is a JSON string: it travels as base64 and is decoded in the machine.
            argv = [SHELL, "-c", "base64 -d | " + quote(argv)]
            stdin_text = base64.b64encode(stdin).decode("ascii")
        # Output goes to files that a second exec returns as base64: the API's JSON strings
        # cannot carry bytes that are not UTF-8.
        capture = scratch_path()
        script = captured(self.command_script(argv, env=env, cwd=cwd, user=user), capture)
        limit = timeout if timeout is not None else float(self._owner.stream_timeout_s)
        d = q(capture)
        done = False
        try:
            body = await self.exec_call([SHELL, "-c", script], stdin_text, limit)
            code = _exit_code(body)
            if code == 125 and body.get("stderr"):
                raise ProviderError(f"Fly: could not capture output in machine {self.id}: {body.get('stderr')}")
            # Reading and removing the files is one call: execs are rate limited per machine.
            files = await self.run_root(f"base64 {d}/o && echo . && base64 {d}/e; c=$?; rm -rf {d}; exit $c")
            done = True
            lines = files.stdout.decode("ascii", errors="replace").split("\n")
            if not files.ok or "." not in lines:
                raise ProviderError(f"Fly: could not read the command's output in machine {self.id}")
            mark = lines.index(".")
            stdout = base64.b64decode("".join(lines[:mark]))
            stderr = base64.b64decode("".join(lines[mark + 1 :]))
        finally:
            if not done:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                    try:
                        await self.run_root(f"rm -rf {d}")
                    except ProviderError:
                        pass
        return ExecResult(exit_code=code, stdout=stdout, stderr=stderr)

    async def run_root(
        self, script: str, stdin: str | None = None, timeout_s: float = DEFAULT_FILE_TIMEOUT_S
    ) -> ExecResult:
        """A helper script run as the exec user (root), output as text."""
        body = await self.exec_call([SHELL, "-c", script], stdin, timeout_s)
        return ExecResult(
            _exit_code(body),
            str(body.get("stdout") or "").encode("utf-8"),
            str(body.get("stderr") or "").encode("utf-8"),
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
        check_exec_args(argv, env, cwd, user)
        process = FlyProcess(self, self._owner.poll_interval_s)
        await process.start(self.command_script(argv, env=env, cwd=cwd, user=user, pidfile=f"{process.dir}/pid"))
        async with followed(
            process, process.poll_until_exit, process.terminate, cleanup_timeout_s=CLEANUP_TIMEOUT_S
        ) as started:
            yield started

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        script = f'mkdir -p "$(dirname {q(path)})" && base64 -d > {q(path)} && chmod {mode:o} {q(path)}'
        owner = run_as(self.spec.user, user)
        if owner:
            script += f" && chown {q(owner)} {q(path)}"
        result = await self.run_root(script, stdin=base64.b64encode(data).decode("ascii"))
        if not result.ok:
            raise ProviderError(
                f"Fly: writing {path} in machine {self.id} failed: {result.stderr.decode(errors='replace').strip()}"
            )

    async def get_file(self, path: str) -> bytes:
        script = f"[ -f {q(path)} ] || exit {NOT_FOUND_EXIT}; base64 < {q(path)}"
        result = await self.run_root(script)
        if result.exit_code == NOT_FOUND_EXIT:
            raise NotFoundError(f"{path}: no such file in Fly machine {self.id}")
        if not result.ok:
            raise ProviderError(
                f"Fly: reading {path} in machine {self.id} failed: {result.stderr.decode(errors='replace').strip()}"
            )
        try:
            return base64.b64decode(b"".join(result.stdout.split()), validate=True)
        except binascii.Error as exc:
            raise ProviderError(f"Fly: {path} in machine {self.id} came back garbled: {exc}") from None


class FlyProcess(QueuedStream):
    """A command started in the background of a Fly Machine and followed by polling.

    Fly's exec returns only when its command ends, so a stream is built from several
    execs: one starts the command detached, reading stdin from a FIFO and writing stdout,
    stderr, its pid and finally its exit code to files in a private directory; then one
    exec per poll interval returns what was appended to the output files since the last
    poll (base64, so bytes survive) and the exit code once it exists. `send_stdin` is an
    exec that writes into the FIFO, `close_stdin` ends the process that holds the FIFO
    open, `signal` runs `kill` on the recorded pid. Output therefore arrives up to one
    poll interval late (1 s by default, which keeps within Fly's 1 request/s/action limit).
    """

    def __init__(self, sandbox: FlySandbox, poll_interval_s: float) -> None:
        super().__init__(limit=math.inf)
        self._sandbox = sandbox
        self._poll_interval_s = poll_interval_s
        self.dir = scratch_path()
        self._offsets = {"stdout": 0, "stderr": 0}
        self._stdin_closed = False

    async def start(self, script: str) -> None:
        d = q(self.dir)
        launch = (
            f"mkdir -p {d} && chmod 700 {d} && mkfifo {d}/in && : > {d}/out && : > {d}/err && "
            f"{{ {stdin_holder(self.dir)}; }} && "
            f"{{ ( {SHELL} -c {q(script)} <{d}/in >{d}/out 2>{d}/err; echo $? > {d}/exit.new; "
            f"mv {d}/exit.new {d}/exit ) </dev/null >/dev/null 2>&1 & }}"
        )
        result = await self._sandbox.run_root(launch)
        if not result.ok:
            raise ProviderError(
                f"Fly: could not start the command in machine {self._sandbox.id}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )

    async def poll(self) -> bool:
        """Fetch new output; True once the exit code is known (and all output was read)."""
        d = q(self.dir)
        script = (
            f"x=$(cat {d}/exit 2>/dev/null); "
            f"tail -c +{self._offsets['stdout'] + 1} {d}/out | base64; echo .; "
            f'tail -c +{self._offsets["stderr"] + 1} {d}/err | base64; echo .; echo "$x"'
        )
        result = await self._sandbox.run_root(script)
        lines = result.stdout.decode("ascii", errors="replace").split("\n")
        marks = [i for i, line in enumerate(lines) if line == "."]
        if not result.ok or len(marks) != 2:
            raise ProviderError(
                f"Fly: could not read the output of the command in machine {self._sandbox.id}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        sections = ("".join(lines[: marks[0]]), "".join(lines[marks[0] + 1 : marks[1]]))
        for stream, text in zip(("stdout", "stderr"), sections, strict=True):
            data = base64.b64decode(text)
            self._offsets[stream] += len(data)
            self.output.put_nowait(stream, data)
        exit_text = "".join(lines[marks[1] + 1 :]).strip()
        if exit_text:
            self.output.finish(int(exit_text))
            return True
        return False

    async def poll_until_exit(self) -> None:
        try:
            # Polling is the only way to follow a command through Fly's exec (see the class docstring).
            while not await self.poll():  # noqa: ASYNC110
                await anyio.sleep(self._poll_interval_s)
        except Exception as exc:
            self.output.finish(-1, exc)

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise ProviderError("stdin is already closed")
        d = q(self.dir)
        result = await self._sandbox.run_root(
            f"base64 -d > {d}/in", stdin=base64.b64encode(data).decode("ascii"), timeout_s=SIGNAL_TIMEOUT_S
        )
        if not result.ok:
            raise ProviderError(f"Fly: writing stdin in machine {self._sandbox.id} failed")

    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        await self._sandbox.run_root(f"{end_holder(self.dir)}exit 0")

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self.output.ended:
            return
        pid = f"{q(self.dir)}/pid"
        # The pid file is written first thing by the wrapper; wait for it a bounded while.
        script = (
            f"{wait_until(f'-s {pid}', tries=50, step_s=0.1)}"
            f'kill -s {signal_name(signum)} "$(cat {pid})" 2>/dev/null; exit 0'
        )
        with anyio.fail_after(SIGNAL_TIMEOUT_S):
            await self._sandbox.run_root(script, timeout_s=SIGNAL_TIMEOUT_S)

    async def terminate(self) -> None:
        """Kill the command if it still runs, end the FIFO holder, remove the files."""
        d = q(self.dir)
        kill = "" if self.output.ended else f'[ -s {d}/pid ] && kill -9 "$(cat {d}/pid)" 2>/dev/null; '
        try:
            await self._sandbox.run_root(f"{kill}{end_holder(self.dir)}rm -rf {d}; exit 0")
        except (ProviderError, TimeoutError):
            pass
