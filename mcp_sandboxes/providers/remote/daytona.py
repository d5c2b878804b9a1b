"""Daytona sandboxes through the Daytona REST API and the toolbox API inside each sandbox.

Followed (daytonaio/daytona: libs/api-client-go/api/openapi.yaml, the published API spec,
and apps/daemon/pkg/toolbox/docs/swagger.yaml, the toolbox spec; https://www.daytona.io/docs):
- API, `Authorization: Bearer <key>`: `POST /sandbox` (CreateSandbox: snapshot, env,
  labels, networkBlockAll, cpu, memory in GB, user, autoStopInterval) -> Sandbox with
  `state` and `toolboxProxyUrl`; `GET /sandbox/{id}` (poll until `started`);
  `GET /sandbox?labels=<JSON>&limit=&cursor=` -> {items, nextCursor}; `DELETE /sandbox/{id}`.
- Toolbox, `{toolboxProxyUrl}/{sandboxId}/...` with the same bearer key (the SDKs' proxy):
  `POST /process/execute` {command, timeout} -> {exitCode, result} (the command is fed to
  a shell on stdin; stdout and stderr come back combined), `POST /files/upload?path=`
  (multipart `file`), `GET /files/download?path=`, `POST /files/permissions?path=&mode=`,
  sessions: `POST /process/session` {sessionId}, `POST /process/session/{id}/exec`
  {command, runAsync, suppressInputEcho} -> {cmdId}, `GET .../command/{cmdId}` (exitCode),
  `GET .../command/{cmdId}/logs?follow=true` as a WebSocket of binary frames in which each
  output line is prefixed by \\x01\\x01\\x01 (stdout) or \\x02\\x02\\x02 (stderr),
  `DELETE /process/session/{id}`.

What the toolbox cannot do directly, and how this provider does it:
- exact bytes and separate stderr for `exec`: the command's stdout/stderr go to files in the
  sandbox and come back base64-encoded in `/process/execute`'s result (needs `base64`).
- streaming stdin with EOF and signals: the toolbox has no signal call and its session
  input cannot be closed, so the streamed command reads stdin from a FIFO of ours held
  open by a `sleep`; `send_stdin` writes an uploaded chunk into it, `close_stdin` kills
  the holder (EOF), and `signal` runs `kill -N <pid>` through `/process/execute`.
- streamed output is line-based, as the daemon's log format is: a final line without a
  newline arrives with one added.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import signal as _signal
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc
import httpx
import websockets
from websockets.asyncio.client import connect as ws_connect

from mcp_sandboxes.errors import (
    InvalidInputError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
)
from mcp_sandboxes.providers._cleanup import removed_on_failure
from mcp_sandboxes.providers._labels import owner_labels
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
from mcp_sandboxes.providers.remote._remote_http import setting_or_env
from mcp_sandboxes.providers.remote._remote_shell import quote, wait_until
from mcp_sandboxes.providers.remote._remote_stream import QueuedStream, followed, sole_exception
from mcp_sandboxes.providers.remote._remote_support import (
    CLEANUP_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    ROOT_USERS,
    STATE_DIR,
    api_key_availability,
    env_prefix,
    http_timeout,
    refuse_mounts,
    status_error,
    transport_error,
)
from mcp_sandboxes.redaction import redact_values as redact

DEFAULT_API_URL = "https://app.daytona.io/api"
KEY_HINT = "DAYTONA_API_KEY or providers.daytona.api_key"
STDOUT_PREFIX = b"\x01\x01\x01"
STDERR_PREFIX = b"\x02\x02\x02"
HELPER_TIMEOUT_S = 30
POLL_INTERVAL_S = 0.2


def _sudo(user: str | None, default_user: str | None) -> list[str]:
    """Commands run as the sandbox's user; another user goes through sudo (Daytona images
    give their user passwordless sudo)."""
    if user is None or user == default_user:
        return []
    if user in ROOT_USERS:
        return ["sudo", "-n", "--"]
    return ["sudo", "-n", "-u", f"#{user}" if user.isdigit() else user, "--"]


class DaytonaProvider(ProviderLifecycle):
    name = "daytona"

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._api_key = setting_or_env(settings, "api_key", ["DAYTONA_API_KEY"])
        self._api_url = str(settings.get("api_url") or setting_or_env({}, "", ["DAYTONA_API_URL"]) or DEFAULT_API_URL)
        self._api_url = self._api_url.rstrip("/")
        self._target = setting_or_env(settings, "target", ["DAYTONA_TARGET"])
        self._http = httpx.AsyncClient(timeout=http_timeout())

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DaytonaProvider:
        return cls(settings)

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self._api_key,)

    def auth(self) -> dict[str, str]:
        if not self._api_key:
            raise ProviderUnavailableError(
                "daytona: DAYTONA_API_KEY is not set: export it or set providers.daytona.api_key"
            )
        return {"Authorization": f"Bearer {self._api_key}"}

    async def request(self, method: str, url: str, action: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth(), **kwargs.pop("headers", {})}
        try:
            return await self._http.request(method, url, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, action, exc, self.secrets) from None

    async def _api(self, method: str, path: str, action: str, **kwargs: Any) -> httpx.Response:
        return await self.request(method, f"{self._api_url}{path}", action, **kwargs)

    def _failed(self, action: str, response: httpx.Response) -> ProviderError:
        return status_error(self.name, action, response, self.secrets, key_hint=KEY_HINT)

    # -- Provider ---------------------------------------------------------------------

    async def check(self) -> Availability:
        return await api_key_availability(
            self.name,
            "Daytona",
            api_key=self._api_key,
            env_var="DAYTONA_API_KEY",
            api_url=self._api_url,
            probe=partial(self._api, "GET", "/sandbox", "listing sandboxes", params={"limit": 1}),
        )

    async def create(self, spec: SandboxSpec) -> Sandbox:
        refuse_mounts(spec, "daytona")
        labels = owner_labels(spec)
        body: dict[str, Any] = {
            "snapshot": spec.image,
            "env": spec.env,
            "labels": labels,
            "networkBlockAll": spec.network == "none",
            "autoStopInterval": 0,
        }
        if spec.user and not spec.user.isdigit():
            body["user"] = spec.user
        if spec.limits.cpus:
            body["cpu"] = math.ceil(spec.limits.cpus)
        if spec.limits.memory_mb:
            body["memory"] = math.ceil(spec.limits.memory_mb / 1024)
        if self._target:
            body["target"] = self._target
        response = await self._api("POST", "/sandbox", "creating a sandbox", json=body)
        if response.status_code == 404:
            raise InvalidInputError("image", f"daytona has no snapshot {spec.image!r}; use a snapshot name")
        if response.status_code not in (200, 201):
            raise self._failed("creating a sandbox", response)
        created = response.json()
        sandbox_id = str(created["id"])
        async with removed_on_failure(partial(self.destroy, sandbox_id), cleanup_timeout_s=CLEANUP_TIMEOUT_S):
            detail = await self._wait_started(sandbox_id, created)
            sandbox = DaytonaSandbox(self, sandbox_id, str(detail["toolboxProxyUrl"]), spec.workdir, detail.get("user"))
            result = await sandbox.exec(["mkdir", "-p", spec.workdir], cwd="/", timeout=HELPER_TIMEOUT_S)
            if not result.ok:
                raise ProviderError(
                    f"daytona: could not create {spec.workdir}: {result.stderr.decode(errors='replace')}"
                )
        return sandbox

    async def _wait_started(self, sandbox_id: str, detail: dict[str, Any]) -> dict[str, Any]:
        with anyio.fail_after(DEFAULT_CREATE_TIMEOUT_S):
            while detail.get("state") != "started":
                if detail.get("state") in ("error", "build_failed", "destroyed", "destroying"):
                    reason = redact(str(detail.get("errorReason") or detail.get("state")), self.secrets)
                    raise ProviderError(f"daytona: sandbox {sandbox_id} did not start ({reason})")
                await anyio.sleep(POLL_INTERVAL_S)
                response = await self._api("GET", f"/sandbox/{sandbox_id}", "waiting for a sandbox")
                if response.status_code != 200:
                    raise self._failed("waiting for a sandbox", response)
                detail = response.json()
        return detail

    async def attach(self, sandbox_id: str) -> Sandbox | None:
        response = await self._api("GET", f"/sandbox/{urllib.parse.quote(sandbox_id)}", "looking up a sandbox")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._failed("looking up a sandbox", response)
        detail = response.json()
        if detail.get("labels", {}).get(OWNER_LABEL) != "true" or detail.get("state") in ("destroyed", "destroying"):
            return None
        return DaytonaSandbox(self, sandbox_id, str(detail["toolboxProxyUrl"]), None, detail.get("user"))

    async def destroy(self, sandbox_id: str) -> None:
        response = await self._api("DELETE", f"/sandbox/{urllib.parse.quote(sandbox_id)}", "deleting a sandbox")
        if response.status_code not in (200, 204, 404):
            raise self._failed("deleting a sandbox", response)

    async def list_owned(self) -> list[str]:
        ids: list[str] = []
        cursor: str | None = None
        for _ in range(1000):
            params: dict[str, Any] = {"labels": json.dumps({OWNER_LABEL: "true"}), "limit": 100}
            if cursor:
                params["cursor"] = cursor
            response = await self._api("GET", "/sandbox", "listing sandboxes", params=params)
            if response.status_code != 200:
                raise self._failed("listing sandboxes", response)
            page = response.json()
            ids.extend(str(item["id"]) for item in page.get("items", []) if item.get("state") != "destroyed")
            cursor = page.get("nextCursor")
            if not cursor:
                break
        return ids

    async def aclose(self) -> None:
        await self._http.aclose()


class DaytonaSandbox:
    provider = "daytona"

    def __init__(
        self, owner: DaytonaProvider, sandbox_id: str, toolbox_url: str, workdir: str | None, user: str | None
    ) -> None:
        self.id = sandbox_id
        self.owner = owner
        self.toolbox = f"{toolbox_url.rstrip('/')}/{urllib.parse.quote(sandbox_id)}"
        self.workdir = workdir
        self.user = user

    def failed(self, action: str, response: httpx.Response) -> ProviderError:
        if response.status_code == 404 and "sandbox" in response.text.lower():
            return SandboxGoneError(f"daytona: sandbox {self.id} is gone ({action} answered 404)")
        return self.owner._failed(action, response)

    async def execute(self, script: str, action: str, limit_s: float) -> tuple[int, str]:
        """Run a shell script through `/process/execute`: (exit code, combined output). The
        daemon enforces `limit_s` itself (killing the process group) and answers 408."""
        seconds = max(1, math.ceil(limit_s))
        response = await self.owner.request(
            "POST",
            f"{self.toolbox}/process/execute",
            action,
            json={"command": script, "timeout": seconds},
            timeout=http_timeout(read=seconds + CONNECT_TIMEOUT_S),
        )
        if response.status_code == 408:
            raise ProviderError(f"daytona: {action} did not finish within {seconds} s (timed out; killed)")
        if response.status_code != 200:
            raise self.failed(action, response)
        body = response.json()
        return int(body.get("exitCode", 0) or 0), str(body.get("result", ""))

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
        if not argv:
            raise InvalidInputError("argv", "the command is empty")
        tag = secrets.token_hex(8)
        state = f"{STATE_DIR}/x-{tag}"
        stdin_path = f"{STATE_DIR}-{tag}.stdin"
        if stdin:
            await self.put_file(stdin_path, stdin, mode=0o600)
        command = quote([*_sudo(user, self.user), *env_prefix(env), *argv])
        directory = quote([cwd or self.workdir or "/"])
        source = quote([stdin_path]) if stdin else "/dev/null"
        script = (
            f'd={quote([state])}; mkdir -p "$d" || exit 97; '
            f'{{ cd {directory} && {command}; }} <{source} >"$d/out" 2>"$d/err"; rc=$?; '
            'printf "%s\\n" "$rc"; base64 -w0 "$d/out"; echo; base64 -w0 "$d/err"; echo; '
            f'rm -rf "$d" {quote([stdin_path])}'
        )
        _, output = await self.execute(
            script, f"running {argv[0]}", DEFAULT_EXEC_TIMEOUT_S if timeout is None else timeout
        )
        lines = output.split("\n")
        try:
            return ExecResult(
                exit_code=int(lines[0]), stdout=base64.b64decode(lines[1]), stderr=base64.b64decode(lines[2])
            )
        except (ValueError, IndexError):
            detail = redact(output[:300], self.owner.secrets)
            raise ProviderError(
                f"daytona: could not read the output of {argv[0]} (needs sh and base64): {detail}"
            ) from None

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
            raise InvalidInputError("argv", "the command is empty")
        process = DaytonaProcess(self)
        command = [*_sudo(user, self.user), *env_prefix(env), *argv]
        await process.start(command, cwd or self.workdir or "/")
        try:
            async with followed(process, process.pump, process.cleanup, cleanup_timeout_s=CLEANUP_TIMEOUT_S) as started:
                yield started
        except BaseExceptionGroup as group:
            raise sole_exception(group) from None

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
            response = await self.owner.request(
                "POST",
                f"{self.toolbox}/files/upload",
                f"writing {path}",
                params={"path": path},
                files={"file": (path.rsplit("/", 1)[-1] or "file", data, "application/octet-stream")},
            )
            if response.status_code != 200:
                raise self.failed(f"writing {path}", response)
            params = {"path": path, "mode": format(mode, "04o")}
            if user is not None:
                params["owner"] = "root" if user in ROOT_USERS else user
            response = await self.owner.request(
                "POST", f"{self.toolbox}/files/permissions", f"setting the mode of {path}", params=params
            )
            if response.status_code != 200:
                raise self.failed(f"setting the mode of {path}", response)

    async def get_file(self, path: str) -> bytes:
        with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
            response = await self.owner.request(
                "GET", f"{self.toolbox}/files/download", f"reading {path}", params={"path": path}
            )
        if response.status_code == 404 and "sandbox" not in response.text.lower():
            raise NotFoundError(f"daytona: {path} does not exist in sandbox {self.id}")
        if response.status_code != 200:
            raise self.failed(f"reading {path}", response)
        return response.content


class DaytonaProcess(QueuedStream):
    """A command in its own toolbox session, its output followed over the logs WebSocket."""

    def __init__(self, sandbox: DaytonaSandbox) -> None:
        super().__init__()
        self._sandbox = sandbox
        self.session = "mcp-" + secrets.token_hex(8)
        self.state = f"{STATE_DIR}/{self.session}"
        self.command_id = ""
        self._chunks = 0

    async def _session_call(self, method: str, path: str, action: str, **kwargs: Any) -> httpx.Response:
        url = f"{self._sandbox.toolbox}/process/session{path}"
        return await self._sandbox.owner.request(method, url, action, **kwargs)

    async def start(self, command: list[str], cwd: str) -> None:
        response = await self._session_call("POST", "", "creating a session", json={"sessionId": self.session})
        if response.status_code not in (200, 201):
            raise self._sandbox.failed("creating a session", response)
        state = quote([self.state])
        inner = (
            'sleep 2147483647 >"$0/in" 2>/dev/null </dev/null & echo $! >"$0/holder"; echo $$ >"$0/pid"; '
            'cd "$1" || exit 1; shift; exec "$@" <"$0/in"'
        )
        wrapper = (
            f"mkdir -p {state} && rm -f {state}/in && mkfifo {state}/in && "
            f"/bin/sh -c {quote([inner])} {state} {quote([cwd])} {quote(command)}"
        )
        response = await self._session_call(
            "POST",
            f"/{self.session}/exec",
            f"starting {command[0]}",
            json={"command": wrapper, "runAsync": True, "suppressInputEcho": True},
        )
        if response.status_code not in (200, 202):
            raise self._sandbox.failed(f"starting {command[0]}", response)
        self.command_id = str(response.json()["cmdId"])

    async def pump(self) -> None:
        url = (
            f"{self._sandbox.toolbox}/process/session/{self.session}/command/{self.command_id}/logs?follow=true"
        ).replace("http", "ws", 1)
        splitter = _Demux()
        try:
            async with ws_connect(
                url, additional_headers=self._sandbox.owner.auth(), open_timeout=CONNECT_TIMEOUT_S, max_size=None
            ) as ws:
                async for message in ws:
                    data = message if isinstance(message, bytes) else message.encode()
                    for stream, part in splitter.feed(data):
                        await self.output.put(stream, part)
            self.output.finish(await self._exit_code())
        except (OSError, websockets.WebSocketException, ProviderError, TimeoutError) as exc:
            detail = redact(f"{type(exc).__name__}: {exc}", self._sandbox.owner.secrets)
            self.output.finish(None, ProviderError(f"daytona: following the command's output failed ({detail})"))

    async def _exit_code(self) -> int:
        path = f"/{self.session}/command/{self.command_id}"
        with anyio.fail_after(HELPER_TIMEOUT_S):
            while True:
                response = await self._session_call("GET", path, "reading an exit code")
                if response.status_code != 200:
                    raise self._sandbox.owner._failed("reading an exit code", response)
                code = response.json().get("exitCode")
                if code is not None:
                    return int(code)
                await anyio.sleep(POLL_INTERVAL_S)

    def _wait_for(self, name: str) -> str:
        # The session command starts asynchronously: wait (boundedly) until it wrote `name`.
        target = quote([f"{self.state}/{name}"])
        return wait_until(f"-s {target}")

    async def _helper(self, script: str, action: str) -> None:
        code, output = await self._sandbox.execute(script, action, HELPER_TIMEOUT_S)
        if code != 0 and not self.output.ended:
            detail = redact(output.strip()[:300], self._sandbox.owner.secrets)
            raise ProviderError(f"daytona: {action} failed ({detail})")

    # -- ExecStream -----------------------------------------------------------------

    async def send_stdin(self, data: bytes) -> None:
        if not data:
            return
        self._chunks += 1
        chunk = f"{self.state}/chunk-{self._chunks}"
        await self._sandbox.put_file(chunk, data, mode=0o600)
        fifo = quote([f"{self.state}/in"])
        await self._helper(
            f"{self._wait_for('holder')}cat {quote([chunk])} >{fifo}; rc=$?; rm -f {quote([chunk])}; exit $rc",
            "writing to stdin",
        )

    async def close_stdin(self) -> None:
        holder = quote([f"{self.state}/holder"])
        await self._helper(f'{self._wait_for("holder")}kill "$(cat {holder})" 2>/dev/null; true', "closing stdin")

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self.output.ended:
            return
        pid = quote([f"{self.state}/pid"])
        await self._helper(f'{self._wait_for("pid")}kill -{int(signum)} "$(cat {pid})"', f"sending signal {signum}")

    async def cleanup(self) -> None:
        state = quote([self.state])
        script = (
            f'for f in pid holder; do [ -s {state}/$f ] && kill -9 "$(cat {state}/$f)" 2>/dev/null; done; '
            f"rm -rf {state}; true"
        )
        try:
            if self.output.ended:
                script = script.replace("pid holder", "holder")
            await self._sandbox.execute(script, "cleaning up a process", HELPER_TIMEOUT_S)
            await self._session_call("DELETE", f"/{self.session}", "deleting a session")
        except (ProviderError, TimeoutError):
            pass  # best effort: the sandbox may already be gone


class _Demux:
    """Splits the daemon's prefixed log stream into (stream, bytes); a prefix may straddle frames."""

    def __init__(self) -> None:
        self._stream = "stdout"
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        data = self._pending + data
        self._pending = b""
        parts: list[tuple[str, bytes]] = []
        start = 0
        index = 0
        while index < len(data):
            byte = data[index]
            if byte in (1, 2):
                prefix = STDOUT_PREFIX if byte == 1 else STDERR_PREFIX
                if data.startswith(prefix, index):
                    if index > start:
                        parts.append((self._stream, data[start:index]))
                    self._stream = "stdout" if byte == 1 else "stderr"
                    index += len(prefix)
                    start = index
                    continue
                if len(data) - index < len(prefix) and prefix.startswith(data[index:]):
                    break  # maybe the start of a prefix: keep it for the next frame
            index += 1
        if index < len(data):
            self._pending = data[index:]
        if index > start:
            parts.append((self._stream, data[start:index]))
        return parts


__all__ = ["DaytonaProvider", "DaytonaSandbox"]
