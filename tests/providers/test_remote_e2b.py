"""What is E2B-specific: the API key travels only as X-API-Key, never leaks into errors,
a rejected key reads as a clear error, deleting twice is harmless, a failed create leaves
no sandbox behind. All against the loopback stand-in of E2B's published API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mcp_sandboxes.errors import InvalidInputError, ProviderError, ProviderUnavailableError
from mcp_sandboxes.providers.base import OWNER_LABEL, SandboxSpec
from mcp_sandboxes.providers.e2b import E2BProvider
from tests.contract_servers.e2b import E2BStandIn
from tests.contract_servers.sandbox_host import LoopbackServer

API_KEY = "e2b_" + "fedcba9876543210" * 2


@pytest.fixture
async def stand_in() -> AsyncIterator[tuple[E2BStandIn, str]]:
    server_state = E2BStandIn(API_KEY)
    async with LoopbackServer(server_state.app, "e2b-stand-in") as server:
        yield server_state, server.url
    await server_state.close()


def provider(url: str, key: str = API_KEY) -> E2BProvider:
    return E2BProvider({"api_key": key, "api_url": url, "sandbox_url": url})


async def test_the_api_key_is_sent_as_x_api_key_and_nowhere_else(stand_in: tuple[E2BStandIn, str]) -> None:
    state, url = stand_in
    e2b = provider(url)
    try:
        sandbox = await e2b.create(SandboxSpec(image="base"))
        await sandbox.exec(["true"])
        await e2b.destroy(sandbox.id)
    finally:
        await e2b.aclose()
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
    e2b = provider(url, wrong)
    try:
        with pytest.raises(ProviderUnavailableError) as caught:
            await e2b.create(SandboxSpec(image="base"))
        availability = await e2b.check()
    finally:
        await e2b.aclose()
    assert "401" in str(caught.value) and "E2B_API_KEY" in str(caught.value)
    assert wrong not in str(caught.value)
    assert not availability.available and "rejected" in (availability.reason or "")
    assert wrong not in (availability.reason or "") + (availability.fix or "")


async def test_check_without_a_key_names_the_variable_and_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    e2b = E2BProvider({"api_url": "http://127.0.0.1:9"})
    try:
        availability = await e2b.check()
    finally:
        await e2b.aclose()
    assert not availability.available
    assert availability.reason == "E2B_API_KEY is not set"
    assert "providers.e2b.api_key" in (availability.fix or "")


async def test_the_key_can_come_from_the_environment(
    stand_in: tuple[E2BStandIn, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = stand_in
    monkeypatch.setenv("E2B_API_KEY", API_KEY)
    e2b = E2BProvider({"api_url": url, "sandbox_url": url})
    try:
        assert (await e2b.check()).available
    finally:
        await e2b.aclose()


async def test_destroying_a_missing_sandbox_is_harmless(stand_in: tuple[E2BStandIn, str]) -> None:
    state, url = stand_in
    e2b = provider(url)
    try:
        sandbox = await e2b.create(SandboxSpec(image="base"))
        await e2b.destroy(sandbox.id)
        await e2b.destroy(sandbox.id)
        await e2b.destroy("i-never-existed")
        assert await e2b.attach(sandbox.id) is None
    finally:
        await e2b.aclose()
    assert state.sandboxes == {}


async def test_a_create_that_fails_after_the_sandbox_exists_deletes_it(stand_in: tuple[E2BStandIn, str]) -> None:
    state, url = stand_in
    state.fail_starts.append("internal")  # the workdir setup inside the new sandbox fails
    e2b = provider(url)
    try:
        with pytest.raises(ProviderError):
            await e2b.create(SandboxSpec(image="base"))
        assert await e2b.list_owned() == []
    finally:
        await e2b.aclose()
    assert state.sandboxes == {}
    assert [r.method for r in state.requests if r.path.startswith("/sandboxes/")] == ["DELETE"]


async def test_an_unknown_template_names_the_image_field(stand_in: tuple[E2BStandIn, str]) -> None:
    _, url = stand_in
    e2b = provider(url)
    try:
        with pytest.raises(InvalidInputError, match="image"):
            await e2b.create(SandboxSpec(image="no-such-template"))
    finally:
        await e2b.aclose()


async def test_list_owned_filters_by_metadata(stand_in: tuple[E2BStandIn, str]) -> None:
    state, url = stand_in
    e2b = provider(url)
    try:
        ours = [await e2b.create(SandboxSpec(image="base")) for _ in range(3)]
        # A sandbox someone else made in the same account must never be listed as ours.
        foreign = await e2b.create(SandboxSpec(image="base"))
        state.sandboxes[foreign.id].metadata.pop(OWNER_LABEL)
        owned = set(await e2b.list_owned())
    finally:
        await e2b.aclose()
    assert owned == {s.id for s in ours}
