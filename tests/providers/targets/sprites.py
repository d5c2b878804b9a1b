"""Sprites, against the loopback contract server of the Sprites API (no sprites.dev account here)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.remote.sprites import SpritesProvider
from tests.contract_servers.sandbox_host import bwrap_available
from tests.contract_servers.sprites import sprites_server
from tests.providers.targets import ConformanceTarget


@asynccontextmanager
async def open_sprites() -> AsyncIterator[Provider]:
    token = f"sprites-{secrets.token_hex(16)}"
    async with (
        sprites_server(token=token) as (server, _state),
        aclosing(SpritesProvider.from_settings({"api_url": server.url, "token": token})) as provider,
    ):
        yield provider


TARGETS = [
    ConformanceTarget(
        # Sprites run Fly's standard image ("default") and always have a network.
        name="sprites-contract",
        open_provider=open_sprites,
        spec=SandboxSpec(image="default", workdir="/workspace", network="host"),
        available=bwrap_available,
    ),
]
