"""The host-side egress proxy of network mode "model": one unix socket per sandbox, so the proxy
knows which session talks without any authentication of its own.

What a sandbox may reach through its socket (HTTP/1.1, keep-alive):
- `/m/<route>/<rest>`: the route's upstream (a model API), with each placeholder credential in
  the request's header values and query string replaced by the real one;
- `/agent/<rest>`: this server's agent endpoint (sub-agents), passed through unchanged;
- `CONNECT host:port` and absolute-form `GET http://host/...`: only hosts on the environment's
  allow-list (domain names; IP literals are always refused).
Everything else is answered 403/404 and reported through `on_refused`.

Built on h11 (the sandbox side) and httpx (the upstream side): both are already dependencies
(httpx depends on h11), both stream request and response bodies incrementally (model SSE streams
flow event by event), and both run on anyio, so the proxy lives in the server's own event loop
and task group without a second server framework.

Real credential values are never logged and never returned to the sandbox.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import logging
import os
import re
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self, cast
from urllib.parse import quote, urlsplit

import anyio
import anyio.abc
import h11
import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

__all__ = ["EgressPolicy", "EgressProxy", "ModelRoute", "RefusedRequest"]

_ROUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# A DNS name as an allow-list or CONNECT may carry it (labels of letters, digits, '-' and '_').
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
# Headers that describe one hop, never forwarded (RFC 9110 7.6.1, plus proxy-* and expect,
# which httpx does not speak: the proxy answers 100-continue itself).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    }
)
_READ_SIZE = 65536
# Bounds: how many connections one socket serves at once, how long an on_refused callback may take,
# how long a refused-for-load connection gets to send its request head before it is closed.
DEFAULT_MAX_CONNECTIONS = 64
REPORT_TIMEOUT_S = 10.0
_UNIX_PATH_MAX = 107
# The most request body the proxy reads and drops to keep a connection open after refusing it.
_DRAIN_LIMIT = 65536


class ModelRoute(BaseModel):
    """One model API the sandbox reaches at `/m/<name>/`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="One path segment ([A-Za-z0-9_.-]+), e.g. ANTHROPIC_BASE_URL.")
    upstream: str = Field(description="Absolute http(s) base URL, e.g. https://api.anthropic.com or http://h/v1.")
    credentials: dict[str, str] = Field(
        default_factory=dict, description="placeholder -> real value, swapped in on the way out."
    )

    @field_validator("name")
    @classmethod
    def _one_segment(cls, value: str) -> str:
        if not _ROUTE_NAME.match(value):
            raise ValueError("must be one path segment of letters, digits, '_', '.' or '-'; rename the route")
        return value

    @field_validator("upstream")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        return _check_base_url(value)

    def __repr__(self) -> str:  # never show the real values
        return f"ModelRoute(name={self.name!r}, upstream={self.upstream!r}, credentials=<{len(self.credentials)}>)"

    __str__ = __repr__


class EgressPolicy(BaseModel):
    """What one sandbox may reach through its socket."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str
    routes: list[ModelRoute] = Field(default_factory=list)
    agent_upstream: str | None = Field(default=None, description="Base URL of this server's agent listener.")
    allowed_hosts: list[str] = Field(
        default_factory=list, description='Domain names: "example.com" exact, "*.example.com" any subdomain.'
    )

    @field_validator("agent_upstream")
    @classmethod
    def _agent_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_base_url(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _domain_names(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for entry in value:
            name = entry.strip().lower().rstrip(".")
            bare = name[2:] if name.startswith("*.") else name
            if _is_ip_literal(bare) or not _HOST_NAME.match(bare):
                raise ValueError(f"{entry!r} is not a domain name; give names like example.com or *.example.com")
            out.append(name)
        return out

    def route(self, name: str) -> ModelRoute | None:
        return next((route for route in self.routes if route.name == name), None)

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allowed_hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                    return True
            elif host == pattern:
                return True
        return False


class RefusedRequest(BaseModel):
    """A request the proxy refused, as `on_refused` receives it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str
    method: str
    target: str = Field(description="host:port for CONNECT, the URL without its query otherwise.")
    reason: str


def _check_base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an absolute http(s) URL; give one like https://api.example.com/v1")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} has a query or fragment; give a base URL without them")
    return value


def _is_ip_literal(host: str) -> bool:
    """True for anything a resolver would take as an address rather than a name: IPv4 and IPv6
    literals, and the legacy IPv4 spellings inet_aton accepts (127.1, 0x7f000001, 2130706433)."""
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(candidate)
        return True
    except ValueError:
        pass
    if ":" in candidate:
        return True
    try:
        socket.inet_aton(candidate)
        return True
    except OSError:
        return False


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """The shared httpx client must never keep one sandbox's cookies (nor send them for another)."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


class _Malformed(Exception):
    """The sandbox sent something that is not HTTP: answer 400 (or h11's hint) and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _PrivateAddress(Exception):
    """An allowed name resolved to an address the proxy refuses (the message says which)."""


class _ClientGone(Exception):
    """The sandbox side closed or stalled while the proxy was sending to it."""


@dataclass(eq=False)
class _Socket:
    """One served socket: its listener, its policy and its live connections."""

    path: Path
    policy: EgressPolicy
    listener: anyio.abc.SocketListener
    inode: int
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    connections: dict[anyio.abc.SocketStream, anyio.CancelScope] = field(default_factory=dict)
    rejecting: int = 0
    closed: bool = False


class _Wire:
    """One sandbox connection: h11 over an anyio stream, with every wait bounded."""

    def __init__(self, stream: anyio.abc.ByteStream, timeout_s: float) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)
        self.timeout_s = timeout_s

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Malformed(exc.error_status_hint, str(exc)) from exc
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            try:
                with anyio.fail_after(self.timeout_s):
                    data = await self.stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            except TimeoutError:
                raise _ClientGone("the sandbox side sent nothing in time") from None
            try:
                self.conn.receive_data(data)
            except h11.RemoteProtocolError as exc:
                raise _Malformed(exc.error_status_hint, str(exc)) from exc

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if not data:
            return
        try:
            with anyio.fail_after(self.timeout_s):
                await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, TimeoutError) as exc:
            raise _ClientGone("the sandbox side stopped reading") from exc

    async def body(self) -> AsyncIterator[bytes]:
        """The request body as it arrives (for httpx to stream upstream)."""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:  # ConnectionClosed mid-body
                raise _ClientGone("the sandbox side closed during the request body")

    async def drain(self, limit: int = _DRAIN_LIMIT) -> None:
        """Read (and drop) the rest of a small request body we answer without forwarding, so the
        connection can carry the next request; a larger one, or one still waiting for
        100-continue, is left unread (the answer then closes the connection)."""
        if self.conn.their_state is not h11.SEND_BODY or self.conn.they_are_waiting_for_100_continue:
            return
        dropped = 0
        while dropped <= limit:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                dropped += len(event.data)
            else:
                return

    async def simple(self, status: int, text: str, *, close: bool = False) -> None:
        body = (text.rstrip("\n") + "\n").encode()
        headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
        if not close:
            await self.drain()
        if close or self.conn.their_state is not h11.DONE:
            # The request body was not read: the connection cannot carry another request.
            headers.append(("connection", "close"))
        await self.send(h11.Response(status_code=status, headers=headers))
        await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())


class EgressProxy:
    """Serves one unix socket per sandbox, each with its own `EgressPolicy`.

    An async context manager: entering it opens the task group and the one upstream httpx client
    (trust_env=False: the host's own proxy variables must not redirect model traffic); leaving it
    closes every listener, connection and upstream request.
    """

    def __init__(
        self,
        *,
        on_refused: Callable[[RefusedRequest], Awaitable[None]] | None = None,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 600.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        refuse_private_addresses: bool = False,
    ) -> None:
        """`refuse_private_addresses`: an allowed name that resolves to a loopback, private,
        link-local or otherwise non-global address (this host's own services, a cloud metadata
        endpoint) is refused too, and the proxy connects to the very address it checked (no second
        lookup a rebinding DNS could answer differently). Off by default: the allow-list is the
        operator's, and a name like "localhost" is what they may mean."""
        self._on_refused = on_refused
        self._refuse_private = refuse_private_addresses
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_connections = max_connections
        self._sockets: dict[Path, _Socket] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._client: httpx.AsyncClient | None = None
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("EgressProxy: already entered; use one `async with` per proxy")
        async with AsyncExitStack() as stack:
            self._client = await stack.enter_async_context(
                httpx.AsyncClient(
                    trust_env=False,
                    follow_redirects=False,
                    cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
                    timeout=httpx.Timeout(
                        connect=self._connect_timeout_s,
                        read=self._read_timeout_s,
                        write=self._read_timeout_s,
                        pool=self._connect_timeout_s,
                    ),
                    # Long-lived SSE streams from many sandboxes must not queue behind each other;
                    # each socket is capped at max_connections instead.
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                )
            )
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        with anyio.CancelScope(shield=True):
            for path in list(self._sockets):
                await self.stop(path)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        try:
            await stack.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None
            self._client = None

    def policy(self, socket_path: Path) -> EgressPolicy | None:
        served = self._sockets.get(_key(socket_path))
        return None if served is None else served.policy

    async def serve(self, socket_path: Path, policy: EgressPolicy) -> None:
        """Listen on `socket_path` with `policy` (replacing a stale socket file, and any listener
        this proxy had there: its connections close); returns once the socket accepts."""
        if self._tg is None:
            raise RuntimeError("EgressProxy.serve: enter the proxy (`async with EgressProxy()`) first")
        path = _key(socket_path)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ValueError(f"socket_path: {path} is longer than a unix socket allows; use a shorter directory")
        current = self._sockets.get(path)
        if current is not None:
            if _same_socket(path, current.inode):
                # Same live socket: swap the policy in place (no moment without a listener; open
                # connections use the new policy from their next request on).
                current.policy = policy
                logger.info("egress proxy for session %s: policy replaced on %s", policy.session_id, path)
                return
            await self.stop(path)
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"socket_path: {path} exists and is not a socket; remove it or choose another")
        except FileNotFoundError:
            pass
        listener = await anyio.create_unix_listener(path)
        try:
            path.chmod(0o666)  # the sandbox's user is another uid
        except BaseException:
            await listener.aclose()
            raise
        served = _Socket(path=path, policy=policy, listener=listener, inode=path.lstat().st_ino)
        self._sockets[path] = served
        self._tg.start_soon(self._accept, served)
        logger.info("egress proxy for session %s listening on %s", policy.session_id, path)

    async def stop(self, socket_path: Path) -> None:
        """Stop listening on `socket_path`, remove the socket file, close its open connections."""
        served = self._sockets.pop(_key(socket_path), None)
        if served is None:
            return
        served.closed = True
        served.scope.cancel()
        with anyio.CancelScope(shield=True):
            await served.listener.aclose()
            for stream, scope in list(served.connections.items()):
                scope.cancel()
                await stream.aclose()
        if _same_socket(served.path, served.inode):  # never another's file put there since
            try:
                served.path.unlink()
            except FileNotFoundError:
                pass

    # -- accepting ---------------------------------------------------------------------------

    async def _accept(self, served: _Socket) -> None:
        assert self._tg is not None
        with served.scope:
            while not served.closed:
                try:
                    stream = await served.listener.accept()
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                except OSError as exc:  # e.g. EMFILE: log, go on
                    logger.warning("egress proxy %s: accept failed: %s", served.path, exc)
                    await anyio.sleep(0.1)
                    continue
                if len(served.connections) < self._max_connections:
                    scope = anyio.CancelScope()
                    served.connections[stream] = scope
                    self._tg.start_soon(self._connection, served, stream, scope)
                elif served.rejecting < self._max_connections:
                    served.rejecting += 1
                    self._tg.start_soon(self._reject_busy, served, stream)
                else:
                    await stream.aclose()

    async def _reject_busy(self, served: _Socket, stream: anyio.abc.SocketStream) -> None:
        try:
            async with stream:
                wire = _Wire(stream, self._connect_timeout_s)
                try:
                    event = await wire.next_event()
                    if isinstance(event, h11.Request):
                        await wire.simple(
                            503,
                            f"503: too many connections on this sandbox's proxy (at most {self._max_connections})",
                            close=True,
                        )
                except (_Malformed, _ClientGone, h11.LocalProtocolError):
                    pass
        finally:
            served.rejecting -= 1

    async def _connection(self, served: _Socket, stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                async with stream:
                    await self._serve_connection(served, _Wire(stream, self._read_timeout_s))
        except Exception:
            logger.exception("egress proxy %s: connection failed", served.path)
        finally:
            served.connections.pop(stream, None)

    async def _serve_connection(self, served: _Socket, wire: _Wire) -> None:
        while True:
            try:
                event = await wire.next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return
                keep = await self._request(served, wire, event)
            except _Malformed as exc:
                if wire.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    try:
                        await wire.simple(exc.status, f"{exc.status}: malformed HTTP request: {exc}", close=True)
                    except (_ClientGone, h11.LocalProtocolError):
                        pass
                return
            except _ClientGone:
                return
            if not keep or wire.conn.our_state is not h11.DONE or wire.conn.their_state is not h11.DONE:
                return
            wire.conn.start_next_cycle()

    # -- dispatch ----------------------------------------------------------------------------

    async def _request(self, served: _Socket, wire: _Wire, request: h11.Request) -> bool:
        """Answer one request; False when the connection must close afterwards (CONNECT tunnels)."""
        policy = served.policy
        method = request.method.decode("ascii", "replace").upper()
        target = request.target.decode("ascii", "replace")
        if method == "CONNECT":
            return await self._connect(served, wire, target)
        if target.startswith("/"):
            path, _, query = target.partition("?")
            if path.startswith("/m/"):
                name, slash, rest = path[3:].partition("/")
                route = policy.route(name)
                if route is not None:
                    upstream = _join(route.upstream, slash + rest, query, route.credentials)
                    await self._forward(wire, request, upstream, swap=route.credentials, label=f"route {route.name}")
                    return True
                reason = f"no model route named {name!r} for this sandbox"
            elif path == "/agent" or path.startswith("/agent/"):
                if policy.agent_upstream is not None:
                    upstream = _join(policy.agent_upstream, path[len("/agent") :], query, {})
                    await self._forward(wire, request, upstream, swap={}, label="the agent endpoint")
                    return True
                reason = "this sandbox has no agent endpoint"
            else:
                reason = "not a proxy path: use /m/<route>/..., /agent/... or an allowed host"
            await self._refuse(served, wire, method, path, 404, reason)
            return True
        if target.lower().startswith(("http://", "https://")):
            return await self._absolute(served, wire, request, method, target)
        await wire.simple(400, f"400: unsupported request target {target[:200]!r}", close=True)
        return False

    async def _absolute(self, served: _Socket, wire: _Wire, request: h11.Request, method: str, target: str) -> bool:
        try:
            parts = urlsplit(target)
            port = parts.port
            host = parts.hostname or ""
        except ValueError:
            await wire.simple(400, f"400: malformed URL {target.split('?')[0][:200]!r}", close=True)
            return False
        shown = target.split("?", 1)[0]
        if parts.scheme.lower() != "http":
            await self._refuse(
                served, wire, method, shown, 400, "only http:// URLs go in absolute form; use CONNECT for https"
            )
            return True
        refusal = _host_refusal(served.policy, host)
        if refusal is not None:
            await self._refuse(served, wire, method, shown, 403, refusal)
            return True
        authority = host if port is None else f"{host}:{port}"
        try:
            address = await self._address(host, port or 80)
        except _PrivateAddress as exc:
            await self._refuse(served, wire, method, shown, 403, str(exc))
            return True
        except (OSError, TimeoutError) as exc:
            await wire.simple(502, f"502: could not resolve {host} ({type(exc).__name__})", close=True)
            return False
        netloc = f"[{address}]" if ":" in address else address
        upstream = httpx.URL(f"http://{netloc if port is None else f'{netloc}:{port}'}").copy_with(
            raw_path=((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode("ascii", "replace")
        )
        await self._forward(wire, request, upstream, swap={}, label=f"host {host}", host_header=authority)
        return True

    async def _address(self, host: str, port: int) -> str:
        """Where to connect for the allowed name `host`: the name itself, or (when private
        addresses are refused) the one global address it resolved to."""
        if not self._refuse_private:
            return host
        with anyio.fail_after(self._connect_timeout_s):
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]).split("%", 1)[0] for info in infos]
        if not addresses:
            raise OSError(f"no address for {host}")
        private = [a for a in addresses if not ipaddress.ip_address(a).is_global]
        if private:
            raise _PrivateAddress(
                f"host {host} resolves to a non-public address ({private[0]}): the proxy refuses those"
                " (loopback, private and link-local networks stay closed even for allowed names)"
            )
        return addresses[0]

    async def _refuse(self, served: _Socket, wire: _Wire, method: str, target: str, status: int, reason: str) -> None:
        logger.warning(
            "egress proxy: refused %s %s for session %s: %s", method, target, served.policy.session_id, reason
        )
        try:
            await wire.simple(status, f"{status}: {reason}")
        finally:
            await self._report(
                RefusedRequest(session_id=served.policy.session_id, method=method, target=target, reason=reason)
            )

    async def _report(self, refused: RefusedRequest) -> None:
        if self._on_refused is None:
            return
        try:
            with anyio.fail_after(REPORT_TIMEOUT_S):
                await self._on_refused(refused)
        except Exception:
            logger.exception("egress proxy: on_refused failed for %s %s", refused.method, refused.target)

    # -- forwarding --------------------------------------------------------------------------

    async def _forward(
        self,
        wire: _Wire,
        request: h11.Request,
        url: httpx.URL,
        *,
        swap: dict[str, str],
        label: str,
        host_header: str | None = None,
    ) -> None:
        assert self._client is not None
        headers = _forward_headers(request.headers, swap)
        if host_header is not None:
            headers.insert(0, (b"host", host_header.encode("ascii")))
        names = {name for name, _ in headers}
        content: AsyncIterator[bytes] | None = None
        if b"content-length" in names or any(n == b"transfer-encoding" for n, _ in request.headers):
            content = wire.body()
        else:  # no body: drain h11's EndOfMessage so the connection can go on
            event = await wire.next_event()
            if not isinstance(event, h11.EndOfMessage):
                raise _ClientGone("unexpected event before the end of a body-less request")
        if wire.conn.they_are_waiting_for_100_continue:
            await wire.send(h11.InformationalResponse(status_code=100, headers=[]))
        upstream_request = httpx.Request(
            request.method.decode("ascii"),
            url,
            headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers],
            content=content,
        )
        try:
            response = await self._client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            if isinstance(exc.__cause__, _ClientGone):
                raise _ClientGone("the sandbox side closed during the request body") from None
            logger.warning("egress proxy: %s could not be reached: %s", label, type(exc).__name__)
            await wire.simple(
                502, f"502: the upstream of {label} could not be reached ({type(exc).__name__})", close=True
            )
            return
        try:
            await wire.send(
                h11.Response(
                    status_code=response.status_code,
                    headers=_response_headers(response.headers.raw),
                    reason=response.reason_phrase.encode("latin-1", "replace"),
                )
            )
            try:
                async for chunk in response.aiter_raw():
                    await wire.send(h11.Data(data=chunk))
            except httpx.HTTPError as exc:
                # Headers are out: all the sandbox can learn is a cut-off body.
                logger.warning("egress proxy: %s failed mid-response: %s", label, type(exc).__name__)
                raise _ClientGone("upstream failed mid-response") from None
            await wire.send(h11.EndOfMessage())
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    # -- CONNECT -----------------------------------------------------------------------------

    async def _connect(self, served: _Socket, wire: _Wire, target: str) -> bool:
        host, port = _split_authority(target)
        refusal = "malformed CONNECT target: give host:port" if host is None or port is None else None
        if refusal is None and host is not None:
            refusal = _host_refusal(served.policy, host)
        if refusal is not None or host is None or port is None:
            # The tunnel's bytes may already follow: this connection carries nothing more.
            await self._refuse(served, wire, "CONNECT", target, 403, refusal or "refused")
            return False
        event = await wire.next_event()
        if not isinstance(event, h11.EndOfMessage):
            await wire.simple(400, "400: a CONNECT request has no body", close=True)
            return False
        try:
            address = await self._address(host, port)
        except _PrivateAddress as exc:
            await self._refuse(served, wire, "CONNECT", target, 403, str(exc))
            return False
        except (OSError, TimeoutError) as exc:
            await wire.simple(502, f"502: could not resolve {host} ({type(exc).__name__})", close=True)
            return False
        try:
            with anyio.fail_after(self._connect_timeout_s):
                upstream = await anyio.connect_tcp(address, port)
        except (OSError, TimeoutError) as exc:
            logger.warning("egress proxy: CONNECT %s:%s failed: %s", host, port, type(exc).__name__)
            await wire.simple(502, f"502: could not connect to {host}:{port} ({type(exc).__name__})", close=True)
            return False
        async with upstream:
            await wire.send(h11.Response(status_code=200, headers=[], reason=b"Connection Established"))
            leftover, closed = wire.conn.trailing_data
            if leftover:
                await upstream.send(bytes(leftover))
            await self._relay(wire.stream, upstream, client_closed=closed)
        return False

    async def _relay(
        self, client: anyio.abc.ByteStream, upstream: anyio.abc.ByteStream, *, client_closed: bool
    ) -> None:
        """Copy bytes both ways; an end of stream on one side is passed on as a half-close, and
        the tunnel ends when both directions have ended (or one stays silent past the read timeout)."""

        async def pump(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
            try:
                while True:
                    with anyio.fail_after(self._read_timeout_s):
                        data = await source.receive(_READ_SIZE)
                    with anyio.fail_after(self._read_timeout_s):
                        await sink.send(data)
            except anyio.EndOfStream:
                try:
                    await _send_eof(sink)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    tg.cancel_scope.cancel()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, TimeoutError):
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            if client_closed:
                await _send_eof(upstream)
            else:
                tg.start_soon(pump, client, upstream)
            tg.start_soon(pump, upstream, client)


async def _send_eof(stream: anyio.abc.ByteStream) -> None:
    if isinstance(stream, anyio.abc.SocketStream):
        await stream.send_eof()
    else:
        await stream.aclose()


def _same_socket(path: Path, inode: int) -> bool:
    try:
        found = path.lstat()
    except OSError:
        return False
    return stat.S_ISSOCK(found.st_mode) and found.st_ino == inode


def _key(socket_path: Path) -> Path:
    return Path(os.path.abspath(socket_path))


def _join(base: str, rest: str, query: str, credentials: dict[str, str]) -> httpx.URL:
    """`base` (which may carry a path such as /v1) + `rest` + `?query`, with placeholders in the
    query replaced; the scheme and authority always stay the base's."""
    url = httpx.URL(base)
    base_path = url.raw_path.split(b"?", 1)[0].decode("ascii")
    path = base_path.rstrip("/") + rest if rest else base_path
    if not path:
        path = "/"
    for placeholder, real in credentials.items():
        if placeholder:
            query = query.replace(placeholder, quote(real, safe=""))
    raw = path + (f"?{query}" if query else "")
    return url.copy_with(raw_path=raw.encode("ascii", "replace"))


def _forward_headers(headers: Iterable[tuple[bytes, bytes]], credentials: dict[str, str]) -> list[tuple[bytes, bytes]]:
    named_by_connection = _connection_tokens(headers)
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lowered = bytes(name).lower()
        if lowered.decode("latin-1") in _HOP_BY_HOP or lowered in named_by_connection:
            continue
        value = bytes(value)
        for placeholder, real in credentials.items():
            if placeholder:
                value = value.replace(placeholder.encode(), real.encode())
        out.append((lowered, value))
    return out


def _response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named_by_connection = _connection_tokens(headers)
    return [
        (name, value)
        for name, value in headers
        if name.lower().decode("latin-1") not in _HOP_BY_HOP and name.lower() not in named_by_connection
    ]


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if bytes(name).lower() == b"connection":
            tokens.update(token.strip().lower() for token in bytes(value).split(b",") if token.strip())
    return tokens


def _split_authority(target: str) -> tuple[str | None, int | None]:
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        host = f"[{host}]"
    else:
        host, _, port_text = target.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return (host or None), None
    return host, int(port_text)


def _host_refusal(policy: EgressPolicy, host: str) -> str | None:
    """Why `host` may not be reached, or None when the environment's allow-list admits it."""
    name = host.lower().rstrip(".")
    if _is_ip_literal(name):
        return f"{host} is an IP address: the proxy admits domain names only (the environment's allow-list decides)"
    if not _HOST_NAME.match(name):
        return f"{host!r} is not a domain name: the proxy admits domain names only"
    if not policy.allows_host(name):
        return f"host {name} is not allowed: the environment's allow-list (allowed_hosts) decides"
    return None
