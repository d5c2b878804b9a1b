"""The egress proxy against real servers on loopback: real unix sockets on the sandbox side, real
HTTP/1.1 and TCP upstreams on 127.0.0.1 (an h11 server written here, an echo server for CONNECT)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import h11
import httpx
import pytest
from anyio.abc import SocketAttribute

from mcp_sandboxes.egress.proxy import EgressPolicy, EgressProxy, ModelRoute, RefusedRequest

PLACEHOLDER = "mcp-sandboxes-placeholder-ANTHROPIC_API_KEY"
REAL_KEY = "sk-ant-real-key-0123456789abcdef"
WAIT_S = 10.0


# -- an upstream HTTP server (h11 on anyio, 127.0.0.1) -------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    @property
    def names(self) -> set[str]:
        return {key for key, _ in self.headers}


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Callable[[], AsyncIterator[bytes]] = b"ok"


Handler = Callable[[Seen], Awaitable[Reply]]


async def echo_request(seen: Seen) -> Reply:
    return Reply(headers=[("x-upstream", "yes")], body=f"{seen.method} {seen.target}".encode())


@dataclass
class Upstream:
    port: int
    seen: list[Seen]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _receive_event(conn: h11.Connection, stream: anyio.abc.ByteStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)
        elif event is h11.PAUSED:
            raise AssertionError("h11 paused")
        else:
            assert isinstance(event, h11.Event)
            return event


@asynccontextmanager
async def upstream_server(handler: Handler = echo_request) -> AsyncIterator[Upstream]:
    seen: list[Seen] = []

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            while True:
                event = await _receive_event(conn, stream)
                if not isinstance(event, h11.Request):
                    return
                body = bytearray()
                while True:
                    part = await _receive_event(conn, stream)
                    if isinstance(part, h11.Data):
                        body += part.data
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
                request = Seen(
                    method=event.method.decode(),
                    target=event.target.decode(),
                    headers=[(k.decode(), v.decode()) for k, v in event.headers],
                    body=bytes(body),
                )
                seen.append(request)
                reply = await handler(request)
                headers = list(reply.headers)
                if isinstance(reply.body, bytes):
                    headers.append(("content-length", str(len(reply.body))))
                await stream.send(conn.send(h11.Response(status_code=reply.status, headers=headers)))
                if request.method == "HEAD":
                    pass
                elif isinstance(reply.body, bytes):
                    await stream.send(conn.send(h11.Data(data=reply.body)))
                else:
                    async for chunk in reply.body():
                        await stream.send(conn.send(h11.Data(data=chunk)))
                await stream.send(conn.send(h11.EndOfMessage()))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield Upstream(port=listener.extra(SocketAttribute.local_port), seen=seen)
        tg.cancel_scope.cancel()


@dataclass
class Echo:
    port: int
    connections: int = 0


@asynccontextmanager
async def echo_server() -> AsyncIterator[Echo]:
    """TCP on 127.0.0.1 that sends back what it gets and, after the client's end of stream, says
    b"bye" and closes (so a tunnel must pass a half-close on, not end at it)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    echo = Echo(port=listener.extra(SocketAttribute.local_port))

    async def serve(stream: anyio.abc.SocketStream) -> None:
        echo.connections += 1
        async with stream:
            try:
                async for chunk in stream:
                    await stream.send(b"echo:" + chunk)
                await stream.send(b"bye")
            except anyio.BrokenResourceError:
                pass

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield echo
        tg.cancel_scope.cancel()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the sandbox side -------------------------------------------------------------------------


class RawClient:
    """An HTTP/1.1 client on one unix-socket connection (h11), for keep-alive, CONNECT and
    requests httpx would not send (absolute form, hop-by-hop headers, garbage)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = list(headers or [])
        if not any(name == "host" for name, _ in all_headers):
            all_headers.insert(0, ("host", "sandbox"))
        if body:
            all_headers.append(("content-length", str(len(body))))
        await self.stream.send(self.conn.send(h11.Request(method=method, target=target, headers=all_headers)))
        if body:
            await self.stream.send(self.conn.send(h11.Data(data=body)))
        await self.stream.send(self.conn.send(h11.EndOfMessage()))
        response = await _receive_event(self.conn, self.stream)
        assert isinstance(response, h11.Response), response
        if self.conn.their_state is h11.SWITCHED_PROTOCOL:
            return response, b""
        data = bytearray()
        while True:
            event = await _receive_event(self.conn, self.stream)
            if isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                return response, bytes(data)
            else:
                raise AssertionError(f"unexpected {event}")


@asynccontextmanager
async def raw(path: Path) -> AsyncIterator[RawClient]:
    async with await anyio.connect_unix(path) as stream:
        yield RawClient(stream)


def sandbox_client(path: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://127.0.0.1:18080", trust_env=False
    )


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: a unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="egress-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Refusals:
    seen: list[RefusedRequest] = field(default_factory=list)
    arrived: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, refused: RefusedRequest) -> None:
        self.seen.append(refused)
        self.arrived.set()


def route(upstream: str, name: str = "ANTHROPIC_BASE_URL") -> ModelRoute:
    return ModelRoute(name=name, upstream=upstream, credentials={PLACEHOLDER: REAL_KEY})


# -- model routes -----------------------------------------------------------------------------


async def test_route_forwards_under_the_upstreams_base_path(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(f"{up.url}/v1/")]))
            async with sandbox_client(path) as client:
                response = await client.get("/m/ANTHROPIC_BASE_URL/messages/count?beta=true&x=%2F")
                bare = await client.head("/m/ANTHROPIC_BASE_URL")
    assert response.status_code == 200
    assert response.text == "GET /v1/messages/count?beta=true&x=%2F"
    assert response.headers["x-upstream"] == "yes"
    assert bare.status_code == 200
    assert [seen.target for seen in up.seen] == ["/v1/messages/count?beta=true&x=%2F", "/v1/"]
    assert up.seen[0].header("host") == f"127.0.0.1:{up.port}"


async def test_placeholders_are_swapped_in_headers_and_query_on_model_routes(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with sandbox_client(path) as client:
                response = await client.post(
                    f"/m/ANTHROPIC_BASE_URL/v1/messages?key={PLACEHOLDER}&other=1",
                    headers={"x-api-key": PLACEHOLDER, "authorization": f"Bearer {PLACEHOLDER}"},
                    content=f'{{"note": "{PLACEHOLDER}"}}',
                )
    assert response.status_code == 200
    [seen] = up.seen
    assert seen.header("x-api-key") == REAL_KEY
    assert seen.header("authorization") == f"Bearer {REAL_KEY}"
    assert seen.target == f"/v1/messages?key={REAL_KEY}&other=1"
    # The body is the agent's content, not a credential slot: left alone.
    assert seen.body == f'{{"note": "{PLACEHOLDER}"}}'.encode()


async def test_placeholders_are_not_swapped_on_agent_or_allowed_host_traffic(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    headers = [("x-api-key", PLACEHOLDER), ("authorization", f"Bearer {PLACEHOLDER}")]
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy() as proxy:
            policy = EgressPolicy(
                session_id="s1", routes=[route(up.url)], agent_upstream=up.url, allowed_hosts=["localhost"]
            )
            await proxy.serve(path, policy)
            async with raw(path) as client:
                agent, _ = await client.request("GET", f"/agent/mcp?key={PLACEHOLDER}", headers)
                absolute, _ = await client.request(
                    "GET", f"http://localhost:{up.port}/simple?key={PLACEHOLDER}", headers
                )
    assert (agent.status_code, absolute.status_code) == (200, 200)
    assert [seen.target for seen in up.seen] == [f"/mcp?key={PLACEHOLDER}", f"/simple?key={PLACEHOLDER}"]
    for seen in up.seen:
        assert seen.header("x-api-key") == PLACEHOLDER
        assert seen.header("authorization") == f"Bearer {PLACEHOLDER}"


async def test_upstream_sees_no_hop_by_hop_headers(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with raw(path) as client:
                response, _ = await client.request(
                    "POST",
                    "/m/ANTHROPIC_BASE_URL/v1/messages",
                    [
                        ("connection", "keep-alive, x-drop-me"),
                        ("x-drop-me", "1"),
                        ("keep-alive", "timeout=5"),
                        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                        ("proxy-connection", "keep-alive"),
                        ("te", "trailers"),
                        ("trailer", "x-checksum"),
                        ("upgrade", "h2c"),
                        ("x-keep-me", "2"),
                    ],
                    body=b"{}",
                )
    assert response.status_code == 200
    [seen] = up.seen
    dropped = {"connection", "x-drop-me", "keep-alive", "proxy-authorization", "proxy-connection"}
    dropped |= {"te", "trailer", "upgrade", "transfer-encoding"}
    assert seen.names.isdisjoint(dropped), seen.headers
    assert seen.header("x-keep-me") == "2"
    assert seen.header("content-length") == "2"
    assert seen.header("host") == f"127.0.0.1:{up.port}"
    assert seen.body == b"{}"


async def test_sse_response_streams_event_by_event(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    first_seen_by_client = anyio.Event()
    first = b"event: message_start\ndata: {}\n\n"
    second = b"event: message_stop\ndata: {}\n\n"

    async def sse(seen: Seen) -> Reply:
        async def body() -> AsyncIterator[bytes]:
            yield first
            # The upstream holds the rest back until the client has the first event: a proxy
            # that buffered the response would deadlock here (and fail_after would end the test).
            await first_seen_by_client.wait()
            yield second

        return Reply(headers=[("content-type", "text/event-stream")], body=body)

    received: list[bytes] = []
    with anyio.fail_after(WAIT_S):
        async with upstream_server(sse) as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with (
                sandbox_client(path) as client,
                client.stream("POST", "/m/ANTHROPIC_BASE_URL/v1/messages", content=b"{}") as response,
            ):
                assert response.headers["content-type"] == "text/event-stream"
                async for chunk in response.aiter_raw():
                    received.append(chunk)
                    if b"".join(received) == first:
                        first_seen_by_client.set()
    assert b"".join(received) == first + second
    assert received[0] == first


async def test_large_uploads_arrive_intact_with_and_without_a_length(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)

    async def digest(seen: Seen) -> Reply:
        return Reply(body=f"{len(seen.body)} {hashlib.sha256(seen.body).hexdigest()}".encode())

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    expected = f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
    with anyio.fail_after(30):
        async with upstream_server(digest) as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with sandbox_client(path) as client:
                sized = await client.post("/m/ANTHROPIC_BASE_URL/upload", content=payload)
                chunked = await client.post("/m/ANTHROPIC_BASE_URL/upload", content=chunks())
    assert sized.text == expected
    assert chunked.text == expected
    assert up.seen[0].header("content-length") == str(len(payload))
    assert up.seen[1].header("transfer-encoding") == "chunked"


async def test_one_connection_carries_several_requests(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with raw(path) as client:
                first, body1 = await client.request("POST", "/m/ANTHROPIC_BASE_URL/one", body=b"a")
                second, body2 = await client.request("GET", "/m/ANTHROPIC_BASE_URL/two")
                refused, _ = await client.request("GET", "/nowhere")
                third, body3 = await client.request("GET", "/m/ANTHROPIC_BASE_URL/three")
    assert [r.status_code for r in (first, second, refused, third)] == [200, 200, 404, 200]
    assert (body1, body2, body3) == (b"POST /one", b"GET /two", b"GET /three")


async def test_unreachable_upstream_answers_502_naming_the_route_not_the_key(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with EgressProxy(connect_timeout_s=2) as proxy:
            dead = f"http://127.0.0.1:{free_port()}/v1"
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(dead)]))
            async with sandbox_client(path) as client:
                response = await client.get(
                    f"/m/ANTHROPIC_BASE_URL/messages?key={PLACEHOLDER}", headers={"x-api-key": PLACEHOLDER}
                )
    assert response.status_code == 502
    assert "ANTHROPIC_BASE_URL" in response.text
    assert REAL_KEY not in response.text
    assert REAL_KEY not in str(response.headers)


# -- refusals ---------------------------------------------------------------------------------


async def test_unknown_routes_and_paths_are_404_and_reported(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    refusals = Refusals()
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy(on_refused=refusals) as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with sandbox_client(path) as client:
                unknown = await client.get(f"/m/OPENAI_BASE_URL/v1/responses?key={PLACEHOLDER}")
                other = await client.post("/v1/messages", content=b"{}")
                agent = await client.get("/agent/mcp")
    assert (unknown.status_code, other.status_code, agent.status_code) == (404, 404, 404)
    assert "OPENAI_BASE_URL" in unknown.text
    assert up.seen == []
    assert [(r.session_id, r.method, r.target) for r in refusals.seen] == [
        ("s1", "GET", "/m/OPENAI_BASE_URL/v1/responses"),
        ("s1", "POST", "/v1/messages"),
        ("s1", "GET", "/agent/mcp"),
    ]
    assert "agent endpoint" in refusals.seen[2].reason


async def test_a_failing_on_refused_does_not_break_the_proxy(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    calls: list[str] = []

    async def broken(refused: RefusedRequest) -> None:
        calls.append(refused.target)
        raise RuntimeError("event log is down")

    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy(on_refused=broken) as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with raw(path) as client:
                refused, _ = await client.request("GET", "/nowhere")
                after, body = await client.request("GET", "/m/ANTHROPIC_BASE_URL/still")
    assert (refused.status_code, after.status_code, body) == (404, 200, b"GET /still")
    assert calls == ["/nowhere"]


async def test_malformed_http_is_answered_400_and_closed(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1"))
            async with await anyio.connect_unix(path) as stream:
                await stream.send(b"NOT HTTP AT ALL\x00\r\n\r\n")
                answer = bytearray()
                async for chunk in stream:  # ends only when the proxy closes
                    answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")


# -- CONNECT and absolute form (the allow-list) ---------------------------------------------


async def test_connect_to_an_allowed_name_relays_bytes_both_ways(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with echo_server() as echo, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", allowed_hosts=["LocalHost."]))
            async with raw(path) as client:
                response, _ = await client.request("CONNECT", f"localhost:{echo.port}", [("host", "localhost")])
                assert response.status_code == 200
                leftover, _ = client.conn.trailing_data
                assert leftover == b""
                await client.stream.send(b"hello")
                assert await client.stream.receive() == b"echo:hello"
                await client.stream.send(b"x" * 200_000)
                got = bytearray()
                while got.count(b"x") < 200_000:
                    got += await client.stream.receive()
                assert bytes(got).replace(b"echo:", b"") == b"x" * 200_000
                # Our end of stream reaches the echo server, which answers and closes: so does the tunnel.
                await client.stream.send_eof()
                tail = bytearray()
                async for chunk in client.stream:
                    tail += chunk
                assert tail == b"bye"
    assert echo.connections == 1


@pytest.mark.parametrize(
    ("authority", "why"),
    [
        ("127.0.0.1:{port}", "IP address"),
        ("[::1]:{port}", "IP address"),
        ("127.1:{port}", "IP address"),
        ("2130706433:{port}", "IP address"),
        ("example.org:{port}", "allow-list"),
        ("localhost.evil.test:{port}", "allow-list"),
    ],
)
async def test_connect_outside_the_allow_list_is_403_and_reported(socket_dir: Path, authority: str, why: str) -> None:
    path = socket_dir / "proxy.sock"
    refusals = Refusals()
    with anyio.fail_after(WAIT_S):
        async with echo_server() as echo, EgressProxy(on_refused=refusals) as proxy:
            target = authority.format(port=echo.port)
            policy = EgressPolicy(session_id="s9", allowed_hosts=["localhost", "*.example.org"])
            await proxy.serve(path, policy)
            async with raw(path) as client:
                response, body = await client.request("CONNECT", target, [("host", target)])
            await refusals.arrived.wait()
    assert response.status_code == 403
    text = body.decode()
    assert target.rsplit(":", 1)[0].strip("[]") in text
    assert why in text
    assert [(r.session_id, r.method, r.target) for r in refusals.seen] == [("s9", "CONNECT", target)]
    assert echo.connections == 0


async def test_absolute_form_reaches_allowed_hosts_only(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    refusals = Refusals()
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy(on_refused=refusals) as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", allowed_hosts=["localhost"]))
            async with raw(path) as client:
                allowed, body = await client.request("GET", f"http://localhost:{up.port}/simple/pkg/?a=1")
                by_ip, _ = await client.request("GET", f"http://127.0.0.1:{up.port}/simple/?a=1")
                other, _ = await client.request("GET", "http://pypi.org/simple/")
    assert (allowed.status_code, body) == (200, b"GET /simple/pkg/?a=1")
    assert (by_ip.status_code, other.status_code) == (403, 403)
    assert [seen.header("host") for seen in up.seen] == [f"localhost:{up.port}"]
    assert [r.target for r in refusals.seen] == [f"http://127.0.0.1:{up.port}/simple/", "http://pypi.org/simple/"]


# -- the agent endpoint -----------------------------------------------------------------------


async def test_agent_route_passes_mcp_requests_and_sse_streams(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    opened = anyio.Event()

    async def mcp(seen: Seen) -> Reply:
        if seen.method == "GET":

            async def events() -> AsyncIterator[bytes]:
                yield b": stream open\n\n"
                await opened.wait()
                yield b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/x"}\n\n'

            return Reply(headers=[("content-type", "text/event-stream"), ("mcp-session-id", "abc")], body=events)
        if seen.method == "DELETE":
            return Reply(status=204, body=b"")
        return Reply(headers=[("content-type", "application/json")], body=b'{"jsonrpc":"2.0","id":1,"result":{}}')

    with anyio.fail_after(WAIT_S):
        async with upstream_server(mcp) as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", agent_upstream=up.url))
            async with sandbox_client(path) as client:
                posted = await client.post(
                    "/agent/mcp",
                    json={"jsonrpc": "2.0", "id": 1, "method": "initialize"},
                    headers={"authorization": "Bearer session-token", "accept": "application/json, text/event-stream"},
                )
                chunks: list[bytes] = []
                async with client.stream("GET", "/agent/mcp", headers={"mcp-session-id": "abc"}) as stream:
                    assert stream.headers["mcp-session-id"] == "abc"
                    async for chunk in stream.aiter_raw():
                        chunks.append(chunk)
                        opened.set()
                deleted = await client.delete("/agent/mcp")
    assert posted.json() == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert b"notifications/x" in b"".join(chunks)
    assert deleted.status_code == 204
    assert [(s.method, s.target) for s in up.seen] == [("POST", "/mcp"), ("GET", "/mcp"), ("DELETE", "/mcp")]
    assert up.seen[0].header("authorization") == "Bearer session-token"


# -- many sockets, their lifecycle ------------------------------------------------------------


async def test_two_sockets_keep_their_own_policies(socket_dir: Path) -> None:
    path_a, path_b = socket_dir / "a.sock", socket_dir / "b.sock"
    refusals = Refusals()
    with anyio.fail_after(WAIT_S):
        async with (
            upstream_server() as up_a,
            upstream_server() as up_b,
            EgressProxy(on_refused=refusals) as proxy,
        ):
            await proxy.serve(
                path_a,
                EgressPolicy(
                    session_id="A",
                    routes=[ModelRoute(name="M", upstream=up_a.url, credentials={PLACEHOLDER: "key-of-a"})],
                ),
            )
            await proxy.serve(
                path_b,
                EgressPolicy(
                    session_id="B",
                    routes=[ModelRoute(name="M", upstream=up_b.url, credentials={PLACEHOLDER: "key-of-b"})],
                    allowed_hosts=["localhost"],
                ),
            )
            async with sandbox_client(path_a) as a, sandbox_client(path_b) as b:
                for client in (a, b, a, b):
                    await client.get("/m/M/x", headers={"x-api-key": PLACEHOLDER})
                refused = await a.get(f"http://localhost:{up_b.port}/")  # httpx sends origin form: a path
                async with raw(path_a) as raw_a:
                    absolute, _ = await raw_a.request("GET", f"http://localhost:{up_b.port}/")
            served_a = proxy.policy(path_a)
    assert [s.header("x-api-key") for s in up_a.seen] == ["key-of-a", "key-of-a"]
    assert [s.header("x-api-key") for s in up_b.seen] == ["key-of-b", "key-of-b"]
    assert refused.status_code == 404
    assert absolute.status_code == 403  # localhost is on B's list, not A's
    assert {r.session_id for r in refusals.seen} == {"A"}
    assert served_a is not None and served_a.session_id == "A"


async def test_stop_closes_open_connections_and_removes_the_socket(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    started = anyio.Event()
    never = anyio.Event()

    async def hanging(seen: Seen) -> Reply:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            started.set()
            await never.wait()
            yield b"data: never\n\n"

        return Reply(headers=[("content-type", "text/event-stream")], body=body)

    with anyio.fail_after(WAIT_S):
        async with upstream_server(hanging) as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            assert path.is_socket()
            assert path.stat().st_mode & 0o777 == 0o666
            async with sandbox_client(path) as client:
                with pytest.raises(httpx.RemoteProtocolError):
                    async with client.stream("GET", "/m/ANTHROPIC_BASE_URL/stream") as response:
                        async for _ in response.aiter_raw():
                            await started.wait()
                            await proxy.stop(path)
            assert not path.exists()
            assert proxy.policy(path) is None
            with pytest.raises(OSError):
                await anyio.connect_unix(path)


async def test_serve_replaces_a_stale_socket_file_but_not_other_files(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # what a crashed server leaves behind: a socket file nobody listens on
    plain = socket_dir / "plain"
    plain.write_text("not a socket")
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with sandbox_client(path) as client:
                response = await client.get("/m/ANTHROPIC_BASE_URL/x")
            with pytest.raises(FileExistsError):
                await proxy.serve(plain, EgressPolicy(session_id="s2"))
    assert response.text == "GET /x"
    assert plain.read_text() == "not a socket"
    assert not path.exists()  # leaving the proxy stops every socket


async def test_serving_a_path_again_replaces_its_policy(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy() as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url, "OLD")]))
            async with raw(path) as client:
                before, _ = await client.request("GET", "/m/OLD/x")
                await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url, "NEW")]))
                # The same kept-alive connection follows the new policy.
                old, _ = await client.request("GET", "/m/OLD/x")
                new, _ = await client.request("GET", "/m/NEW/y")
            # After the socket file is gone, serving again makes a new listener.
            path.unlink()
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url, "THIRD")]))
            async with sandbox_client(path) as fresh:
                third = await fresh.get("/m/THIRD/z")
    assert [r.status_code for r in (before, old, new, third)] == [200, 404, 200, 200]
    assert [s.target for s in up.seen] == ["/x", "/y", "/z"]


async def test_connections_beyond_the_cap_get_503(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    with anyio.fail_after(WAIT_S):
        async with upstream_server() as up, EgressProxy(max_connections=1) as proxy:
            await proxy.serve(path, EgressPolicy(session_id="s1", routes=[route(up.url)]))
            async with raw(path) as first:
                ok, _ = await first.request("GET", "/m/ANTHROPIC_BASE_URL/a")
                async with raw(path) as second:
                    busy, text = await second.request("GET", "/m/ANTHROPIC_BASE_URL/b")
            # Once the first connection closes, a new one is served again.
            async with raw(path) as third:
                again, _ = await third.request("GET", "/m/ANTHROPIC_BASE_URL/c")
    assert (ok.status_code, busy.status_code, again.status_code) == (200, 503, 200)
    assert b"too many connections" in text
    assert [s.target for s in up.seen] == ["/a", "/c"]


def test_policy_takes_domain_names_only() -> None:
    with pytest.raises(ValueError, match="not a domain name"):
        EgressPolicy(session_id="s", allowed_hosts=["10.0.0.1"])
    with pytest.raises(ValueError, match="not a domain name"):
        EgressPolicy(session_id="s", allowed_hosts=["https://example.com"])
    with pytest.raises(ValueError, match="absolute http"):
        ModelRoute(name="X", upstream="api.anthropic.com")
    with pytest.raises(ValueError, match="one path segment"):
        ModelRoute(name="a/b", upstream="https://api.anthropic.com")
    policy = EgressPolicy(session_id="s", allowed_hosts=["*.Example.com.", "pypi.org"])
    assert policy.allows_host("a.b.example.com") and policy.allows_host("PYPI.org.")
    assert not policy.allows_host("example.com") and not policy.allows_host("badexample.com")
    assert REAL_KEY not in repr(ModelRoute(name="X", upstream="https://h", credentials={PLACEHOLDER: REAL_KEY}))


async def test_refusing_private_addresses_closes_allowed_names_that_resolve_to_loopback(socket_dir: Path) -> None:
    path = socket_dir / "proxy.sock"
    refusals = Refusals()
    with anyio.fail_after(WAIT_S):
        async with (
            echo_server() as echo,
            upstream_server() as up,
            EgressProxy(on_refused=refusals, refuse_private_addresses=True) as proxy,
        ):
            await proxy.serve(path, EgressPolicy(session_id="s1", allowed_hosts=["localhost"]))
            async with raw(path) as client:
                tunnel, body = await client.request("CONNECT", f"localhost:{echo.port}", [("host", "localhost")])
            async with raw(path) as client:
                plain, _ = await client.request("GET", f"http://localhost:{up.port}/x")
    assert (tunnel.status_code, plain.status_code) == (403, 403)
    assert b"non-public address" in body
    assert [r.target for r in refusals.seen] == [f"localhost:{echo.port}", f"http://localhost:{up.port}/x"]
    assert echo.connections == 0 and up.seen == []
