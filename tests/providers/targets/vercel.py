"""Vercel Sandbox, against the loopback contract server of the Sandbox REST API (no Vercel account here)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.remote.vercel import VercelProvider
from tests.contract_servers.sandbox_host import bwrap_available
from tests.contract_servers.vercel import vercel_server
from tests.providers.targets import ConformanceTarget

TEAM = "team_conformance"
PROJECT = "prj_conformance"


@asynccontextmanager
async def open_vercel() -> AsyncIterator[Provider]:
    token = f"vercel-{secrets.token_hex(16)}"
    async with vercel_server(token=token, team=TEAM, project=PROJECT) as (server, _state):
        settings = {"api_url": server.url, "token": token, "team_id": TEAM, "project_id": PROJECT}
        async with aclosing(VercelProvider.from_settings(settings)) as provider:
            yield provider


TARGETS = [
    ConformanceTarget(
        # network "none" maps to Vercel's deny-all network policy.
        name="vercel-contract",
        open_provider=open_vercel,
        spec=SandboxSpec(image="node24", workdir="/workspace", network="none"),
        available=bwrap_available,
    ),
]
