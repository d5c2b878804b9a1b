"""The web view: the tree of sessions, each session's live events (server-sent events fed by the
event bus, resumable by cursor), its rendered transcript, and Stop / Interrupt buttons.

Served beside /mcp on the operator's HTTP endpoint, or alone on a loopback port for a stdio
server (`serve --web-port N`); never on the agents' listener.

Who may look: the operator only. A browser cannot attach a bearer header, so the operator token
is given once (`/?token=...` or the sign-in form) and exchanged for an HttpOnly SameSite=Strict
cookie holding a value derived from the token (never the token itself). Only the operator token
is compared, so no agent token is ever admitted. A request that changes something (POST) needs,
besides the cookie, an X-CSRF-Token header whose value only a page of this origin can read
(GET /api/me); a request carrying the operator's bearer header needs neither.

The pages are static files shipped in the package (server/static/), no build step."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator
from importlib import resources
from urllib.parse import parse_qs

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_sandboxes.errors import ConflictError, McpSandboxesError, NotFoundError
from mcp_sandboxes.orchestrator import Orchestrator, render_transcript

COOKIE_NAME = "mcp_sandboxes_web"
CSRF_HEADER = "x-csrf-token"
# An idle event stream sends a comment this often, so proxies and browsers keep it open.
KEEPALIVE_S = 15.0
# Events sent per read of the log while an event stream catches up.
EVENTS_PER_READ = 500
MAX_TRANSCRIPT_EVENTS = 10_000
# How long an open event stream may hold up the server's shutdown.
SHUTDOWN_GRACE_S = 3
FINAL_STATUSES = ("stopped", "failed")
TERMINATED = "session.status_terminated"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> str:
    return resources.files("mcp_sandboxes.server").joinpath("static", name).read_text("utf-8")


def _derive(secret: str, purpose: str) -> str:
    return hmac.new(secret.encode(), f"mcp-sandboxes web {purpose} v1".encode(), hashlib.sha256).hexdigest()


class WebAuth:
    """The operator's credentials for the browser. `operator_token` None: the endpoint needs no
    token (server.operator_auth = 'none', loopback only), and then only loopback Host headers are
    served, so a page of another site cannot reach it through DNS rebinding."""

    def __init__(self, operator_token: str | None) -> None:
        self._token = operator_token
        secret = operator_token if operator_token is not None else secrets.token_urlsafe(32)
        self.cookie_value = _derive(secret, "cookie")
        self.csrf_value = _derive(secret, "csrf")

    @property
    def needs_token(self) -> bool:
        return self._token is not None

    def token_ok(self, supplied: str) -> bool:
        return self._token is not None and hmac.compare_digest(supplied.encode(), self._token.encode())

    def bearer_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and self.token_ok(header[len("Bearer ") :])

    def admitted(self, request: Request) -> bool:
        if self._token is None:
            host = request.headers.get("host", "").rsplit(":", 1)[0] if request.headers.get("host") else ""
            return host in LOOPBACK_HOSTS
        if self.bearer_ok(request):
            return True
        cookie = request.cookies.get(COOKIE_NAME, "")
        return hmac.compare_digest(cookie.encode(), self.cookie_value.encode())

    def csrf_ok(self, request: Request) -> bool:
        if self.bearer_ok(request):
            return True  # no ambient credential: a header another site cannot send
        supplied = request.headers.get(CSRF_HEADER, "")
        return hmac.compare_digest(supplied.encode(), self.csrf_value.encode())


def _secured(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


def _login_page(message: str = "", status_code: int = 401) -> Response:
    html = _static("login.html").replace("{{message}}", _escape(message))
    return _secured(HTMLResponse(html, status_code=status_code))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _signed_in(auth: WebAuth) -> Response:
    """Back to the tree, with the cookie; the token leaves the address bar and the history."""
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE_NAME, auth.cookie_value, httponly=True, samesite="strict", path="/")
    return _secured(response)


def _error(status: int, message: str) -> Response:
    return _secured(JSONResponse({"error": message}, status_code=status))


def _sse(event: str, data: str, event_id: int | None = None) -> str:
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return "\n".join(lines) + "\n\n"


def _cursor(request: Request) -> int | None:
    """Where a stream resumes: Last-Event-ID (the browser's reconnect) wins over ?after=."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 0 <= value < 2**63 else None


def web_app(orchestrator: Orchestrator, operator_token: str | None) -> ASGIApp:
    """The web view as an ASGI app (no lifespan of its own)."""
    auth = WebAuth(operator_token)
    db = orchestrator.db

    def guarded(request: Request) -> Response | None:
        return None if auth.admitted(request) else _error(401, "sign in first: open /?token=<operator token>")

    async def index(request: Request) -> Response:
        supplied = request.query_params.get("token")
        if supplied is not None:
            if auth.token_ok(supplied):
                return _signed_in(auth)
            return _login_page("That is not the operator token (`mcp-sandboxes token` prints it).")
        if not auth.admitted(request):
            return _login_page()
        return _secured(HTMLResponse(_static("index.html")))

    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        if auth.token_ok(form.get("token", [""])[0].strip()):
            return _signed_in(auth)
        return _login_page("That is not the operator token (`mcp-sandboxes token` prints it).")

    async def session_page(request: Request) -> Response:
        if not auth.admitted(request):
            return _login_page()
        return _secured(HTMLResponse(_static("session.html")))

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return _error(404, f"no static file {name!r}")
        return _secured(Response(_static(name), media_type=STATIC_FILES[name]))

    async def me(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        return _secured(JSONResponse({"csrf": auth.csrf_value}))

    async def sessions(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        views = await orchestrator.list_sessions()
        return _secured(JSONResponse({"sessions": [view.model_dump(mode="json") for view in views]}))

    async def session(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        try:
            view = await orchestrator.get_session(request.path_params["session_id"])
        except NotFoundError as exc:
            return _error(404, str(exc))
        return _secured(JSONResponse(view.model_dump(mode="json")))

    async def transcript(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        session_id = request.path_params["session_id"]
        try:
            record = await db.get_session(session_id)
        except NotFoundError as exc:
            return _error(404, str(exc))
        events = await db.read_events(session_id, limit=MAX_TRANSCRIPT_EVENTS)
        return _secured(PlainTextResponse(render_transcript(record, events), media_type="text/markdown"))

    async def events(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        session_id = request.path_params["session_id"]
        after = _cursor(request)
        if after is None:
            return _error(400, "after: must be a whole number >= 0 (the seq of the last event seen)")
        try:
            await db.get_session(session_id)
        except NotFoundError as exc:
            return _error(404, str(exc))
        return _secured(
            StreamingResponse(_event_stream(orchestrator, session_id, after), media_type="text/event-stream")
        )

    async def changes(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        return _secured(StreamingResponse(_change_stream(orchestrator), media_type="text/event-stream"))

    async def act(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        if not auth.csrf_ok(request):
            return _error(403, f"{CSRF_HEADER}: missing or wrong; reload the page (GET /api/me gives the value)")
        session_id, action = request.path_params["session_id"], request.path_params["action"]
        try:
            if action == "stop":
                view = await orchestrator.stop_session(session_id)
            elif action == "interrupt":
                view = await orchestrator.interrupt(session_id)
            else:
                return _error(404, f"no action {action!r}; use stop or interrupt")
        except NotFoundError as exc:
            return _error(404, str(exc))
        except ConflictError as exc:
            return _error(409, str(exc))
        except McpSandboxesError as exc:
            return _error(400, str(exc))
        return _secured(JSONResponse(view.model_dump(mode="json")))

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/sessions/{session_id}", session_page, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/api/me", me, methods=["GET"]),
        Route("/api/sessions", sessions, methods=["GET"]),
        Route("/api/changes", changes, methods=["GET"]),
        Route("/api/sessions/{session_id}", session, methods=["GET"]),
        Route("/api/sessions/{session_id}/transcript", transcript, methods=["GET"]),
        Route("/api/sessions/{session_id}/events", events, methods=["GET"]),
        Route("/api/sessions/{session_id}/{action}", act, methods=["POST"]),
    ]
    return Starlette(routes=routes)


async def _event_stream(orchestrator: Orchestrator, session_id: str, after: int) -> AsyncIterator[str]:
    """Every event after `after`, then each new one as it is stored; `id:` is its seq, so a
    reconnecting browser resumes where it was. Ends (event `end`) once the session is over and its
    last event (session.status_terminated, written just after the status) is sent. Subscribed
    before the first read, so no notice falls between a read and the wait that follows it."""
    changes = orchestrator.bus.subscribe()
    cursor = after
    last_type: str | None = None
    waited_while_over = False
    async with changes:
        yield "retry: 2000\n\n"
        while True:
            records = await orchestrator.db.read_events(session_id, after=cursor, limit=EVENTS_PER_READ)
            for record in records:
                yield _sse("event", json.dumps(record.model_dump(), ensure_ascii=False), record.seq)
                cursor, last_type = record.seq, record.type
            if records:
                continue
            status = (await orchestrator.db.get_session(session_id)).status
            if status in FINAL_STATUSES:
                if last_type is None and cursor > 0:
                    seen = await orchestrator.db.read_events(session_id, after=cursor - 1, limit=1)
                    last_type = seen[0].type if seen else None
                # An older log may lack the closing event: one quiet wait, then it ends anyway.
                if last_type == TERMINATED or waited_while_over:
                    yield _sse("end", json.dumps({"status": status}))
                    return
                waited_while_over = True
            woken = False
            with anyio.move_on_after(KEEPALIVE_S):
                async for change in changes:
                    if change.session_id == session_id:
                        woken = True
                        break
            if not woken:
                yield ": keepalive\n\n"


async def _change_stream(orchestrator: Orchestrator) -> AsyncIterator[str]:
    """A notice for each change of any session (the tree page refetches the list)."""
    changes = orchestrator.bus.subscribe()
    async with changes:
        yield "retry: 2000\n\n"
        while True:
            with anyio.move_on_after(KEEPALIVE_S) as waited:
                change = await changes.receive()
            if waited.cancelled_caught:
                yield ": keepalive\n\n"
                continue
            data = {
                "session_id": change.session_id,
                "last_seq": change.last_seq,
                "status_changed": change.status_changed,
            }
            yield _sse("change", json.dumps(data))


class WebBesideMcp:
    """Routes /mcp (and below) to the bearer-guarded MCP app, everything else to the web view;
    the lifespan goes to the MCP app, which owns the session manager."""

    def __init__(self, mcp: ASGIApp, web: ASGIApp) -> None:
        self._mcp = mcp
        self._web = web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope.get("path", "")
            if not (path == "/mcp" or path.startswith("/mcp/")):
                await self._web(scope, receive, send)
                return
        await self._mcp(scope, receive, send)


__all__ = ["SHUTDOWN_GRACE_S", "WebAuth", "WebBesideMcp", "web_app"]
