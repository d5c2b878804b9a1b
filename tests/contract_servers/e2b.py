"""A loopback stand-in for E2B: the control-plane REST API and envd, on one Starlette app.

Followed (e2b-dev/E2B `spec/`, the source of https://e2b.dev/docs/api-reference):
- spec/openapi.yml: `POST /sandboxes` (NewSandbox, 201 Sandbox), `GET /sandboxes/{id}`
  (SandboxDetail), `GET /v2/sandboxes` (metadata query "k=v&..." with URL-encoded keys and
  values, `state`, `limit` 1..100, `nextToken` / `X-Next-Token`), `DELETE /sandboxes/{id}`
  (204, 404); security `X-API-Key`; errors are `{"code": <int>, "message": "..."}`.
- spec/envd/process/process.proto + the Connect protocol (https://connectrpc.com/docs/protocol):
  `Process/Start` server stream (`application/connect+json`, envelopes, end-stream flag 0x02,
  errors in the end-stream message), `SendInput`, `CloseStdin`, `SendSignal` unary
  (`application/json`; errors `{"code": "not_found", "message": ...}` with the mapped HTTP
  status). Proto3 JSON: lowerCamelCase names, bytes as base64, zero values omitted.
  End events carry what envd's Go handler reports: `exitCode` (-1 when signalled),
  `exited`, `status` ("exit status N" / "signal: killed") and `error`.
- spec/envd/envd.yaml: `POST /files?path=&username=` (multipart `file`, 200 [EntryInfo]),
  `GET /files?path=` (raw bytes; 404 `{"message", "code"}`); `X-Access-Token` when the
  sandbox was created with `secure: true`; the user in `Authorization: Basic base64(user:)`.
- envd requests name their sandbox with the `E2b-Sandbox-Id` header, as the SDKs send it
  to the shared sandbox proxy; an unknown sandbox gets the proxy's 502.

Commands run for real (see sandbox_host.LocalMachine). Only the templates in `templates`
exist; user names other than "user" and "root" are rejected as envd rejects unknown users.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.contract_servers.sandbox_host import LocalMachine, LocalProcess, LoopbackServer

ENVELOPE = struct.Struct(">BI")
USERS = {"user": "/home/user", "root": "/root"}
CONNECT_STATUS = {
    "invalid_argument": 400,
    "failed_precondition": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "internal": 500,
    "unimplemented": 501,
}
GO_SIGNAL_TEXT = {1: "hangup", 2: "interrupt", 3: "quit", 9: "killed", 10: "user defined signal 1", 15: "terminated"}


class ConnectError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class RunningProcess:
    local: LocalProcess
    stdin_open: bool
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


@dataclass
class StandInSandbox:
    sandbox_id: str
    template: str
    metadata: dict[str, str]
    env: dict[str, str]
    access_token: str | None
    machine: LocalMachine
    started_at: datetime
    end_at: datetime
    processes: dict[int, RunningProcess] = field(default_factory=dict)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


class E2BStandIn:
    def __init__(self, api_key: str, *, templates: frozenset[str] = frozenset({"base"})) -> None:
        self.api_key = api_key
        self.templates = templates
        self.sandboxes: dict[str, StandInSandbox] = {}
        self.requests: list[Recorded] = []
        # Test hook: the next N Process/Start calls fail with this Connect error code.
        self.fail_starts: list[str] = []
        self.app = Starlette(
            routes=[
                Route("/sandboxes", self.create_sandbox, methods=["POST"]),
                Route("/v2/sandboxes", self.list_sandboxes, methods=["GET"]),
                Route("/sandboxes/{sandbox_id}", self.get_sandbox, methods=["GET"]),
                Route("/sandboxes/{sandbox_id}", self.kill_sandbox, methods=["DELETE"]),
                Route("/process.Process/Start", self.start, methods=["POST"]),
                Route("/process.Process/{method}", self.unary, methods=["POST"]),
                Route("/files", self.files, methods=["GET", "POST"]),
            ]
        )

    async def close(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            await sandbox.machine.destroy()
        self.sandboxes.clear()

    # -- control plane -------------------------------------------------------------

    def _record(self, request: Request) -> None:
        self.requests.append(Recorded(request.method, request.url.path, dict(request.headers)))

    def _auth(self, request: Request) -> JSONResponse | None:
        self._record(request)
        if request.headers.get("x-api-key") != self.api_key:
            return _api_error(401, "Invalid API key, please visit https://e2b.dev/docs/api-key for more information.")
        return None

    async def create_sandbox(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _api_error(400, "request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("templateID"), str):
            return _api_error(400, "templateID is required")
        timeout = body.get("timeout", 15)
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
            return _api_error(400, "timeout must be a non-negative integer")
        for key in ("metadata", "envVars"):
            value = body.get(key, {})
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                return _api_error(400, f"{key} must be an object of strings")
        template = body["templateID"]
        if template not in self.templates:
            return _api_error(404, f"template '{template}' not found")
        sandbox_id = "i" + secrets.token_hex(10)
        now = datetime.now(UTC)
        sandbox = StandInSandbox(
            sandbox_id=sandbox_id,
            template=template,
            metadata=dict(body.get("metadata", {})),
            env=dict(body.get("envVars", {})),
            access_token=secrets.token_urlsafe(24) if body.get("secure") else None,
            machine=LocalMachine(network=bool(body.get("allow_internet_access", True))),
            started_at=now,
            end_at=now + timedelta(seconds=timeout),
        )
        self.sandboxes[sandbox_id] = sandbox
        return JSONResponse(
            {
                "templateID": template,
                "sandboxID": sandbox_id,
                "clientID": "6532622b",
                "envdVersion": "0.6.4",
                "envdAccessToken": sandbox.access_token,
                "trafficAccessToken": None,
                "domain": None,
            },
            status_code=201,
        )

    def _listed(self, sandbox: StandInSandbox) -> dict[str, Any]:
        return {
            "templateID": sandbox.template,
            "sandboxID": sandbox.sandbox_id,
            "clientID": "6532622b",
            "startedAt": sandbox.started_at.isoformat(),
            "endAt": sandbox.end_at.isoformat(),
            "cpuCount": 2,
            "memoryMB": 512,
            "diskSizeMB": 10240,
            "metadata": sandbox.metadata,
            "state": "running",
            "envdVersion": "0.6.4",
        }

    async def list_sandboxes(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        query = request.query_params
        try:
            limit = int(query.get("limit", "100"))
            offset = int(query.get("nextToken", "0"))
        except ValueError:
            return _api_error(400, "limit and nextToken must be integers")
        if not 1 <= limit <= 100:
            return _api_error(400, "limit must be between 1 and 100")
        wanted = {unquote(k): unquote(v) for k, v in parse_qsl(query.get("metadata", ""), keep_blank_values=True)}
        states = set(query.get("state", "running").split(","))
        if not states <= {"running", "paused"}:
            return _api_error(400, f"invalid state filter {sorted(states)}")
        matching = [
            s
            for s in self.sandboxes.values()
            if "running" in states and all(s.metadata.get(k) == v for k, v in wanted.items())
        ]
        page = matching[offset : offset + limit]
        headers = {"X-Total-Running": str(len(self.sandboxes))}
        if offset + limit < len(matching):
            headers["X-Next-Token"] = str(offset + limit)
        return JSONResponse([self._listed(s) for s in page], headers=headers)

    async def get_sandbox(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        sandbox = self.sandboxes.get(request.path_params["sandbox_id"])
        if sandbox is None:
            return _api_error(
                404, f"sandbox \"{request.path_params['sandbox_id']}\" doesn't exist or you don't have access to it"
            )
        detail = self._listed(sandbox)
        detail.update({"envdAccessToken": sandbox.access_token, "domain": None})
        return JSONResponse(detail)

    async def kill_sandbox(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        sandbox = self.sandboxes.pop(request.path_params["sandbox_id"], None)
        if sandbox is None:
            return _api_error(404, f'sandbox "{request.path_params["sandbox_id"]}" not found')
        await sandbox.machine.destroy()
        return Response(status_code=204)

    # -- envd ----------------------------------------------------------------------

    def _envd_sandbox(self, request: Request) -> StandInSandbox:
        self._record(request)
        sandbox = self.sandboxes.get(request.headers.get("e2b-sandbox-id", ""))
        if sandbox is None or request.headers.get("e2b-sandbox-port") != "49983":
            raise LookupError("sandbox not found")
        if sandbox.access_token is not None and request.headers.get("x-access-token") != sandbox.access_token:
            raise ConnectError("unauthenticated", "invalid access token")
        return sandbox

    def _process_call(self, request: Request, content_type: str) -> StandInSandbox | Response:
        """The sandbox a Connect call of the process service is for, or the error answer
        (the proxy's for an unknown sandbox, Connect's for a bad token, 415 for a wrong codec)."""
        try:
            sandbox = self._envd_sandbox(request)
        except LookupError:
            return _proxy_not_found(request)
        except ConnectError as exc:
            return _connect_unary_error(exc)
        if request.headers.get("content-type", "").split(";")[0] != content_type:
            return Response(status_code=415)
        return sandbox

    def _user(self, request: Request, query_user: str | None = None) -> str:
        user = query_user
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            try:
                user = base64.b64decode(header[6:]).decode().split(":", 1)[0]
            except (binascii.Error, UnicodeDecodeError):
                raise ConnectError("unauthenticated", "malformed basic auth") from None
        user = user or "user"
        if user not in USERS:
            raise ConnectError("unauthenticated", f"error looking up user '{user}': user: unknown user {user}")
        return user

    async def start(self, request: Request) -> Response:
        sandbox = self._process_call(request, "application/connect+json")
        if isinstance(sandbox, Response):
            return sandbox
        if request.headers.get("connect-protocol-version", "1") != "1":
            return _connect_unary_error(ConnectError("invalid_argument", "unsupported connect-protocol-version"))
        raw = await request.body()
        try:
            _flags, length = ENVELOPE.unpack_from(raw)
            message = json.loads(raw[ENVELOPE.size : ENVELOPE.size + length])
            config = message["process"]
            argv = [config["cmd"], *config.get("args", [])]
        except (struct.error, ValueError, KeyError, TypeError):
            return _stream_response([_end_stream(ConnectError("invalid_argument", "malformed StartRequest"))])
        try:
            user = self._user(request)
            if self.fail_starts:
                raise ConnectError(self.fail_starts.pop(0), "injected failure")
            _check_executable(sandbox.machine, argv[0])
            env = {"USER": user, "HOME": USERS[user], **sandbox.env, **config.get("envs", {})}
            local = await sandbox.machine.spawn(argv, env=env, cwd=config.get("cwd") or USERS[user])
        except ConnectError as exc:
            return _stream_response([_end_stream(exc)])
        except FileNotFoundError as exc:
            return _stream_response([_end_stream(ConnectError("invalid_argument", str(exc)))])
        running = RunningProcess(local, stdin_open=bool(message.get("stdin")))
        if not running.stdin_open and local.process.stdin is not None:
            await local.process.stdin.aclose()
        sandbox.processes[local.pid] = running
        asyncio.get_running_loop().create_task(_pump(running))
        keepalive = float(request.headers.get("keepalive-ping-interval", "0") or 0)
        return StreamingResponse(_events(running, keepalive), media_type="application/connect+json")

    async def unary(self, request: Request) -> Response:
        method = request.path_params["method"]
        sandbox = self._process_call(request, "application/json")
        if isinstance(sandbox, Response):
            return sandbox
        try:
            self._user(request)
            body = await request.json()
            running = _select(sandbox, body)
            if method == "SendInput":
                data = base64.b64decode(body.get("input", {}).get("stdin", ""))
                stdin = running.local.process.stdin
                if not running.stdin_open or stdin is None:
                    raise ConnectError("failed_precondition", "stdin is not enabled for this process")
                await stdin.send(data)
            elif method == "CloseStdin":
                stdin = running.local.process.stdin
                if running.stdin_open and stdin is not None:
                    running.stdin_open = False
                    await stdin.aclose()
            elif method == "SendSignal":
                value = body.get("signal")
                signum = {"SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9, 15: 15, 9: 9}.get(value)
                if signum is None:
                    raise ConnectError("unimplemented", f"invalid signal: {value}")
                running.local.send_signal(signum)
            else:
                raise ConnectError("unimplemented", f"process.Process/{method} is not implemented")
        except ConnectError as exc:
            return _connect_unary_error(exc)
        except (ValueError, binascii.Error):
            return _connect_unary_error(ConnectError("invalid_argument", "malformed request"))
        return JSONResponse({})

    async def files(self, request: Request) -> Response:
        try:
            sandbox = self._envd_sandbox(request)
            self._user(request, request.query_params.get("username"))
        except LookupError:
            return _proxy_not_found(request)
        except ConnectError as exc:
            return JSONResponse({"message": exc.message, "code": 401}, status_code=401)
        path = request.query_params.get("path", "")
        try:
            host = sandbox.machine.resolve(path)
        except ValueError as exc:
            return JSONResponse({"message": str(exc), "code": 400}, status_code=400)
        if request.method == "GET":
            if host.is_dir():
                return JSONResponse({"message": f"path '{path}' is a directory", "code": 400}, status_code=400)
            if not host.is_file():
                return JSONResponse({"message": f"path '{path}' does not exist", "code": 404}, status_code=404)
            return Response(host.read_bytes(), media_type="application/octet-stream")
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return JSONResponse({"message": "missing multipart field 'file'", "code": 400}, status_code=400)
        if not sandbox.machine.writable(path):
            message = f"error opening file '{path}': permission denied"
            return JSONResponse({"message": message, "code": 500}, status_code=500)
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(await upload.read())
        host.chmod(0o644)
        return JSONResponse([{"path": path, "name": host.name, "type": "file"}])


@asynccontextmanager
async def e2b_server(api_key: str) -> AsyncIterator[tuple[LoopbackServer, E2BStandIn]]:
    """The stand-in on loopback (control plane and envd at one URL); its sandboxes end with it."""
    stand_in = E2BStandIn(api_key)
    try:
        async with LoopbackServer(stand_in.app, "e2b-stand-in") as server:
            yield server, stand_in
    finally:
        await stand_in.close()


def _check_executable(machine: LocalMachine, cmd: str) -> None:
    """envd spawns with Go's exec.Command, which fails the Start call (invalid_argument) for a
    program it cannot find, before any process exists."""
    if "/" in cmd:
        host = machine.resolve(cmd)
        if not host.exists():
            raise ConnectError(
                "invalid_argument", f"error starting process '{cmd}': fork/exec {cmd}: no such file or directory"
            )
        return
    for directory in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]:
        if machine.resolve(f"{directory}/{cmd}").exists():
            return
    raise ConnectError(
        "invalid_argument", f"error starting process '{cmd}': exec: \"{cmd}\": executable file not found in $PATH"
    )


def _select(sandbox: StandInSandbox, body: Any) -> RunningProcess:
    pid = body.get("process", {}).get("pid") if isinstance(body, dict) else None
    running = sandbox.processes.get(pid) if isinstance(pid, int) else None
    if running is None or running.local.process.returncode is not None:
        raise ConnectError("not_found", f"process with pid {pid} not found")
    return running


async def _pump(running: RunningProcess) -> None:
    process = running.local.process
    await running.events.put({"event": {"start": {"pid": running.local.pid}}})

    async def read(stream: Any, name: str) -> None:
        async for chunk in stream:
            await running.events.put({"event": {"data": {name: base64.b64encode(chunk).decode()}}})

    assert process.stdout is not None and process.stderr is not None
    await asyncio.gather(read(process.stdout, "stdout"), read(process.stderr, "stderr"))
    code = await process.wait()
    killed = running.local.killed_by(code)
    if killed is not None:
        status = f"signal: {GO_SIGNAL_TEXT.get(killed, str(killed))}"
        end: dict[str, Any] = {"exitCode": -1, "status": status, "error": status}
    else:
        end = {"exited": True, "status": f"exit status {code}"}
        if code:
            end.update({"exitCode": code, "error": f"exit status {code}"})
    await running.events.put({"event": {"end": end}})


async def _events(running: RunningProcess, keepalive_s: float) -> AsyncIterator[bytes]:
    while True:
        try:
            if keepalive_s > 0:
                event = await asyncio.wait_for(running.events.get(), keepalive_s)
            else:
                event = await running.events.get()
        except TimeoutError:
            event = {"event": {"keepalive": {}}}
        yield _envelope(0, event)
        if "end" in event["event"]:
            break
    yield _envelope(0x02, {})


def _envelope(flags: int, message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return ENVELOPE.pack(flags, len(payload)) + payload


def _end_stream(error: ConnectError) -> bytes:
    return _envelope(0x02, {"error": {"code": error.code, "message": error.message}})


def _stream_response(parts: list[bytes]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    return StreamingResponse(body(), media_type="application/connect+json")


def _connect_unary_error(error: ConnectError) -> JSONResponse:
    return JSONResponse({"code": error.code, "message": error.message}, status_code=CONNECT_STATUS[error.code])


def _api_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _proxy_not_found(request: Request) -> JSONResponse:
    sandbox_id = request.headers.get("e2b-sandbox-id", "")
    return JSONResponse({"message": "The sandbox was not found", "sandboxId": sandbox_id, "code": 502}, status_code=502)


__all__ = ["E2BStandIn", "e2b_server"]
