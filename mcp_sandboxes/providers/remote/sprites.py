"""Sprites (sprites.dev, by Fly.io): one Sprite, a persistent Firecracker microVM, per sandbox.

Vendor documentation followed (docs.sprites.dev API reference, and the wire calls of the
official Go SDK, github.com/superfly/sprites-go):
- https://docs.sprites.dev/api/ : base URL https://api.sprites.dev,
  `Authorization: Bearer $SPRITE_TOKEN`; errors are `{"error": "<code>", "message": ...}`.
- Sprites: POST /v1/sprites `{name, config: {cpus, ram_mb}, labels: [..]}` (201),
  GET /v1/sprites?prefix=&max_results=(<=50)&continuation_token= ->
  `{sprites, has_more, next_continuation_token}`, GET/DELETE /v1/sprites/{name}.
- Exec (https://docs.sprites.dev/api/exec, "Command Execution"): a WebSocket at
  /v1/sprites/{name}/exec with query `cmd` (repeated: argv), `path`, `dir`, `env`
  (repeated KEY=VALUE, *replaces* the default environment), `stdin`, `tty`,
  `max_run_after_disconnect`. Non-TTY frames are binary with a leading stream byte:
  0 stdin, 1 stdout, 2 stderr, 3 exit (next byte: the code), 4 stdin EOF. Text frames
  are JSON: `session_info` (`session_id` is the process id), `exit {exit_code}`, and
  from the client `signal {signal: "TERM"}` when the server lists `signal` in its
  `X-Sprite-Capabilities` response header; otherwise
  POST /v1/sprites/{name}/exec/{session_id}/kill?signal=TERM.
- Filesystem: GET /v1/sprites/{name}/fs/read?path=&workingDir= (raw bytes, 404 when
  absent), PUT /v1/sprites/{name}/fs/write?path=&workingDir=&mode=&mkdirParents=true.

Notes on what this module does with it:
- Exec is the WebSocket protocol (the only documented exec); it streams output and takes
  live stdin, so `stream()` is a real stream. `cwd` is the `dir` parameter; the
  environment is set inside a `/bin/sh -c` wrapper rather than with `env`, because `env`
  would replace PATH and HOME; users are switched with `sudo -n` (the default user,
  `sprite`, has passwordless sudo) - see `_remote_shell`.
- Sprites run Fly's standard Ubuntu image, so `spec.image` must be "default" (or
  "sprite"/"ubuntu"); `network='none'` and host mounts are refused with an error that
  says so. Labels are a list of strings on Sprites: ownership is the label
  `mcp-sandboxes-managed`; `spec.labels` are not stored.
"""

from __future__ import annotations

import json
import math
import secrets
import signal as _signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlencode

import anyio
import anyio.abc
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from mcp_sandboxes.errors import (
    InvalidInputError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
)
from mcp_sandboxes.providers._cleanup import removed_unless_ready
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
from mcp_sandboxes.providers.remote._remote_http import (
    CLEANUP_TIMEOUT_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    RemoteApiError,
    RemoteNotFoundError,
    VendorClient,
    setting_or_env,
)
from mcp_sandboxes.providers.remote._remote_shell import (
    SHELL,
    as_user,
    inner_script,
    q,
    reject_unsupported,
    run_as,
    signal_name,
)
from mcp_sandboxes.providers.remote._remote_stream import QueuedStream, followed

NAME = "sprites"
DEFAULT_API_URL = "https://api.sprites.dev"
OWNER_TAG = "mcp-sandboxes-managed"
NAME_PREFIX = "mcp-"
IMAGES = ("default", "sprite", "sprites", "ubuntu")
STDIN, STDOUT, STDERR, EXIT, STDIN_EOF = 0, 1, 2, 3, 4


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or response.text[:300])
    return response.text[:300]


class SpritesProvider(ProviderLifecycle):
    name = NAME

    def __init__(
        self,
        *,
        token: str | None,
        api_url: str = DEFAULT_API_URL,
        max_run_after_disconnect: str = "10s",
        request_timeout_s: float = 60.0,
        create_timeout_s: float = DEFAULT_CREATE_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._token = token
        self.api_url = api_url.rstrip("/")
        self.max_run_after_disconnect = max_run_after_disconnect
        self.create_timeout_s = create_timeout_s
        self._api = VendorClient(
            vendor="Sprites",
            base_url=api_url,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            secrets=[token or ""],
            credential_fix="set SPRITE_TOKEN (or providers.sprites.token) to a token from sprites.dev/account",
            error_text=_error_text,
            request_timeout_s=request_timeout_s,
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> SpritesProvider:
        return cls(
            token=setting_or_env(settings, "token", ["SPRITE_TOKEN", "SPRITES_TOKEN"]),
            api_url=setting_or_env(settings, "api_url", ["SPRITES_API_URL"]) or DEFAULT_API_URL,
            max_run_after_disconnect=str(settings.get("max_run_after_disconnect", "10s")),
            request_timeout_s=float(settings.get("request_timeout_s", 60.0)),
            create_timeout_s=float(settings.get("create_timeout_s", DEFAULT_CREATE_TIMEOUT_S)),
        )

    @property
    def api(self) -> VendorClient:
        return self._api

    @property
    def token(self) -> str:
        if not self._token:
            raise ProviderError(
                "no Sprites token: SPRITE_TOKEN is not set and providers.sprites.token is empty; "
                "fix: create one at sprites.dev/account (or `sprite org auth`) and export SPRITE_TOKEN"
            )
        return self._token

    async def check(self) -> Availability:
        if not self._token:
            return Availability(
                provider=NAME,
                available=False,
                reason="no Sprites token: SPRITE_TOKEN is not set and providers.sprites.token is empty",
                fix="create a token at sprites.dev/account (or `sprite org auth`) and export SPRITE_TOKEN",
            )
        try:
            await self._api.request("GET", "/v1/sprites", params={"max_results": "1"})
        except ProviderError as exc:
            return Availability(
                provider=NAME, available=False, reason=str(exc), fix="check SPRITE_TOKEN and providers.sprites.api_url"
            )
        return Availability(provider=NAME, available=True)

    async def create(self, spec: SandboxSpec) -> SpritesSandbox:
        if spec.image not in IMAGES:
            raise InvalidInputError(
                "image",
                f"Sprites always run Fly's standard Ubuntu image and cannot run {spec.image!r}; "
                "set image = 'default' for this environment, or use a provider that runs container images",
            )
        reject_unsupported(spec, "Sprites", network_none=False)
        self.token  # noqa: B018 - fail before creating anything when there is no token
        name = f"{NAME_PREFIX}{secrets.token_hex(6)}"
        body: dict[str, Any] = {"name": name, "labels": [OWNER_TAG]}
        config: dict[str, Any] = {}
        if spec.limits.cpus is not None:
            config["cpus"] = max(1, round(spec.limits.cpus))
        if spec.limits.memory_mb is not None:
            config["ram_mb"] = spec.limits.memory_mb
        if config:
            body["config"] = config
        await self._api.request("POST", "/v1/sprites", json=body, timeout_s=self.create_timeout_s, ok=(200, 201))
        async with removed_unless_ready(
            partial(self.destroy, name),
            what="Sprites: the new sprite",
            within_s=self.create_timeout_s,
            cleanup_timeout_s=CLEANUP_TIMEOUT_S,
        ):
            sandbox = SpritesSandbox(self, name, spec)
            workdir = q(spec.workdir)
            script = f'mkdir -p {workdir} && chown "${{SUDO_USER:-$(id -un)}}" {workdir}'
            result = await sandbox.run_script(script, user="root", cwd="/")
            if not result.ok:
                raise ProviderError(
                    f"Sprites: could not create workdir {spec.workdir!r} in sprite {name}: "
                    f"{result.stderr.decode(errors='replace').strip()}"
                )
        return sandbox

    async def attach(self, sandbox_id: str) -> SpritesSandbox | None:
        try:
            response = await self._api.request("GET", f"/v1/sprites/{sandbox_id}")
        except RemoteNotFoundError:
            return None
        info = response.json()
        labels = [str(label) for label in info.get("labels") or []]
        return SpritesSandbox(
            self, sandbox_id, SandboxSpec(image="default", network="host", labels=dict.fromkeys(labels, ""))
        )

    async def destroy(self, sandbox_id: str) -> None:
        try:
            await self._api.request("DELETE", f"/v1/sprites/{sandbox_id}", ok=(200, 204))
        except RemoteNotFoundError:
            return

    async def list_owned(self) -> list[str]:
        names: list[str] = []
        token: str | None = None
        for _page in range(1000):
            params = {"prefix": NAME_PREFIX, "max_results": "50", "continuation_token": token}
            body = (await self._api.request("GET", "/v1/sprites", params=params)).json()
            for sprite in body.get("sprites") or []:
                if OWNER_TAG in (sprite.get("labels") or []):
                    names.append(str(sprite["name"]))
            token = body.get("next_continuation_token")
            if not body.get("has_more") or not token:
                break
        return names

    async def aclose(self) -> None:
        await self._api.aclose()


class SpritesSandbox:
    provider = NAME

    def __init__(self, owner: SpritesProvider, name: str, spec: SandboxSpec) -> None:
        self._owner = owner
        self.id = name
        self.spec = spec

    def exec_url(self, argv: list[str], *, cwd: str, stdin: bool) -> str:
        base = self._owner.api_url
        ws_base = "ws" + base[4:] if base.startswith("http") else base
        query: list[tuple[str, str]] = [("cmd", arg) for arg in argv]
        query += [
            ("path", argv[0]),
            ("dir", cwd),
            ("stdin", "true" if stdin else "false"),
            ("tty", "false"),
            ("max_run_after_disconnect", self._owner.max_run_after_disconnect),
        ]
        return f"{ws_base}/v1/sprites/{self.id}/exec?{urlencode(query)}"

    def command(self, argv: list[str], *, env: dict[str, str] | None, user: str | None) -> list[str]:
        script = inner_script(argv, env={**self.spec.env, **(env or {})})
        return [SHELL, "-c", as_user(script, run_as(self.spec.user, user))]

    async def open(
        self, argv: list[str], *, env: dict[str, str] | None, cwd: str | None, user: str | None, stdin: bool
    ) -> SpritesConnection:
        url = self.exec_url(self.command(argv, env=env, user=user), cwd=cwd or self.spec.workdir, stdin=stdin)
        api = self._owner.api
        try:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {self._owner.token}"},
                open_timeout=DEFAULT_CONNECT_TIMEOUT_S,
                max_size=None,
                ping_interval=15,
            )
        except InvalidStatus as exc:
            response = httpx.Response(exc.response.status_code, content=bytes(exc.response.body or b""))
            if response.status_code == 404:
                raise SandboxGoneError(f"sprite {self.id} no longer exists") from None
            raise api.status_error("WS", f"/v1/sprites/{self.id}/exec", response) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ProviderUnavailableError(
                api.scrub(f"Sprites: cannot open the exec WebSocket of sprite {self.id}: {exc!s}")
            ) from None
        return SpritesConnection(self, ws)

    async def run_script(self, script: str, *, user: str | None, cwd: str | None = None) -> ExecResult:
        return await self.exec([SHELL, "-c", script], user=user, cwd=cwd, timeout=DEFAULT_FILE_TIMEOUT_S)

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
        connection = await self.open(argv, env=env, cwd=cwd, user=user, stdin=stdin is not None)
        stdout = bytearray()
        stderr = bytearray()
        async with connection:
            try:
                with anyio.fail_after(timeout):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(connection.read_all)
                        if stdin is not None:
                            await connection.send_stdin(stdin)
                            await connection.close_stdin()
                    code = await connection.wait()
            except TimeoutError:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                    await connection.signal(_signal.SIGKILL)
                raise ProviderError(
                    f"Sprites: the command in sprite {self.id} did not finish within {timeout:g}s (timed out); "
                    "it was killed"
                ) from None
        async for chunk in connection:
            (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
        return ExecResult(code, bytes(stdout), bytes(stderr))

    @asynccontextmanager
    async def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[SpritesConnection]:
        check_exec_args(argv, env, cwd, user)
        connection = await self.open(argv, env=env, cwd=cwd, user=user, stdin=True)
        async with (
            connection,
            followed(connection, connection.read_all, connection.kill, cleanup_timeout_s=CLEANUP_TIMEOUT_S) as started,
        ):
            yield started

    def fs_params(self, path: str) -> dict[str, str]:
        if not path.startswith("/"):
            path = f"{self.spec.workdir.rstrip('/')}/{path}"
        return {"path": path, "workingDir": "/"}

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        params = {**self.fs_params(path), "mode": f"{mode & 0o7777:04o}", "mkdirParents": "true"}
        await self._owner.api.request(
            "PUT",
            f"/v1/sprites/{self.id}/fs/write",
            params=params,
            content=data,
            headers={"content-type": "application/octet-stream"},
            timeout_s=DEFAULT_FILE_TIMEOUT_S,
            ok=(200, 201),
        )
        owner = run_as(self.spec.user, user)
        if owner:
            result = await self.run_script(f"chown {q(owner)} {q(params['path'])}", user="root", cwd="/")
            if not result.ok:
                raise ProviderError(
                    f"Sprites: chown {owner} {path} failed in sprite {self.id}: "
                    f"{result.stderr.decode(errors='replace').strip()}"
                )

    async def get_file(self, path: str) -> bytes:
        try:
            response = await self._owner.api.request(
                "GET", f"/v1/sprites/{self.id}/fs/read", params=self.fs_params(path), timeout_s=DEFAULT_FILE_TIMEOUT_S
            )
        except RemoteNotFoundError:
            raise NotFoundError(f"{path}: no such file in sprite {self.id}") from None
        return response.content

    async def kill_session(self, session_id: str, signum: int) -> None:
        try:
            await self._owner.api.request(
                "POST",
                f"/v1/sprites/{self.id}/exec/{session_id}/kill",
                params={"signal": signal_name(signum), "timeout": "0s"},
            )
        except RemoteApiError as exc:
            if exc.status != 410:  # 410: the session already ended
                raise


class SpritesConnection(QueuedStream):
    """One exec WebSocket: a running process with live stdin, streamed output and signals."""

    def __init__(self, sandbox: SpritesSandbox, ws: ClientConnection) -> None:
        super().__init__(limit=math.inf)
        self._sandbox = sandbox
        self._ws = ws
        self.session_id: str | None = None
        headers = ws.response.headers if ws.response is not None else {}
        self.capabilities = {c.strip() for c in str(headers.get("X-Sprite-Capabilities", "")).split(",") if c.strip()}
        self._stdin_closed = False

    async def __aenter__(self) -> SpritesConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
            await self._ws.close()

    async def read_all(self) -> None:
        """Read frames until the exit frame; the channel gets the output and the exit code."""
        try:
            async for message in self._ws:
                if isinstance(message, str):
                    self._on_text(message)
                elif message:
                    stream, payload = message[0], message[1:]
                    if stream == STDOUT:
                        self.output.put_nowait("stdout", payload)
                    elif stream == STDERR:
                        self.output.put_nowait("stderr", payload)
                    elif stream == EXIT:
                        self.output.finish(payload[0] if payload else 0)
                if self.output.ended:
                    return
        except ConnectionClosed:
            pass
        self.output.finish(
            -1, ProviderError(f"Sprites: the exec connection to sprite {self._sandbox.id} closed before the exit code")
        )

    def _on_text(self, message: str) -> None:
        try:
            data = json.loads(message)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if data.get("type") == "session_info" and data.get("session_id") is not None:
            self.session_id = str(data["session_id"])
        elif data.get("type") == "exit":
            self.output.finish(int(data.get("exit_code") or 0))

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise ProviderError("stdin is already closed")
        try:
            await self._ws.send(bytes([STDIN]) + data)
        except ConnectionClosed:
            raise ProviderError(f"Sprites: the exec connection to sprite {self._sandbox.id} is closed") from None

    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        try:
            await self._ws.send(bytes([STDIN_EOF]))
        except ConnectionClosed:
            pass

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self.output.ended:
            return
        if "signal" in self.capabilities:
            try:
                await self._ws.send(json.dumps({"type": "signal", "signal": signal_name(signum)}))
                return
            except ConnectionClosed:
                pass
        if self.session_id is None:
            raise ProviderError(f"Sprites: no session id yet to signal the command in sprite {self._sandbox.id}")
        await self._sandbox.kill_session(self.session_id, signum)

    async def kill(self) -> None:
        """SIGKILL the command unless it has ended; for cleanup, so a failure to reach it is dropped."""
        try:
            await self.signal(_signal.SIGKILL)
        except ProviderError:
            pass
