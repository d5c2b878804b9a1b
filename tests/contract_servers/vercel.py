"""A loopback stand-in for the Vercel Sandbox REST API (v2), limited to what the vercel provider uses.

It follows the Vercel REST API reference, "Sandboxes" group
(https://vercel.com/docs/rest-api/sandboxes/...: create-a-named-sandbox, list-sandboxes,
get-a-named-sandbox, execute-a-command, get-a-command, stream-command-logs,
kill-a-command, write-files, read-a-file, stop-a-session), the error format of
https://vercel.com/docs/rest-api/errors (`{"error": {"code", "message"}}`, 403
`forbidden` "Not authorized" for a missing or wrong token), and the request shapes of
the official `@vercel/sandbox` SDK (gzipped tar + `x-cwd` for fs/write, `teamId` query
parameter, `tags=key:value` list filter, ndjson logs).

A sandbox session "runs" as a `LocalMachine` (tests/contract_servers/sandbox_host.py):
commands are real processes in a bubblewrap namespace with the sandbox's own /workspace
and /tmp; `networkPolicy {"mode": "deny-all"}` gives it a network namespace with only lo.
Commands have no stdin (the API has none): theirs is closed at start. `sudo` is accepted
but every process runs as the test's uid (see sandbox_host.py).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import secrets
import tarfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.contract_servers.host_reaper import force_cleanup, reap
from tests.contract_servers.sandbox_host import LocalMachine, LocalProcess, LoopbackServer

RUNTIMES = ("node22", "node24", "node26", "python3.13")
DEFAULT_CWD = "/home/vercel-sandbox"
DEFAULT_TIMEOUT_MS = 300_000


def _ms() -> int:
    return int(time.time() * 1000)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@dataclass
class Command:
    id: str
    session_id: str
    name: str
    args: list[str]
    cwd: str
    local: LocalProcess
    started_at: int = field(default_factory=_ms)
    exit_code: int | None = None
    log: list[tuple[str, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "args": self.args,
            "cwd": self.cwd,
            "sessionId": self.session_id,
            "exitCode": self.exit_code,
            "startedAt": self.started_at,
        }


@dataclass
class Sandbox:
    name: str
    project: str
    session_id: str
    runtime: str
    vcpus: int
    timeout: int
    env: dict[str, str]
    tags: dict[str, str]
    network_policy: dict[str, Any] | None
    local: LocalMachine
    status: str = "running"
    created_at: int = field(default_factory=_ms)
    commands: dict[str, Command] = field(default_factory=dict)

    def sandbox_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "persistent": False,
            "region": "iad1",
            "vcpus": self.vcpus,
            "memory": 2048 * self.vcpus,
            "runtime": self.runtime,
            "timeout": self.timeout,
            "createdAt": self.created_at,
            "updatedAt": _ms(),
            "currentSessionId": self.session_id,
            "status": self.status,
            "cwd": DEFAULT_CWD,
            "tags": self.tags,
        }

    def session_json(self) -> dict[str, Any]:
        return {
            "id": self.session_id,
            "memory": 2048 * self.vcpus,
            "vcpus": self.vcpus,
            "region": "iad1",
            "runtime": self.runtime,
            "timeout": self.timeout,
            "status": self.status,
            "requestedAt": self.created_at,
            "startedAt": self.created_at,
            "createdAt": self.created_at,
            "cwd": DEFAULT_CWD,
            "updatedAt": _ms(),
        }

    def full_json(self) -> dict[str, Any]:
        return {"sandbox": self.sandbox_json(), "session": self.session_json(), "routes": []}


@dataclass
class VercelState:
    token: str
    team: str
    project: str
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str], dict[str, str]]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def session(self, session_id: str) -> Sandbox | None:
        for sandbox in self.sandboxes.values():
            if sandbox.session_id == session_id:
                return sandbox
        return None


async def _pump(command: Command, stream_name: str, source: Any) -> None:
    async for chunk in source:
        command.log.append((stream_name, chunk))
        command.changed.set()


async def _supervise(command: Command) -> None:
    process = command.local.process
    async with anyio.create_task_group() as tg:
        tg.start_soon(_pump, command, "stdout", process.stdout)
        tg.start_soon(_pump, command, "stderr", process.stderr)
        await process.wait()
    command.exit_code = process.returncode
    command.done.set()
    command.changed.set()


def build_app(state: VercelState) -> Starlette:
    def denied(request: Request) -> Response | None:
        state.requests.append((request.method, request.url.path, dict(request.headers), dict(request.query_params)))
        if request.headers.get("authorization") != f"Bearer {state.token}":
            return JSONResponse(
                {"error": {"code": "forbidden", "message": "Not authorized", "invalidToken": True}}, status_code=403
            )
        if request.query_params.get("teamId") != state.team:
            return _error(403, "forbidden", "Not authorized")
        return None

    async def body_json(request: Request) -> dict[str, Any] | Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_request", "Invalid JSON body")
        if not isinstance(body, dict):
            return _error(400, "bad_request", "The body must be an object")
        return body

    async def sandboxes(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        if request.method == "GET":
            if request.query_params.get("project") != state.project:
                return _error(404, "not_found", "Project not found")
            wanted = [tag.split(":", 1) for tag in request.query_params.getlist("tags")]
            limit = int(request.query_params.get("limit", "50"))
            found = [
                s
                for s in state.sandboxes.values()
                if all(len(pair) == 2 and s.tags.get(pair[0]) == pair[1] for pair in wanted)
            ]
            found.sort(key=lambda s: s.created_at, reverse=True)
            start = int(request.query_params.get("cursor") or 0)
            page = found[start : start + limit]
            next_cursor = str(start + limit) if start + limit < len(found) else None
            return JSONResponse(
                {"sandboxes": [s.sandbox_json() for s in page], "pagination": {"count": len(page), "next": next_cursor}}
            )
        body = await body_json(request)
        if isinstance(body, Response):
            return body
        if body.get("projectId") != state.project:
            return _error(404, "not_found", "Project not found")
        runtime = body.get("runtime", "node24")
        if runtime not in RUNTIMES:
            return _error(400, "bad_request", f"Invalid runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
        vcpus = (body.get("resources") or {}).get("vcpus", 2)
        if not isinstance(vcpus, int) or not (vcpus == 1 or (vcpus % 2 == 0 and 2 <= vcpus <= 8)):
            return _error(400, "bad_request", "resources.vcpus must be 1 or an even number up to 8")
        timeout = body.get("timeout", DEFAULT_TIMEOUT_MS)
        if not isinstance(timeout, int) or timeout <= 0:
            return _error(400, "bad_request", "timeout must be a positive number of milliseconds")
        for key in ("env", "tags"):
            value = body.get(key) or {}
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                return _error(400, "bad_request", f"{key} must be an object of strings")
        name = body.get("name") or f"sandbox-{secrets.token_hex(6)}"
        if name in state.sandboxes:
            return _error(409, "conflict", f"A sandbox named {name} already exists")
        policy = body.get("networkPolicy")
        sandbox = Sandbox(
            name=name,
            project=state.project,
            session_id=f"sbx_{secrets.token_hex(12)}",
            runtime=runtime,
            vcpus=vcpus,
            timeout=timeout,
            env=dict(body.get("env") or {}),
            tags=dict(body.get("tags") or {}),
            network_policy=policy,
            local=LocalMachine(
                network=not (isinstance(policy, dict) and policy.get("mode") == "deny-all"),
                home_user="vercel-sandbox",
            ),
        )
        state.sandboxes[name] = sandbox
        return JSONResponse(sandbox.full_json())

    async def named(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        sandbox = state.sandboxes.get(request.path_params["name"])
        if sandbox is None or request.query_params.get("projectId") != sandbox.project:
            return _error(404, "not_found", f"Sandbox not found: {request.path_params['name']}")
        if request.method == "GET":
            return JSONResponse(sandbox.full_json())
        sandbox.status = "stopped"
        reap(sandbox.local)  # detached processes too
        await sandbox.local.destroy()
        del state.sandboxes[sandbox.name]
        return JSONResponse({"sandbox": sandbox.sandbox_json()})

    def session_of(request: Request) -> Sandbox | Response:
        """The sandbox of the session the path names, for an authorized caller; else the error."""
        if (no := denied(request)) is not None:
            return no
        sandbox = state.session(request.path_params["session"])
        if sandbox is None:
            return _error(404, "not_found", f"Session not found: {request.path_params['session']}")
        return sandbox

    def running(request: Request) -> Sandbox | Response:
        sandbox = session_of(request)
        if isinstance(sandbox, Sandbox) and sandbox.status != "running":
            return _error(410, "sandbox_stopped", "Sandbox is stopped")
        return sandbox

    async def session(request: Request) -> Response:
        sandbox = session_of(request)
        if isinstance(sandbox, Response):
            return sandbox
        return JSONResponse({"session": sandbox.session_json(), "routes": []})

    async def run_command(request: Request) -> Response:
        sandbox = running(request)
        if isinstance(sandbox, Response):
            return sandbox
        body = await body_json(request)
        if isinstance(body, Response):
            return body
        command = body.get("command")
        args = body.get("args", [])
        env = body.get("env") or {}
        cwd = body.get("cwd") or DEFAULT_CWD
        if not isinstance(command, str) or not command:
            return _error(400, "bad_request", "command is required")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            return _error(400, "bad_request", "args must be an array of strings")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            return _error(400, "bad_request", "env must be an object of strings")
        if not isinstance(body.get("sudo", False), bool) or not isinstance(cwd, str):
            return _error(400, "bad_request", "sudo must be a boolean and cwd a string")
        try:
            local = await sandbox.local.spawn([command, *args], env={**sandbox.env, **env}, cwd=cwd)
        except (FileNotFoundError, ValueError) as exc:
            return _error(400, "bad_request", str(exc))
        assert local.process.stdin is not None
        await local.process.stdin.aclose()  # commands have no stdin in this API
        record = Command(f"cmd_{secrets.token_hex(10)}", sandbox.session_id, command, args, cwd, local)
        sandbox.commands[record.id] = record
        task = asyncio.get_running_loop().create_task(_supervise(record))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
        return JSONResponse({"command": record.json()})

    def find_command(request: Request) -> Command | Response:
        if (no := denied(request)) is not None:
            return no
        sandbox = state.session(request.path_params["session"])
        command = sandbox.commands.get(request.path_params["cmd"]) if sandbox else None
        if command is None:
            return _error(404, "not_found", f"Command not found: {request.path_params['cmd']}")
        return command

    async def get_command(request: Request) -> Response:
        command = find_command(request)
        if isinstance(command, Response):
            return command
        if request.query_params.get("wait") == "true":
            await command.done.wait()
        return JSONResponse({"command": command.json()})

    async def logs(request: Request) -> Response:
        command = find_command(request)
        if isinstance(command, Response):
            return command

        async def lines() -> AsyncIterator[bytes]:
            sent = 0
            while True:
                command.changed.clear()
                while sent < len(command.log):
                    stream, data = command.log[sent]
                    sent += 1
                    # Logs are JSON strings: bytes that are not UTF-8 do not survive.
                    entry = {"stream": stream, "data": data.decode("utf-8", errors="replace")}
                    yield (json.dumps(entry) + "\n").encode()
                if command.done.is_set() and sent == len(command.log):
                    return
                await command.changed.wait()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def kill(request: Request) -> Response:
        command = find_command(request)
        if isinstance(command, Response):
            return command
        body = await body_json(request)
        if isinstance(body, Response):
            return body
        signum = body.get("signal", 15)
        if not isinstance(signum, int) or not 1 <= signum <= 64:
            return _error(400, "bad_request", "signal must be a signal number")
        if command.done.is_set():
            return _error(410, "command_finished", "The command has already finished")
        command.local.send_signal(signum)
        return JSONResponse({"command": command.json()})

    async def fs_write(request: Request) -> Response:
        sandbox = running(request)
        if isinstance(sandbox, Response):
            return sandbox
        if request.headers.get("content-type") != "application/gzip":
            return _error(400, "bad_request", "fs/write takes a gzipped tar (content-type application/gzip)")
        extract_dir = request.headers.get("x-cwd", "/")
        try:
            archive = tarfile.open(fileobj=io.BytesIO(gzip.decompress(await request.body())), mode="r:")  # noqa: SIM115
        except (OSError, tarfile.TarError) as exc:
            return _error(400, "bad_request", f"invalid archive: {exc}")
        with archive:
            for member in archive.getmembers():
                target = "/" + "/".join(p for p in f"{extract_dir}/{member.name}".split("/") if p)
                try:
                    host = sandbox.local.resolve(target)
                except ValueError as exc:
                    return _error(400, "bad_request", str(exc))
                if not sandbox.local.writable(target):
                    return _error(403, "forbidden", f"{target} is read-only")
                if member.isdir():
                    host.mkdir(parents=True, exist_ok=True)
                    continue
                source = archive.extractfile(member)
                if source is None:
                    continue
                host.parent.mkdir(parents=True, exist_ok=True)
                host.write_bytes(source.read())
                host.chmod(member.mode & 0o7777)
        return JSONResponse({})

    async def fs_read(request: Request) -> Response:
        sandbox = running(request)
        if isinstance(sandbox, Response):
            return sandbox
        body = await body_json(request)
        if isinstance(body, Response):
            return body
        path = body.get("path")
        if not isinstance(path, str) or not path:
            return _error(400, "bad_request", "path is required")
        if not path.startswith("/"):
            path = f"{body.get('cwd') or DEFAULT_CWD}/{path}"
        try:
            host = sandbox.local.resolve(path)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        if not host.is_file():
            return _error(404, "file_not_found", f"File not found: {path}")
        return Response(host.read_bytes(), media_type="application/octet-stream")

    async def stop(request: Request) -> Response:
        sandbox = session_of(request)
        if isinstance(sandbox, Response):
            return sandbox
        sandbox.status = "stopped"
        reap(sandbox.local)  # detached processes too
        await sandbox.local.destroy()
        return JSONResponse({"session": sandbox.session_json()})

    sessions = "/v2/sandboxes/sessions/{session}"
    return Starlette(
        routes=[
            Route("/v2/sandboxes", sandboxes, methods=["GET", "POST"]),
            Route(sessions, session, methods=["GET"]),
            Route(f"{sessions}/cmd", run_command, methods=["POST"]),
            Route(f"{sessions}/cmd/{{cmd}}", get_command, methods=["GET"]),
            Route(f"{sessions}/cmd/{{cmd}}/logs", logs, methods=["GET"]),
            Route(f"{sessions}/cmd/{{cmd}}/kill", kill, methods=["POST"]),
            Route(f"{sessions}/fs/write", fs_write, methods=["POST"]),
            Route(f"{sessions}/fs/read", fs_read, methods=["POST"]),
            Route(f"{sessions}/stop", stop, methods=["POST"]),
            Route("/v2/sandboxes/{name}", named, methods=["GET", "DELETE"]),
        ]
    )


@asynccontextmanager
async def vercel_server(
    *, token: str, team: str = "team_mcpsandboxes", project: str = "prj_mcpsandboxes"
) -> AsyncIterator[tuple[LoopbackServer, VercelState]]:
    state = VercelState(token=token, team=team, project=project)
    try:
        async with LoopbackServer(build_app(state), "vercel-contract") as server:
            yield server, state
    finally:
        # Their processes belong to the server's (now stopped) event loop: end them directly.
        for sandbox in state.sandboxes.values():
            force_cleanup(sandbox.local)
