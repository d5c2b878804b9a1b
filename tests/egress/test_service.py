"""The orchestrator's egress service on real sockets (no sandbox): where socket directories go,
how a pooled sandbox's directory follows its session, what start-up pruning keeps, what the
default settings let through, and a bad forwarder_path."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from mcp_sandboxes.config import load_settings
from mcp_sandboxes.egress.plan import SOCKET_NAME
from mcp_sandboxes.errors import ProviderError
from mcp_sandboxes.events import NetworkRefused
from mcp_sandboxes.orchestrator.egress import EgressService, sockets_root

STEP_S = 20.0


@asynccontextmanager
async def service(data: Path, **environ: str) -> AsyncIterator[tuple[EgressService, list[tuple[str, NetworkRefused]]]]:
    refused: list[tuple[str, NetworkRefused]] = []

    async def emit(session_id: str, events: list[NetworkRefused]) -> None:
        refused.extend((session_id, event) for event in events)

    settings = load_settings(environ={"MCP_SANDBOXES_DATA_DIR": str(data), **environ})
    egress = EgressService(settings, {"ANTHROPIC_API_KEY": "sk-real-key-for-the-service-test"}, emit)
    async with egress.proxy() as proxy:
        egress.attach(proxy)
        try:
            yield egress, refused
        finally:
            egress.attach(None)


def socket_of(mounts_source: str) -> Path:
    return Path(mounts_source) / SOCKET_NAME


async def connect_status(socket_path: Path, target: str) -> int:
    with anyio.fail_after(STEP_S):
        async with await anyio.connect_unix(str(socket_path)) as stream:
            await stream.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = await stream.receive()
    return int(head.split()[1])


async def test_a_long_data_dir_puts_sockets_in_a_private_short_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    root = sockets_root(deep / "egress")
    assert root != deep / "egress" and len(str(root)) < 60
    assert sockets_root(Path("/var/lib/x/egress")) == Path("/var/lib/x/egress")
    async with service(deep) as (egress, _):
        plan, _backend = egress.backend_for("ses_long", "claude", [])
        mounts = await egress.sandbox_mounts("ses_long")
        await egress.open("ses_long", "ses_long", plan, agent_endpoint=False)
        sock = socket_of(mounts[0].source)
        assert sock.is_socket() and len(str(sock)) <= 107
        assert (sock.parent.parent.stat().st_mode & 0o777) == 0o700 and (sock.parent.stat().st_mode & 0o777) == 0o755
        await egress.close("ses_long")
        assert not sock.parent.exists()


async def test_a_pooled_sandboxs_directory_follows_its_session_and_goes_with_it(tmp_path: Path) -> None:
    async with service(tmp_path / "data") as (egress, _):
        mounts = await egress.sandbox_mounts("mcp-sandboxes-pool-abc")
        pooled_dir = Path(mounts[0].source)
        plan, _backend = egress.backend_for("ses_taken", "claude", [])
        await egress.open("mcp-sandboxes-pool-abc", "ses_taken", plan, agent_endpoint=False)
        # Served where the pooled sandbox has it mounted.
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(pooled_dir / SOCKET_NAME))) as http:
            answer = await http.get("http://sandbox/nowhere")
        assert answer.status_code == 404
        # Start-up pruning keeps a live session's directory (through its link) and drops the rest.
        stray = Path((await egress.sandbox_mounts("gone"))[0].source)
        await egress.prune({"ses_taken"})
        assert await anyio.Path(pooled_dir).is_dir() and not await anyio.Path(stray).exists()
        await egress.close("ses_taken")
        assert not await anyio.Path(pooled_dir).exists()
        # Nothing but the forwarder's cache is left.
        assert [p.name async for p in anyio.Path(pooled_dir.parent).iterdir()] == ["bin"]


async def test_by_default_an_allowed_name_that_is_this_host_is_refused(tmp_path: Path) -> None:
    for allow_private, expected in ((None, 403), ("true", 200)):
        extra = {} if allow_private is None else {"MCP_SANDBOXES_EGRESS__ALLOW_PRIVATE_ADDRESSES": allow_private}
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, service(tmp_path / f"data-{expected}", **extra) as (egress, refused):
            plan, _backend = egress.backend_for("ses_a", "claude", ["localhost"])
            mounts = await egress.sandbox_mounts("ses_a")
            await egress.open("ses_a", "ses_a", plan, agent_endpoint=False)
            assert await connect_status(socket_of(mounts[0].source), f"localhost:{port}") == expected
            if expected == 403:
                assert refused and refused[0][0] == "ses_a" and refused[0][1].target == f"localhost:{port}"
            await egress.close("ses_a")


async def test_a_forwarder_path_that_is_no_program_is_refused_by_name(tmp_path: Path) -> None:
    not_a_program = tmp_path / "forward"
    not_a_program.write_text("nope")
    async with service(tmp_path / "data", MCP_SANDBOXES_EGRESS__FORWARDER_PATH=str(not_a_program)) as (egress, _):
        with pytest.raises(ProviderError, match=r"egress\.forwarder_path: .* is not an executable file"):
            await egress.check_available()
    not_a_program.chmod(0o755)
    async with service(tmp_path / "data", MCP_SANDBOXES_EGRESS__FORWARDER_PATH=str(not_a_program)) as (egress, _):
        mounts = await egress.sandbox_mounts("ses_b")
        # Copied into the data directory (the path an engine's host shares with a containerised server).
        copied = Path(mounts[1].source)
        assert copied.parent == tmp_path / "data" / "egress" / "bin" and os.access(copied, os.X_OK)
        assert await anyio.Path(copied).read_text() == "nope"


async def test_sessions_that_ended_without_a_stop_are_no_longer_served(tmp_path: Path) -> None:
    async with service(tmp_path / "data") as (egress, _):
        sockets = {}
        for session_id in ("ses_live", "ses_failed"):
            plan, _backend = egress.backend_for(session_id, "claude", [])
            sockets[session_id] = socket_of((await egress.sandbox_mounts(session_id))[0].source)
            await egress.open(session_id, session_id, plan, agent_endpoint=False)
        await egress.close_ended({"ses_live"})
        assert await anyio.Path(sockets["ses_live"]).is_socket()
        assert not await anyio.Path(sockets["ses_failed"].parent).exists()


async def test_a_target_refused_again_is_reported_once(tmp_path: Path) -> None:
    async with service(tmp_path / "data") as (egress, refused):
        plan, _backend = egress.backend_for("ses_r", "claude", [])
        mounts = await egress.sandbox_mounts("ses_r")
        await egress.open("ses_r", "ses_r", plan, agent_endpoint=False)
        for target in ("telemetry.example:443", "telemetry.example:443", "other.example:443"):
            assert await connect_status(socket_of(mounts[0].source), target) == 403
        assert [event.target for _, event in refused] == ["telemetry.example:443", "other.example:443"]
