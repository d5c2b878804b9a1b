"""What is specific to the Vercel Sandbox provider, against the loopback contract server."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import pytest

from mcp_sandboxes.errors import InvalidInputError, ProviderError
from mcp_sandboxes.providers.base import OWNER_LABEL, SandboxSpec
from mcp_sandboxes.providers.remote.vercel import VercelProvider
from tests.contract_servers.sandbox_host import LoopbackServer, require_bwrap
from tests.contract_servers.vercel import VercelState, vercel_server

TEAM = "team_remote_test"
PROJECT = "prj_remote_test"
SPEC = SandboxSpec(image="node24", network="none")
STEP_S = 30.0


@pytest.fixture(autouse=True)
def _needs_bwrap() -> None:
    require_bwrap()


@pytest.fixture
def token() -> str:
    return f"vercel-{secrets.token_hex(16)}"


@pytest.fixture
async def server(token: str) -> AsyncIterator[tuple[LoopbackServer, VercelState]]:
    async with vercel_server(token=token, team=TEAM, project=PROJECT) as started:
        yield started


def provider_for(url: str, token: str, team: str = TEAM) -> VercelProvider:
    return VercelProvider.from_settings({"api_url": url, "token": token, "team_id": team, "project_id": PROJECT})


@pytest.fixture
async def provider(server: tuple[LoopbackServer, VercelState], token: str) -> AsyncIterator[VercelProvider]:
    async with aclosing(provider_for(server[0].url, token)) as opened:
        yield opened


async def test_every_request_carries_the_bearer_token_and_the_team(
    server: tuple[LoopbackServer, VercelState], provider: VercelProvider, token: str
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(SPEC)
        await sandbox.exec(["true"])
        await sandbox.put_file("/workspace/x", b"x")
        await provider.destroy(sandbox.id)
    assert len(state.requests) >= 6
    assert {headers.get("authorization") for _, _, headers, _ in state.requests} == {f"Bearer {token}"}
    assert {query.get("teamId") for _, _, _, query in state.requests} == {TEAM}


async def test_a_rejected_token_gives_a_clear_error_that_never_contains_the_key(
    server: tuple[LoopbackServer, VercelState],
) -> None:
    loopback, state = server
    wrong = f"vercel-wrong-{secrets.token_hex(16)}"
    async with aclosing(provider_for(loopback.url, wrong)) as provider:
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
            with pytest.raises(ProviderError) as raised:
                await provider.create(SPEC)
    assert not availability.available and "403" in (availability.reason or "")
    assert wrong not in (availability.reason or "") + (availability.fix or "")
    message = str(raised.value)
    assert "forbidden" in message and "VERCEL_TOKEN" in message
    assert wrong not in message
    assert state.sandboxes == {}


async def test_a_token_of_another_team_is_refused(server: tuple[LoopbackServer, VercelState], token: str) -> None:
    loopback, _state = server
    async with aclosing(provider_for(loopback.url, token, team="team_someone_else")) as provider:
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
    assert not availability.available
    assert "Not authorized" in (availability.reason or "")
    assert "VERCEL_TEAM_ID" in (availability.fix or "")


async def test_check_names_what_is_missing_and_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VERCEL_TOKEN", "VERCEL_PROJECT_ID", "VERCEL_TEAM_ID"):
        monkeypatch.delenv(name, raising=False)
    no_token = await VercelProvider.from_settings({"project_id": PROJECT}).check()
    no_project = await VercelProvider.from_settings({"token": "x" * 20}).check()
    assert not no_token.available and "VERCEL_TOKEN" in (no_token.reason or "")
    assert no_token.fix and "Tokens" in no_token.fix
    assert not no_project.available and "VERCEL_PROJECT_ID" in (no_project.reason or "")


async def test_destroying_an_unknown_sandbox_is_harmless(
    server: tuple[LoopbackServer, VercelState], provider: VercelProvider
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        await provider.destroy("mcp-000000000000")
    method, path, _headers, query = state.requests[-1]
    assert (method, path, query.get("projectId")) == ("DELETE", "/v2/sandboxes/mcp-000000000000", PROJECT)


async def test_a_sandbox_whose_setup_fails_is_deleted(
    server: tuple[LoopbackServer, VercelState], provider: VercelProvider
) -> None:
    _, state = server
    # /usr is read-only in the sandbox, so creating the workdir fails after the sandbox exists.
    with anyio.fail_after(STEP_S), pytest.raises(ProviderError, match="could not create workdir"):
        await provider.create(SPEC.model_copy(update={"workdir": "/usr/not-allowed"}))
    with anyio.fail_after(STEP_S):
        owned = await provider.list_owned()
    assert owned == []
    assert state.sandboxes == {}
    assert [path for method, path, _, _ in state.requests if method == "DELETE"] != []


async def test_sandboxes_are_tagged_and_network_none_denies_all(
    server: tuple[LoopbackServer, VercelState], provider: VercelProvider
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(SPEC.model_copy(update={"labels": {"team": "blue"}}))
        interfaces = await sandbox.exec(["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"])
    record = state.sandboxes[sandbox.id]
    assert record.tags[OWNER_LABEL] == "true" and record.tags["team"] == "blue"
    assert record.network_policy == {"mode": "deny-all"}
    assert interfaces.stdout.split() == [b"lo"]


async def test_a_runtime_vercel_does_not_have_is_refused_and_nothing_is_left(
    server: tuple[LoopbackServer, VercelState], provider: VercelProvider
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S), pytest.raises(ProviderError, match="runtime"):
        await provider.create(SandboxSpec(image="mcp-sandboxes/base:latest"))
    assert state.sandboxes == {}


async def test_host_mounts_are_refused_with_the_fix() -> None:
    async with aclosing(VercelProvider.from_settings({"token": "x" * 20, "project_id": PROJECT})) as provider:
        with pytest.raises(InvalidInputError, match="put_file"):
            await provider.create(SandboxSpec(image="node24", mounts=[{"source": "/etc", "target": "/x"}]))  # type: ignore[list-item]


async def test_attach_after_a_restart_keeps_the_workdir(server: tuple[LoopbackServer, VercelState], token: str) -> None:
    loopback, _state = server
    async with aclosing(provider_for(loopback.url, token)) as first:
        with anyio.fail_after(STEP_S):
            created = await first.create(SPEC.model_copy(update={"workdir": "/workspace/project"}))
    # A new process would build a new provider.
    async with aclosing(provider_for(loopback.url, token)) as second:
        with anyio.fail_after(STEP_S):
            attached = await second.attach(created.id)
            assert attached is not None
            result = await attached.exec(["pwd"])
    assert result.stdout == b"/workspace/project\n"
