"""A loopback stand-in for the Fly Machines API, limited to the endpoints the fly provider uses.

It follows the public reference:
- https://fly.io/docs/machines/api/working-with-machines-api/ (Bearer auth, status codes,
  1 req/s per action per Machine with bursts of 3, answered with 429),
- https://fly.io/docs/machines/api/machines-resource/ (create, list with
  `metadata.{key}` filters, get, wait, stop, delete with `force`),
- https://fly.io/docs/machines/api/apps-resource/ (get app),
- the OpenAPI `Machines_exec` operation (docs.machines.dev): `MachineExecRequest
  {command, cmd (deprecated), stdin, timeout}` -> `flydv1.ExecResponse {stdout, stderr,
  exit_code, exit_signal}`, strings, returned when the command has ended.
Errors use the API's `{"error": "..."}` body.

A Machine "runs" as a `LocalMachine` (tests/contract_servers/sandbox_host.py): exec'd
commands are real processes in a bubblewrap namespace with the machine's own /workspace
and /tmp. The machine's init process is not run (nothing here needs it).

Knobs for tests: `rate_limit=True` enforces the documented per-action limit;
`never_start=True` leaves created machines in `created`, so `wait` times out (408).
"""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.contract_servers.host_reaper import force_cleanup, reap
from tests.contract_servers.sandbox_host import LocalMachine, LoopbackServer

EXEC_DEFAULT_TIMEOUT_S = 60
# Documented: 1 request per second per action per Machine, short bursts up to 3.
RATE_PER_S = 1.0
RATE_BURST = 3.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@dataclass
class Machine:
    id: str
    name: str
    region: str
    config: dict[str, Any]
    local: LocalMachine
    state: str = "started"
    instance_id: str = field(default_factory=lambda: secrets.token_hex(13).upper())
    created_at: str = field(default_factory=_now)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": "fdaa:0:1::2",
            "config": self.config,
            "image_ref": {"registry": "registry-1.docker.io", "repository": self.config["image"], "tag": "latest"},
            "created_at": self.created_at,
            "updated_at": _now(),
            "events": [],
        }


@dataclass
class FlyState:
    token: str
    app: str
    rate_limit: bool = False
    never_start: bool = False
    machines: dict[str, Machine] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    buckets: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    rate_limited: int = 0

    def take(self, machine_id: str, action: str) -> bool:
        if not self.rate_limit:
            return True
        now = time.monotonic()
        tokens, stamp = self.buckets.get((machine_id, action), (RATE_BURST, now))
        tokens = min(RATE_BURST, tokens + (now - stamp) * RATE_PER_S)
        if tokens < 1.0:
            self.buckets[(machine_id, action)] = (tokens, now)
            self.rate_limited += 1
            return False
        self.buckets[(machine_id, action)] = (tokens - 1.0, now)
        return True


def build_app(state: FlyState) -> Starlette:
    def denied(request: Request) -> Response | None:
        """The answer to a caller without the token, or to a path naming another app."""
        state.requests.append((request.method, request.url.path, dict(request.headers)))
        if request.headers.get("authorization") != f"Bearer {state.token}":
            return _error(401, "You must be authenticated to view this.")
        if request.path_params["app"] != state.app:
            return _error(404, "app not found")
        return None

    def find(request: Request) -> Machine | Response:
        if (no := denied(request)) is not None:
            return no
        machine = state.machines.get(request.path_params["id"])
        if machine is None or machine.state == "destroyed":
            return _error(404, "machine not found")
        return machine

    async def get_app(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        return JSONResponse(
            {"id": state.app, "name": state.app, "status": "deployed", "organization": {"slug": "personal"}}
        )

    async def machines(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        if request.method == "GET":
            include_deleted = request.query_params.get("include_deleted") == "true"
            filters = {
                k.removeprefix("metadata."): v for k, v in request.query_params.items() if k.startswith("metadata.")
            }
            found = [
                m.json()
                for m in state.machines.values()
                if (include_deleted or m.state != "destroyed")
                and all((m.config.get("metadata") or {}).get(k) == v for k, v in filters.items())
            ]
            return JSONResponse(found)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid JSON body")
        config = body.get("config") if isinstance(body, dict) else None
        if not isinstance(config, dict) or not isinstance(config.get("image"), str) or not config["image"]:
            return _error(400, "config.image is required")
        metadata = config.get("metadata", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            return _error(400, "config.metadata must be an object of strings")
        init = config.get("init", {})
        if not isinstance(init, dict) or not all(isinstance(a, str) for a in init.get("exec", [])):
            return _error(400, "config.init.exec must be an array of strings")
        name = body.get("name") or f"machine-{secrets.token_hex(4)}"
        if any(m.name == name and m.state != "destroyed" for m in state.machines.values()):
            return _error(409, f"a machine named {name} already exists")
        machine = Machine(
            id=secrets.token_hex(7),
            name=name,
            region=body.get("region") or "iad",
            config=config,
            local=LocalMachine(network=True),
            state="created" if state.never_start else "started",
        )
        state.machines[machine.id] = machine
        return JSONResponse(machine.json())

    async def machine(request: Request) -> Response:
        found = find(request)
        if isinstance(found, Response):
            return found
        if request.method == "GET":
            return JSONResponse(found.json())
        # DELETE: a running machine is only removed with force=true.
        if found.state == "started" and request.query_params.get("force") != "true":
            return _error(412, "failed_precondition: unable to destroy machine, not currently stopped")
        found.state = "destroyed"
        reap(found.local)  # detached processes too
        await found.local.destroy()
        return JSONResponse({"ok": True})

    async def wait(request: Request) -> Response:
        found = find(request)
        if isinstance(found, Response):
            return found
        wanted = request.query_params.get("state", "started")
        if wanted == "stopped" and not request.query_params.get("instance_id"):
            return _error(400, "instance_id is required when waiting for stopped")
        if found.state == wanted:
            return JSONResponse({"ok": True})
        # Machines here change state only by API calls, so waiting longer cannot help: time out.
        await anyio.sleep(float(request.query_params.get("timeout", "60")))
        return _error(408, f"timed out waiting for machine to reach state {wanted}")

    async def stop(request: Request) -> Response:
        found = find(request)
        if isinstance(found, Response):
            return found
        for process in found.local.processes:
            if process.process.returncode is None:
                process.send_signal(15)
        found.state = "stopped"
        return JSONResponse({"ok": True})

    async def exec_(request: Request) -> Response:
        found = find(request)
        if isinstance(found, Response):
            return found
        if not state.take(found.id, "exec"):
            return _error(429, "rate limit exceeded")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid JSON body")
        if not isinstance(body, dict):
            return _error(400, "request body must be an object")
        command = body.get("command")
        if command is None and isinstance(body.get("cmd"), str):
            command = shlex.split(body["cmd"])  # the deprecated string form
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            return _error(400, "command must be a non-empty array of strings")
        stdin = body.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            return _error(400, "stdin must be a string")
        timeout = body.get("timeout", EXEC_DEFAULT_TIMEOUT_S)
        if not isinstance(timeout, int) or timeout < 0:
            return _error(400, "timeout must be a non-negative integer (seconds)")
        if found.state != "started":
            return _error(412, f"machine is {found.state}, not started")
        env = {str(k): str(v) for k, v in (found.config.get("env") or {}).items()}
        local = await found.local.spawn(command, env=env, cwd="/")
        process = local.process
        stdout = bytearray()
        stderr = bytearray()

        async def pump(source: Any, sink: bytearray) -> None:
            async for chunk in source:
                sink.extend(chunk)

        timed_out = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, process.stdout, stdout)
            tg.start_soon(pump, process.stderr, stderr)
            assert process.stdin is not None
            if stdin:
                await process.stdin.send(stdin.encode("utf-8"))
            await process.stdin.aclose()
            with anyio.move_on_after(timeout or EXEC_DEFAULT_TIMEOUT_S):
                await process.wait()
                timed_out = False
            if timed_out:
                local.send_signal(9)
                await process.wait()
        if timed_out:
            return _error(408, "deadline_exceeded: command did not finish within the timeout")
        code = process.returncode or 0
        killed = local.killed_by(code)
        result: dict[str, Any] = {
            # Fly returns strings: bytes that are not UTF-8 do not survive.
            "stdout": stdout.decode("utf-8", errors="replace"),
            "stderr": stderr.decode("utf-8", errors="replace"),
            "exit_code": code,
        }
        if killed is not None:
            result["exit_signal"] = killed
        return JSONResponse(result)

    base = "/v1/apps/{app}"
    return Starlette(
        routes=[
            Route(base, get_app, methods=["GET"]),
            Route(f"{base}/machines", machines, methods=["GET", "POST"]),
            Route(f"{base}/machines/{{id}}", machine, methods=["GET", "DELETE"]),
            Route(f"{base}/machines/{{id}}/wait", wait, methods=["GET"]),
            Route(f"{base}/machines/{{id}}/stop", stop, methods=["POST"]),
            Route(f"{base}/machines/{{id}}/exec", exec_, methods=["POST"]),
        ]
    )


@asynccontextmanager
async def fly_server(
    *, token: str, app: str = "mcp-sandboxes-test", rate_limit: bool = False, never_start: bool = False
) -> AsyncIterator[tuple[LoopbackServer, FlyState]]:
    state = FlyState(token=token, app=app, rate_limit=rate_limit, never_start=never_start)
    try:
        async with LoopbackServer(build_app(state), "fly-contract") as server:
            yield server, state
    finally:
        # The machines' processes belong to the server's (now stopped) event loop: end them directly.
        for machine in state.machines.values():
            force_cleanup(machine.local)
