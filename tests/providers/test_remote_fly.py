"""What is specific to the Fly Machines provider, against the loopback contract server."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import pytest

from mcp_sandboxes.errors import InvalidInputError, ProviderError
from mcp_sandboxes.providers.base import OWNER_LABEL, SandboxSpec
from mcp_sandboxes.providers.remote.fly import FlyProvider
from tests.contract_servers.fly import FlyState, fly_server
from tests.contract_servers.host_reaper import processes_of
from tests.contract_servers.sandbox_host import LoopbackServer, require_bwrap

APP = "mcp-sandboxes-remote-test"
SPEC = SandboxSpec(image="debian:bookworm", network="host")
STEP_S = 30.0


@pytest.fixture(autouse=True)
def _needs_bwrap() -> None:
    require_bwrap()


@pytest.fixture
def token() -> str:
    return f"fly-{secrets.token_hex(16)}"


@pytest.fixture
async def server(token: str) -> AsyncIterator[tuple[LoopbackServer, FlyState]]:
    async with fly_server(token=token, app=APP) as started:
        yield started


def provider_for(url: str, token: str, **extra: object) -> FlyProvider:
    return FlyProvider.from_settings({"api_url": url, "api_token": token, "app": APP, **extra})


@pytest.fixture
async def provider(server: tuple[LoopbackServer, FlyState], token: str) -> AsyncIterator[FlyProvider]:
    async with aclosing(provider_for(server[0].url, token)) as opened:
        yield opened


async def test_every_request_carries_the_bearer_token(
    server: tuple[LoopbackServer, FlyState], provider: FlyProvider, token: str
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(SPEC)
        await sandbox.exec(["true"])
        await provider.destroy(sandbox.id)
    assert len(state.requests) >= 4
    assert {headers.get("authorization") for _, _, headers in state.requests} == {f"Bearer {token}"}


async def test_a_rejected_token_gives_a_clear_error_that_never_contains_the_key(
    server: tuple[LoopbackServer, FlyState],
) -> None:
    loopback, state = server
    wrong = f"fly-wrong-{secrets.token_hex(16)}"
    async with aclosing(provider_for(loopback.url, wrong)) as provider:
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
            with pytest.raises(ProviderError) as raised:
                await provider.create(SPEC)
    assert not availability.available
    assert availability.reason is not None and "401" in availability.reason
    assert wrong not in (availability.reason or "") + (availability.fix or "")
    message = str(raised.value)
    assert "401" in message and "FLY_API_TOKEN" in message
    assert wrong not in message
    assert state.machines == {}


async def test_an_unreachable_api_is_unavailable_without_leaking_the_key(token: str) -> None:
    async with aclosing(provider_for("http://127.0.0.1:9", token)) as provider:
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
            with pytest.raises(ProviderError) as raised:
                await provider.list_owned()
    assert not availability.available
    assert "cannot reach" in (availability.reason or "")
    assert token not in (availability.reason or "") and token not in str(raised.value)


async def test_check_names_what_is_missing_and_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLY_API_TOKEN", raising=False)
    monkeypatch.delenv("FLY_APP_NAME", raising=False)
    no_token = await FlyProvider.from_settings({"app": APP}).check()
    no_app = await FlyProvider.from_settings({"api_token": "x" * 20}).check()
    assert not no_token.available and "FLY_API_TOKEN" in (no_token.reason or "")
    assert no_token.fix and "fly tokens create" in no_token.fix
    assert not no_app.available and "providers.fly.app" in (no_app.reason or "") + (no_app.fix or "")


async def test_the_token_and_app_come_from_the_environment(
    server: tuple[LoopbackServer, FlyState], token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loopback, _state = server
    monkeypatch.setenv("FLY_API_TOKEN", token)
    monkeypatch.setenv("FLY_APP_NAME", APP)
    async with aclosing(FlyProvider.from_settings({"api_url": loopback.url})) as provider:
        with anyio.fail_after(STEP_S):
            assert (await provider.check()).available


async def test_destroying_an_unknown_machine_is_harmless(
    server: tuple[LoopbackServer, FlyState], provider: FlyProvider
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        await provider.destroy("0123456789abcd")
    assert ("DELETE", f"/v1/apps/{APP}/machines/0123456789abcd", state.requests[-1][2]) == state.requests[-1]


async def test_a_machine_that_never_starts_is_force_deleted(token: str) -> None:
    async with (
        fly_server(token=token, app=APP, never_start=True) as (loopback, state),
        aclosing(provider_for(loopback.url, token, create_timeout_s=2.0)) as provider,
    ):
        with anyio.fail_after(STEP_S), pytest.raises(ProviderError, match=r"not ready within 2s|408"):
            await provider.create(SPEC)
        with anyio.fail_after(STEP_S):
            owned = await provider.list_owned()
    assert owned == []
    assert [m.state for m in state.machines.values()] == ["destroyed"]
    deletes = [path for method, path, _ in state.requests if method == "DELETE"]
    assert len(deletes) == 1


async def test_machines_carry_the_owner_label_in_their_metadata(
    server: tuple[LoopbackServer, FlyState], provider: FlyProvider
) -> None:
    _, state = server
    spec = SPEC.model_copy(update={"labels": {"team": "blue"}, "env": {"A": "1"}})
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(spec)
    config = state.machines[sandbox.id].config
    assert config["metadata"][OWNER_LABEL] == "true"
    assert config["metadata"]["team"] == "blue"
    assert config["env"] == {"A": "1"}
    assert config["image"] == "debian:bookworm"


async def test_rate_limited_execs_are_retried_until_they_succeed(token: str) -> None:
    async with (
        fly_server(token=token, app=APP, rate_limit=True) as (loopback, state),
        aclosing(provider_for(loopback.url, token)) as provider,
    ):
        with anyio.fail_after(60):
            sandbox = await provider.create(SPEC)
            results = [await sandbox.exec(["echo", str(i)]) for i in range(3)]
    assert [r.stdout for r in results] == [b"0\n", b"1\n", b"2\n"]
    assert state.rate_limited > 0


async def test_network_none_and_host_mounts_are_refused_with_the_fix() -> None:
    async with aclosing(FlyProvider.from_settings({"api_token": "x" * 20, "app": APP})) as provider:
        with pytest.raises(InvalidInputError, match="network"):
            await provider.create(SandboxSpec(image="debian", network="none"))
        with pytest.raises(InvalidInputError, match="put_file"):
            await provider.create(
                SandboxSpec(image="debian", network="host", mounts=[{"source": "/etc", "target": "/x"}])  # type: ignore[list-item]
            )


async def test_attach_after_a_restart_keeps_the_workdir_and_env(
    server: tuple[LoopbackServer, FlyState], token: str
) -> None:
    loopback, _state = server
    spec = SPEC.model_copy(update={"workdir": "/workspace/project", "env": {"GREETING": "hi"}})
    async with aclosing(provider_for(loopback.url, token)) as first:
        with anyio.fail_after(STEP_S):
            created = await first.create(spec)
    # A new process would build a new provider.
    async with aclosing(provider_for(loopback.url, token)) as second:
        with anyio.fail_after(STEP_S):
            attached = await second.attach(created.id)
            assert attached is not None
            result = await attached.exec(["sh", "-c", 'pwd; echo "$GREETING"'])
    assert result.stdout == b"/workspace/project\nhi\n"


async def test_destroy_ends_a_streamed_command_that_runs_detached(
    server: tuple[LoopbackServer, FlyState], token: str
) -> None:
    loopback, state = server
    async with aclosing(provider_for(loopback.url, token, poll_interval_s=0.1)) as provider:
        with anyio.fail_after(STEP_S):
            sandbox = await provider.create(SPEC)
            local = state.machines[sandbox.id].local
            async with sandbox.stream(["sh", "-c", "echo up; exec sleep 600"]) as process:
                async for chunk in process:
                    if b"up" in chunk.data:
                        break
                running = processes_of(local)
                await provider.destroy(sandbox.id)
            left = processes_of(local)
    assert running, "the detached command should have been running"
    assert left == []
