"""Fly Machines, against the loopback contract server of the Machines API (no Fly account here)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.remote.fly import FlyProvider
from tests.contract_servers.fly import fly_server
from tests.contract_servers.sandbox_host import bwrap_available
from tests.providers.targets import ConformanceTarget

APP = "mcp-sandboxes-conformance"


@asynccontextmanager
async def open_fly() -> AsyncIterator[Provider]:
    token = f"fly-{secrets.token_hex(16)}"
    async with fly_server(token=token, app=APP) as (server, _state):
        # The stand-in has no rate limit by default, so the output of streams can be polled faster than on Fly.
        settings = {"api_url": server.url, "api_token": token, "app": APP, "poll_interval_s": 0.2}
        async with aclosing(FlyProvider.from_settings(settings)) as provider:
            yield provider


TARGETS = [
    ConformanceTarget(
        # Fly Machines always have a network, so the spec asks for "host" (its own network).
        name="fly-contract",
        open_provider=open_fly,
        spec=SandboxSpec(image="registry-1.docker.io/library/debian:bookworm", workdir="/workspace", network="host"),
        available=bwrap_available,
    ),
]
