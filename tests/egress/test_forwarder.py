"""The in-sandbox forwarder (egress/forward.c), compiled by forwarder_binary and run for real: on
the host as the wrapper of real programs talking to a unix-socket server the test serves, and in
real `--network none` containers (busybox and plain Debian, as a non-root user) where the mounted
socket is the only way out."""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import signal
import socket
import stat
import struct
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteReceiveStream, SocketAttribute, SocketStream

from mcp_sandboxes.egress import forwarder
from mcp_sandboxes.egress.forwarder import FORWARD_SOURCE, IN_SANDBOX_PATH, binary_name, forwarder_binary
from mcp_sandboxes.errors import ProviderError
from tests.conftest import BUSYBOX_IMAGE, ROOT

STEP_S = 60.0
DEBIAN_IMAGE = "mcp-sandboxes/debian:bookworm"
BIG = 5 * 1024 * 1024
# Where the server mounts the socket's directory, and the port the CLI is pointed at (egress/plan.py).
SANDBOX_EGRESS_DIR = "/run/mcp-sandboxes/egress"
SANDBOX_SOCKET = f"{SANDBOX_EGRESS_DIR}/proxy.sock"
SANDBOX_PORT = 18080
# clock_nanosleep, the syscall forward sleeps in between bind attempts (glibc's nanosleep uses it).
CLOCK_NANOSLEEP = {"x86_64": 230, "aarch64": 115}

Handler = Callable[[SocketStream], Awaitable[None]]


@pytest.fixture(scope="module")
async def forward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with anyio.fail_after(STEP_S):
        return await forwarder_binary(tmp_path_factory.mktemp("forwarder") / "bin")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def unix_server(path: Path, handler: Handler) -> AsyncIterator[Path]:
    """Serve `handler` on a unix socket at `path`, connectable by any uid (as the proxy's is)."""
    listener = await anyio.create_unix_listener(path)
    await anyio.Path(path).chmod(0o666)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handler)
        yield path
        group.cancel_scope.cancel()


async def echo_then_trailer(stream: SocketStream) -> None:
    """Echo every chunk as it comes (both directions busy at once); at EOF, one trailer naming
    what arrived, then close: the trailer exists only if the client's half-close got through."""
    digest, size = hashlib.sha256(), 0
    async with stream:
        async for chunk in stream:
            digest.update(chunk)
            size += len(chunk)
            await stream.send(chunk)
        await stream.send(f"END {size} {digest.hexdigest()}".encode())


def peer_uid(stream: SocketStream) -> int:
    raw = stream.extra(SocketAttribute.raw_socket)
    _pid, uid, _gid = struct.unpack("3i", raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


async def http_hello(stream: SocketStream) -> None:
    """A minimal HTTP answer naming the request line and the connecting process's uid."""
    async with stream:
        head = b""
        async for chunk in stream:
            head += chunk
            if b"\r\n\r\n" in head:
                break
        request_line = head.split(b"\r\n")[0].decode()
        body = f"hello from the host socket; uid {peer_uid(stream)} asked {request_line}\n"
        await stream.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())


@dataclass
class Finished:
    pid: int
    code: int
    stdout: str
    stderr: str


async def drain(stream: ByteReceiveStream | None, into: bytearray) -> None:
    assert stream is not None
    async for chunk in stream:
        into += chunk


async def run(argv: list[str], *, stdin: bytes = b"") -> Finished:
    """Run to the end. Reading stderr to EOF also waits for the forwarder, which holds the
    program's stderr: a forwarder that outlived its program would hang here until the timeout."""
    out, err = bytearray(), bytearray()
    with anyio.fail_after(STEP_S):
        async with await anyio.open_process(argv) as process:
            assert process.stdin is not None
            if stdin:
                await process.stdin.send(stdin)
            await process.stdin.aclose()
            async with anyio.create_task_group() as group:
                group.start_soon(drain, process.stdout, out)
                group.start_soon(drain, process.stderr, err)
            code = await process.wait()
    return Finished(process.pid, code, out.decode(), err.decode())


async def wait_gone(pid: int) -> None:
    """Until process `pid` has exited (its sockets are closed by then)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with anyio.fail_after(STEP_S):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# The program a test wraps: prints its pid and its children (the forwarder), relays BIG bytes
# through the port while reading the echo at the same time, half-closes, then exits with argv[3].
CLIENT = r"""
import hashlib, os, socket, sys, threading
port, size, code = map(int, sys.argv[1:4])
pid = os.getpid()
print("pid", pid, "children", open(f"/proc/{pid}/task/{pid}/children").read().strip(), flush=True)
payload = bytes(range(256)) * (size // 256)
conn = socket.create_connection(("127.0.0.1", port))
def send():
    conn.sendall(payload)
    conn.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send)
sender.start()
got = bytearray()
while chunk := conn.recv(1 << 16):
    got += chunk
sender.join()
print("echo", got[:size] == payload, "trailer", got[size:].decode(), flush=True)
sys.exit(code)
"""


# -- building -----------------------------------------------------------------------------------


async def test_the_binary_is_built_once_static_private_and_cached_by_the_source_s_hash(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "bin"
    with anyio.fail_after(STEP_S):
        built = await forwarder_binary(cache)
    # Named by a hash of the source (and flags): an upgraded package never runs a stale binary.
    assert built == cache / binary_name(FORWARD_SOURCE.read_bytes())
    assert built.name.startswith("forward-") and len(built.name) == len("forward-") + 16
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(built.stat().st_mode) == 0o755
    assert is_static_elf(built.read_bytes())
    assert list(cache.iterdir()) == [built]  # no temporary left behind
    mtime = built.stat().st_mtime_ns
    # Cached: a compiler that does not exist is never asked for.
    with anyio.fail_after(STEP_S):
        again = await forwarder_binary(cache, compiler="/nonexistent/cc")
    assert again == built and built.stat().st_mtime_ns == mtime


async def test_no_compiler_names_the_packages_to_install_and_the_prebuilt_alternative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc-from-env")
    with pytest.raises(ProviderError) as caught, anyio.fail_after(STEP_S):
        await forwarder_binary(tmp_path / "bin")
    message = str(caught.value)
    assert "/nonexistent/cc-from-env" in message
    assert "gcc libc6-dev" in message and "egress.forwarder_path" in message and "network 'model'" in message


async def test_a_failing_compile_carries_the_compiler_s_words_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "bin"
    with pytest.raises(ProviderError) as caught, anyio.fail_after(STEP_S):
        await forwarder_binary(cache, compiler="sh -c 'echo cannot find -lc >&2; exit 1' cc")
    message = str(caught.value)
    assert "cannot find -lc" in message and "exit 1" in message and "gcc libc6-dev" in message
    assert list(cache.iterdir()) == []


async def test_a_compiler_that_hangs_is_stopped_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder, "COMPILE_TIMEOUT_S", 0.5)
    with pytest.raises(ProviderError) as caught, anyio.fail_after(STEP_S):
        await forwarder_binary(tmp_path / "bin", compiler="sh -c 'exec sleep 60' cc")
    assert "sh did not finish compiling" in str(caught.value) and "gcc libc6-dev" in str(caught.value)
    assert list((tmp_path / "bin").iterdir()) == []


def is_static_elf(data: bytes) -> bool:
    """A 64-bit little-endian ELF executable with no PT_INTERP (no dynamic loader to find)."""
    if data[:6] != b"\x7fELF\x02\x01":
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def test_the_source_ships_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    shipped = config["tool"]["setuptools"]["package-data"]["mcp_sandboxes"]
    assert FORWARD_SOURCE.relative_to(ROOT / "mcp_sandboxes").as_posix() in shipped


# -- on the host --------------------------------------------------------------------------------


async def test_a_program_reaches_the_socket_through_the_port_both_ways_at_once_with_half_close(
    forward: Path, tmp_path: Path
) -> None:
    port = free_port()
    async with unix_server(tmp_path / "proxy.sock", echo_then_trailer) as path:
        done = await run([str(forward), str(port), str(path), sys.executable, "-c", CLIENT, str(port), str(BIG), "5"])
    assert done.code == 5, done.stderr
    payload = bytes(range(256)) * (BIG // 256)
    pid_line, echo_line = done.stdout.splitlines()
    assert echo_line == f"echo True trailer END {BIG} {hashlib.sha256(payload).hexdigest()}"
    # The program kept the pid the test started; its one child is the forwarder, gone with it.
    _, pid, _, children = pid_line.split()
    assert int(pid) == done.pid and children.isdigit()
    await wait_gone(int(children))
    assert refused(port)


async def test_the_program_keeps_its_stdio_environment_cwd_and_signal_dispositions(
    forward: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    script = 'echo "$$ $FOO $(pwd)"; grep "^SigIgn" /proc/$$/status; cat'
    monkeypatch.setenv("FOO", "kept")
    done = await run([str(forward), str(port), str(tmp_path / "none.sock"), "sh", "-c", script], stdin=b"piped in")
    assert done.code == 0, done.stderr
    first, ignored, rest = done.stdout.split("\n", 2)
    assert first == f"{done.pid} kept {Path.cwd()}"
    # SIGPIPE and SIGCHLD are ignored in the forwarder only: the program gets what its caller gave.
    ignored_mask = int(ignored.split()[1], 16)
    assert not ignored_mask & (1 << (signal.SIGPIPE - 1)) and not ignored_mask & (1 << (signal.SIGCHLD - 1))
    assert rest == "piped in" and done.stderr == ""


async def test_signals_reach_the_program_itself_and_its_exit_code_is_the_caller_s(
    forward: Path, tmp_path: Path
) -> None:
    script = (
        "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(42));"
        " print('ready', flush=True); signal.pause()"
    )
    argv = [str(forward), str(free_port()), str(tmp_path / "none.sock"), sys.executable, "-c", script]
    with anyio.fail_after(STEP_S):
        async with await anyio.open_process(argv) as process:
            assert process.stdout is not None
            assert (await process.stdout.receive()).startswith(b"ready")
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 42


async def test_an_unreachable_socket_answers_502_naming_it_and_the_port_serves_again_next_turn(
    forward: Path, tmp_path: Path
) -> None:
    """The forwarder closes first here, leaving TIME_WAIT on the port: the next turn's forwarder
    must still bind it (SO_REUSEADDR) rather than give up."""
    port = free_port()
    missing = tmp_path / "gone.sock"
    ask = (
        "import socket, sys; c = socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
        " c.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); print(c.makefile('rb').read().decode())"
    )
    for _turn in range(2):
        done = await run([str(forward), str(port), str(missing), sys.executable, "-c", ask, str(port)])
        assert done.code == 0 and done.stderr == "", done.stderr
        assert done.stdout.startswith("HTTP/1.1 502 Bad Gateway\r\n")
        assert f"the egress proxy at {missing} is not reachable: No such file or directory" in done.stdout


async def test_a_port_held_a_moment_is_waited_for_and_one_held_for_good_is_reported(
    forward: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    machine = platform.machine()
    if machine not in CLOCK_NANOSLEEP:
        pytest.skip(f"no syscall number known for {machine}")
    port = free_port()
    # Bound, not listening, no SO_REUSEADDR: forward cannot bind, and nothing answers on the port.
    holder = socket.socket()
    request.addfinalizer(holder.close)
    holder.bind(("127.0.0.1", port))
    ask = (
        "import socket, sys; c = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); c.shutdown(1);"
        " print(c.recv(100).decode())"
    )
    async with unix_server(tmp_path / "proxy.sock", echo_then_trailer) as path:
        argv = [str(forward), str(port), str(path), sys.executable, "-c", ask, str(port)]
        with anyio.fail_after(STEP_S):
            async with await anyio.open_process(argv) as process:
                # Release the port once forward sleeps between bind attempts (it found it taken).
                # No event says "another process entered a syscall": polled, bounded by fail_after.
                syscall = anyio.Path(f"/proc/{process.pid}/syscall")
                while (await syscall.read_text()).split()[0] != str(CLOCK_NANOSLEEP[machine]):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
                holder.close()
                assert process.stdout is not None
                out = bytearray()
                await drain(process.stdout, out)
                assert await process.wait() == 0
        assert out.decode().strip() == f"END 0 {hashlib.sha256(b'').hexdigest()}"
        # Held for good: after about 2 s the program runs anyway, told why on stderr.
        # Another port: the connection above left TIME_WAIT on this one, which a plain bind refuses.
        other = free_port()
        with socket.socket() as held:
            held.bind(("127.0.0.1", other))
            done = await run([str(forward), str(other), str(path), sys.executable, "-c", ask, str(other)])
    assert done.stderr.startswith(f"forward: cannot serve 127.0.0.1:{other}: Address already in use;")
    assert done.code == 1 and "ConnectionRefusedError" in done.stderr


async def test_a_program_that_cannot_be_run_exits_like_a_shell_and_bad_arguments_are_usage_errors(
    forward: Path, tmp_path: Path
) -> None:
    sock = str(tmp_path / "none.sock")
    missing = await run([str(forward), str(free_port()), sock, "/nonexistent/agent", "-p", "hi"])
    assert (missing.code, missing.stderr) == (127, "forward: /nonexistent/agent: No such file or directory\n")
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    denied = await run([str(forward), str(free_port()), sock, str(plain)])
    assert (denied.code, denied.stderr) == (126, f"forward: {plain}: Permission denied\n")
    for port in ("0", "65536", "80x", "-1", "", "+80"):
        usage = await run([str(forward), port, sock, "true"])
        assert usage.code == 2 and usage.stderr.startswith("usage: forward PORT SOCKET PROGRAM"), port
    assert (await run([str(forward), "8080", sock])).code == 2
    assert (await run([str(forward), "8080", "/" + "x" * 120, "true"])).code == 2


# -- in real containers with no network -----------------------------------------------------------


async def docker_run(image: str, forward: Path, socket_dir: Path, script: str) -> tuple[int, str]:
    argv = [
        "docker", "run", "--rm", "--network", "none", "--user", "1000:1000",
        "-v", f"{forward}:{IN_SANDBOX_PATH}:ro",
        "-v", f"{socket_dir}:{SANDBOX_EGRESS_DIR}:ro",
        image, "sh", "-c", script,
    ]  # fmt: skip
    with anyio.fail_after(STEP_S):
        result = await anyio.run_process(argv, check=False, stderr=subprocess.STDOUT)
    return result.returncode, result.stdout.decode("utf-8", "replace")


@pytest.mark.docker
@pytest.mark.parametrize(
    ("image", "client"),
    [
        (BUSYBOX_IMAGE, "wget -q -O - http://127.0.0.1:{port}/{path}"),
        (
            DEBIAN_IMAGE,
            'bash -c \'exec 3<>/dev/tcp/127.0.0.1/{port} && printf "GET /{path} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" >&3'
            " && cat <&3'",
        ),
    ],
)
async def test_in_a_container_without_network_the_mounted_socket_is_the_only_way_out(
    docker_available: None, forward: Path, tmp_path: Path, image: str, client: str
) -> None:
    socket_dir = tmp_path / "egress"
    socket_dir.mkdir(mode=0o755)
    socket_dir.chmod(0o755)
    reached: list[int] = []

    async def count(stream: SocketStream) -> None:
        reached.append(1)
        await stream.aclose()

    host_listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    host_port = host_listener.extra(SocketAttribute.local_port)
    direct = client.format(port=host_port, path="direct")
    forwarded = client.format(port=SANDBOX_PORT, path="forwarded")
    # A direct attempt to the host's port first (the container's loopback is its own), then the
    # same client under the forwarder, as the server runs an agent CLI.
    script = (
        f"if {direct}; then echo DIRECT REACHED; else echo direct refused; fi; "
        f"{IN_SANDBOX_PATH} {SANDBOX_PORT} {SANDBOX_SOCKET} {forwarded}"
    )
    async with (
        host_listener,
        anyio.create_task_group() as group,
        unix_server(socket_dir / Path(SANDBOX_SOCKET).name, http_hello),
    ):
        group.start_soon(host_listener.serve, count)
        code, out = await docker_run(image, forward, socket_dir, script)
        group.cancel_scope.cancel()
    assert code == 0, out
    assert "direct refused" in out and "DIRECT REACHED" not in out and reached == []
    assert "hello from the host socket; uid 1000 asked GET /forwarded HTTP/1.1" in out


def test_errno_names_used_here_match_the_platform() -> None:
    # The messages compared above are glibc's strerror texts; guard the assumption once.
    assert os.strerror(errno.ENOENT) == "No such file or directory"
    assert os.strerror(errno.EACCES) == "Permission denied"
    assert os.strerror(errno.EADDRINUSE) == "Address already in use"
