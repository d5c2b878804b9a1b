"""`ScriptedModelServer`: a loopback HTTP server that answers model API calls from a `Script`.

It runs uvicorn in a background thread on 127.0.0.1 with an ephemeral port, so sync and
async tests (and real CLIs in subprocesses or containers with host networking) can reach
it at `server.url`:

    with ScriptedModelServer(script) as server:
        run_cli(env={"ANTHROPIC_BASE_URL": server.url})
        assert server.requests_containing("first prompt")

Vendors plug in as route modules: a module with `routes(script, recorder) -> list[Route]`
that parses its wire format into a `core.ModelRequest`, calls `script.pick`, records the
request, and renders the `Reply` in its own format. Pass them as
`ScriptedModelServer(script, vendors=[anthropic, openai_responses, ...])`; the default is
every module in `VENDORS`. Paths no vendor claims (telemetry, probes) get 200 and `{}`,
and are recorded as side requests, so they never consume a scripted reply.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import types
from collections.abc import Sequence
from typing import Any, Protocol

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.support.model_server import anthropic
from tests.support.model_server.core import RecordedRequest, Recorder, Script, redact_headers

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class VendorModule(Protocol):
    def routes(self, script: Script, recorder: Recorder) -> list[Route]: ...


VENDORS: list[VendorModule | types.ModuleType] = [anthropic]


def _inspection_routes(recorder: Recorder, script: Script) -> list[Route]:
    """`GET /_scripted/requests` lists what was received (for the standalone process)."""

    async def listing(request: Request) -> Response:
        rows = [
            {"method": r.method, "path": r.path, "kind": r.kind, "headers": r.headers, "body": r.body}
            for r in recorder.requests
        ]
        return JSONResponse({"requests": rows, "pending": script.pending, "misses": script.misses})

    return [Route("/_scripted/requests", listing, methods=["GET"])]


def build_app(script: Script, recorder: Recorder, vendors: Sequence[Any] = VENDORS) -> Starlette:
    routes: list[Route] = _inspection_routes(recorder, script)
    for vendor in vendors:
        routes.extend(vendor.routes(script, recorder))

    async def side(request: Request) -> Response:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        recorder.add(RecordedRequest(request.method, request.url.path, redact_headers(request.headers), body, "side"))
        return JSONResponse({})

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    routes.append(Route("/{path:path}", side, methods=methods))

    app = Starlette(routes=routes)

    class NoteCredentials:
        """Pure ASGI (streamed responses pass untouched): which keys reached the model API."""

        def __init__(self, inner: ASGIApp) -> None:
            self.inner = inner

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                request = Request(scope)
                recorder.saw_credentials(request.headers, request.query_params)
            await self.inner(scope, receive, send)

    app.add_middleware(NoteCredentials)
    return app


class ScriptedModelServer:
    def __init__(self, script: Script | None = None, *, vendors: Sequence[Any] = VENDORS, port: int = 0) -> None:
        self.script = script or Script()
        self.recorder = Recorder()
        self._app = build_app(self.script, self.recorder, vendors)
        self._port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the scripted model server is not running; use it as a context manager")
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    @property
    def model_requests(self) -> list[RecordedRequest]:
        return self.recorder.model_requests

    def requests_containing(self, needle: str) -> list[RecordedRequest]:
        return self.recorder.requests_containing(needle)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the scripted model server is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._socket = sock
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="scripted-model"
        )
        self._thread.start()
        # uvicorn exposes no start callback; poll its flag with a bounded wait.
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            self.stop()
            raise RuntimeError(f"the scripted model server did not start within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = None
        self._socket = None

    def __enter__(self) -> ScriptedModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> ScriptedModelServer:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.stop)
