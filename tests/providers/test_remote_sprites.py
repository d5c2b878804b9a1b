"""What is specific to the Sprites provider, against the loopback contract server."""

from __future__ import annotations

import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import pytest

from mcp_sandboxes.errors import InvalidInputError, ProviderError
from mcp_sandboxes.providers.base import SandboxSpec
from mcp_sandboxes.providers.remote.sprites import OWNER_TAG, SpritesProvider, SpritesSandbox
from tests.contract_servers.sandbox_host import LoopbackServer, require_bwrap
from tests.contract_servers.sprites import SpritesState, sprites_server

SPEC = SandboxSpec(image="default", network="host")
STEP_S = 30.0


@pytest.fixture(autouse=True)
def _needs_bwrap() -> None:
    require_bwrap()


@pytest.fixture
def token() -> str:
    return f"sprites-{secrets.token_hex(16)}"


@pytest.fixture
async def server(token: str) -> AsyncIterator[tuple[LoopbackServer, SpritesState]]:
    async with sprites_server(token=token) as started:
        yield started


def provider_for(url: str, token: str) -> SpritesProvider:
    return SpritesProvider.from_settings({"api_url": url, "token": token})


@pytest.fixture
async def provider(server: tuple[LoopbackServer, SpritesState], token: str) -> AsyncIterator[SpritesProvider]:
    async with aclosing(provider_for(server[0].url, token)) as opened:
        yield opened


async def test_every_request_and_websocket_carries_the_bearer_token(
    server: tuple[LoopbackServer, SpritesState], provider: SpritesProvider, token: str
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(SPEC)
        await sandbox.exec(["true"])
        await sandbox.put_file("/workspace/x", b"x")
        await provider.destroy(sandbox.id)
    methods = {method for method, _, _ in state.requests}
    assert {"POST", "WS", "PUT", "DELETE"} <= methods
    assert {headers.get("authorization") for _, _, headers in state.requests} == {f"Bearer {token}"}


async def test_a_rejected_token_gives_a_clear_error_that_never_contains_the_key(
    server: tuple[LoopbackServer, SpritesState], token: str
) -> None:
    loopback, state = server
    wrong = f"sprites-wrong-{secrets.token_hex(16)}"
    async with aclosing(provider_for(loopback.url, wrong)) as provider:
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
            with pytest.raises(ProviderError) as raised:
                await provider.create(SPEC)
    assert not availability.available and "401" in (availability.reason or "")
    assert wrong not in (availability.reason or "") + (availability.fix or "")
    assert "SPRITE_TOKEN" in str(raised.value) and wrong not in str(raised.value)
    assert state.sprites == {}


async def test_a_websocket_refused_for_its_token_does_not_leak_it(
    server: tuple[LoopbackServer, SpritesState], provider: SpritesProvider
) -> None:
    loopback, _state = server
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(SPEC)
    wrong = f"sprites-wrong-{secrets.token_hex(16)}"
    # The exec WebSocket itself is refused (HTTP 401 before the upgrade).
    async with aclosing(provider_for(loopback.url, wrong)) as impostor:
        with anyio.fail_after(STEP_S), pytest.raises(ProviderError) as raised:
            await SpritesSandbox(impostor, sandbox.id, SPEC).exec(["true"])
    assert "401" in str(raised.value) and wrong not in str(raised.value)


async def test_check_names_what_is_missing_and_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPRITE_TOKEN", raising=False)
    monkeypatch.delenv("SPRITES_TOKEN", raising=False)
    availability = await SpritesProvider.from_settings({}).check()
    assert not availability.available and "SPRITE_TOKEN" in (availability.reason or "")
    assert availability.fix and "sprites.dev/account" in availability.fix


async def test_destroying_an_unknown_sprite_is_harmless(
    server: tuple[LoopbackServer, SpritesState], provider: SpritesProvider
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        await provider.destroy("mcp-000000000000")
    assert state.requests[-1][:2] == ("DELETE", "/v1/sprites/mcp-000000000000")


async def test_a_sprite_whose_setup_fails_is_deleted(
    server: tuple[LoopbackServer, SpritesState], provider: SpritesProvider
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S), pytest.raises(ProviderError, match="could not create workdir"):
        await provider.create(SPEC.model_copy(update={"workdir": "/usr/not-allowed"}))
    assert state.sprites == {}


async def test_sprites_are_labelled_and_listed_by_label(
    server: tuple[LoopbackServer, SpritesState], provider: SpritesProvider
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(SPEC)
        # A sprite with our name prefix but without our label is not ours.
        await provider.api.request("POST", "/v1/sprites", json={"name": "mcp-someone-elses"}, ok=(201,))
        owned = await provider.list_owned()
    assert state.sprites[sandbox.id].labels == [OWNER_TAG]
    assert owned == [sandbox.id]


async def test_signals_travel_over_the_websocket_when_the_server_offers_it(
    server: tuple[LoopbackServer, SpritesState], provider: SpritesProvider
) -> None:
    _, state = server
    with anyio.fail_after(STEP_S):
        sandbox = await provider.create(SPEC)
        async with sandbox.stream(["sleep", "600"]) as process:
            await process.signal(signal.SIGINT)
            code = await process.wait()
    assert code == 128 + signal.SIGINT
    assert state.signals_over_ws == ["INT"]


async def test_images_other_than_the_sprite_image_are_refused_with_the_fix() -> None:
    async with aclosing(SpritesProvider.from_settings({"token": "x" * 20})) as provider:
        with pytest.raises(InvalidInputError, match="image = 'default'"):
            await provider.create(SandboxSpec(image="mcp-sandboxes/base:latest", network="host"))
        with pytest.raises(InvalidInputError, match="network"):
            await provider.create(SandboxSpec(image="default"))
