"""A loopback stand-in for Daytona: the REST API and the in-sandbox toolbox, one Starlette app.

Followed (daytonaio/daytona): libs/api-client-go/api/openapi.yaml (the published API spec:
`POST /sandbox` CreateSandbox -> Sandbox with `state` and `toolboxProxyUrl`,
`GET /sandbox/{id}`, `GET /sandbox?labels=<JSON>&limit=1..200&cursor=` -> ListSandboxesResponse
{items, nextCursor}, `DELETE /sandbox/{id}`; bearer auth), and
apps/daemon/pkg/toolbox/docs/swagger.yaml with the daemon's handlers for what the spec leaves
open: `/process/execute` feeds `command` to a shell on stdin and answers
{exitCode, result} with stdout+stderr combined (408 on `timeout`, default 10 s);
`/files/upload` (multipart `file`, parents created), `/files/download` (404 when missing),
`/files/permissions` (octal `mode`); sessions: `POST /process/session` {sessionId} -> 201,
`POST /process/session/{id}/exec` {command, runAsync} -> 202 {cmdId} (async commands keep
stdin open), `GET .../command/{cmdId}` -> {id, command, exitCode}, `.../logs` (JSON
{output, stdout, stderr}, or with `follow=true` a WebSocket of binary frames where each output
line is written as \\x01\\x01\\x01<line>\\n or \\x02\\x02\\x02<line>\\n, closed with 1000 at the end),
`DELETE /process/session/{id}`. Toolbox calls arrive at `<toolboxProxyUrl>/<sandboxId>/...`.
Errors use the API's `{"statusCode", "message", "error"}` shape.

Commands run for real in a bubblewrap sandbox (see sandbox_host.LocalMachine).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from tests.contract_servers.sandbox_host import LocalMachine, LocalProcess, LoopbackServer

STDOUT_PREFIX = b"\x01\x01\x01"
STDERR_PREFIX = b"\x02\x02\x02"
SANDBOX_USER_HOME = "/home/daytona"


@dataclass
class SessionCommand:
    command_id: str
    command: str
    local: LocalProcess
    log: bytearray = field(default_factory=bytearray)
    exit_code: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def append(self, data: bytes) -> None:
        self.log.extend(data)
        self.changed.set()


@dataclass
class StandInSandbox:
    sandbox_id: str
    body: dict[str, Any]
    machine: LocalMachine
    state: str = "creating"
    sessions: dict[str, dict[str, SessionCommand]] = field(default_factory=dict)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


class DaytonaStandIn:
    def __init__(self, api_key: str, *, snapshots: frozenset[str] = frozenset({"daytona-small"})) -> None:
        self.api_key = api_key
        self.snapshots = snapshots
        self.sandboxes: dict[str, StandInSandbox] = {}
        self.requests: list[Recorded] = []
        # Test hook: the next N /process/execute calls answer this HTTP status.
        self.fail_executes: list[int] = []
        self.app = Starlette(
            routes=[
                Route("/api/sandbox", self.create_sandbox, methods=["POST"]),
                Route("/api/sandbox", self.list_sandboxes, methods=["GET"]),
                Route("/api/sandbox/{sandbox_id}", self.get_sandbox, methods=["GET"]),
                Route("/api/sandbox/{sandbox_id}", self.delete_sandbox, methods=["DELETE"]),
                Route("/toolbox/{sandbox_id}/process/execute", self.execute, methods=["POST"]),
                Route("/toolbox/{sandbox_id}/files/upload", self.upload, methods=["POST"]),
                Route("/toolbox/{sandbox_id}/files/download", self.download, methods=["GET"]),
                Route("/toolbox/{sandbox_id}/files/permissions", self.permissions, methods=["POST"]),
                Route("/toolbox/{sandbox_id}/process/session", self.create_session, methods=["POST"]),
                Route("/toolbox/{sandbox_id}/process/session/{sid}", self.delete_session, methods=["DELETE"]),
                Route("/toolbox/{sandbox_id}/process/session/{sid}/exec", self.session_exec, methods=["POST"]),
                Route("/toolbox/{sandbox_id}/process/session/{sid}/command/{cid}", self.get_command, methods=["GET"]),
                Route("/toolbox/{sandbox_id}/process/session/{sid}/command/{cid}/logs", self.logs, methods=["GET"]),
                WebSocketRoute("/toolbox/{sandbox_id}/process/session/{sid}/command/{cid}/logs", self.follow_logs),
            ]
        )

    async def close(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            await sandbox.machine.destroy()
        self.sandboxes.clear()

    # -- helpers ---------------------------------------------------------------------

    def _authorized(self, connection: HTTPConnection) -> bool:
        self.requests.append(
            Recorded(getattr(connection, "method", "WS"), connection.url.path, dict(connection.headers))
        )
        return connection.headers.get("authorization") == f"Bearer {self.api_key}"

    def _toolbox(self, request: Request) -> StandInSandbox | Response:
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        sandbox = self.sandboxes.get(request.path_params["sandbox_id"])
        if sandbox is None or sandbox.state != "started":
            return _error(404, f"Sandbox with ID {request.path_params['sandbox_id']} not found")
        return sandbox

    def _file_call(self, request: Request) -> tuple[StandInSandbox, str] | Response:
        """The sandbox and the `path` parameter of a toolbox files call."""
        sandbox = self._toolbox(request)
        if isinstance(sandbox, Response):
            return sandbox
        path = request.query_params.get("path", "")
        if not path:
            return _error(400, "path is required")
        return sandbox, path

    def _public(self, sandbox: StandInSandbox, base_url: str) -> dict[str, Any]:
        body = sandbox.body
        return {
            "id": sandbox.sandbox_id,
            "organizationId": "org-standin",
            "name": sandbox.sandbox_id,
            "snapshot": body["snapshot"],
            "user": body.get("user", "daytona"),
            "env": body.get("env", {}),
            "labels": body.get("labels", {}),
            "public": False,
            "networkBlockAll": body.get("networkBlockAll", False),
            "target": body.get("target", "us"),
            "cpu": body.get("cpu", 1),
            "gpu": 0,
            "memory": body.get("memory", 1),
            "disk": 3,
            "state": sandbox.state,
            "toolboxProxyUrl": f"{base_url.rstrip('/')}/toolbox",
        }

    # -- API -------------------------------------------------------------------------

    async def create_sandbox(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Invalid JSON body")
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON body")
        for key in ("env", "labels"):
            value = body.get(key, {})
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                return _error(400, f"{key} must be an object of strings")
        for key in ("cpu", "memory", "disk", "autoStopInterval"):
            if key in body and (not isinstance(body[key], int) or isinstance(body[key], bool)):
                return _error(400, f"{key} must be an integer number")
        if "networkBlockAll" in body and not isinstance(body["networkBlockAll"], bool):
            return _error(400, "networkBlockAll must be a boolean value")
        snapshot = body.setdefault("snapshot", "daytona-small")
        if snapshot not in self.snapshots:
            return _error(404, f"Snapshot {snapshot} not found")
        sandbox_id = secrets.token_hex(16)
        machine = LocalMachine(network=not body.get("networkBlockAll", False), home_user="daytona")
        sandbox = StandInSandbox(sandbox_id, body, machine)
        self.sandboxes[sandbox_id] = sandbox
        return JSONResponse(self._public(sandbox, str(request.base_url)))

    async def get_sandbox(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        sandbox = self.sandboxes.get(request.path_params["sandbox_id"])
        if sandbox is None:
            return _error(404, f"Sandbox with ID or name {request.path_params['sandbox_id']} not found")
        sandbox.state = "started"  # sandboxes start between the create and the first poll
        return JSONResponse(self._public(sandbox, str(request.base_url)))

    async def list_sandboxes(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        try:
            limit = int(request.query_params.get("limit", "100"))
            labels = json.loads(request.query_params.get("labels", "{}"))
            offset = int(request.query_params.get("cursor", "0"))
        except ValueError:
            return _error(400, "Invalid query parameters")
        if not 1 <= limit <= 200 or not isinstance(labels, dict):
            return _error(400, "limit must be between 1 and 200; labels must be a JSON object")
        matching = [
            s for s in self.sandboxes.values() if all(s.body.get("labels", {}).get(k) == v for k, v in labels.items())
        ]
        page = matching[offset : offset + limit]
        next_cursor = str(offset + limit) if offset + limit < len(matching) else None
        items = [self._public(s, str(request.base_url)) for s in page]
        return JSONResponse({"items": items, "nextCursor": next_cursor})

    async def delete_sandbox(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        sandbox = self.sandboxes.pop(request.path_params["sandbox_id"], None)
        if sandbox is None:
            return _error(404, f"Sandbox with ID or name {request.path_params['sandbox_id']} not found")
        await sandbox.machine.destroy()
        return Response(status_code=200)

    # -- toolbox ---------------------------------------------------------------------

    async def execute(self, request: Request) -> Response:
        sandbox = self._toolbox(request)
        if isinstance(sandbox, Response):
            return sandbox
        body = await request.json()
        command = body.get("command") if isinstance(body, dict) else None
        if not isinstance(command, str) or not command.strip():
            return _error(400, "command cannot be empty or whitespace-only")
        if self.fail_executes:
            return _error(self.fail_executes.pop(0), "injected failure")
        timeout = body.get("timeout") or 10
        local = await sandbox.machine.spawn(
            ["/bin/sh"],
            env={"HOME": SANDBOX_USER_HOME, **sandbox.body.get("env", {}), **body.get("envs", {})},
            cwd=body.get("cwd") or "/",
            new_session=True,  # the daemon starts it with Setpgid and kills the group on timeout
        )
        process = local.process
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        await process.stdin.send(command.encode())
        await process.stdin.aclose()
        output = bytearray()

        async def collect(stream: Any) -> None:
            async for chunk in stream:
                output.extend(chunk)

        try:
            await asyncio.wait_for(
                asyncio.gather(collect(process.stdout), collect(process.stderr), process.wait()), timeout
            )
        except TimeoutError:
            local.kill_group()
            # The daemon answers only after its Wait on the killed command returned.
            await process.wait()
            for _ in range(200):
                if not _group_alive(local.pid):
                    break
                await asyncio.sleep(0.01)
            return _error(408, "command execution timeout")
        return JSONResponse({"exitCode": process.returncode, "result": output.decode(errors="replace")})

    async def upload(self, request: Request) -> Response:
        call = self._file_call(request)
        if isinstance(call, Response):
            return call
        sandbox, path = call
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return _error(400, "http: no such file")
        if not sandbox.machine.writable(path):
            return _error(400, f"open {path}: read-only file system")
        host = sandbox.machine.resolve(path)
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(await upload.read())
        return Response(status_code=200)

    async def download(self, request: Request) -> Response:
        call = self._file_call(request)
        if isinstance(call, Response):
            return call
        sandbox, path = call
        host = sandbox.machine.resolve(path)
        if not host.exists():
            return _error(404, f"stat {path}: no such file or directory")
        if host.is_dir():
            return _error(400, "path must be a file")
        return Response(host.read_bytes(), media_type="application/octet-stream")

    async def permissions(self, request: Request) -> Response:
        sandbox = self._toolbox(request)
        if isinstance(sandbox, Response):
            return sandbox
        path = request.query_params.get("path", "")
        host = sandbox.machine.resolve(path) if path else None
        if host is None or not host.exists():
            return _error(404 if path else 400, "invalid path" if not path else f"stat {path}: no such file")
        mode = request.query_params.get("mode", "")
        if mode:
            try:
                host.chmod(int(mode, 8))
            except ValueError:
                return _error(400, f"invalid mode {mode!r}")
        return Response(status_code=200)

    async def create_session(self, request: Request) -> Response:
        sandbox = self._toolbox(request)
        if isinstance(sandbox, Response):
            return sandbox
        body = await request.json()
        session_id = body.get("sessionId") if isinstance(body, dict) else None
        if not isinstance(session_id, str) or not session_id:
            return _error(400, "sessionId is required")
        if session_id in sandbox.sessions:
            return _error(409, "session already exists")
        sandbox.sessions[session_id] = {}
        return Response(status_code=201)

    async def delete_session(self, request: Request) -> Response:
        sandbox = self._toolbox(request)
        if isinstance(sandbox, Response):
            return sandbox
        commands = sandbox.sessions.pop(request.path_params["sid"], None)
        if commands is None:
            return _error(404, "session not found")
        for command in commands.values():
            if command.local.process.returncode is None:
                command.local.send_signal(9)
        return Response(status_code=204)

    async def session_exec(self, request: Request) -> Response:
        sandbox = self._toolbox(request)
        if isinstance(sandbox, Response):
            return sandbox
        commands = sandbox.sessions.get(request.path_params["sid"])
        if commands is None:
            return _error(404, "session not found")
        body = await request.json()
        command = body.get("command") if isinstance(body, dict) else None
        if not isinstance(command, str) or not command.strip():
            return _error(400, "command cannot be empty")
        run_async = bool(body.get("runAsync") or body.get("async"))
        env = {"HOME": SANDBOX_USER_HOME, **sandbox.body.get("env", {})}
        local = await sandbox.machine.spawn(["/bin/sh", "-c", command], env=env, cwd="/")
        entry = SessionCommand(secrets.token_hex(8), command, local)
        commands[entry.command_id] = entry
        if not run_async and local.process.stdin is not None:
            await local.process.stdin.aclose()
        task = asyncio.get_running_loop().create_task(_run_session_command(entry))
        if run_async:
            return JSONResponse({"cmdId": entry.command_id}, status_code=202)
        await task
        stdout, stderr = _demux(bytes(entry.log))
        return JSONResponse(
            {
                "cmdId": entry.command_id,
                "output": entry.log.decode(errors="replace"),
                "stdout": stdout.decode(errors="replace"),
                "stderr": stderr.decode(errors="replace"),
                "exitCode": entry.exit_code,
            }
        )

    def _command(self, sandbox: StandInSandbox, sid: str, cid: str) -> SessionCommand | Response:
        commands = sandbox.sessions.get(sid)
        if commands is None:
            return _error(404, "session not found")
        entry = commands.get(cid)
        return entry if entry is not None else _error(404, "command not found")

    def _toolbox_command(self, request: Request) -> SessionCommand | Response:
        sandbox = self._toolbox(request)
        if isinstance(sandbox, Response):
            return sandbox
        return self._command(sandbox, request.path_params["sid"], request.path_params["cid"])

    async def get_command(self, request: Request) -> Response:
        entry = self._toolbox_command(request)
        if isinstance(entry, Response):
            return entry
        return JSONResponse({"id": entry.command_id, "command": entry.command, "exitCode": entry.exit_code})

    async def logs(self, request: Request) -> Response:
        entry = self._toolbox_command(request)
        if isinstance(entry, Response):
            return entry
        stdout, stderr = _demux(bytes(entry.log))
        return JSONResponse(
            {"output": entry.log.decode(errors="replace"), "stdout": stdout.decode(), "stderr": stderr.decode()}
        )

    async def follow_logs(self, websocket: WebSocket) -> None:
        if not self._authorized(websocket):
            await websocket.close(code=1008)
            return
        sandbox = self.sandboxes.get(websocket.path_params["sandbox_id"])
        entry = (
            self._command(sandbox, websocket.path_params["sid"], websocket.path_params["cid"])
            if sandbox is not None
            else None
        )
        if not isinstance(entry, SessionCommand):
            await websocket.close(code=1008)
            return
        await websocket.accept()
        sent = 0
        follow = websocket.query_params.get("follow") == "true"
        while True:
            entry.changed.clear()
            if sent < len(entry.log):
                data = bytes(entry.log[sent:])
                sent += len(data)
                await websocket.send_bytes(data)
                continue
            if entry.exit_code is not None or not follow:
                break
            await entry.changed.wait()
        await websocket.close(code=1000)


async def _run_session_command(entry: SessionCommand) -> None:
    """Like the daemon's wrapper: each stream is read line by line and appended to one log,
    every line (a final partial one too) written as prefix + line + newline."""
    process = entry.local.process

    async def pump(stream: Any, prefix: bytes) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                entry.append(prefix + line + b"\n")
        if pending:
            entry.append(prefix + pending + b"\n")

    await asyncio.gather(pump(process.stdout, STDOUT_PREFIX), pump(process.stderr, STDERR_PREFIX))
    entry.exit_code = await process.wait()
    entry.changed.set()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _demux(log: bytes) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()
    target = out
    index = 0
    while index < len(log):
        if log.startswith(STDOUT_PREFIX, index):
            target, index = out, index + 3
        elif log.startswith(STDERR_PREFIX, index):
            target, index = err, index + 3
        else:
            target.append(log[index])
            index += 1
    return bytes(out), bytes(err)


@asynccontextmanager
async def daytona_server(api_key: str) -> AsyncIterator[tuple[LoopbackServer, DaytonaStandIn]]:
    """The stand-in on loopback (its API under `<url>/api`); its sandboxes end with it."""
    stand_in = DaytonaStandIn(api_key)
    try:
        async with LoopbackServer(stand_in.app, "daytona-stand-in") as server:
            yield server, stand_in
    finally:
        await stand_in.close()


def _error(status: int, message: str) -> JSONResponse:
    names = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout", 409: "Conflict"}
    return JSONResponse(
        {"statusCode": status, "message": message, "error": names.get(status, "Error")}, status_code=status
    )


__all__ = ["DaytonaStandIn", "daytona_server"]
