"""What is E2B-specific: the API key travels only as X-API-Key, never leaks into errors,
a rejected key reads as a clear error, deleting twice is harmless, a failed create leaves
no sandbox behind. All against the loopback stand-in of E2B's published API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from mcp_sandboxes.errors import InvalidInputError, ProviderError, ProviderUnavailableError
from mcp_sandboxes.providers.base import OWNER_LABEL, SandboxSpec
from mcp_sandboxes.providers.remote.e2b import E2BProvider
from tests.contract_servers.e2b import E2BStandIn, e2b_server

API_KEY = "e2b_" + "fedcba9876543210" * 2


@pytest.fixture
async def stand_in() -> AsyncIterator[tuple[E2BStandIn, str]]:
    async with e2b_server(API_KEY) as (server, state):
        yield state, server.url


def provider(url: str, key: str = API_KEY) -> E2BProvider:
    return E2BProvider({"api_key": key, "api_url": url, "sandbox_url": url})


@pytest.fixture
async def e2b(stand_in: tuple[E2BStandIn, str]) -> AsyncIterator[E2BProvider]:
    async with aclosing(provider(stand_in[1])) as opened:
        yield opened


async def test_the_api_key_is_sent_as_x_api_key_and_nowhere_else(
    stand_in: tuple[E2BStandIn, str], e2b: E2BProvider
) -> None:
    state, _ = stand_in
    sandbox = await e2b.create(SandboxSpec(image="base"))
    await sandbox.exec(["true"])
    await e2b.destroy(sandbox.id)
    control = [r for r in state.requests if r.path.startswith(("/sandboxes", "/v2/"))]
    envd = [r for r in state.requests if r.path.startswith(("/process.", "/files"))]
    assert control and envd
    assert all(r.headers.get("x-api-key") == API_KEY for r in control)
    # envd gets the per-sandbox access token, never the account key.
    assert all(API_KEY not in str(r.headers) for r in envd)
    assert all(r.headers.get("x-access-token") for r in envd)


async def test_a_rejected_key_is_a_clear_error_without_the_key(stand_in: tuple[E2BStandIn, str]) -> None:
    _, url = stand_in
    wrong = "e2b_wrong_key_" + "9" * 24
    async with aclosing(provider(url, wrong)) as e2b:
        with pytest.raises(ProviderUnavailableError) as caught:
            await e2b.create(SandboxSpec(image="base"))
        availability = await e2b.check()
    assert "401" in str(caught.value) and "E2B_API_KEY" in str(caught.value)
    assert wrong not in str(caught.value)
    assert not availability.available and "rejected" in (availability.reason or "")
    assert wrong not in (availability.reason or "") + (availability.fix or "")


async def test_check_without_a_key_names_the_variable_and_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    async with aclosing(E2BProvider({"api_url": "http://127.0.0.1:9"})) as e2b:
        availability = await e2b.check()
    assert not availability.available
    assert availability.reason == "E2B_API_KEY is not set"
    assert "providers.e2b.api_key" in (availability.fix or "")


async def test_the_key_can_come_from_the_environment(
    stand_in: tuple[E2BStandIn, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = stand_in
    monkeypatch.setenv("E2B_API_KEY", API_KEY)
    async with aclosing(E2BProvider({"api_url": url, "sandbox_url": url})) as e2b:
        assert (await e2b.check()).available


async def test_destroying_a_missing_sandbox_is_harmless(stand_in: tuple[E2BStandIn, str], e2b: E2BProvider) -> None:
    state, _ = stand_in
    sandbox = await e2b.create(SandboxSpec(image="base"))
    await e2b.destroy(sandbox.id)
    await e2b.destroy(sandbox.id)
    await e2b.destroy("i-never-existed")
    assert await e2b.attach(sandbox.id) is None
    assert state.sandboxes == {}


async def test_a_create_that_fails_after_the_sandbox_exists_deletes_it(
    stand_in: tuple[E2BStandIn, str], e2b: E2BProvider
) -> None:
    state, _ = stand_in
    state.fail_starts.append("internal")  # the workdir setup inside the new sandbox fails
    with pytest.raises(ProviderError):
        await e2b.create(SandboxSpec(image="base"))
    assert await e2b.list_owned() == []
    assert state.sandboxes == {}
    assert [r.method for r in state.requests if r.path.startswith("/sandboxes/")] == ["DELETE"]


async def test_an_unknown_template_names_the_image_field(e2b: E2BProvider) -> None:
    with pytest.raises(InvalidInputError, match="image"):
        await e2b.create(SandboxSpec(image="no-such-template"))


async def test_list_owned_filters_by_metadata(stand_in: tuple[E2BStandIn, str], e2b: E2BProvider) -> None:
    state, _ = stand_in
    ours = [await e2b.create(SandboxSpec(image="base")) for _ in range(3)]
    # A sandbox someone else made in the same account must never be listed as ours.
    foreign = await e2b.create(SandboxSpec(image="base"))
    state.sandboxes[foreign.id].metadata.pop(OWNER_LABEL)
    owned = set(await e2b.list_owned())
    assert owned == {s.id for s in ours}
