"""What is Daytona-specific: the bearer key (API and toolbox) never leaks into errors, a
rejected key reads as a clear error, deleting twice is harmless, a failed create leaves no
sandbox, and the logs-WebSocket demultiplexer copes with prefixes split across frames."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from mcp_sandboxes.errors import ProviderError, ProviderUnavailableError
from mcp_sandboxes.providers.base import SandboxSpec
from mcp_sandboxes.providers.remote.daytona import DaytonaProvider, _Demux
from tests.contract_servers.daytona import DaytonaStandIn, daytona_server

API_KEY = "dtn_" + "fedcba9876543210" * 4
SPEC = SandboxSpec(image="daytona-small")


@pytest.fixture
async def stand_in() -> AsyncIterator[tuple[DaytonaStandIn, str]]:
    async with daytona_server(API_KEY) as (server, state):
        yield state, f"{server.url}/api"


@pytest.fixture
async def daytona(stand_in: tuple[DaytonaStandIn, str]) -> AsyncIterator[DaytonaProvider]:
    async with aclosing(DaytonaProvider({"api_key": API_KEY, "api_url": stand_in[1]})) as provider:
        yield provider


async def test_every_call_carries_the_bearer_key(
    stand_in: tuple[DaytonaStandIn, str], daytona: DaytonaProvider
) -> None:
    state, _ = stand_in
    sandbox = await daytona.create(SPEC)
    async with sandbox.stream(["echo", "hi"]) as process:
        await process.close_stdin()
        assert [c.data async for c in process] == [b"hi\n"]
    await daytona.destroy(sandbox.id)
    paths = {r.path.split("/")[-1] for r in state.requests}
    assert {"sandbox", "execute", "session", "logs"} <= paths | {"sandbox"}
    assert all(r.headers.get("authorization") == f"Bearer {API_KEY}" for r in state.requests)


async def test_a_rejected_key_is_a_clear_error_without_the_key(stand_in: tuple[DaytonaStandIn, str]) -> None:
    _, url = stand_in
    wrong = "dtn_wrong_" + "7" * 40
    async with aclosing(DaytonaProvider({"api_key": wrong, "api_url": url})) as daytona:
        with pytest.raises(ProviderUnavailableError) as caught:
            await daytona.create(SPEC)
        availability = await daytona.check()
    assert "401" in str(caught.value) and "DAYTONA_API_KEY" in str(caught.value)
    assert wrong not in str(caught.value)
    assert not availability.available and wrong not in str(availability)


async def test_check_without_a_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    async with aclosing(DaytonaProvider({"api_url": "http://127.0.0.1:9/api"})) as daytona:
        availability = await daytona.check()
    assert availability.reason == "DAYTONA_API_KEY is not set"
    assert "providers.daytona.api_key" in (availability.fix or "")


async def test_destroying_twice_is_harmless(stand_in: tuple[DaytonaStandIn, str], daytona: DaytonaProvider) -> None:
    state, _ = stand_in
    sandbox = await daytona.create(SPEC)
    await daytona.destroy(sandbox.id)
    await daytona.destroy(sandbox.id)
    assert await daytona.attach(sandbox.id) is None
    assert state.sandboxes == {}


async def test_a_create_that_fails_inside_the_sandbox_deletes_it(
    stand_in: tuple[DaytonaStandIn, str], daytona: DaytonaProvider
) -> None:
    state, _ = stand_in
    state.fail_executes.append(500)  # the workdir setup fails
    with pytest.raises(ProviderError, match="500"):
        await daytona.create(SPEC)
    assert await daytona.list_owned() == []
    assert state.sandboxes == {}


def test_the_demultiplexer_handles_prefixes_split_across_frames() -> None:
    demux = _Demux()
    frames = [b"\x01\x01", b"\x01out\n\x02", b"\x02\x02err\n\x01\x01\x01more"]
    parts = [part for frame in frames for part in demux.feed(frame)]
    joined: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    for stream, data in parts:
        joined[stream] += data
    assert joined == {"stdout": b"out\nmore", "stderr": b"err\n"}
