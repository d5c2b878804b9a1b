"""Daytona against its loopback stand-in (tests/contract_servers/daytona.py): the real provider
code, the vendor's REST + toolbox + logs-WebSocket contract, real commands behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.remote.daytona import DaytonaProvider
from tests.contract_servers.daytona import daytona_server
from tests.contract_servers.sandbox_host import bwrap_available
from tests.providers.targets import ConformanceTarget

API_KEY = "dtn_" + "0123456789abcdef" * 4


@asynccontextmanager
async def open_daytona() -> AsyncIterator[Provider]:
    async with (
        daytona_server(API_KEY) as (server, _stand_in),
        aclosing(DaytonaProvider({"api_key": API_KEY, "api_url": f"{server.url}/api"})) as provider,
    ):
        yield provider


TARGETS = [
    ConformanceTarget(
        name="daytona",
        open_provider=open_daytona,
        spec=SandboxSpec(image="daytona-small"),
        available=bwrap_available,
    )
]
