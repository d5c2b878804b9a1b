"""A loopback stand-in for the Sprites API (sprites.dev), limited to what the sprites provider uses.

It follows the Sprites API reference (https://docs.sprites.dev/api/: Sprites, Exec,
Filesystem) and the wire calls of the official Go SDK (github.com/superfly/sprites-go):
- Bearer auth; errors `{"error": "<code>", "message": "..."}`; 401 without a valid token.
- POST /v1/sprites (201), GET /v1/sprites?prefix&max_results(<=50)&continuation_token,
  GET and DELETE /v1/sprites/{name}.
- WSS /v1/sprites/{name}/exec?cmd=..&path=..&dir=..&env=..&stdin=..&tty=false: the
  response header `X-Sprite-Capabilities: signal`; a `session_info` text frame
  (`session_id` = the process id); binary frames with a stream byte (0 stdin,
  1 stdout, 2 stderr, 3 exit + code byte, 4 stdin EOF); client text frames
  `{"type": "signal", "signal": "TERM"}`; a command outlives a disconnect by
  `max_run_after_disconnect` (non-TTY default 10s), then it is killed.
- POST /v1/sprites/{name}/exec/{session_id}/kill?signal=TERM (410 once it ended).
- GET /v1/sprites/{name}/fs/read?path&workingDir, PUT .../fs/write?path&workingDir&mode&mkdirParents.

A Sprite "runs" as a `LocalMachine` (tests/contract_servers/sandbox_host.py): real
processes in a bubblewrap namespace with the sprite's own /workspace, /tmp and
/home/sprite. Differences kept on purpose: processes run as the test's uid, not as
`sprite`; an `env` query parameter is added to (not substituted for) PATH/HOME/LANG.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
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
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.contract_servers.host_reaper import force_cleanup, reap
from tests.contract_servers.sandbox_host import LocalMachine, LocalProcess, LoopbackServer

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_DIR = "/home/sprite"
STDIN, STDOUT, STDERR, EXIT, STDIN_EOF = 0, 1, 2, 3, 4


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text)
    if not match:
        raise ValueError(f"invalid duration {text!r}")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


@dataclass
class Sprite:
    name: str
    labels: list[str]
    config: dict[str, Any]
    local: LocalMachine
    id: str = field(default_factory=lambda: f"sprite-{secrets.token_hex(8)}")
    created_at: str = field(default_factory=_now)
    sessions: dict[str, LocalProcess] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": "running" if any(p.process.returncode is None for p in self.sessions.values()) else "warm",
            "organization": "personal",
            "url": f"https://{self.name}.sprites.app",
            "url_settings": {"auth": "sprite"},
            "config": self.config,
            "labels": self.labels,
            "created_at": self.created_at,
            "updated_at": _now(),
        }


@dataclass
class SpritesState:
    token: str
    sprites: dict[str, Sprite] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    signals_over_ws: list[str] = field(default_factory=list)


def build_app(state: SpritesState) -> Starlette:
    def denied(headers: Any, method: str, path: str) -> Response | None:
        state.requests.append((method, path, dict(headers)))
        if headers.get("authorization") != f"Bearer {state.token}":
            return _error(401, "unauthorized", "missing or invalid API token")
        return None

    def find(request: Request) -> Sprite | Response:
        """The sprite the path names, for an authorized caller; else the error response."""
        if (no := denied(request.headers, request.method, request.url.path)) is not None:
            return no
        sprite = state.sprites.get(request.path_params["name"])
        if sprite is None:
            return _error(404, "not_found", f"sprite {request.path_params['name']} not found")
        return sprite

    def fs_target(request: Request) -> tuple[Sprite, str] | Response:
        """The sprite and the absolute path (`path` under `workingDir`) of a filesystem call."""
        found = find(request)
        if isinstance(found, Response):
            return found
        path = request.query_params.get("path")
        working_dir = request.query_params.get("workingDir")
        if not path or not working_dir:
            return JSONResponse({"error": "path and workingDir are required", "code": "invalid_request"}, 400)
        return found, path if path.startswith("/") else f"{working_dir.rstrip('/')}/{path}"

    async def sprites(request: Request) -> Response:
        if (no := denied(request.headers, request.method, request.url.path)) is not None:
            return no
        if request.method == "GET":
            prefix = request.query_params.get("prefix", "")
            limit = int(request.query_params.get("max_results", "50"))
            if not 1 <= limit <= 50:
                return _error(400, "invalid_request", "max_results must be between 1 and 50")
            names = sorted(n for n in state.sprites if n.startswith(prefix))
            start = int(request.query_params.get("continuation_token") or 0)
            page = names[start : start + limit]
            more = start + limit < len(names)
            body: dict[str, Any] = {"sprites": [state.sprites[n].json() for n in page], "has_more": more}
            if more:
                body["next_continuation_token"] = str(start + limit)
            return JSONResponse(body)
        try:
            payload = await request.json()
        except ValueError:
            return _error(400, "invalid_request", "invalid JSON body")
        name = payload.get("name") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not NAME_RE.match(name):
            return _error(400, "invalid_request", "name is required: lowercase letters, digits and dashes")
        labels = payload.get("labels") or []
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            return _error(400, "invalid_request", "labels must be an array of strings")
        config = payload.get("config") or {}
        if not isinstance(config, dict):
            return _error(400, "invalid_request", "config must be an object")
        if name in state.sprites:
            return _error(409, "sprite_exists", f"a sprite named {name} already exists")
        sprite = Sprite(name=name, labels=labels, config=config, local=LocalMachine(network=True, home_user="sprite"))
        state.sprites[name] = sprite
        return JSONResponse(sprite.json(), status_code=201)

    async def sprite(request: Request) -> Response:
        found = find(request)
        if isinstance(found, Response):
            return found
        if request.method == "GET":
            return JSONResponse(found.json())
        del state.sprites[found.name]
        reap(found.local)  # detached processes too
        await found.local.destroy()
        return Response(status_code=204)

    async def kill(request: Request) -> Response:
        found = find(request)
        if isinstance(found, Response):
            return found
        session = found.sessions.get(request.path_params["session"])
        if session is None:
            return _error(404, "not_found", "session not found")
        if session.process.returncode is not None:
            return _error(410, "session_exited", "the session has already exited")
        name = request.query_params.get("signal", "TERM")
        try:
            signum = signal.Signals[f"SIG{name}"]
        except KeyError:
            return _error(400, "invalid_request", f"unknown signal {name!r}")
        session.send_signal(signum)
        return JSONResponse({"ok": True})

    async def fs_read(request: Request) -> Response:
        target = fs_target(request)
        if isinstance(target, Response):
            return target
        found, full = target
        try:
            host = found.local.resolve(full)
        except ValueError as exc:
            return JSONResponse({"error": str(exc), "code": "invalid_request", "path": full}, 400)
        if not host.is_file():
            return JSONResponse({"error": "no such file", "code": "not_found", "path": full}, 404)
        return Response(host.read_bytes(), media_type="application/octet-stream")

    async def fs_write(request: Request) -> Response:
        target = fs_target(request)
        if isinstance(target, Response):
            return target
        found, full = target
        try:
            mode = int(request.query_params.get("mode", "0644"), 8)
            host = found.local.resolve(full)
        except ValueError as exc:
            return JSONResponse({"error": str(exc), "code": "invalid_request", "path": full}, 400)
        if not found.local.writable(full):
            return JSONResponse({"error": "read-only location", "code": "permission_denied", "path": full}, 403)
        if not host.parent.is_dir():
            if request.query_params.get("mkdirParents") != "true":
                return JSONResponse({"error": "parent does not exist", "code": "not_found", "path": full}, 404)
            host.parent.mkdir(parents=True, exist_ok=True)
        data = await request.body()
        host.write_bytes(data)
        host.chmod(mode)
        return JSONResponse({"path": full, "size": len(data)})

    async def exec_ws(websocket: WebSocket) -> None:
        path = websocket.url.path
        if (no := denied(websocket.headers, "WS", path)) is not None:
            await websocket.send_denial_response(no)
            return
        sprite = state.sprites.get(websocket.path_params["name"])
        if sprite is None:
            await websocket.send_denial_response(_error(404, "not_found", "sprite not found"))
            return
        params = websocket.query_params
        cmd = params.getlist("cmd")
        if not cmd or params.get("tty", "false") != "false":
            await websocket.send_denial_response(_error(400, "invalid_request", "cmd is required (non-TTY only here)"))
            return
        try:
            linger = _duration(params.get("max_run_after_disconnect", "10s"))
        except ValueError as exc:
            await websocket.send_denial_response(_error(400, "invalid_request", str(exc)))
            return
        env = dict(item.split("=", 1) for item in params.getlist("env") if "=" in item)
        argv = [params.get("path") or cmd[0], *cmd[1:]]
        try:
            local = await sprite.local.spawn(argv, env=env, cwd=params.get("dir") or DEFAULT_DIR)
        except (FileNotFoundError, ValueError) as exc:
            await websocket.send_denial_response(_error(400, "invalid_request", str(exc)))
            return
        process = local.process
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        if params.get("stdin", "false") != "true":
            await process.stdin.aclose()
        session_id = str(local.pid)
        sprite.sessions[session_id] = local
        await websocket.accept(headers=[(b"x-sprite-capabilities", b"signal")])
        connected = True
        await websocket.send_text(
            json.dumps(
                {
                    "type": "session_info",
                    "session_id": local.pid,
                    "command": " ".join(cmd),
                    "created": int(time.time()),
                    "is_owner": True,
                    "tty": False,
                }
            )
        )

        async def pump(source: Any, stream_id: int) -> None:
            nonlocal connected
            async for chunk in source:
                if connected:
                    try:
                        await websocket.send_bytes(bytes([stream_id]) + chunk)
                    except (WebSocketDisconnect, RuntimeError):
                        connected = False

        async def receive(cancel: anyio.CancelScope) -> None:
            nonlocal connected
            try:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    if message.get("bytes"):
                        frame = message["bytes"]
                        if frame[0] == STDIN and process.stdin is not None:
                            try:
                                await process.stdin.send(frame[1:])
                            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                                pass
                        elif frame[0] == STDIN_EOF and process.stdin is not None:
                            await process.stdin.aclose()
                    elif message.get("text"):
                        control = json.loads(message["text"])
                        if control.get("type") == "signal":
                            state.signals_over_ws.append(str(control.get("signal")))
                            local.send_signal(signal.Signals[f"SIG{control['signal']}"])
            except WebSocketDisconnect:
                pass
            connected = False
            # The client went away: the command may run on for max_run_after_disconnect.
            with anyio.move_on_after(linger):
                await process.wait()
            if process.returncode is None:
                local.send_signal(signal.SIGKILL)
            cancel.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive, tg.cancel_scope)
            async with anyio.create_task_group() as output:
                output.start_soon(pump, process.stdout, STDOUT)
                output.start_soon(pump, process.stderr, STDERR)
            code = await process.wait()
            if connected:
                try:
                    await websocket.send_bytes(bytes([EXIT, code & 0xFF]))
                    await websocket.close()
                except (WebSocketDisconnect, RuntimeError):
                    pass
            tg.cancel_scope.cancel()

    base = "/v1/sprites/{name}"
    return Starlette(
        routes=[
            Route("/v1/sprites", sprites, methods=["GET", "POST"]),
            Route(base, sprite, methods=["GET", "DELETE"]),
            Route(f"{base}/exec/{{session}}/kill", kill, methods=["POST"]),
            Route(f"{base}/fs/read", fs_read, methods=["GET"]),
            Route(f"{base}/fs/write", fs_write, methods=["PUT"]),
            WebSocketRoute(f"{base}/exec", exec_ws),
        ]
    )


@asynccontextmanager
async def sprites_server(*, token: str) -> AsyncIterator[tuple[LoopbackServer, SpritesState]]:
    state = SpritesState(token=token)
    try:
        async with LoopbackServer(build_app(state), "sprites-contract") as server:
            yield server, state
    finally:
        # Their processes belong to the server's (now stopped) event loop: end them directly.
        for sprite in state.sprites.values():
            force_cleanup(sprite.local)
