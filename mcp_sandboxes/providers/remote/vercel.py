"""Vercel Sandbox: one named Vercel sandbox (a Firecracker microVM) per sandbox.

Vendor documentation followed (Vercel REST API reference, "Sandboxes" group, and the
wire calls of the official `@vercel/sandbox` SDK, packages/vercel-sandbox/src/api-client):
- https://vercel.com/docs/rest-api : base URL https://api.vercel.com,
  `Authorization: Bearer <token>`, `?teamId=` on every call for team-owned resources.
- https://vercel.com/docs/rest-api/errors : errors are `{"error": {"code", "message"}}`;
  a missing or invalid token is 403 `forbidden` / "Not authorized".
- https://vercel.com/docs/rest-api/sandboxes/create-a-named-sandbox : POST /v2/sandboxes
  `{projectId, name, runtime, resources: {vcpus}, timeout (ms), env, tags, persistent,
  networkPolicy}` -> `{sandbox, session, routes}`.
- .../list-sandboxes (GET /v2/sandboxes?project=&tags=key:value&cursor=),
  .../get-a-named-sandbox (GET /v2/sandboxes/{name}?projectId=), DELETE of the same path.
- .../execute-a-command (POST /v2/sandboxes/sessions/{sessionId}/cmd `{command, args,
  cwd, env, sudo}` -> `{command: {id, exitCode: null, ...}}`), .../get-a-command
  (`?wait=true` blocks until `exitCode` is set), .../stream-command-logs (GET
  .../cmd/{cmdId}/logs, `application/x-ndjson` lines `{"stream": "stdout"|"stderr",
  "data": "..."}` or `{"stream": "error", "data": {code, message}}`), .../kill-a-command
  (POST .../cmd/{cmdId}/kill `{signal: <number>}`).
- .../write-files (POST .../fs/write, a gzipped tar, `x-cwd` = extraction directory),
  .../read-a-file (POST .../fs/read `{path}` -> `application/octet-stream`, 404 if absent).

What the API does not offer, and what this module does instead:
- A command has no stdin, and its logs are JSON strings. `exec()` writes stdin to a file
  with fs/write and runs the command with `< file`; its output goes to files that are
  read back with fs/read, so it is byte-exact. `stream()` output is really streamed from
  the logs endpoint, as text (bytes that are not UTF-8 are replaced); its stdin is a FIFO
  in the sandbox, held open until `close_stdin()`, fed by one fs/write plus one short
  command per `send_stdin`.
- Commands run as the image's default user, or as root with `sudo`. Other users are
  reached with `su` from root (see `_remote_shell`).
- `network='none'` maps to the documented `networkPolicy {"mode": "deny-all"}`.
  Host mounts are refused. `spec.image` names a Vercel runtime (node22, node24, node26,
  python3.13); there are no arbitrary container images on this endpoint.
"""

from __future__ import annotations

import io
import json
import math
import secrets
import signal as _signal
import tarfile
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
    as_user,
    captured,
    end_holder,
    inner_script,
    q,
    quote,
    reject_unsupported,
    run_as,
    scratch_path,
    stdin_holder,
    wait_until,
)
from mcp_sandboxes.providers.remote._remote_stream import OutputQueue, QueuedStream, followed

NAME = "vercel"
DEFAULT_API_URL = "https://api.vercel.com"
# The sandbox's own lifetime; Vercel's default is 5 minutes, too short for an agent session.
DEFAULT_SANDBOX_TIMEOUT_MS = 45 * 60 * 1000
POLL_INTERVAL_S = 0.5
ROOT_USERS = ("root", "0")


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{error.get('code', 'error')}: {error.get('message', '')}"
    return response.text[:300]


def _tags_filter(tags: Mapping[str, str]) -> list[str]:
    return [f"{key}:{value}" for key, value in tags.items()]


class VercelProvider(ProviderLifecycle):
    name = NAME

    def __init__(
        self,
        *,
        token: str | None,
        project_id: str | None,
        team_id: str | None = None,
        api_url: str = DEFAULT_API_URL,
        sandbox_timeout_ms: int = DEFAULT_SANDBOX_TIMEOUT_MS,
        request_timeout_s: float = 60.0,
        create_timeout_s: float = DEFAULT_CREATE_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._token = token
        self.project_id = project_id
        self.team_id = team_id
        self.sandbox_timeout_ms = sandbox_timeout_ms
        self.create_timeout_s = create_timeout_s
        self._api = VendorClient(
            vendor="Vercel Sandbox",
            base_url=api_url,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            secrets=[token or ""],
            credential_fix="set VERCEL_TOKEN (or providers.vercel.token) to an access token of the VERCEL_TEAM_ID team",
            error_text=_error_text,
            request_timeout_s=request_timeout_s,
            default_params={"teamId": team_id} if team_id else None,
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> VercelProvider:
        return cls(
            token=setting_or_env(settings, "token", ["VERCEL_TOKEN"]),
            project_id=setting_or_env(settings, "project_id", ["VERCEL_PROJECT_ID"]),
            team_id=setting_or_env(settings, "team_id", ["VERCEL_TEAM_ID"]),
            api_url=setting_or_env(settings, "api_url", []) or DEFAULT_API_URL,
            sandbox_timeout_ms=int(settings.get("sandbox_timeout_ms", DEFAULT_SANDBOX_TIMEOUT_MS)),
            request_timeout_s=float(settings.get("request_timeout_s", 60.0)),
            create_timeout_s=float(settings.get("create_timeout_s", DEFAULT_CREATE_TIMEOUT_S)),
        )

    @property
    def api(self) -> VendorClient:
        return self._api

    def _missing(self) -> Availability | None:
        if not self._token:
            return Availability(
                provider=NAME,
                available=False,
                reason="no Vercel token: VERCEL_TOKEN is not set and providers.vercel.token is empty",
                fix="create an access token in the Vercel dashboard (Settings > Tokens) and export VERCEL_TOKEN",
            )
        if not self.project_id:
            return Availability(
                provider=NAME,
                available=False,
                reason="no Vercel project: VERCEL_PROJECT_ID is not set and providers.vercel.project_id is empty",
                fix="set providers.vercel.project_id (and team_id for a team) to the project sandboxes belong to",
            )
        return None

    def _project(self) -> str:
        missing = self._missing()
        if missing is not None:
            raise ProviderError(f"{missing.reason}; fix: {missing.fix}")
        assert self.project_id is not None
        return self.project_id

    async def check(self) -> Availability:
        missing = self._missing()
        if missing is not None:
            return missing
        try:
            await self._api.request("GET", "/v2/sandboxes", params={"project": self.project_id, "limit": "1"})
        except ProviderError as exc:
            return Availability(
                provider=NAME,
                available=False,
                reason=str(exc),
                fix="check VERCEL_TOKEN, VERCEL_TEAM_ID and providers.vercel.project_id",
            )
        return Availability(provider=NAME, available=True)

    async def create(self, spec: SandboxSpec) -> VercelSandbox:
        reject_unsupported(spec, "Vercel", network_none=True)
        project = self._project()
        name = f"mcp-{secrets.token_hex(6)}"
        body: dict[str, Any] = {
            "projectId": project,
            "name": name,
            "runtime": spec.image,
            "timeout": self.sandbox_timeout_ms,
            "env": dict(spec.env),
            "tags": restorable_labels(spec, name),
            "persistent": False,
        }
        if spec.limits.cpus is not None:
            # Vercel takes 1 or an even number of vCPUs (memory follows at 2 GB per vCPU).
            cpus = max(1, round(spec.limits.cpus))
            body["resources"] = {"vcpus": cpus if cpus == 1 else cpus + cpus % 2}
        if spec.network == "none":
            body["networkPolicy"] = {"mode": "deny-all"}
        response = await self._api.request("POST", "/v2/sandboxes", json=body, timeout_s=self.create_timeout_s)
        session = response.json()["session"]
        async with removed_unless_ready(
            partial(self.destroy, name),
            what="Vercel: the new sandbox",
            within_s=self.create_timeout_s,
            cleanup_timeout_s=CLEANUP_TIMEOUT_S,
        ):
            session = await self._wait_running(str(session["id"]), session)
            sandbox = VercelSandbox(self, name, str(session["id"]), spec)
            # The default user may not own the workdir's parent: create it as root, hand it over.
            script = f'mkdir -p {q(spec.workdir)} && {{ [ -z "$SUDO_USER" ] || chown "$SUDO_USER" {q(spec.workdir)}; }}'
            result = await sandbox.run_script(script, sudo=True, cwd="/")
            if not result.ok:
                raise ProviderError(
                    f"Vercel: could not create workdir {spec.workdir!r} in sandbox {name}: "
                    f"{result.stderr.decode(errors='replace').strip()}"
                )
        return sandbox

    async def _wait_running(self, session_id: str, session: Mapping[str, Any]) -> Mapping[str, Any]:
        while session.get("status") == "pending":
            await anyio.sleep(POLL_INTERVAL_S)
            response = await self._api.request("GET", f"/v2/sandboxes/sessions/{session_id}")
            session = response.json()["session"]
        if session.get("status") != "running":
            raise ProviderError(f"Vercel: the sandbox session {session_id} is {session.get('status')}, not running")
        return session

    async def attach(self, sandbox_id: str) -> VercelSandbox | None:
        try:
            response = await self._api.request(
                "GET", f"/v2/sandboxes/{sandbox_id}", params={"projectId": self._project()}
            )
        except RemoteNotFoundError:
            return None
        body = response.json()
        session = body.get("session") or {}
        if session.get("status") not in ("pending", "running"):
            return None
        sandbox = body.get("sandbox") or {}
        tags = {str(k): str(v) for k, v in (sandbox.get("tags") or {}).items()}
        spec = SandboxSpec(
            image=str(sandbox.get("runtime") or "unknown"),
            network="host",
            workdir=tags.get(WORKDIR_LABEL) or str(sandbox.get("cwd") or session.get("cwd") or "/"),
            user=tags.get(USER_LABEL),
            labels=tags,
        )
        return VercelSandbox(self, sandbox_id, str(session["id"]), spec)

    async def destroy(self, sandbox_id: str) -> None:
        try:
            await self._api.request("DELETE", f"/v2/sandboxes/{sandbox_id}", params={"projectId": self._project()})
        except RemoteNotFoundError:
            return

    async def list_owned(self) -> list[str]:
        names: list[str] = []
        cursor: str | None = None
        for _page in range(1000):
            params: dict[str, Any] = {
                "project": self._project(),
                "tags": _tags_filter({OWNER_LABEL: "true"}),
                "limit": "50",
                "cursor": cursor,
            }
            body = (await self._api.request("GET", "/v2/sandboxes", params=params)).json()
            for sandbox in body.get("sandboxes", []):
                if (sandbox.get("tags") or {}).get(OWNER_LABEL) == "true" and sandbox.get("status") not in (
                    "stopped",
                    "failed",
                    "aborted",
                ):
                    names.append(str(sandbox["name"]))
            cursor = (body.get("pagination") or {}).get("next")
            if not cursor:
                break
        return names

    async def aclose(self) -> None:
        await self._api.aclose()


class VercelSandbox:
    provider = NAME

    def __init__(self, owner: VercelProvider, name: str, session_id: str, spec: SandboxSpec) -> None:
        self._owner = owner
        self.id = name
        self.session_id = session_id
        self.spec = spec

    def session_path(self, suffix: str) -> str:
        return f"/v2/sandboxes/sessions/{self.session_id}{suffix}"

    def _request(
        self, argv: list[str], *, env: dict[str, str] | None, cwd: str | None, user: str | None, stdin_file: str | None
    ) -> dict[str, Any]:
        user = run_as(self.spec.user, user)
        sudo = user is not None
        script = inner_script(argv, stdin_file=stdin_file)
        if user is not None and user not in ROOT_USERS:
            script = as_user(script, user)
        return {
            "command": SHELL,
            "args": ["-c", script],
            "cwd": cwd or self.spec.workdir,
            "env": {**self.spec.env, **(env or {})},
            "sudo": sudo,
        }

    async def start_command(self, body: Mapping[str, Any]) -> str:
        try:
            response = await self._owner.api.request("POST", self.session_path("/cmd"), json=dict(body))
        except RemoteApiError as exc:
            if exc.status in (404, 410):
                raise SandboxGoneError(f"Vercel sandbox {self.id} no longer runs ({exc})") from None
            raise
        return str(response.json()["command"]["id"])

    async def read_logs(self, command_id: str, output: OutputQueue) -> None:
        async with self._owner.api.stream("GET", self.session_path(f"/cmd/{command_id}/logs")) as response:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                entry = json.loads(line)
                stream = entry.get("stream")
                if stream == "error":
                    data = entry.get("data") or {}
                    raise ProviderError(
                        f"Vercel: the log stream of command {command_id} failed: "
                        f"{data.get('code')}: {data.get('message')}"
                    )
                if stream in ("stdout", "stderr"):
                    output.put_nowait(stream, str(entry.get("data") or "").encode("utf-8"))

    async def wait_command(self, command_id: str) -> int:
        response = await self._owner.api.request(
            "GET", self.session_path(f"/cmd/{command_id}"), params={"wait": "true"}, unbounded_read=True
        )
        code = response.json()["command"].get("exitCode")
        return int(code) if isinstance(code, int) else -1

    async def kill_command(self, command_id: str, signum: int) -> None:
        try:
            await self._owner.api.request(
                "POST", self.session_path(f"/cmd/{command_id}/kill"), json={"signal": int(signum)}
            )
        except RemoteApiError as exc:
            if exc.status not in (404, 410):  # already ended: nothing to signal
                raise

    async def _finish(self, command_id: str, limit_s: float | None) -> int:
        """Wait for the command's exit code; past `limit_s` kill it and raise."""
        try:
            with anyio.fail_after(limit_s):
                return await self.wait_command(command_id)
        except TimeoutError:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                await self.kill_command(command_id, _signal.SIGKILL)
            raise ProviderError(
                f"Vercel: the command in sandbox {self.id} did not finish within {limit_s:g}s (timed out); "
                "it was killed"
            ) from None

    async def run_script(self, script: str, *, sudo: bool, cwd: str | None = None) -> ExecResult:
        """A helper script; its output comes from the logs (text)."""
        body = {"command": SHELL, "args": ["-c", script], "cwd": cwd or self.spec.workdir, "env": {}, "sudo": sudo}
        command_id = await self.start_command(body)
        output = OutputQueue(math.inf)
        with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
            await self.read_logs(command_id, output)
        output.finish(await self._finish(command_id, DEFAULT_FILE_TIMEOUT_S))
        stdout, stderr = bytearray(), bytearray()
        async for chunk in output.chunks():
            (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
        return ExecResult(await output.wait(), bytes(stdout), bytes(stderr))

    async def stage_stdin(self, data: bytes) -> str:
        path = f"{scratch_path()}.stdin"
        await self._write(path, data, 0o644)
        return path

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
        stdin_file = await self.stage_stdin(stdin) if stdin is not None else None
        # Output goes to files read back with fs/read: the logs carry JSON strings, not bytes.
        capture = scratch_path()
        try:
            body = self._request(argv, env=env, cwd=cwd, user=user, stdin_file=stdin_file)
            body["args"] = ["-c", captured(body["args"][1], capture)]
            command_id = await self.start_command(body)
            code = await self._finish(command_id, timeout)
            stdout = await self._read_optional(f"{capture}/o")
            stderr = await self._read_optional(f"{capture}/e")
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                await self._cleanup(" ".join(p for p in (capture, stdin_file) if p))
        return ExecResult(code, stdout, stderr)

    async def _read_optional(self, path: str) -> bytes:
        try:
            return await self.get_file(path)
        except NotFoundError:
            return b""

    async def _cleanup(self, paths: str) -> None:
        try:
            await self.run_script(f"rm -rf {quote(paths.split())}", sudo=True, cwd="/")
        except (ProviderError, TimeoutError):
            pass

    @asynccontextmanager
    async def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[VercelProcess]:
        check_exec_args(argv, env, cwd, user)
        process = VercelProcess(self)
        body = self._request(argv, env=env, cwd=cwd, user=user, stdin_file=None)
        await process.start(body)
        async with followed(process, process.follow, process.terminate, cleanup_timeout_s=CLEANUP_TIMEOUT_S) as started:
            yield started

    async def _write(self, path: str, data: bytes, mode: int) -> None:
        if not path.startswith("/"):
            path = f"{self.spec.workdir.rstrip('/')}/{path}"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            info = tarfile.TarInfo(name=path.lstrip("/"))
            info.size = len(data)
            info.mode = mode
            archive.addfile(info, io.BytesIO(data))
        await self._owner.api.request(
            "POST",
            self.session_path("/fs/write"),
            content=buffer.getvalue(),
            headers={"content-type": "application/gzip", "x-cwd": "/"},
            timeout_s=DEFAULT_FILE_TIMEOUT_S,
        )

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        await self._write(path, data, mode)
        owner = run_as(self.spec.user, user)
        if owner:
            result = await self.run_script(f"chown {q(owner)} {q(path)}", sudo=True, cwd="/")
            if not result.ok:
                raise ProviderError(
                    f"Vercel: chown {owner} {path} failed in sandbox {self.id}: "
                    f"{result.stderr.decode(errors='replace').strip()}"
                )

    async def get_file(self, path: str) -> bytes:
        try:
            response = await self._owner.api.request(
                "POST", self.session_path("/fs/read"), json={"path": path}, timeout_s=DEFAULT_FILE_TIMEOUT_S
            )
        except RemoteNotFoundError:
            raise NotFoundError(f"{path}: no such file in Vercel sandbox {self.id}") from None
        if "application/octet-stream" not in response.headers.get("content-type", ""):
            raise ProviderError(f"Vercel: reading {path} returned {response.headers.get('content-type')!r}, not a file")
        return response.content


class VercelProcess(QueuedStream):
    """A Vercel command with streamed output (the logs endpoint) and stdin through a FIFO.

    Vercel commands have no stdin, so the command is started reading a FIFO in a private
    directory, kept open by a holder process until `close_stdin()`; each `send_stdin`
    writes its bytes to a file (fs/write) and runs a short command that copies them into
    the FIFO. Signals use the kill endpoint.
    """

    def __init__(self, sandbox: VercelSandbox) -> None:
        super().__init__(limit=math.inf)
        self._sandbox = sandbox
        self.dir = scratch_path()
        self._command_id: str | None = None
        self._stdin_closed = False
        self._chunks_sent = 0

    async def start(self, body: dict[str, Any]) -> None:
        d = q(self.dir)
        script = (
            f"mkdir -p {d} && mkfifo {d}/in || exit 125\n"
            f"{stdin_holder(self.dir)}\n"
            f"exec {SHELL} -c {q(body['args'][1])} <{d}/in"
        )
        self._command_id = await self._sandbox.start_command({**body, "args": ["-c", script]})

    async def follow(self) -> None:
        assert self._command_id is not None
        try:
            await self._sandbox.read_logs(self._command_id, self.output)
            code = await self._sandbox.wait_command(self._command_id)
        except Exception as exc:
            self.output.finish(-1, exc)
            return
        self.output.finish(code)

    async def _helper(self, script: str) -> ExecResult:
        return await self._sandbox.run_script(script, sudo=True, cwd="/")

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise ProviderError("stdin is already closed")
        self._chunks_sent += 1
        chunk = f"{self.dir}.in{self._chunks_sent}"
        await self._sandbox._write(chunk, data, 0o600)
        d = q(self.dir)
        result = await self._helper(
            f"{wait_until(f'-p {d}/in')}cat {q(chunk)} > {d}/in; c=$?; rm -f {q(chunk)}; exit $c"
        )
        if not result.ok:
            raise ProviderError(
                f"Vercel: writing stdin in sandbox {self._sandbox.id} failed: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )

    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        d = q(self.dir)
        await self._helper(f"{wait_until(f'-s {d}/holder')}{end_holder(self.dir)}exit 0")

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self.output.ended or self._command_id is None:
            return
        await self._sandbox.kill_command(self._command_id, signum)

    async def terminate(self) -> None:
        """Kill the command if it still runs, end the FIFO holder, remove the files."""
        if not self.output.ended:
            try:
                await self.signal(_signal.SIGKILL)
            except ProviderError:
                pass
        d = q(self.dir)
        try:
            await self._helper(f"{end_holder(self.dir)}rm -rf {d} {d}.in*; exit 0")
        except (ProviderError, TimeoutError):
            pass
