"""E2B against its loopback stand-in (tests/contract_servers/e2b.py): the real provider code,
the vendor's wire contract, real commands in a bubblewrap sandbox behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.e2b import E2BProvider
from tests.contract_servers.e2b import E2BStandIn
from tests.contract_servers.sandbox_host import LoopbackServer, bwrap_available
from tests.providers.targets import ConformanceTarget

API_KEY = "e2b_" + "0123456789abcdef" * 2


@asynccontextmanager
async def open_e2b() -> AsyncIterator[Provider]:
    stand_in = E2BStandIn(API_KEY)
    async with LoopbackServer(stand_in.app, "e2b-stand-in") as server:
        provider = E2BProvider({"api_key": API_KEY, "api_url": server.url, "sandbox_url": server.url})
        try:
            yield provider
        finally:
            await provider.aclose()
    await stand_in.close()


TARGETS = [
    ConformanceTarget(
        name="e2b",
        open_provider=open_e2b,
        spec=SandboxSpec(image="base"),
        available=bwrap_available,
    )
]
