"""E2B sandboxes: the control-plane REST API plus envd, the agent inside each sandbox.

Followed (the SDK's own specs, e2b-dev/E2B `spec/`):
- Control plane, https://e2b.dev/docs/api-reference (spec/openapi.yml), header `X-API-Key`:
  `POST /sandboxes` (NewSandbox: templateID, timeout, secure, allow_internet_access,
  metadata, envVars; 201 -> Sandbox with sandboxID, envdAccessToken, domain),
  `GET /sandboxes/{id}` (SandboxDetail), `GET /v2/sandboxes?metadata=k%3Dv&state=...`
  (paginated by `X-Next-Token` / `nextToken`), `DELETE /sandboxes/{id}` (204; 404 when gone).
- envd (spec/envd/envd.yaml, spec/envd/process/process.proto), reached at
  `https://49983-{sandboxID}.{domain}` with `X-Access-Token: {envdAccessToken}`, the
  routing headers `E2b-Sandbox-Id` / `E2b-Sandbox-Port` the SDKs send, and the user as
  `Authorization: Basic base64("{user}:")`:
  `POST /process.Process/Start` is a Connect server stream with the JSON codec
  (https://connectrpc.com/docs/protocol: `application/connect+json`, 5-byte envelopes,
  end-of-stream envelope flag 0x02) of ProcessEvent start/data/end/keepalive;
  `SendInput`, `CloseStdin`, `SendSignal` are Connect unary calls (`application/json`);
  `POST /files?path=` (multipart field `file`) and `GET /files?path=` move file bytes.
envd only signals SIGTERM and SIGKILL; other signals are sent by a `kill` run through envd.
"""

from __future__ import annotations

import base64
import json
import signal as _signal
import struct
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc
import httpx

from mcp_sandboxes.errors import InvalidInputError, NotFoundError, ProviderError, SandboxGoneError
from mcp_sandboxes.providers._cleanup import removed_on_failure
from mcp_sandboxes.providers._labels import owner_labels
from mcp_sandboxes.providers.base import (
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
from mcp_sandboxes.providers.remote._remote_shell import quote, signal_name
from mcp_sandboxes.providers.remote._remote_stream import QueuedStream, run_collected, sole_exception
from mcp_sandboxes.providers.remote._remote_support import (
    CLEANUP_TIMEOUT_S,
    ROOT_USERS,
    api_key_availability,
    http_timeout,
    refuse_mounts,
    signal_exit_code,
    status_error,
    transport_error,
)

DEFAULT_API_URL = "https://api.e2b.app"
DEFAULT_DOMAIN = "e2b.app"
ENVD_PORT = 49983
# Sandbox time-to-live sent on create; E2B's own default is 15 s, far too short for an agent.
DEFAULT_SANDBOX_TTL_S = 3600
KEEPALIVE_PING_S = 50
KEY_HINT = "E2B_API_KEY or providers.e2b.api_key"
_END_STREAM = 0x02
_ENVELOPE = struct.Struct(">BI")
# Go's os.ProcessState.String() for a signalled child is "signal: <strsignal text>".
_GO_SIGNAL_TEXT = {
    "hangup": 1,
    "interrupt": 2,
    "quit": 3,
    "killed": 9,
    "user defined signal 1": 10,
    "user defined signal 2": 12,
    "broken pipe": 13,
    "alarm clock": 14,
    "terminated": 15,
}
_ENVD_SIGNALS = {int(_signal.SIGTERM): "SIGNAL_SIGTERM", int(_signal.SIGKILL): "SIGNAL_SIGKILL"}


def _envelope(message: Mapping[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return _ENVELOPE.pack(0, len(payload)) + payload


def _exit_code(end: Mapping[str, Any]) -> int:
    status = str(end.get("status", ""))
    if status.startswith("signal: "):
        signum = _GO_SIGNAL_TEXT.get(status.removeprefix("signal: ").strip())
        if signum is not None:
            return signal_exit_code(signum)
    return int(end.get("exitCode", end.get("exit_code", 0)))


def _missing_program(error: Mapping[str, Any]) -> bool:
    text = str(error.get("message", ""))
    return error.get("code") == "invalid_argument" and (
        "no such file or directory" in text or "executable file not found" in text
    )


def _envd_user(user: str | None) -> str | None:
    return "root" if user in ROOT_USERS else user


class E2BProvider(ProviderLifecycle):
    name = "e2b"

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._api_key = setting_or_env(settings, "api_key", ["E2B_API_KEY"])
        self._api_url = str(settings.get("api_url") or DEFAULT_API_URL).rstrip("/")
        self._domain = str(settings.get("domain") or DEFAULT_DOMAIN)
        self._sandbox_url = setting_or_env(settings, "sandbox_url", ["E2B_SANDBOX_URL"])
        self._ttl_s = int(settings.get("timeout_s", DEFAULT_SANDBOX_TTL_S))
        self._http = httpx.AsyncClient(timeout=http_timeout())

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> E2BProvider:
        return cls(settings)

    # -- plumbing --------------------------------------------------------------------

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self._api_key,)

    def _require_key(self) -> str:
        if not self._api_key:
            raise ProviderError(f"e2b: E2B_API_KEY is not set: export it or set providers.e2b.api_key ({KEY_HINT})")
        return self._api_key

    async def _api(self, method: str, path: str, action: str, **kwargs: Any) -> httpx.Response:
        headers = {"X-API-Key": self._require_key()}
        try:
            return await self._http.request(method, f"{self._api_url}{path}", headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, action, exc, self.secrets) from None

    def envd_url(self, sandbox_id: str, domain: str | None) -> str:
        if self._sandbox_url:
            return self._sandbox_url.rstrip("/")
        return f"https://{ENVD_PORT}-{sandbox_id}.{domain or self._domain}"

    # -- Provider ---------------------------------------------------------------------

    async def check(self) -> Availability:
        return await api_key_availability(
            self.name,
            "E2B",
            api_key=self._api_key,
            env_var="E2B_API_KEY",
            api_url=self._api_url,
            probe=partial(self._api, "GET", "/v2/sandboxes", "listing sandboxes", params={"limit": 1}),
        )

    async def create(self, spec: SandboxSpec) -> Sandbox:
        refuse_mounts(spec, "e2b")
        metadata = owner_labels(spec)
        body = {
            "templateID": spec.image,
            "timeout": self._ttl_s,
            "secure": True,
            "allow_internet_access": spec.network == "host",
            "metadata": metadata,
            "envVars": spec.env,
        }
        response = await self._api("POST", "/sandboxes", "creating a sandbox", json=body)
        if response.status_code == 404:
            raise InvalidInputError("image", f"e2b has no template {spec.image!r}; use a template ID or alias")
        if response.status_code != 201:
            raise status_error(self.name, "creating a sandbox", response, self.secrets, key_hint=KEY_HINT)
        created = response.json()
        sandbox = E2BSandbox(
            self,
            created["sandboxID"],
            self.envd_url(created["sandboxID"], created.get("domain")),
            created.get("envdAccessToken"),
            workdir=spec.workdir,
            user=spec.user,
        )
        async with removed_on_failure(partial(self.destroy, sandbox.id), cleanup_timeout_s=CLEANUP_TIMEOUT_S):
            # Templates do not promise the working directory; make it, owned by the default user.
            setup = ["mkdir", "-p", spec.workdir]
            result = await sandbox.exec(["sh", "-c", quote(setup)], user="root", cwd="/", timeout=60)
            if not result.ok:
                raise ProviderError(f"e2b: could not create {spec.workdir}: {result.stderr.decode(errors='replace')}")
            if spec.user and spec.user not in ROOT_USERS:
                await sandbox.exec(["chown", spec.user, spec.workdir], user="root", cwd="/", timeout=60)
        return sandbox

    async def attach(self, sandbox_id: str) -> Sandbox | None:
        response = await self._api("GET", f"/sandboxes/{urllib.parse.quote(sandbox_id)}", "looking up a sandbox")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise status_error(self.name, "looking up a sandbox", response, self.secrets, key_hint=KEY_HINT)
        detail = response.json()
        if detail.get("metadata", {}).get(OWNER_LABEL) != "true":
            return None
        return E2BSandbox(
            self,
            sandbox_id,
            self.envd_url(sandbox_id, detail.get("domain")),
            detail.get("envdAccessToken"),
            workdir=None,
            user=None,
        )

    async def destroy(self, sandbox_id: str) -> None:
        response = await self._api("DELETE", f"/sandboxes/{urllib.parse.quote(sandbox_id)}", "killing a sandbox")
        if response.status_code not in (200, 204, 404):
            raise status_error(self.name, "killing a sandbox", response, self.secrets, key_hint=KEY_HINT)

    async def list_owned(self) -> list[str]:
        query = urllib.parse.urlencode({urllib.parse.quote(OWNER_LABEL): "true"})
        ids: list[str] = []
        next_token: str | None = None
        for _ in range(1000):  # 100 per page: far beyond any real account
            params: dict[str, Any] = {"metadata": query, "state": "running,paused", "limit": 100}
            if next_token:
                params["nextToken"] = next_token
            response = await self._api("GET", "/v2/sandboxes", "listing sandboxes", params=params)
            if response.status_code != 200:
                raise status_error(self.name, "listing sandboxes", response, self.secrets, key_hint=KEY_HINT)
            ids.extend(item["sandboxID"] for item in response.json())
            next_token = response.headers.get("X-Next-Token")
            if not next_token:
                break
        return ids

    async def aclose(self) -> None:
        await self._http.aclose()


class E2BSandbox:
    provider = "e2b"

    def __init__(
        self,
        owner: E2BProvider,
        sandbox_id: str,
        envd_url: str,
        access_token: str | None,
        *,
        workdir: str | None,
        user: str | None,
    ) -> None:
        self.id = sandbox_id
        self._owner = owner
        self._envd = envd_url
        self._token = access_token
        self._workdir = workdir
        self._user = user

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (*self._owner.secrets, self._token)

    def headers(self, user: str | None) -> dict[str, str]:
        headers = {"E2b-Sandbox-Id": self.id, "E2b-Sandbox-Port": str(ENVD_PORT)}
        if self._token:
            headers["X-Access-Token"] = self._token
        name = _envd_user(user if user is not None else self._user)
        if name:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{name}:".encode()).decode()
        return headers

    async def rpc(self, method: str, message: Mapping[str, Any], user: str | None) -> bool:
        """A Connect unary call on the process service; False when envd no longer knows the process."""
        headers = {**self.headers(user), "Content-Type": "application/json", "Connect-Protocol-Version": "1"}
        try:
            response = await self._owner._http.post(
                f"{self._envd}/process.Process/{method}", headers=headers, json=message
            )
        except httpx.HTTPError as exc:
            raise transport_error("e2b", f"process.{method}", exc, self.secrets) from None
        if response.status_code == 404 and _connect_code(response) == "not_found":
            return False
        if response.status_code != 200:
            raise _envd_error(self.id, f"process.{method}", response, self.secrets)
        return True

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
        return await run_collected(process, provider="e2b", argv=argv, stdin=stdin, timeout=timeout)

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
        process = E2BProcess(self, user)
        config: dict[str, Any] = {"cmd": argv[0], "args": argv[1:], "envs": dict(env or {})}
        if cwd or self._workdir:
            config["cwd"] = cwd or self._workdir
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(process.run, {"process": config, "stdin": True})
                try:
                    yield process
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                        if not process.output.ended:
                            await process.kill()
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise sole_exception(group) from None

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        params = {"path": path}
        name = _envd_user(user if user is not None else self._user)
        if name:
            params["username"] = name
        try:
            with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
                response = await self._owner._http.post(
                    f"{self._envd}/files",
                    params=params,
                    headers=self.headers(user),
                    files={"file": (path, data, "application/octet-stream")},
                )
        except httpx.HTTPError as exc:
            raise transport_error("e2b", f"writing {path}", exc, self.secrets) from None
        if response.status_code != 200:
            raise _envd_error(self.id, f"writing {path}", response, self.secrets)
        if mode != 0o644:
            result = await self.exec(["chmod", format(mode, "o"), path], user=user, cwd="/", timeout=60)
            if not result.ok:
                raise ProviderError(f"e2b: chmod {path} failed: {result.stderr.decode(errors='replace').strip()}")

    async def get_file(self, path: str) -> bytes:
        try:
            with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
                response = await self._owner._http.get(
                    f"{self._envd}/files", params={"path": path}, headers=self.headers(None)
                )
        except httpx.HTTPError as exc:
            raise transport_error("e2b", f"reading {path}", exc, self.secrets) from None
        if response.status_code == 404:
            raise NotFoundError(f"e2b: {path} does not exist in sandbox {self.id}")
        if response.status_code != 200:
            raise _envd_error(self.id, f"reading {path}", response, self.secrets)
        return response.content


def _connect_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) and isinstance(body.get("code"), str) else None


def _envd_error(
    sandbox_id: str, action: str, response: httpx.Response, secrets: tuple[str | None, ...]
) -> ProviderError:
    if response.status_code == 502 or (response.status_code == 404 and "sandbox" in response.text.lower()):
        return SandboxGoneError(f"e2b: sandbox {sandbox_id} is gone ({action} answered {response.status_code})")
    return status_error("e2b", action, response, secrets, key_hint=KEY_HINT)


class E2BProcess(QueuedStream):
    """A process started through envd's Process/Start stream."""

    def __init__(self, sandbox: E2BSandbox, user: str | None) -> None:
        super().__init__()
        self._sandbox = sandbox
        self._user = user
        self.pid: int | None = None

    async def run(self, request: Mapping[str, Any], *, task_status: anyio.abc.TaskStatus[int]) -> None:
        headers = {
            **self._sandbox.headers(self._user),
            "Content-Type": "application/connect+json",
            "Connect-Protocol-Version": "1",
            "Keepalive-Ping-Interval": str(KEEPALIVE_PING_S),
        }
        client = self._sandbox._owner._http
        url = f"{self._sandbox._envd}/process.Process/Start"
        started = False
        try:
            # The stream lasts as long as the process: no read timeout, envd sends keepalives.
            async with client.stream(
                "POST", url, content=_envelope(request), headers=headers, timeout=http_timeout(read=None)
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _envd_error(self._sandbox.id, "starting a process", response, self._sandbox.secrets)
                async for flags, message in _read_envelopes(response):
                    if flags & _END_STREAM:
                        error = message.get("error")
                        if error and not started and _missing_program(error):
                            # envd fails Start when exec cannot find the program; report it the
                            # way a shell does, as a process that ended with 127.
                            started = True
                            task_status.started(0)
                            await self.output.put("stderr", str(error.get("message", "")).encode() + b"\n")
                            self.output.finish(127)
                        elif error:
                            text = f"{error.get('code', 'unknown')}: {error.get('message', '')}"
                            raise ProviderError(f"e2b: the process stream failed ({text})")
                        break
                    event = message.get("event", {})
                    if "start" in event and not started:
                        self.pid = int(event["start"].get("pid", 0))
                        started = True
                        task_status.started(self.pid)
                    elif "data" in event:
                        data = event["data"]
                        for stream in ("stdout", "stderr"):
                            if stream in data:
                                await self.output.put(stream, base64.b64decode(data[stream]))
                    elif "end" in event:
                        self.output.finish(_exit_code(event["end"]))
                if not self.output.ended:
                    raise ProviderError("e2b: the process stream ended before the process did")
        except httpx.HTTPError as exc:
            error = transport_error("e2b", "streaming process output", exc, self._sandbox.secrets)
            if not started:
                raise error from None
            self.output.finish(None, error)
        except ProviderError as exc:
            if not started:
                raise
            self.output.finish(None, exc)

    # -- ExecStream -----------------------------------------------------------------

    def _selector(self) -> dict[str, Any]:
        return {"pid": self.pid}

    async def send_stdin(self, data: bytes) -> None:
        message = {"process": self._selector(), "input": {"stdin": base64.b64encode(data).decode()}}
        # A process that already ended (envd forgot it) takes no more input; its output and exit code stand.
        await self._sandbox.rpc("SendInput", message, self._user)

    async def close_stdin(self) -> None:
        await self._sandbox.rpc("CloseStdin", {"process": self._selector()}, self._user)

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self.output.ended:
            return
        envd_signal = _ENVD_SIGNALS.get(int(signum))
        if envd_signal:
            await self._sandbox.rpc("SendSignal", {"process": self._selector(), "signal": envd_signal}, self._user)
            return
        # envd's SendSignal knows only SIGTERM/SIGKILL; deliver the rest with kill(1) as the same user.
        name = signal_name(signum)
        result = await self._sandbox.exec(["kill", "-s", name, str(self.pid)], user=self._user, cwd="/", timeout=30)
        if not result.ok and not self.output.ended:
            raise ProviderError(f"e2b: kill -s {name} {self.pid} failed: {result.stderr.decode(errors='replace')}")

    async def kill(self) -> None:
        try:
            await self.signal(_signal.SIGKILL)
        except ProviderError:
            pass  # the process (or the whole sandbox) is already gone


async def _read_envelopes(response: httpx.Response) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    buffer = bytearray()
    async for data in response.aiter_bytes():
        buffer.extend(data)
        while len(buffer) >= _ENVELOPE.size:
            flags, length = _ENVELOPE.unpack_from(buffer)
            if len(buffer) < _ENVELOPE.size + length:
                break
            payload = bytes(buffer[_ENVELOPE.size : _ENVELOPE.size + length])
            del buffer[: _ENVELOPE.size + length]
            yield flags, json.loads(payload) if payload else {}
    if buffer:
        raise ProviderError("e2b: the process stream ended inside a message")


__all__ = ["E2BProvider", "E2BSandbox"]
