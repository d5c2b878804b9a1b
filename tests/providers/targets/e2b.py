"""E2B against its loopback stand-in (tests/contract_servers/e2b.py): the real provider code,
the vendor's wire contract, real commands in a bubblewrap sandbox behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.remote.e2b import E2BProvider
from tests.contract_servers.e2b import e2b_server
from tests.contract_servers.sandbox_host import bwrap_available
from tests.providers.targets import ConformanceTarget

API_KEY = "e2b_" + "0123456789abcdef" * 2


@asynccontextmanager
async def open_e2b() -> AsyncIterator[Provider]:
    async with (
        e2b_server(API_KEY) as (server, _stand_in),
        aclosing(E2BProvider({"api_key": API_KEY, "api_url": server.url, "sandbox_url": server.url})) as provider,
    ):
        yield provider


TARGETS = [
    ConformanceTarget(
        name="e2b",
        open_provider=open_e2b,
        spec=SandboxSpec(image="base"),
        available=bwrap_available,
    )
]
